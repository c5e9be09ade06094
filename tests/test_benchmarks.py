"""Each benchmark script still runs end to end (tiny configurations; no timing is asserted)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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
    assert len(results) == 6 and "bf16, 2 writer threads" in results
    assert all(r["bit_exact"] and r["checks"] == 3 for r in results.values())


def test_switching_smoke(tmp_path):
    run("switching.py", "--reduced", "--repeats", "1", "--out", str(tmp_path / "s.json"))
    data = json.loads((tmp_path / "s.json").read_text())
    assert data["ours"]["drift_after_20_cycles"] == {"elements_changed": 0, "max_abs_error": 0.0}
    assert {"diffusers_switch_over_ours", "peft_switch_over_ours", "file_vs_lora"} <= set(data["ratios"])
    lora = data["diffusers_lora"]  # load + first fuse timed as one call, like ours; the sum of its parts kept beside it
    assert lora["load_s_plus_fuse_s"] == lora["load_s"] + lora["fuse_s"] and lora["load_and_apply_s"] > 0
    assert data["ratios"]["diffusers_load_apply_over_ours"] == lora["load_and_apply_s"] / data["ours"]["load_and_apply_s"]
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
    run("concept_retention.py", "--types", "lora", "shira-rand", "--generations", "3", "--other_generations", "1", "--prompts", "2",
        "--base_prompts", "2", "--base_seeds", "1", "--steps", "2", "--out", str(tmp_path / "c.json"))
    data = json.loads((tmp_path / "c.json").read_text())
    assert set(data["types"]) == {"lora", "shira-rand"}
    assert set(data["base"]["style_when_described"]) == {"bluefire", "paintings"}
    row = data["types"]["shira-rand"]
    assert set(row["fused"]) == {"sks+bluefire", "sks+paintings", "bluefire+paintings"}
    assert len(row["leak"]) == 6 and {"bluefire on paintings", "paintings on bluefire", "sks on bluefire"} <= set(row["leak"])
    assert 0.0 <= row["fused"]["sks+bluefire"]["overlap"] < 0.5  # each concept has its own mask seed
    assert set(data["aim"]) == {"shira-rand"} or row["mean_retention"] is None
    assert data["figure_rows"][0] == "lora sks+bf" and (tmp_path / "c.png").stat().st_size > 0
    assert data["prompts"] == {"sks": 2, "bluefire": 2, "paintings": 2}  # 3 generations on 2 prompts: 2 seeds each
    assert data["generations_per_cell"] == {"sks": 4, "bluefire": 4, "paintings": 4}
    assert data["other_generations_per_cell"] == {"sks": 2, "bluefire": 2, "paintings": 2, "plain": 2}
    lo, hi = row["ci"]["single.bluefire"]
    assert lo <= row["single"]["bluefire"] <= hi and set(row["minus_lora"]) >= {"mean_retention", "mean_single"}
    assert set(data["base"]["ci"]) >= {"prompted_shape_and_colour", "style_when_described.paintings"}
    kept = data["outcomes"]["shira-rand"]["single.bluefire"]
    assert kept["prompt_set"] == "bluefire" and kept["passed"].count("1") / len(kept["passed"]) == row["single"]["bluefire"]
    printed = run("concept_retention.py", "--tables", str(tmp_path / "c.json")).stdout.splitlines()
    rows = [line for line in printed if line.startswith(("| LoRA", "| SHiRA-rand"))]
    assert len(rows) == 4 and all(line.count("|") == (12 if i < 2 else 11) for i, line in enumerate(rows))
    assert f"{row['single']['bluefire']:.2f} ({lo:.2f}–{hi:.2f})" in rows[1]


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


def concept_retention_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("concept_retention", ROOT / "benchmarks" / "concept_retention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_concept_retention_intervals_and_paired_differences():
    cr = concept_retention_module()
    rng = np.random.default_rng(0)

    def cells(fused_rate):
        out = {}
        for c in ("sks", "bluefire", "paintings"):
            out[f"single.{c}"] = out[f"single_on_prompt.{c}"] = (c, rng.random((4, 6)) < 0.8)
            out[f"preservation.{c}"] = ("plain", np.ones((4, 6), bool))
            out[f"leak.{c} on x"] = ("x", np.zeros((4, 6), bool))
        for a, b in cr.PAIRS:
            for c in (a, b):
                out[f"fused.{a}+{b}.score.{c}"] = out[f"fused.{a}+{b}.score_on_prompt.{c}"] = (c, rng.random((4, 6)) < fused_rate)
            out[f"fused.{a}+{b}.joint"] = (f"joint {a}+{b}", np.zeros((4, 6), bool))
        return out

    lora = cells(0.4)
    lora["single.sks"] = ("sks", np.zeros((4, 6), bool))  # never shown alone: its retentions are undefined
    same = dict(lora)
    out = cr.summarise({"lora": lora, "shira-x": same, "shira-y": cells(0.8)}, replicates=500)
    point, ci = out["lora"]["point"], out["lora"]["ci"]
    score, single = lora["fused.sks+bluefire.score.bluefire"][1].mean(), lora["single.bluefire"][1].mean()
    assert point["fused.sks+bluefire.retention.bluefire"] == score / single
    assert point["fused.sks+bluefire.retention.sks"] is None and ci["fused.sks+bluefire.retention.sks"] is None
    ratios = [point[f"fused.{a}+{b}.retention.{c}"] for a, b in cr.PAIRS for c in (a, b) if c != "sks"]
    assert point["mean_retention"] == pytest.approx(sum(ratios) / 4)  # undefined ratios are left out of the mean
    fused_sum = sum(lora[f"fused.{a}+{b}.score.{c}"][1].mean() for a, b in cr.PAIRS for c in (a, b))
    assert point["pooled_retention"] == pytest.approx(fused_sum / sum(lora[f"single.{c}"][1].mean() for a, b in cr.PAIRS for c in (a, b)))
    assert ci["preservation.sks"] == [1.0, 1.0] and ci["leak.sks on x"] == [0.0, 0.0]
    for key, value in point.items():
        if value is not None:
            lo, hi = ci[key]
            assert lo <= value <= hi, key
    # the same cells as LoRA: every paired difference is exactly zero; a better type's is above it
    assert all(d == {"point": 0.0, "ci": [0.0, 0.0]} for k, d in out["shira-x"]["minus_lora"].items() if d["point"] is not None)
    assert out["shira-y"]["minus_lora"]["mean_retention"]["ci"][0] > 0
    assert cr.nest({"a.b.c": 1, "a.b.d": 2, "e": 3}) == {"a": {"b": {"c": 1, "d": 2}}, "e": 3}


def test_writer_threads_smoke(tmp_path):
    run("writer_threads.py", "--reduced", "--rounds", "2", "--out", str(tmp_path / "w.json"))
    data = json.loads((tmp_path / "w.json").read_text())
    steps = {"stage_and_first_apply", "apply", "switch", "restore", "fuse2", "fuse3"}
    assert set(data["one_thread_over_threads"]) == steps and all(set(data["seconds"][w]) == steps for w in ("one_thread", "threads"))
