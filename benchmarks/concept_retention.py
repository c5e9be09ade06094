"""Concept learning, preservation and concept loss under fusion: SHiRA (each mask) vs LoRA.

On the built-in demo model with the demo adapters (``shira_diffusion/assets/adapters``, rebuilt by
``training/build_demo_world.py``), for every adapter type:

* single: the share of generations where the detectors see the concept, adapter alone, over N
  seeds x M held-out prompts that carry the concept's trigger; "on prompt": seen *and* the rest
  of the prompt drawn right (an adapter that paints its style over a wrecked scene scores 0);
* the base model alone: prompted shape and colour, each concept under its trigger (should be 0),
  and each style's look when described in plain words (", with a glowing outline");
* preservation: with the adapter applied, prompts without any trigger still show the prompted
  shape and colour (the base model's own rate is reported next to it);
* leak: with the adapter alone, the share of *another* concept's prompts on which its concept
  shows (an adapter bound to "in ... style" rather than to its own trigger word fires on both
  styles' prompts, and then a fusion of the two cannot keep both);
* fused retention: each pair fused at scale 1.0; each concept's score with its own prompts under
  the fusion, divided by its single score (also on prompt); plus the share of prompts carrying both triggers
  where both concepts show ("joint");
* weight space: index overlap, AWOM and AWOR of each pair.

    python benchmarks/concept_retention.py                       # ~15 min on 2 CPU cores
    python benchmarks/concept_retention.py --seeds 1 --prompts 2 --steps 4 --out /tmp/cr.json   # smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shira_diffusion import ShiraPipelineSwitcher  # noqa: E402
from shira_diffusion.demo import world  # noqa: E402
from shira_diffusion.demo.detect import Reading, read_many, shows_concept  # noqa: E402
from shira_diffusion.demo.model import ADAPTERS_DIR, recorded_config  # noqa: E402
from shira_diffusion.metrics import interference  # noqa: E402

TYPES = ("lora", "shira-struct", "shira-rand", "shira-wm", "shira-grad", "shira-snip")
PAIRS = list(itertools.combinations(world.CONCEPTS, 2))
SHORT = {"sks": "sks", "bluefire": "bf", "paintings": "pt"}  # figure labels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters_dir", type=Path, default=ADAPTERS_DIR)
    p.add_argument("--types", nargs="+", default=list(TYPES))
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--prompts", type=int, default=8, help="held-out prompts per concept (and plain prompts)")
    p.add_argument("--base_prompts", type=int, default=100, help="plain prompts for the base model's accuracy")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "concept_retention.json")
    return p.parse_args(argv)


class Bench:
    def __init__(self, sw: ShiraPipelineSwitcher, args) -> None:
        self.sw, self.args = sw, args

    def generate(self, prompts: list[str], adapters: dict[str, float] | None) -> list[Image.Image]:
        """Every prompt x seed; each image has its own generator, so batching never changes it."""
        jobs = [(p, s) for s in range(self.args.seeds) for p in prompts]
        images = []
        for i in range(0, len(jobs), self.args.batch):
            chunk = jobs[i : i + self.args.batch]
            gens = [torch.Generator().manual_seed(1000 * s + j) for j, (_, s) in enumerate(chunk, start=i)]
            out = self.sw([p for p, _ in chunk], adapters=adapters or {}, generator=gens, height=world.SIZE, width=world.SIZE,
                          num_inference_steps=self.args.steps, guidance_scale=self.args.guidance)
            images += out.images
        return images

    def score(self, scenes: list[world.Scene], adapters, test, *more_tests, described: bool = False):
        """Share of generations passing ``test`` (a tuple of shares when more tests are given);
        ``described`` prompts a style by its look in plain words instead of its trigger."""
        readings = read_many(self.generate([world.caption(s, described=described) for s in scenes], adapters))
        expected = [s for _ in range(self.args.seeds) for s in scenes]
        shares = [sum(bool(t(r, s)) for r, s in zip(readings, expected)) / len(readings) for t in (test, *more_tests)]
        return tuple(shares) if more_tests else shares[0]


def concept_seen(name: str):
    return lambda r, s: shows_concept(r, name)


def concept_on_prompt(name: str):
    """The concept seen *and* the prompted shape in its colour (for the subject: the crescent in
    its own colour; for a style: the prompted shape and colour): wiping out the scene does not count."""
    seen = concept_seen(name)
    return lambda r, s: seen(r, s) and r.shows(s)


def retention(fused: dict[str, float], single: dict[str, float]) -> dict[str, float | None]:
    """Fused score over single score per concept (None where the adapter alone never showed it)."""
    return {c: (v / single[c] if single[c] else None) for c, v in fused.items()}


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def joint_scenes(a: str, b: str, n: int) -> list[world.Scene]:
    """Scenes whose captions carry both triggers (subject and style, or both styles)."""
    concepts = world.CONCEPTS
    subject = next((c for c in (a, b) if concepts[c].style is None), None)
    styles = [concepts[c].style for c in (a, b) if concepts[c].style]
    base = concepts[subject].prompts(n) if subject else world.plain_prompts(n, seed=5)
    return [replace(s, style="|".join(styles)) for s in base]


def joint_caption(scene: world.Scene) -> str:
    styles = scene.style.split("|") if scene.style else []
    text = world.caption(replace(scene, style=None))
    return text + "".join(f", in {s} style" for s in styles)


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    sw = ShiraPipelineSwitcher.demo()
    available = {p.stem for p in args.adapters_dir.glob("*.safetensors")}
    types = [t for t in args.types if all(f"{c}-{t}" in available for c in world.CONCEPTS)]
    for t in types:
        for c in world.CONCEPTS:
            sw.load_adapter(args.adapters_dir / f"{c}-{t}.safetensors", adapter_name=f"{c}-{t}")
    bench = Bench(sw, args)
    concept_prompts = {c: world.CONCEPTS[c].prompts(args.prompts) for c in world.CONCEPTS}
    plain = world.plain_prompts(args.prompts)
    start = time.perf_counter()
    base_scenes = world.plain_prompts(args.base_prompts, seed=3)
    both, shape, colour = bench.score(base_scenes, None, Reading.shows, lambda r, s: r.shape == s.shape, lambda r, s: r.colour == s.colour)
    result = {
        "config": recorded_config(args),
        "base": {
            "prompted_shape_and_colour": both,
            "prompted_shape": shape,
            "prompted_colour": colour,
            "concept_without_adapter": {c: bench.score(concept_prompts[c], None, concept_seen(c)) for c in world.CONCEPTS},
            # the looks the style adapters bind their triggers to, asked for in plain words
            "style_when_described": {c: bench.score(concept_prompts[c], None, concept_on_prompt(c), described=True)
                                     for c in world.CONCEPTS if world.CONCEPTS[c].style},
        },
        "types": {},
    }
    print(json.dumps(result["base"]), flush=True)
    for t in types:
        name = {c: f"{c}-{t}" for c in world.CONCEPTS}
        row = {"single": {}, "single_on_prompt": {}, "preservation": {}, "leak": {}, "fused": {}, "params": sw.list_adapters()[name["sks"]]["params"]}
        for c in world.CONCEPTS:
            row["single"][c], row["single_on_prompt"][c] = bench.score(concept_prompts[c], {name[c]: 1.0}, concept_seen(c), concept_on_prompt(c))
            row["preservation"][c] = bench.score(plain, {name[c]: 1.0}, Reading.shows)
            for d in world.CONCEPTS:  # the concept showing up under another concept's trigger
                if d != c:
                    row["leak"][f"{c} on {d}"] = bench.score(concept_prompts[d], {name[c]: 1.0}, concept_seen(c))
        for a, b in PAIRS:
            fused = {name[a]: 1.0, name[b]: 1.0}
            scores, strict = {}, {}
            for c in (a, b):
                scores[c], strict[c] = bench.score(concept_prompts[c], fused, concept_seen(c), concept_on_prompt(c))
            both = joint_scenes(a, b, args.prompts)
            readings = read_many(bench.generate([joint_caption(s) for s in both], fused))
            weights = interference(sw.get_adapter(name[a]), sw.get_adapter(name[b]))["aggregate"]
            row["fused"][f"{a}+{b}"] = {
                "score": scores,
                "retention": retention(scores, row["single"]),
                "score_on_prompt": strict,
                "retention_on_prompt": retention(strict, row["single_on_prompt"]),
                "joint": sum(concept_seen(a)(r, None) and concept_seen(b)(r, None) for r in readings) / len(readings),
                "overlap": weights["overlap"], "awom": weights["awom"], "awor": weights["awor"],
            }
        for key in ("single", "single_on_prompt", "preservation", "leak"):
            row[f"mean_{key}"] = mean(row[key].values())
        for key in ("retention", "retention_on_prompt"):  # None (never shown alone) is left out
            row[f"mean_{key}"] = mean(v for f in row["fused"].values() for v in f[key].values())
        row["mean_joint"] = mean(f["joint"] for f in row["fused"].values())
        result["types"][t] = row
        print(t, json.dumps({k: row[k] for k in ("mean_single", "mean_single_on_prompt", "mean_preservation", "mean_leak", "mean_retention", "mean_retention_on_prompt", "mean_joint")}), flush=True)
    lora = result["types"].get("lora", {}).get("mean_retention")
    result["aim"] = {  # SHiRA keeps >= 0.9 of its concepts under fusion, and >= LoRA's retention + 0.1
        t: {"retention_ge_0.9": row["mean_retention"] >= 0.9, "ge_lora_plus_0.1": None if lora is None else row["mean_retention"] >= lora + 0.1}
        for t, row in result["types"].items() if t != "lora" and row["mean_retention"] is not None
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["figure_pairs"] = figure(sw, args, types)
    return result


def figure(sw, args, types: list[str]) -> dict:
    """base | A | B | A+B for each pair, LoRA and the first SHiRA type, one prompt with both triggers."""
    shown = [t for t in ("lora", next((t for t in types if t != "lora"), None)) if t in types]
    rows, row_labels = [], []
    for t in shown:
        for a, b in PAIRS:
            scene = joint_scenes(a, b, 1)[0]
            prompt = joint_caption(scene)
            columns = [None, {f"{a}-{t}": 1.0}, {f"{b}-{t}": 1.0}, {f"{a}-{t}": 1.0, f"{b}-{t}": 1.0}]
            rows.append([sw(prompt, adapters=c or {}, generator=torch.Generator().manual_seed(0), height=world.SIZE,
                            width=world.SIZE, num_inference_steps=args.steps, guidance_scale=args.guidance).images[0].resize((160, 160), Image.NEAREST)
                         for c in columns])
            row_labels.append(f"{t} {SHORT[a]}+{SHORT[b]}")
    return {"rows": row_labels, "images": rows, "columns": ["base", "A", "B", "A+B"]}


def draw(result: dict, path: Path) -> None:
    from shira_diffusion.compare import grid

    fig = result.pop("figure_pairs")
    lines = [f"base model: prompted shape+colour {result['base']['prompted_shape_and_colour']:.2f}",
             f"{'type':<14}{'single ' + '/'.join(SHORT.values()):<22}{'on prompt':<18}{'preserve':<10}" + "".join(f"{p:<24}" for p in result["types"][next(iter(result["types"]))]["fused"]) if result["types"] else ""]
    for t, row in result["types"].items():
        single = "/".join(f"{v:.2f}" for v in row["single"].values())
        fused = "".join(f"{'/'.join('-' if v is None else f'{v:.2f}' for v in f['retention'].values())} ov{f['overlap']:.2f}".ljust(24) for f in row["fused"].values())
        strict = "/".join(f"{v:.2f}" for v in row["single_on_prompt"].values())
        lines.append(f"{t:<14}{single:<22}{strict:<18}{row['mean_preservation']:<10.2f}{fused}")
    font = ImageFont.load_default()
    table = Image.new("RGB", (1000, 16 * len(lines) + 30), "white")
    d = ImageDraw.Draw(table)
    d.text((10, 6), "concept retention (fused score / single score) per pair; ov = index overlap", fill="black", font=font)
    for i, line in enumerate(lines):
        d.text((10, 24 + 16 * i), line, fill="black", font=font)
    images = grid(fig["images"], fig["columns"], fig["rows"]) if fig["images"] else Image.new("RGB", (1, 1), "white")
    out = Image.new("RGB", (max(table.width, images.width), table.height + images.height), "white")
    out.paste(table, (0, 0))
    out.paste(images, (0, table.height))
    out.save(path)
    result["figure_rows"] = fig["rows"]


def main(argv=None) -> None:
    args = parse_args(argv)
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(result, args.out.with_suffix(".png"))
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
