import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shira_diffusion.app.cli import parse_args
from shira_diffusion.app.studio import NONE, Studio, build_ui, load_pipeline
from shira_diffusion import AdapterError, SparseAdapter, find_targets
from shira_diffusion.testing import random_adapter, tiny_sdxl_pipeline

ROOT = Path(__file__).resolve().parents[1]


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "app", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for flag in ("--model", "--adapters-dir", "--host", "--port", "--share", "--auth", "--device", "--dtype", "--max-upload-mb"):
        assert flag in out.stdout


def test_defaults_bind_locally_and_do_not_share():
    args = parse_args([])
    assert args.host == "127.0.0.1" and args.share is False and args.model == "demo"
    with pytest.raises(SystemExit):
        parse_args(["--auth", "nocolon"])


def start(monkeypatch, argv: list[str]) -> dict:
    """Run the studio's ``main`` with the page's launch caught: ``{"studio": ..., **launch kwargs}``."""
    import shira_diffusion.app.cli as app_cli
    import shira_diffusion.app.studio as app_studio

    launched = {}

    class Page:
        def launch(self, **kwargs):
            launched.update(kwargs)

    monkeypatch.setattr(app_studio, "build_ui", lambda studio: launched.setdefault("studio", studio) and Page())
    app_cli.main(argv)
    return launched


def test_no_flags_opens_on_the_demo_model_with_its_adapters(monkeypatch, capsys):
    from shira_diffusion.demo.model import ADAPTERS_DIR

    launched = start(monkeypatch, [])
    studio = launched["studio"]
    assert launched["server_name"] == "127.0.0.1" and launched["share"] is False
    assert "Built-in demo model" in studio.label
    assert studio.adapters == sorted(p.stem for p in ADAPTERS_DIR.glob("*.safetensors")) and len(studio.adapters) == 18
    assert "loaded sks-shira-rand from sks-shira-rand.safetensors" in capsys.readouterr().out


def test_memory_budget_flags_reach_the_engine_and_refuse_what_does_not_fit(monkeypatch, tmp_path):
    from shira_diffusion.testing import kohya_lora_file

    studio = start(monkeypatch, ["--model", "tiny", "--adapters-dir", "", "--max-adapters-mb", "1", "--max-backup-mb", "0"])["studio"]
    engine = studio.switcher.engine
    assert engine.store.max_bytes == 2**20 and engine.writer.max_backup_bytes == 0
    weights = find_targets(studio.switcher.pipe, ["unet"])
    small = random_adapter(weights, "rand", density=0.01, seed=1).save(tmp_path / "small.safetensors")
    big = random_adapter(weights, "rand", density=0.9, seed=2).save(tmp_path / "big.safetensors")
    lora = kohya_lora_file(tmp_path / "lora.safetensors", seed=3)
    lines = studio.scan(tmp_path)
    assert any("over the store's budget of 1,048,576" in line and "big" in line for line in lines), lines
    assert sorted(studio.adapters) == ["lora", "small"]
    before = {k: v.clone() for k, v in weights.items()}
    with pytest.raises(AdapterError, match="over the budget of 0"):  # a LoRA needs full-weight copies for exact restore
        studio.run("a red square", steps=1, adapters={"lora": 1.0})
    assert all(torch.equal(weights[k], before[k]) for k in weights) and studio.switcher.get_active_adapters() == []
    assert studio.run("a red square", steps=1, adapters={"small": 1.0}).images  # SHiRA needs no copies


def test_single_file_checkpoint_must_be_safetensors(tmp_path):
    ckpt = tmp_path / "model.ckpt"
    ckpt.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="pickled .ckpt files are refused"):
        load_pipeline(str(ckpt))


@pytest.fixture
def studio():
    return Studio(tiny_sdxl_pipeline(seed=0), "demo", max_bytes=10 * 2**20)


def test_scan_loads_good_adapters_and_reports_bad_ones(studio, tmp_path):
    random_adapter(find_targets(studio.pipe), density=0.05, seed=1).save(tmp_path / "good.safetensors")
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    lines = studio.scan(tmp_path)
    assert lines[0].startswith("skipped bad.safetensors: ") and "not a readable safetensors file" in lines[0]
    assert lines[1] == "loaded good from good.safetensors"
    assert studio.adapters == ["good"]


def test_generate_switches_and_returns_to_base_exactly(studio, tmp_path):
    random_adapter(find_targets(studio.pipe), density=0.05, seed=2, std=0.3).save(tmp_path / "style.safetensors")
    studio.scan(tmp_path)
    base, status = studio.generate("a red square", "", 0, 3, 5.0, {NONE: 1.0})
    assert base.size == (64, 64) and status.startswith("base model: switch")
    styled, status = studio.generate("a red square", "", 0, 3, 5.0, {"style": 1.0})
    assert status.startswith("style x1: switch")
    again, _ = studio.generate("a red square", "", 0, 3, 5.0, None)
    as_tensor = lambda im: torch.tensor(list(im.getdata()))
    assert not torch.equal(as_tensor(base), as_tensor(styled))
    assert torch.equal(as_tensor(base), as_tensor(again))


def test_page_builds(studio):
    import gradio as gr

    assert isinstance(build_ui(studio), gr.Blocks)


def test_scan_also_lists_lora_files(studio, tmp_path):
    from safetensors.torch import save_file

    prefix = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{prefix}.lora_down.weight": torch.randn(2, 64), f"{prefix}.lora_up.weight": torch.randn(64, 2)},
              str(tmp_path / "kohya_style.safetensors"))
    assert studio.scan(tmp_path) == ["loaded kohya_style from kohya_style.safetensors"]
    image, status = studio.generate("a red square", "", 0, 2, 5.0, {"kohya_style": 0.5})
    assert status.startswith("kohya_style x0.5: switch") and image.size == (64, 64)


def test_library_rows_and_remove(studio, tmp_path):
    random_adapter(find_targets(studio.pipe), "wm", density=0.05, seed=1).save(tmp_path / "a.safetensors")
    studio.scan(tmp_path)
    [row] = studio.library_rows()
    adapter = SparseAdapter.load(tmp_path / "a.safetensors")
    assert row[:3] == ["a", "shira", "wm"] and row[3] == f"{adapter.density:.3%}" and row[4] == f"{adapter.num_params:,}"
    assert row[7] == "yes" and row[8] == ""
    held = studio.switcher.list_adapters()["a"]
    assert held["device_bytes"] == 0 and row[9] == f"{held['host_bytes'] / 2**20:.2f} MB"  # its compact copy only
    studio.remove("a")
    assert studio.library_rows() == []


def parse_tables(markdown: str) -> list[list[dict[str, str]]]:
    """Each markdown table as a list of ``{header: cell}``, splitting on unescaped ``|`` as renderers do."""
    import re

    tables, current = [], None
    for line in markdown.splitlines():
        if not line.startswith("|"):
            current = None
            continue
        cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        if current is None:
            current = {"headers": cells, "rows": []}
            tables.append(current)
        elif not all(set(c) <= {"-", ":"} for c in cells):
            assert len(cells) == len(current["headers"]), line
            current["rows"].append(dict(zip(current["headers"], cells)))
    return [t["rows"] for t in tables]


def test_compare_report_and_download(studio, tmp_path):
    weights = find_targets(studio.pipe)
    random_adapter(weights, density=0.05, seed=1, std=0.3).save(tmp_path / "a.safetensors")
    random_adapter(weights, density=0.05, seed=2, std=0.3).save(tmp_path / "b.safetensors")
    studio.add(tmp_path / "a.safetensors")
    studio.add(tmp_path / "b.safetensors", "b|c")  # a name with the table's own separator in it
    grid, report, path = studio.compare("a fox", ["a", "b|c"], [], "0 1", 2, 5.0)
    assert grid.size == (60 + 4 * 192, 18 + 2 * 192)
    assert "Columns: base | a | b|c | a+b|c" in report
    assert "**Concept kept in the fusion** (pixel fallback: position between the base image (0)" in report
    _, details = studio.switcher.compare("a fox", ["a", "b|c"], seeds=[0, 1], num_inference_steps=2, guidance_scale=5.0,
                                         return_details=True)
    image, weight = parse_tables(report)
    assert [row["adapter"] for row in image] == ["a", "b|c"]
    for row in image:
        name, dist = row["adapter"], details["image_distance"][row["adapter"]]
        assert row["in the fusion"] == f"{details['concept'][name]['fused']:.2f}"
        assert row["pixel distance fused / base to alone"] == f"{dist['fused_vs_alone']:.4f} / {dist['base_vs_alone']:.4f}"
    m = details["weight_space"][("a", "b|c")]
    assert weight == [{"pair": "a + b|c", "index overlap": f"{m['overlap']:.4%}", "AWOM": f"{m['awom']:.4g}", "AWOR": f"{m['awor']:.4f}"}]
    from PIL import Image

    assert Image.open(path).size == grid.size


def test_unknown_words_are_reported_with_the_image(tmp_path):
    from shira_diffusion.demo import world

    studio = Studio(tiny_sdxl_pipeline(seed=0), "demo", vocabulary=frozenset(world.vocabulary()))
    _, status = studio.generate("a photo of a red square", "blurry", 0, 2, 5.0, None)
    assert "**Unknown to this model:** photo, of, blurry" in status
    _, status = studio.generate("a red square on a white background, in the center", "", 0, 2, 5.0, None)
    assert "Unknown" not in status
    assert "Unknown" not in Studio(tiny_sdxl_pipeline(seed=0)).generate("a photo", "", 0, 1, 5.0, None)[1]  # any word: no check


def test_requested_set_says_which_controls_it_ignores():
    fuse = ["a", 1.0, "b", 0.5, "", 1.0, "", 1.0]
    assert Studio.requested("swap", "c", 0.7, fuse) == ({"c": 0.7}, "fuse slots ignored (a, b): Mode is *swap*")
    assert Studio.requested("swap", NONE, 1.0, ["", 1.0] * 4) == ({}, "")
    assert Studio.requested("fuse", NONE, 1.0, fuse) == ({"a": 1.0, "b": 0.5}, "")
    assert Studio.requested("fuse", "c", 1.0, ["", 1.0] * 4) == ({}, "swap adapter c ignored: Mode is *fuse*")
    assert Studio.requested("fuse", NONE, 1.0, ["a", 1.0, "a", 0.5]) == ({"a": 1.5}, "")


def test_upload_renames_a_taken_name_and_hides_the_temp_path(studio, tmp_path):
    upload_dir = tmp_path / "gradio" / "3f2a"
    upload_dir.mkdir(parents=True)
    random_adapter(find_targets(studio.pipe), density=0.05, seed=1).save(upload_dir / "style.safetensors")
    assert studio.upload(upload_dir / "style.safetensors") == "loaded **style**"
    assert studio.upload(upload_dir / "style.safetensors") == "loaded **style-2** (*style* was taken)"
    assert studio.upload(upload_dir / "style.safetensors", " mine ") == "loaded **mine**"
    (upload_dir / "bad.safetensors").write_bytes(b"junk")
    message = studio.upload(upload_dir / "bad.safetensors")
    assert message.startswith("rejected bad.safetensors: bad.safetensors: ") and str(tmp_path) not in message
    assert studio.adapters == ["style", "style-2", "mine"]


def test_demo_notes_name_every_word_the_model_knows():
    from shira_diffusion.demo import world

    pipe, notes = load_pipeline("demo")
    assert notes["example"] == "a red star on a white background, in the center"
    assert notes["vocabulary"] == frozenset(world.vocabulary()) and len(notes["vocabulary"]) == 33
    assert all(name in notes["label"] for name in (*world.COLOURS, *world.SHAPES, *world.BACKGROUNDS))
    assert "does not tell *left* from *right*" in notes["label"] and "top left" not in notes["label"]
    assert load_pipeline("tiny")[1] == {"label": "**Tiny random-weight pipeline**: SDXL architecture, images are noise; for trying the controls.", "model": "tiny"}


def test_start_up_prints_no_third_party_noise():
    """Loading the demo model and its 18 adapters, as `python -m app` does: no torchvision notice,
    no `torch_dtype` deprecation, no per-LoRA-file progress bars."""
    code = ("from shira_diffusion.app.studio import Studio, load_pipeline\n"
            "from shira_diffusion.demo.model import ADAPTERS_DIR\n"
            "pipe, notes = load_pipeline('demo')\n"
            "print(len(Studio(pipe, **notes).scan(ADAPTERS_DIR)))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "default"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "18"
    for noise in ("torchvision", "torch_dtype", "deprecated", "Warning"):
        assert noise not in out.stderr, out.stderr[-2000:]
    assert out.stderr.count("Loading weights:   0%") == 2  # the two text encoders of the base model, once each
