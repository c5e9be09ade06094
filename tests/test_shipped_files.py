"""What the repository ships (demo model, demo adapters, benchmark records) names no machine's folders."""

import json
import re
from pathlib import Path

import pytest
from safetensors import safe_open

from shira_diffusion import SparseAdapter
from shira_diffusion.adapter import portable_model_id
from shira_diffusion.demo.model import ADAPTERS_DIR, DEMO_DIR

ROOT = Path(__file__).resolve().parents[1]
ABSOLUTE = re.compile(r'(^|["\s=:(])(/[\w.-]+/[\w.-]|[A-Za-z]:\\|~/)')


def strings(value):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from strings(k)
            yield from strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from strings(v)
    elif isinstance(value, str):
        yield value


def shipped_records():
    for path in sorted([*(ROOT / "shira_diffusion" / "assets").rglob("*"), *(ROOT / "benchmarks" / "results").rglob("*"),
                        ROOT / "training" / "demo_recipes.json"]):
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                yield path, list(strings(dict(f.metadata() or {})))
        elif path.suffix == ".json":
            yield path, list(strings(json.loads(path.read_text())))


def test_the_pattern_catches_absolute_paths():
    assert ABSOLUTE.search('"/home/me/assets/demo"') and ABSOLUTE.search("C:\\Users\\me") and ABSOLUTE.search("/tmp/x/y")
    assert not ABSOLUTE.search("assets/demo") and not ABSOLUTE.search("stabilityai/stable-diffusion-xl-base-1.0")


def test_no_shipped_file_records_an_absolute_path():
    records = list(shipped_records())
    assert len(records) >= 18 + 4  # the adapters and the demo model's weights at least
    offenders = [(path.relative_to(ROOT), s) for path, texts in records for s in texts if ABSOLUTE.search(s)]
    assert not offenders, offenders[:5]


@pytest.mark.parametrize("path", sorted(ADAPTERS_DIR.glob("*shira*.safetensors")), ids=lambda p: p.stem)
def test_shipped_shira_adapters_name_the_demo_model(path):
    assert SparseAdapter.load(path).metadata["base_model"] == "demo"


def test_portable_model_id(tmp_path):
    assert portable_model_id(DEMO_DIR) == "demo" and portable_model_id(str(DEMO_DIR) + "/") == "demo"
    assert portable_model_id(tmp_path / "my-sdxl") == "my-sdxl"  # a local folder, even one that is gone
    (tmp_path / "ckpt.safetensors").write_bytes(b"")
    assert portable_model_id(tmp_path / "ckpt.safetensors") == "ckpt.safetensors"
    assert portable_model_id("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    assert portable_model_id("demo") == "demo" and portable_model_id(None) is None


def test_saving_never_writes_a_local_path(tmp_path):
    from shira_diffusion import find_targets
    from shira_diffusion.testing import random_adapter, tiny_sdxl_pipeline

    adapter = random_adapter(find_targets(tiny_sdxl_pipeline(seed=0)), density=0.01, seed=0)
    adapter.metadata["base_model"] = str(tmp_path / "models" / "sdxl-finetune")
    with safe_open(str(adapter.save(tmp_path / "a.safetensors")), framework="pt") as f:
        assert json.loads(f.metadata()["base_model"]) == "sdxl-finetune"
    assert not ABSOLUTE.search(json.dumps(adapter.to_peft(tmp_path / "peft").joinpath("adapter_config.json").read_text()))
