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


# ---- every subcommand with every kind of input: a result or one clear line, never a traceback ----


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from shira_diffusion.testing import kohya_lora_file

    root = tmp_path_factory.mktemp("kinds")
    weights = find_targets(tiny_sdxl_pipeline(seed=0), ["unet", "text_encoder", "text_encoder_2"])
    shira = random_adapter(weights, "rand", density=0.05, seed=1, std=0.3).save(root / "shira.safetensors")
    peft = SparseAdapter.load(shira).to_peft(root / "peft", component="unet")
    (root / "junk.safetensors").write_bytes(b"\x80\x04 not safetensors")
    return {"shira": shira, "peft": peft, "lora": kohya_lora_file(root / "lora.safetensors"), "junk": root / "junk.safetensors"}


COMMANDS = {
    "inspect": lambda x, out, other: ["inspect", x],
    "inspect --model": lambda x, out, other: ["inspect", x, "--model", "tiny"],
    "shira2peft": lambda x, out, other: ["convert", "shira2peft", x, out],
    "peft2shira": lambda x, out, other: ["convert", "peft2shira", x, out + ".safetensors"],
    "lora2shira": lambda x, out, other: ["convert", "lora2shira", x, out + ".safetensors", "--model", "tiny", "--density", "0.1"],
    "diff": lambda x, out, other: ["diff", x, other],
    "merge": lambda x, out, other: ["merge", "--model", "tiny", "--adapter", x, "--out", out],
}
WORKS = {  # (kind, command) pairs that succeed; every other pair is one line on stderr and status 2
    ("shira", "inspect"), ("shira", "inspect --model"), ("shira", "shira2peft"), ("shira", "diff"), ("shira", "merge"),
    ("peft", "inspect --model"), ("peft", "merge"),
    ("lora", "inspect"), ("lora", "inspect --model"), ("lora", "lora2shira"), ("lora", "merge"),
}
HINTS = {  # what the error says for a right file in the wrong command
    ("peft", "inspect"): "cannot tell the weight's shape from the file; pass the model (--model",  # a random mask
    ("peft", "peft2shira"): "cannot tell the weight's shape from the file; pass the model (--model",
    ("lora", "diff"): "`shira convert lora2shira` turns a LoRA into one",
    ("lora", "shira2peft"): "`shira convert lora2shira` turns a LoRA into one",
    ("peft", "diff"): "`shira convert peft2shira` turns it into one",
    ("shira", "lora2shira"): "already a SHiRA adapter",
    ("shira", "peft2shira"): "this is a SHiRA file already",
    ("peft", "lora2shira"): "a PEFT SHiRA folder",
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("kind", ["shira", "peft", "lora", "junk"])
def test_every_command_with_every_kind_of_input(inputs, tmp_path, capsys, kind, command):
    argv = COMMANDS[command](str(inputs[kind]), str(tmp_path / "out"), str(inputs["shira"]))
    code = main(argv)
    out, err = capsys.readouterr()
    if (kind, command) in WORKS:
        assert code == 0, err
        assert out.strip() and not err.startswith("shira: error")
    else:
        assert code == 2 and err.startswith("shira: error: ") and err.count("\n") == 1, err
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.safetensors").exists()
        if (kind, command) in HINTS:
            assert HINTS[kind, command] in err


def test_inspect_a_lora_file_with_its_model(inputs, capsys):
    assert main(["inspect", str(inputs["lora"]), "--model", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "format:      kohya/LyCORIS safetensors, read for tiny" in out
    assert "kinds:       lora 6 (weights)" in out
    assert "params:      2,048 in 6 deltas (rank 4); changes 12,288 entries" in out
    assert "  unet               2 deltas           1,024 params" in out


def test_shira2peft_writes_every_component_and_peft2shira_reads_them_back(inputs, tmp_path, capsys):
    assert main(["convert", "shira2peft", str(inputs["shira"]), str(tmp_path / "peft")]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["text_encoder", "text_encoder_2", "unet"]
    assert "not written" not in out
    assert main(["convert", "peft2shira", str(tmp_path / "peft"), str(tmp_path / "back.safetensors"), "--model", "tiny"]) == 0
    original, back = SparseAdapter.load(inputs["shira"]), SparseAdapter.load(tmp_path / "back.safetensors")
    assert back.deltas.keys() == original.deltas.keys()
    for key, d in original.deltas.items():  # PEFT pads layers with zero-valued entries: the dense deltas agree
        assert torch.equal(back.deltas[key].to_dense(), d.to_dense()), key


def test_shira2peft_of_one_component_says_what_it_left_out(inputs, tmp_path, capsys):
    assert main(["convert", "shira2peft", str(inputs["shira"]), str(tmp_path / "peft"), "--component", "unet"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "peft" / "adapter_config.json").is_file()
    assert "not written: text_encoder (20 weights)" in out and "not written: text_encoder_2 (20 weights)" in out
