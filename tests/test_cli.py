import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from shira_diffusion import ShiraEngine, SparseAdapter, find_targets
from shira_diffusion.cli import main
from shira_diffusion.testing import random_adapter, tiny_sdxl_pipeline


@pytest.fixture
def two_adapters(tmp_path, tiny_pipe):
    weights = find_targets(tiny_pipe)
    a = random_adapter(weights, "rand", density=0.05, seed=1, std=0.3)
    b = random_adapter(weights, "wm", density=0.05, seed=2, std=0.3)
    return a.save(tmp_path / "a.safetensors"), b.save(tmp_path / "b.safetensors")


@pytest.mark.parametrize("command", [[], ["inspect"], ["convert"], ["diff"], ["merge"]])
def test_every_command_has_help(command):
    out = subprocess.run([sys.executable, "-m", "shira_diffusion", *command, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage: shira" in out.stdout


def test_inspect_reports_the_facts(two_adapters, capsys):
    assert main(["inspect", str(two_adapters[0])]) == 0
    out = capsys.readouterr().out
    adapter = SparseAdapter.load(two_adapters[0])
    assert f"params:      {adapter.num_params:,} in 96 weights" in out
    assert "mask:        rand" in out and "dtype:       float32" in out and "version 1" in out
    assert f"fingerprint: {adapter.metadata['fingerprint']}" in out
    assert f"({two_adapters[0].stat().st_size:,} bytes)" in out


@pytest.mark.parametrize("content", [b"\x80\x04garbage pickle", b""])
def test_bad_file_is_one_line_and_exit_2(tmp_path, content):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(content)
    out = subprocess.run([sys.executable, "-m", "shira_diffusion", "inspect", str(bad)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.startswith("shira: error: ") and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr


def test_shira_to_peft_and_back(two_adapters, tmp_path, capsys):
    assert main(["convert", "shira2peft", str(two_adapters[0]), str(tmp_path / "peft")]) == 0
    assert main(["convert", "peft2shira", str(tmp_path / "peft"), str(tmp_path / "back.safetensors"), "--model", "tiny"]) == 0
    original, back = SparseAdapter.load(two_adapters[0]), SparseAdapter.load(tmp_path / "back.safetensors")
    for key, d in original.deltas.items():
        assert torch.equal(back.deltas[key].to_dense(), d.to_dense())
    assert main(["inspect", str(tmp_path / "peft"), "--model", "tiny"]) == 0
    assert "PEFT SHiRA folder" in capsys.readouterr().out


def test_lora2shira_prints_retained_energy(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    prefix = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file({f"{prefix}.lora_down.weight": torch.randn(4, 64, generator=g), f"{prefix}.lora_up.weight": torch.randn(64, 4, generator=g)},
              str(tmp_path / "k.safetensors"))
    assert main(["convert", "lora2shira", str(tmp_path / "k.safetensors"), str(tmp_path / "s.safetensors"), "--model", "tiny", "--density", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "retained energy unet: 0." in out
    adapter = SparseAdapter.load(tmp_path / "s.safetensors")
    assert adapter.num_params == round(0.1 * 64 * 64) and adapter.metadata["mask"] == "lora-topk"
    assert main(["convert", "lora2shira", str(tmp_path / "k.safetensors"), str(tmp_path / "t.safetensors"), "--density", "0.1"]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_diff_table_and_json(two_adapters, capsys):
    assert main(["diff", *map(str, two_adapters)]) == 0
    out = capsys.readouterr().out
    assert "weights: 96 shared, 0 only in A, 0 only in B" in out and out.splitlines()[-1].startswith("all")
    assert main(["diff", *map(str, two_adapters), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["aggregate"]["weights_shared"] == 96 and 0.0 <= data["aggregate"]["overlap"] < 0.2


def test_merge_bakes_adapters_into_a_saved_pipeline(two_adapters, tmp_path, capsys):
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "merged"
    assert main(["merge", "--model", "tiny", "--adapter", f"{two_adapters[0]}:0.5", "--adapter", str(two_adapters[1]), "--out", str(out)]) == 0
    saved = StableDiffusionXLPipeline.from_pretrained(str(out))
    expected = tiny_sdxl_pipeline(seed=0)
    engine = ShiraEngine(expected)
    engine.stage("0:a", SparseAdapter.load(two_adapters[0]))
    engine.stage("1:b", SparseAdapter.load(two_adapters[1]))
    engine.apply({"0:a": 0.5, "1:b": 1.0})
    want = expected.unet.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in saved.unet.state_dict().items())
    assert main(["merge", "--model", "tiny", "--adapter", str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "x")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
