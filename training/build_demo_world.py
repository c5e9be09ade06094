"""Rebuild the whole demo world from seeds: the base model, the instance images, every demo adapter.

    python training/build_demo_world.py                   # everything, ~70 min on 2 CPU cores
    python training/build_demo_world.py --skip_base       # adapters only, on the existing shira_diffusion/assets/demo

Each concept (the ``sks`` subject and the ``bluefire`` / ``paintings`` styles) is learnt from 5
rendered instance images (varied on purpose: a style's five show five colours and every shape)
by ``train_shira_dreambooth.py`` itself, once per adapter type: SHiRA
with each mask kind and LoRA, all at the same parameter count (LoRA rank ``--rank``; SHiRA
``rank * (rows + cols)`` entries per weight). Prior preservation uses rendered, captioned plain
scenes as the class images (the base model's own training distribution), so an adapter learns
its concept without forgetting the rest of the world. Every concept gets its own mask seed, as
independently trained adapters would. The adapters land in ``shira_diffusion/assets/adapters`` as
``<concept>-<type>.safetensors`` with a ``manifest.json`` that says how each was made.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shira_diffusion.demo import world  # noqa: E402
from shira_diffusion.demo.model import ASSETS  # noqa: E402

RECIPES = ROOT / "training" / "demo_recipes.json"
TYPES = ("lora", "shira-struct", "shira-rand", "shira-wm", "shira-grad", "shira-snip")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--assets", type=Path, default=ASSETS, help="writes <assets>/demo and <assets>/adapters")
    p.add_argument("--work_dir", type=Path, default=ROOT / "build" / "demo_world", help="instance images and training runs")
    p.add_argument("--skip_base", action="store_true", help="keep the existing base model")
    p.add_argument("--base_args", default="", help="extra arguments for train_demo_base.py, e.g. '--unet_steps 100'")
    p.add_argument("--concepts", nargs="+", choices=list(world.CONCEPTS), default=list(world.CONCEPTS))
    p.add_argument("--types", nargs="+", choices=TYPES, default=list(TYPES))
    p.add_argument("--rank", type=int, default=4, help="LoRA rank; SHiRA gets the same parameter count")
    p.add_argument("--recipes", default=str(RECIPES), help="learning rate and steps per adapter, chosen by sweep_demo_recipes.py "
                   "(adapters it does not list, or all with --recipes none, use --learning_rate and --steps)")
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--instances", type=int, default=5)
    p.add_argument("--unet_only", action="store_true", help="adapt the UNet only (default: the UNet and both text encoders, so a new trigger word gets a meaning)")
    p.add_argument("--class_images", type=int, default=100, help="rendered plain scenes for prior preservation (0: none)")
    p.add_argument("--prior_loss_weight", type=float, default=1.0)
    p.add_argument("--decoys", type=float, default=0.5, help="share of the class scenes captioned '..., in <decoy word> style' (world.DECOYS)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def class_scenes(n: int, seed: int, decoys: float = 0.0) -> tuple[list[world.Scene], list[str]]:
    """Plain scenes and their captions: what prior preservation keeps the adapters from
    forgetting. A share ``decoys`` of them is captioned under the style template with a word that
    names no look (``world.DECOYS``), so a style adapter learns its trigger word, not the template."""
    rng = random.Random(f"class/{seed}")
    scenes = [world.random_scene(rng) for _ in range(n)]
    decoyed = set(rng.sample(range(n), round(decoys * n)))
    captions = [world.decoy_caption(s, world.DECOYS[i % len(world.DECOYS)]) if i in decoyed else world.caption(s) for i, s in enumerate(scenes)]
    return scenes, captions


def load_recipes(path: str) -> dict:
    """``{"<concept>-<type>": {"learning_rate": ..., "steps": ...}}`` chosen by the sweep; {} for
    ``none`` or when the default file is not there yet."""
    if path == "none" or (Path(path) == RECIPES and not RECIPES.is_file()):
        return {}
    if not Path(path).is_file():
        raise SystemExit(f"--recipes {path}: no such file (write one with training/sweep_demo_recipes.py, or pass 'none')")
    return json.loads(Path(path).read_text())["chosen"]


def recipe(args, recipes: dict, concept: str, kind: str) -> dict:
    """The recipe one adapter is trained with: the sweep's choice, else the command line's."""
    chosen = recipes.get(f"{concept}-{kind}", {})
    return {"learning_rate": chosen.get("learning_rate", args.learning_rate), "steps": chosen.get("steps", args.steps)}


def train_command(args, base: Path, concept: str, kind: str, data: Path, prompt: str, mask_seed: int, out: Path,
                  learning_rate: float, steps: int) -> tuple[list[str], Path]:
    """The ``train_shira_dreambooth.py`` command line for one adapter, and the file it writes."""
    cmd = [sys.executable, str(ROOT / "training" / "train_shira_dreambooth.py"),
           "--pretrained_model_name_or_path", str(base), "--instance_data_dir", str(data), "--instance_prompt", prompt,
           "--output_dir", str(out), "--resolution", str(world.SIZE), "--train_batch_size", str(args.instances),
           "--max_train_steps", str(steps), "--learning_rate", str(learning_rate), "--lr_scheduler", "constant",
           "--seed", str(args.seed), "--mixed_precision", "no", "--cache_latents", "--checkpointing_steps", str(10 * steps),
           "--save_dtype", "fp32"]
    if not args.unet_only:
        cmd += ["--train_text_encoder", "--text_encoder_lr", str(learning_rate)]
    if args.class_images:
        cmd += ["--with_prior_preservation", "--class_data_dir", str(args.work_dir / "class"), "--class_prompt", "a shape",
                "--num_class_images", str(args.class_images), "--prior_loss_weight", str(args.prior_loss_weight)]
    if kind == "lora":
        return cmd + ["--adapter_type", "lora", "--lora_equivalent_rank", str(args.rank)], out / "pytorch_lora_weights.safetensors"
    cmd += ["--mask", kind.removeprefix("shira-"), "--lora_equivalent_rank", str(args.rank), "--mask_seed", str(mask_seed)]
    return cmd, out / "shira_adapter.safetensors"


def manifest_entry(args, concept: str, kind: str, prompt: str, mask_seed: int, learning_rate: float, steps: int, seconds: float) -> dict:
    return {"file": f"{concept}-{kind}.safetensors", "concept": concept, "type": kind, "instance_prompt": prompt, "rank": args.rank,
            "steps": steps, "learning_rate": learning_rate, "text_encoders": not args.unet_only, "class_images": args.class_images,
            "decoys": args.decoys, "prior_loss_weight": args.prior_loss_weight, **({} if kind == "lora" else {"mask_seed": mask_seed}),
            "seconds": round(seconds, 1)}


def prepare(args) -> dict[str, tuple[Path, str, int]]:
    """Write the class and instance images; per concept: its instance folder, prompt and mask seed."""
    if args.class_images:
        world.write_scenes(args.work_dir / "class", *class_scenes(args.class_images, args.seed, args.decoys))
    prepared = {}
    for name in args.concepts:
        data = args.work_dir / "instances" / name
        scenes = world.CONCEPTS[name].instance_scenes(args.instances, args.seed)
        world.write_scenes(data, scenes)
        prepared[name] = (data, world.caption(scenes[0]), args.seed + list(world.CONCEPTS).index(name))
    return prepared


def main(argv=None) -> None:
    args = parse_args(argv)
    start = time.perf_counter()
    base = args.assets / "demo"
    if not args.skip_base:
        subprocess.run([sys.executable, str(ROOT / "training" / "train_demo_base.py"), "--output_dir", str(base),
                        "--seed", str(args.seed), *args.base_args.split()], check=True)
    (args.assets / "adapters").mkdir(parents=True, exist_ok=True)
    manifest_path = args.assets / "adapters" / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    recipes = load_recipes(args.recipes)
    for name, (data, prompt, mask_seed) in prepare(args).items():
        for kind in args.types:
            r = recipe(args, recipes, name, kind)
            cmd, produced = train_command(args, base, name, kind, data, prompt, mask_seed, args.work_dir / "runs" / f"{name}-{kind}", **r)
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True)
            entry = manifest_entry(args, name, kind, prompt, mask_seed, **r, seconds=time.perf_counter() - t0)
            shutil.copyfile(produced, args.assets / "adapters" / entry["file"])
            manifest[entry["file"]] = entry
            manifest_path.write_text(json.dumps(dict(sorted(manifest.items())), indent=2))
            print(f"{entry['file']}: {entry['seconds']} s (lr {r['learning_rate']:g}, {r['steps']} steps)", flush=True)
    print(f"demo world built in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
