"""Each benchmark script still runs end to end (tiny configurations; no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args):
    done = subprocess.run([sys.executable, "-W", "ignore", str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_engine_speed_smoke(tmp_path):
    run("engine_speed.py", "--reduced", "--repeats", "1", "--out", str(tmp_path / "e.json"))
    data = json.loads((tmp_path / "e.json").read_text())
    assert data["config"]["target_weights"] == 96 and data["file"]["fp16"]["ratio_vs_lora"] > 0


def test_restore_exactness_smoke(tmp_path):
    run("restore_exactness.py", "--cycles", "30", "--check-every", "10", "--out", str(tmp_path / "r.json"))
    results = json.loads((tmp_path / "r.json").read_text())["results"]
    assert all(r["bit_exact"] and r["checks"] == 3 for r in results.values())


def test_switching_smoke(tmp_path):
    run("switching.py", "--reduced", "--repeats", "1", "--out", str(tmp_path / "s.json"))
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["ours"]["drift_after_20_cycles"] == {"elements_changed": 0, "max_abs_error": 0.0}
    assert {"diffusers_switch_over_ours", "peft_switch_over_ours", "file_vs_lora"} <= set(data["ratios"])
    assert (tmp_path / "s.png").stat().st_size > 0


@pytest.mark.parametrize("precision", ["bf16"])
def test_training_memory_smoke(tmp_path, precision):
    run("training_memory.py", "--reduced", "--steps", "1", "--precisions", precision, "--checkpointing", "off",
        "--methods", "ours", "peft_lora", "--out", str(tmp_path / "t.json"))
    data = json.loads((tmp_path / "t.json").read_text())
    assert [r["method"] for r in data["runs"]] == ["ours", "peft_lora"] and all("error" not in r for r in data["runs"])
    assert data["runs"][0]["trainable_params"] == data["runs"][1]["trainable_params"]
    assert len(data["summary"]) == 1


def test_concept_retention_smoke(tmp_path):
    run("concept_retention.py", "--types", "lora", "shira-rand", "--seeds", "1", "--prompts", "1", "--base_prompts", "2",
        "--steps", "2", "--out", str(tmp_path / "c.json"))
    data = json.loads((tmp_path / "c.json").read_text())
    assert set(data["types"]) == {"lora", "shira-rand"}
    assert set(data["base"]["style_when_described"]) == {"bluefire", "paintings"}
    row = data["types"]["shira-rand"]
    assert set(row["fused"]) == {"sks+bluefire", "sks+paintings", "bluefire+paintings"}
    assert len(row["leak"]) == 6 and {"bluefire on paintings", "paintings on bluefire", "sks on bluefire"} <= set(row["leak"])
    assert 0.0 <= row["fused"]["sks+bluefire"]["overlap"] < 0.5  # each concept has its own mask seed
    assert set(data["aim"]) == {"shira-rand"} or row["mean_retention"] is None
    assert data["figure_rows"][0] == "lora sks+bf" and (tmp_path / "c.png").stat().st_size > 0


def test_gpu_check_runs_its_whole_code_path_on_a_cpu(tmp_path):
    """``--device cpu --reduced``: every section of the prepared GPU check, on the tiny UNet."""
    run("gpu_check.py", "--device", "cpu", "--reduced", "--repeats", "1", "--ranks", "16", "--out", str(tmp_path / "g.json"))
    data = json.loads((tmp_path / "g.json").read_text())
    assert not [k for k, v in data.items() if isinstance(v, dict) and "error" in v]
    assert data["exactness"] == {d: {"single": True, "fused": True, "restore_bit_exact": True} for d in ("fp16", "bf16")}
    switching = data["switching_r16"]
    assert switching["ours"]["accounting_inactive"] == {"a": {"host_bytes": 196608, "device_bytes": 0},
                                                        "b": {"host_bytes": 196608, "device_bytes": 0}}
    assert {"diffusers_switch_fused_over_ours", "diffusers_load_apply_over_ours", "diffusers_fuse2_over_ours",
            "diffusers_hotswap_over_ours_switch"} <= set(switching["ratios"])
    assert set(data["denoise"]) >= {"batch_1", "batch_4"} and "lora_unfused_over_base" in data["denoise"]["batch_4"]
    training = data["training"]
    assert {"ours_rand", "ours_struct", "peft_lora"} == set(training) and all("error" not in r for r in training.values())
    assert training["ours_rand"]["trainable_params"] == training["peft_lora"]["trainable_params"]
    assert training["ours_rand"]["checkpointing"] is True and training["ours_rand"]["precision"] == "bf16"


def test_training_flops_smoke(tmp_path):
    run("training_flops.py", "--reduced", "--out", str(tmp_path / "f.json"))
    data = json.loads((tmp_path / "f.json").read_text())
    for row in (data["no_checkpointing"], data["checkpointing"]):
        assert row["struct"]["layers_on_slices"] == 96 and row["rand"]["layers_on_slices"] == 0
        assert row["rand"]["trainable"] == row["peft_lora"]["trainable"] and row["struct"]["flops"] < row["rand"]["flops"]


def test_interference(tmp_path):
    run("interference.py", "--reduced", "--samples", "5", "--out", str(tmp_path / "i.json"))
    data = json.loads((tmp_path / "i.json").read_text())
    assert data["weights"] == 96 and data["samples"] == 5 and data["max_awor_abs_error"] < 1e-5
    assert data["max_awom_rel_error"] < 1e-4


def test_serve_load_smoke(tmp_path):
    run("serve_load.py", "--requests", "12", "--replicas", "1", "--steps", "2", "--concurrency", "4", "--out", str(tmp_path / "s.json"))
    data = json.loads((tmp_path / "s.json").read_text())
    assert set(data["configs"]) == {"batching+affinity", "batching (not exact)+affinity", "no batching+affinity", "batching, no affinity"}
    assert all(c["requests"] == 12 and c["retried"] == 0 for c in data["configs"].values())
