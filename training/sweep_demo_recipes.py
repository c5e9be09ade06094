"""Pick each demo adapter's learning rate on validation prompts, the same way for every method.

    python training/sweep_demo_recipes.py                 # 3 concepts x 6 types x 4 lrs (+ LoRA at 3e-4), 2 at a time (~90 min on 2 cores)
    python training/sweep_demo_recipes.py --install       # ... and ship the chosen runs as the demo adapters

Each (concept, type) is trained at every ``--learning_rates`` value with ``build_demo_world.py``'s
recipe (same instance images, class images, prior preservation and parameter count; only the
learning rate differs), then scored on validation prompts that the benchmark never reports on
(``world.Concept.validation_prompts``):

    validation score = on-prompt share x preservation - leak

(on prompt: the concept seen on the prompted scene; preservation: plain prompts still drawn right;
leak: the concept showing on the other concepts' prompts, ~48 generations each on prompts of their
own, ``world.Concept.leak_prompts``). The best score wins, the lower learning rate on a tie. ``training/demo_recipes.json`` records every run and the choice;
``build_demo_world.py`` reads it. Finished runs are reused, so an interrupted sweep resumes; a run
whose training is unchanged but whose validation is not (other validation or leak prompts, or leak
seeds) is only scored again; other ``--seeds`` retrain, as they always did.
Runs use one thread each (two small single-thread trainings finish ~2x sooner than one after
the other on two threads).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "training"))
import build_demo_world as build  # noqa: E402
from shira_diffusion.demo import world  # noqa: E402
from shira_diffusion.demo.model import recorded_config  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--learning_rates", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    p.add_argument("--also", nargs="*", default=["lora:3e-4"], metavar="TYPE:LR",
                   help="extra grid points for one type (LoRA wrecks the base from 1e-2 up, so its grid extends down; '--also' alone: none)")
    p.add_argument("--concepts", nargs="+", choices=list(world.CONCEPTS), default=list(world.CONCEPTS))
    p.add_argument("--types", nargs="+", choices=build.TYPES, default=list(build.TYPES))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--seeds", type=int, default=4, help="generation seeds per validation prompt")
    p.add_argument("--leak_generations", type=int, default=48, help="generations per other concept when looking for leaks "
                   "(a leak of 0.2 is 1 in 5; 24 generations on 6 prompts missed leaks the benchmark then found)")
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--work_dir", type=Path, default=ROOT / "build" / "recipe_sweep")
    p.add_argument("--out", type=Path, default=build.RECIPES)
    p.add_argument("--install", action="store_true", help="copy the chosen runs into <assets>/adapters with manifest entries")
    p.add_argument("--base", type=Path, default=build.ASSETS / "demo", help="the demo base model the runs adapt")
    p.add_argument("--assets", type=Path, default=build.ASSETS, help="--install writes <assets>/adapters")
    p.add_argument("--world_args", default="", help="extra build_demo_world.py arguments for every run, e.g. '--class_images 3'")
    p.add_argument("--evaluate", nargs=3, metavar=("ADAPTER", "CONCEPT", "OUT"), help=argparse.SUPPRESS)
    return p.parse_args(argv)


def leak_seeds(leak_generations: int, scenes: list) -> int:
    return -(-leak_generations // len(scenes))


def validation_digest(seeds: int, leak_generations: int) -> str:
    """What makes two validations the same: the prompts and the seeds they are generated with."""
    sets = {c: [[world.caption(s) for s in concept.validation_prompts()], seeds,
                [world.caption(s) for s in concept.leak_prompts()], leak_seeds(leak_generations, concept.leak_prompts())]
            for c, concept in world.CONCEPTS.items()}
    return hashlib.sha256(json.dumps(sets).encode()).hexdigest()[:16]


def validate(path: Path, concept: str, seeds: int, leak_generations: int) -> dict:
    """One run's scores on the validation prompts (run in its own single-thread process): its own
    concept on ``seeds`` x its validation prompts, leaks on about ``leak_generations`` of each
    other concept's leak prompts (``world.Concept.leak_prompts``)."""
    import torch

    from shira_diffusion import ShiraPipelineSwitcher
    from shira_diffusion.demo.detect import Reading
    from shira_diffusion.demo.scoring import Scorer, concept_on_prompt, concept_seen

    torch.set_num_threads(1)
    sw = ShiraPipelineSwitcher.demo()
    sw.load_adapter(path, adapter_name="run")
    scorer, on = Scorer(sw, seeds), {"run": 1.0}
    single, on_prompt = scorer.outcomes(world.CONCEPTS[concept].validation_prompts(), on, concept_seen(concept), concept_on_prompt(concept))
    leak = {}
    for d in world.CONCEPTS:
        if d != concept:
            scenes = world.CONCEPTS[d].leak_prompts()
            leak[d] = float(Scorer(sw, leak_seeds(leak_generations, scenes)).outcomes(scenes, on, concept_seen(concept))[0].mean())
    preservation = float(scorer.outcomes(world.plain_prompts(6, seed=9), on, Reading.shows)[0].mean())
    scores = {"single": float(single.mean()), "on_prompt": float(on_prompt.mean()), "preservation": preservation,
              "leak": leak, "mean_leak": sum(leak.values()) / len(leak)}
    return {**scores, "score": scores["on_prompt"] * preservation - scores["mean_leak"]}


def run_one(args, world_args, prepared, concept: str, kind: str, lr: float) -> dict:
    """Train (unless done before) and validate one run; its record is kept next to its files."""
    out = args.work_dir / "runs" / f"{concept}-{kind}-lr{lr:g}"
    record = out / "run.json"
    data, prompt, mask_seed = prepared[concept]
    cmd, produced = build.train_command(world_args, args.base, concept, kind, data, prompt, mask_seed, out, lr, args.steps)
    recipe, checked = digest(cmd, args.seeds), validation_digest(args.seeds, args.leak_generations)
    done = json.loads(record.read_text()) if record.is_file() else {}
    trained = done.get("recipe") == recipe and produced.is_file()
    if trained and done.get("validation") == checked:
        return done  # the same run, done and validated before (another recipe is retrained)
    if trained:  # the same training, validated on other prompts: validate again, keep the adapter
        seconds = done["train_seconds"]
    else:
        record.unlink(missing_ok=True)  # a retraining that fails must not leave the old record over the new file
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        with open(out / "train.log", "w") as log:
            subprocess.run([*cmd, "--num_threads", "1"], check=True, stdout=log, stderr=subprocess.STDOUT)
        seconds = round(time.perf_counter() - t0, 1)
    scores = out / "validation.json"
    subprocess.run([sys.executable, __file__, "--evaluate", str(produced), concept, str(scores), "--seeds", str(args.seeds),
                    "--leak_generations", str(args.leak_generations)],
                   check=True, stdout=subprocess.DEVNULL)
    entry = {"concept": concept, "type": kind, "learning_rate": lr, "steps": args.steps, "file": str(produced.relative_to(args.work_dir)),
             "train_seconds": seconds, **json.loads(scores.read_text()), "recipe": recipe, "validation": checked}
    record.write_text(json.dumps(entry, indent=2))
    return entry


def digest(cmd: list[str], seeds: int) -> str:
    """What makes a run the same run: its training command (data, class images, steps, rate, ...)
    and the validation seeds."""
    return hashlib.sha256(json.dumps([cmd[1:], seeds]).encode()).hexdigest()[:16]


def choose(runs: list[dict]) -> dict[str, dict]:
    """Per adapter, the run with the best validation score (the lower learning rate on a tie)."""
    best: dict[str, dict] = {}
    for r in sorted(runs, key=lambda r: r["learning_rate"]):
        key = f"{r['concept']}-{r['type']}"
        if key not in best or r["score"] > best[key]["score"]:
            best[key] = r
    return {k: {"learning_rate": r["learning_rate"], "steps": r["steps"], "validation_score": r["score"]} for k, r in sorted(best.items())}


def install(args, world_args, prepared, runs: list[dict], chosen: dict) -> None:
    """The chosen runs as the shipped demo adapters, with the manifest ``build_demo_world.py`` writes."""
    folder = args.assets / "adapters"
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    for key, pick in chosen.items():
        run = next(r for r in runs if f"{r['concept']}-{r['type']}" == key and r["learning_rate"] == pick["learning_rate"])
        _, prompt, mask_seed = prepared[run["concept"]]
        entry = build.manifest_entry(world_args, run["concept"], run["type"], prompt, mask_seed, run["learning_rate"], run["steps"], run["train_seconds"])
        shutil.copyfile(args.work_dir / run["file"], folder / entry["file"])
        manifest[entry["file"]] = entry
    manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=2))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.evaluate:
        path, concept, out = args.evaluate
        Path(out).write_text(json.dumps(validate(Path(path), concept, args.seeds, args.leak_generations)))
        return
    world_args = build.parse_args(["--work_dir", str(args.work_dir), "--assets", str(args.assets), "--concepts", *args.concepts,
                                   "--steps", str(args.steps), *args.world_args.split()])
    prepared = build.prepare(world_args)
    extra = [(kind, float(lr)) for kind, lr in (a.split(":") for a in args.also)]
    grid = [(c, t, lr) for c in args.concepts for t in args.types for lr in sorted({*args.learning_rates, *(r for k, r in extra if k == t)})]
    start, runs = time.perf_counter(), []
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_one, args, world_args, prepared, *job) for job in grid]
        for i, f in enumerate(futures, 1):
            try:
                r = f.result()
            except BaseException:
                pool.shutdown(cancel_futures=True)  # stop at the first failed run, not after the whole grid
                raise
            runs.append(r)
            elapsed = time.perf_counter() - start
            print(f"[{i}/{len(grid)}] {r['concept']}-{r['type']} lr {r['learning_rate']:g}: score {r['score']:.2f} (on prompt "
                  f"{r['on_prompt']:.2f}, preservation {r['preservation']:.2f}, leak {r['mean_leak']:.2f}); "
                  f"{elapsed / 60:.0f} min, ~{elapsed / i * (len(grid) - i) / 60:.0f} min left", flush=True)
    chosen = choose(runs)
    record = {"config": {k: v for k, v in recorded_config(args).items() if k not in ("evaluate", "install")},
              "validation": {c: [world.caption(s) for s in world.CONCEPTS[c].validation_prompts()] for c in args.concepts},
              "world": {k: v for k, v in vars(world_args).items() if k in ("rank", "instances", "class_images", "decoys", "prior_loss_weight", "seed", "unet_only")},
              "seconds": round(time.perf_counter() - start, 1), "chosen": chosen, "runs": runs}
    args.out.write_text(json.dumps(record, indent=2))
    for key, pick in chosen.items():
        print(f"{key}: lr {pick['learning_rate']:g} (validation score {pick['validation_score']:.2f})")
    if args.install:
        install(args, world_args, prepared, runs, chosen)
    print(f"wrote {args.out} ({record['seconds'] / 60:.0f} min)")


if __name__ == "__main__":
    main()
