"""The learning-rate sweep behind the demo adapters (training/sweep_demo_recipes.py)."""

import json
import subprocess
import sys
from pathlib import Path

from shira_diffusion import SparseAdapter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "training"))
import sweep_demo_recipes as sweep  # noqa: E402


def run(concept, kind, lr, score):
    return {"concept": concept, "type": kind, "learning_rate": lr, "steps": 600, "score": score}


def test_the_best_validation_score_wins_and_a_tie_goes_to_the_lower_rate():
    runs = [run("sks", "lora", 1e-2, 0.5), run("sks", "lora", 1e-3, 0.5), run("sks", "lora", 3e-3, 0.4),
            run("sks", "shira-rand", 1e-3, 0.1), run("sks", "shira-rand", 1e-2, 0.7)]
    chosen = sweep.choose(runs)
    assert {k: v["learning_rate"] for k, v in chosen.items()} == {"sks-lora": 1e-3, "sks-shira-rand": 1e-2}
    assert chosen["sks-shira-rand"] == {"learning_rate": 1e-2, "steps": 600, "validation_score": 0.7}


def test_sweep_trains_validates_records_and_installs(tmp_path):
    """End to end at toy size on the shipped demo base: 2 types x 2 learning rates, then resumed."""
    cmd = [sys.executable, str(ROOT / "training" / "sweep_demo_recipes.py"), "--concepts", "bluefire", "--types", "lora", "shira-rand",
           "--learning_rates", "1e-2", "--also", "lora:1e-3", "shira-rand:1e-3", "--steps", "2", "--seeds", "1", "--leak_generations", "2",
           "--world_args", "--class_images 2",
           "--work_dir", str(tmp_path / "work"), "--out", str(tmp_path / "recipes.json"), "--install", "--assets", str(tmp_path / "assets")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((tmp_path / "recipes.json").read_text())
    assert sorted((r["type"], r["learning_rate"]) for r in record["runs"]) == [("lora", 1e-3), ("lora", 1e-2), ("shira-rand", 1e-3), ("shira-rand", 1e-2)]
    for r in record["runs"]:
        assert r["score"] == r["on_prompt"] * r["preservation"] - r["mean_leak"] and set(r["leak"]) == {"sks", "paintings"}
    assert set(record["chosen"]) == {"bluefire-lora", "bluefire-shira-rand"} and len(record["validation"]["bluefire"]) == 6
    manifest = json.loads((tmp_path / "assets" / "adapters" / "manifest.json").read_text())
    for key, pick in record["chosen"].items():
        entry = manifest[f"{key}.safetensors"]
        assert (entry["learning_rate"], entry["steps"], entry["decoys"]) == (pick["learning_rate"], 2, 0.5)
        run_file = next(tmp_path / "work" / r["file"] for r in record["runs"] if f"bluefire-{r['type']}" == key and r["learning_rate"] == pick["learning_rate"])
        assert (tmp_path / "assets" / "adapters" / entry["file"]).read_bytes() == run_file.read_bytes()
    assert SparseAdapter.load(tmp_path / "assets" / "adapters" / "bluefire-shira-rand.safetensors").metadata["mask"] == "rand"
    logs = {p: p.stat().st_mtime_ns for p in (tmp_path / "work" / "runs").glob("*/train.log")}
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)  # finished runs are reused, not retrained
    assert again.returncode == 0 and json.loads((tmp_path / "recipes.json").read_text())["runs"] == record["runs"]
    assert len(logs) == 4 and {p: p.stat().st_mtime_ns for p in logs} == logs
    more = [*cmd[:cmd.index("--leak_generations") + 1], "4", *cmd[cmd.index("--leak_generations") + 2:]]  # 2 seeds on the subject's 3
    revalidated = subprocess.run(more, capture_output=True, text=True, timeout=600)  # other validation: scored again, not retrained
    assert revalidated.returncode == 0, revalidated.stderr[-3000:]
    runs = json.loads((tmp_path / "recipes.json").read_text())["runs"]
    assert [r["recipe"] for r in runs] == [r["recipe"] for r in record["runs"]] and {r["validation"] for r in runs}.isdisjoint({r["validation"] for r in record["runs"]})
    assert [r["train_seconds"] for r in runs] == [r["train_seconds"] for r in record["runs"]] and {p: p.stat().st_mtime_ns for p in logs} == logs


def test_leak_prompts_are_disjoint_from_the_validation_and_reported_prompts():
    from shira_diffusion.demo.world import CONCEPTS, REPORTED, caption

    for concept in CONCEPTS.values():
        leak = {caption(s) for s in concept.leak_prompts()}
        validation = {caption(s) for s in concept.validation_prompts()}
        reported = {caption(s) for s in concept.prompts(REPORTED, at_most=True)}
        if concept.style is None:  # the subject has no captions to spare: it lends its validation prompts
            assert leak == validation
        else:
            assert len(leak) == 24 and not leak & (validation | reported | {caption(s) for s in concept.instance_scenes()})
    digests = {sweep.validation_digest(seeds, leak) for seeds, leak in ((4, 48), (4, 24), (2, 24))}
    assert len(digests) == 3 and sweep.validation_digest(4, 48) == sweep.validation_digest(4, 47)  # both: 2 seeds on 24 prompts, 16 on 3


def test_a_run_is_reused_only_for_the_same_command_and_validation_seeds():
    cmd = ["python", "train.py", "--learning_rate", "0.001", "--num_class_images", "100"]
    assert sweep.digest(cmd, 4) == sweep.digest(list(cmd), 4)
    assert sweep.digest(cmd, 4) != sweep.digest(cmd, 8)
    assert sweep.digest(cmd, 4) != sweep.digest([*cmd[:-1], "50"], 4)
    assert sweep.digest(cmd, 4) == sweep.digest(["/other/python", *cmd[1:]], 4)  # not the interpreter's path
