"""``pip install .`` gives a working product: the wheel carries the demo model and adapters, and its
``shira studio`` command serves the studio's API on the demo model from outside the checkout."""

import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from PIL import Image

from shira_diffusion.testing import free_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A fresh venv holding only the wheel; the test environment's packages (torch, diffusers, ...)
    are visible through a .pth file, so nothing is downloaded and the checkout is never on the path."""
    tmp = tmp_path_factory.mktemp("install")
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)  # noqa: E731
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), str(ROOT))
    wheel = next((tmp / "dist").glob("shira_studio-*.whl"))
    venv = tmp / "venv"
    run(sys.executable, "-m", "venv", "--without-pip", str(venv))
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "test-environment.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    run(sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q", str(wheel))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PATH=f"{venv / 'bin'}:{env.get('PATH', '')}")
    return wheel, venv, env, tmp


def test_the_wheel_carries_the_package_the_studio_and_the_demo_assets(installed):
    import zipfile

    wheel, venv, env, tmp = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "shira_diffusion/app/studio.py" in names and "shira_diffusion/loading.py" in names
    assert "shira_diffusion/assets/demo/model_index.json" in names
    assert sum(n.startswith("shira_diffusion/assets/adapters/") and n.endswith(".safetensors") for n in names) == 18
    assert not any(n.startswith(("tests/", "app/", "benchmarks/", "training/")) for n in names)
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import shira_diffusion; print(shira_diffusion.__file__)"],
                           cwd=tmp, env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert Path(where).is_relative_to(venv), where  # the installed copy, not the checkout


def test_shira_studio_serves_the_api_on_the_demo_model(installed):
    from gradio_client import Client

    _, venv, env, tmp = installed
    shira = str(venv / "bin" / "shira")
    helped = subprocess.run([shira, "studio", "--help"], cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and helped.stdout.startswith("usage: shira studio")
    assert all(flag in helped.stdout for flag in ("--offload", "--vae", "--compile", "--max-adapters-mb"))
    listed = subprocess.run([shira, "--help"], cwd=tmp, env=env, capture_output=True, text=True, timeout=120)
    assert "studio" in listed.stdout
    port = free_port()
    server = subprocess.Popen([shira, "studio", "--port", str(port)], cwd=tmp, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    try:
        deadline, client = time.time() + 240, None
        while client is None and time.time() < deadline and server.poll() is None:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:  # not listening yet
                time.sleep(1)
        assert client is not None, server.stdout.read() if server.poll() is not None else "no answer in 240 s"
        path, status, table, _ = client.predict("a red circle", "", 0, 2, 5.0, 64, 64, "model default", 1, 1, "swap", "sks-shira-rand",
                                                1.0, "", *(["", 1.0] * 4), *([""] * 4), api_name="/generate")
        assert status.startswith("sks-shira-rand x1: switch") and Path(path).is_file()
        assert "Steps: 2" in Image.open(path).info["parameters"]  # a PNG with its parameters, from the installed package
        assert len(table["data"]) == 18  # the demo adapters, from the package data
    finally:
        server.terminate()
        server.wait(timeout=30)
