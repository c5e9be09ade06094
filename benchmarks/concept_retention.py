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

Every number comes with a 95 % bootstrap interval over the (seed, prompt) pairs, and each SHiRA
type's means with the paired interval of their difference from LoRA's (``minus_lora``: an
interval that excludes 0 is a significant difference). The table's prompts never include the
validation prompts ``training/sweep_demo_recipes.py`` picked the learning rates on; the sweep's
record is copied into the JSON (``recipes``).

    python benchmarks/concept_retention.py                       # ~27 min on 2 CPU cores
    python benchmarks/concept_retention.py --generations 2 --other_generations 2 --prompts 2 --steps 4 --out /tmp/cr.json   # smoke run
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from shira_diffusion import ShiraPipelineSwitcher  # noqa: E402
from shira_diffusion.demo import world  # noqa: E402
from shira_diffusion.demo.detect import Reading  # noqa: E402
from shira_diffusion.demo.model import ADAPTERS_DIR, recorded_config  # noqa: E402
from shira_diffusion.demo.scoring import Scorer, concept_on_prompt, concept_seen  # noqa: E402
from shira_diffusion.metrics import interference  # noqa: E402

TYPES = ("lora", "shira-struct", "shira-rand", "shira-wm", "shira-grad", "shira-snip")
PAIRS = list(itertools.combinations(world.CONCEPTS, 2))
SHORT = {"sks": "sks", "bluefire": "bf", "paintings": "pt"}  # figure labels
RECIPES = ROOT / "training" / "demo_recipes.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapters_dir", type=Path, default=ADAPTERS_DIR)
    p.add_argument("--types", nargs="+", default=list(TYPES))
    p.add_argument("--generations", type=int, default=144, help="generations per cell for the scores retention divides (single and "
                   "fused), spread over the concept's prompts: each prompt gets ceil(generations / prompts) seeds")
    p.add_argument("--other_generations", type=int, default=48, help="the same for preservation, leak and joint")
    p.add_argument("--prompts", type=int, default=world.REPORTED, help="held-out prompts per concept (and plain prompts); the subject has only 7 "
                   "besides its instance and validation captions and gets those. Many prompts and few seeds each: a concept is "
                   "learnt on some scenes and not others, and 6 prompts measured mostly which 6")
    p.add_argument("--base_seeds", type=int, default=4, help="seeds per prompt for the base model's accuracy")
    p.add_argument("--base_prompts", type=int, default=100, help="plain prompts for the base model's accuracy")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--bootstrap", type=int, default=2000, help="resamples of the (seed, prompt) pairs for the 95 %% intervals")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "concept_retention.json")
    p.add_argument("--tables", type=Path, metavar="JSON", help="print the README tables of an existing result and exit")
    args = p.parse_args(argv)
    if not 1 <= args.prompts <= world.REPORTED:  # above it, the prompts would reach the ones the sweep looked for leaks on
        p.error(f"--prompts must be 1 to {world.REPORTED} (world.REPORTED), got {args.prompts}")
    return args


# ---- cells, shares and their intervals --------------------------------------------------------
# A cell is one test over one prompt set: (prompt-set name, seeds x prompts booleans). Cells over
# the same prompt set saw the same prompts with the same generators, so a bootstrap replicate
# resamples one set of (seed, prompt) pairs per prompt set and uses it for every cell on it, for
# every type: a fused score and the single score it is divided by, or LoRA's and SHiRA's
# retention, are compared pair for pair (paired bootstrap).

def shares(cells: dict[str, tuple[str, np.ndarray]], draws: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Each cell's share of passing generations; with ``draws`` one share per bootstrap replicate."""
    if draws is None:
        return {k: np.float64(a.mean()) for k, (_, a) in cells.items()}
    return {k: a.reshape(-1)[draws[name]].mean(axis=1) for k, (name, a) in cells.items()}


def derived(sh: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every number a type reports, from its cells' shares (floats, or one value per replicate):
    retention = fused score / single score (NaN where the adapter alone never showed the concept),
    and the means the table prints (NaN retentions left out)."""
    out = dict(sh)
    for a, b in PAIRS:
        for c in (a, b):
            for ratio, fused, single in (("retention", "score", "single"), ("retention_on_prompt", "score_on_prompt", "single_on_prompt")):
                top, bottom = np.asarray(sh[f"fused.{a}+{b}.{fused}.{c}"], float), np.asarray(sh[f"{single}.{c}"], float)
                out[f"fused.{a}+{b}.{ratio}.{c}"] = np.divide(top, bottom, out=np.full_like(top, np.nan), where=bottom > 0)
    for key in ("single", "single_on_prompt", "preservation", "leak"):
        out[f"mean_{key}"] = np.mean([v for k, v in sh.items() if k.startswith(key + ".")], axis=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN replicate stays NaN
        for key in ("retention", "retention_on_prompt"):
            out[f"mean_{key}"] = np.nanmean([v for k, v in out.items() if k.startswith("fused.") and k.split(".")[2] == key], axis=0)
    out["mean_joint"] = np.mean([v for k, v in sh.items() if k.endswith(".joint")], axis=0)
    # pooled: all fused scores over all the single scores they are divided by; a concept the
    # adapter rarely shows alone weighs little here, where its ratio dominates the mean above
    for pooled, fused, single in (("pooled_retention", "score", "single"), ("pooled_retention_on_prompt", "score_on_prompt", "single_on_prompt")):
        top = sum(np.asarray(sh[f"fused.{a}+{b}.{fused}.{c}"], float) for a, b in PAIRS for c in (a, b))
        bottom = sum(np.asarray(sh[f"{single}.{c}"], float) for a, b in PAIRS for c in (a, b))
        out[pooled] = np.divide(top, bottom, out=np.full_like(top, np.nan), where=bottom > 0)
    return out


def interval(replicates: np.ndarray) -> list[float] | None:
    """The 95 % percentile interval (None where every replicate is undefined)."""
    replicates = replicates[~np.isnan(replicates)]
    return None if not len(replicates) else [round(float(v), 4) for v in np.percentile(replicates, [2.5, 97.5])]


def nest(flat: dict) -> dict:
    """``{"fused.sks+bluefire.retention.sks": v}`` -> ``{"fused": {"sks+bluefire": {"retention": {"sks": v}}}}``."""
    out: dict = {}
    for key, value in flat.items():
        *path, last = key.split(".")
        node = out
        for part in path:
            node = node.setdefault(part, {})
        node[last] = value
    return out


def number(v) -> float | None:
    v = float(v)
    return None if np.isnan(v) else v


def summarise(cells: dict[str, dict[str, tuple[str, np.ndarray]]], replicates: int, seed: int = 0) -> dict[str, dict]:
    """Per type: point values and 95 % intervals of everything :func:`derived` reports, and for
    each other type the paired interval of its difference from LoRA's means."""
    rng = np.random.default_rng(seed)
    sizes = {name: a.size for c in cells.values() for name, a in c.values()}
    draws = {name: rng.integers(0, n, size=(replicates, n)) for name, n in sorted(sizes.items())}
    point = {t: derived(shares(c)) for t, c in cells.items()}
    boot = {t: derived(shares(c, draws)) for t, c in cells.items()}
    out = {}
    for t in cells:
        out[t] = {"point": {k: number(v) for k, v in point[t].items()}, "ci": {k: interval(v) for k, v in boot[t].items()}}
        if t != "lora" and "lora" in cells:
            out[t]["minus_lora"] = {k: {"point": number(point[t][k] - point["lora"][k]), "ci": interval(boot[t][k] - boot["lora"][k])}
                                    for k in point[t] if k.startswith(("mean_", "pooled_"))}
    return out


def joint_scenes(a: str, b: str, n: int) -> list[world.Scene]:
    """Scenes whose captions carry both triggers (subject and style, or both styles)."""
    concepts = world.CONCEPTS
    subject = next((c for c in (a, b) if concepts[c].style is None), None)
    styles = [concepts[c].style for c in (a, b) if concepts[c].style]
    base = concepts[subject].prompts(n, at_most=True) if subject else world.plain_prompts(n, seed=5)
    return [replace(s, style="|".join(styles)) for s in base]


def joint_caption(scene: world.Scene) -> str:
    styles = scene.style.split("|") if scene.style else []
    text = world.caption(replace(scene, style=None))
    return text + "".join(f", in {s} style" for s in styles)


def type_cells(scorer, few, sw, t: str, concept_prompts, plain) -> tuple[dict, dict]:
    """One type's cells (adapters alone, each pair fused) and its pairs' weight-space numbers.
    ``scorer(scenes)`` counts what retention divides (most generations), ``few(scenes)`` the
    rest; their cells are different prompt sets for the bootstrap (``<concept> few``)."""
    name = {c: f"{c}-{t}" for c in world.CONCEPTS}
    cells, weights = {}, {}
    for c in world.CONCEPTS:
        single, strict = scorer(concept_prompts[c]).outcomes(concept_prompts[c], {name[c]: 1.0}, concept_seen(c), concept_on_prompt(c))
        cells[f"single.{c}"], cells[f"single_on_prompt.{c}"] = (c, single), (c, strict)
        cells[f"preservation.{c}"] = ("plain", few(plain).outcomes(plain, {name[c]: 1.0}, Reading.shows)[0])
        for d in world.CONCEPTS:  # the concept showing up under another concept's trigger
            if d != c:
                cells[f"leak.{c} on {d}"] = (f"{d} few", few(concept_prompts[d]).outcomes(concept_prompts[d], {name[c]: 1.0}, concept_seen(c))[0])
    for a, b in PAIRS:
        fused, pair = {name[a]: 1.0, name[b]: 1.0}, f"{a}+{b}"
        for c in (a, b):
            score, strict = scorer(concept_prompts[c]).outcomes(concept_prompts[c], fused, concept_seen(c), concept_on_prompt(c))
            cells[f"fused.{pair}.score.{c}"], cells[f"fused.{pair}.score_on_prompt.{c}"] = (c, score), (c, strict)
        both = joint_scenes(a, b, len(plain))
        joint = few(both).outcomes(both, fused, lambda r, s: concept_seen(a)(r, s) and concept_seen(b)(r, s), captions=[joint_caption(s) for s in both])[0]
        cells[f"fused.{pair}.joint"] = (f"joint {pair}", joint)
        weights[pair] = {k: v for k, v in interference(sw.get_adapter(name[a]), sw.get_adapter(name[b]))["aggregate"].items()
                         if k in ("overlap", "awom", "awor")}
    return cells, weights


def recipes(types: list[str]) -> dict:
    """The sweep that chose each shipped adapter's learning rate (``training/demo_recipes.json``)."""
    if not RECIPES.is_file():
        return {}
    sweep = json.loads(RECIPES.read_text())
    runs = [{k: r[k] for k in ("concept", "type", "learning_rate", "score", "on_prompt", "preservation", "mean_leak")} for r in sweep["runs"] if r["type"] in types]
    return {"chosen": {k: v for k, v in sweep["chosen"].items() if k.split("-", 1)[1] in types}, "validation": sweep["validation"], "runs": runs}


def run(args) -> dict:
    torch.set_num_threads(args.threads)
    sw = ShiraPipelineSwitcher.demo()
    available = {p.stem for p in args.adapters_dir.glob("*.safetensors")}
    types = [t for t in args.types if all(f"{c}-{t}" in available for c in world.CONCEPTS)]
    for t in types:
        for c in world.CONCEPTS:
            sw.load_adapter(args.adapters_dir / f"{c}-{t}.safetensors", adapter_name=f"{c}-{t}")
    manifest_path = args.adapters_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}

    def spread(generations: int):  # a scorer giving a prompt set about ``generations`` generations
        return lambda scenes: Scorer(sw, -(-generations // len(scenes)), args.steps, args.guidance, args.batch)

    scorer, few = spread(args.generations), spread(args.other_generations)
    concept_prompts = {c: world.CONCEPTS[c].prompts(args.prompts, at_most=True) for c in world.CONCEPTS}
    plain = world.plain_prompts(args.prompts)
    start = time.perf_counter()
    base_scenes = world.plain_prompts(args.base_prompts, seed=3)
    both, shape, colour = Scorer(sw, args.base_seeds, args.steps, args.guidance, args.batch).outcomes(
        base_scenes, None, Reading.shows, lambda r, s: r.shape == s.shape, lambda r, s: r.colour == s.colour)
    base = {"prompted_shape_and_colour": ("base", both), "prompted_shape": ("base", shape), "prompted_colour": ("base", colour)}
    for c, scenes in concept_prompts.items():
        base[f"concept_without_adapter.{c}"] = (c, few(scenes).outcomes(scenes, None, concept_seen(c))[0])
        if world.CONCEPTS[c].style:  # the looks the style adapters bind their triggers to, asked for in plain words
            base[f"style_when_described.{c}"] = (f"{c} described", few(scenes).outcomes(scenes, None, concept_on_prompt(c), described=True)[0])
    base_shares = shares(base)
    print(json.dumps({k: float(v) for k, v in base_shares.items()}), flush=True)
    cells, weights = {}, {}
    for t in types:
        cells[t], weights[t] = type_cells(scorer, few, sw, t, concept_prompts, plain)
        sh = derived(shares(cells[t]))
        print(t, json.dumps({k: round(float(v), 3) for k, v in sh.items() if k.startswith("mean_")}), flush=True)
    summary = summarise(cells, args.bootstrap)
    rng = np.random.default_rng(1)
    base_draws = {name: rng.integers(0, a.size, size=(args.bootstrap, a.size)) for name, a in base.values()}
    result = {
        "config": recorded_config(args),
        "prompts": {c: len(p) for c, p in concept_prompts.items()},
        "generations_per_cell": {c: scorer(p).seeds * len(p) for c, p in concept_prompts.items()},  # single and fused
        "other_generations_per_cell": {c: few(p).seeds * len(p) for c, p in {**concept_prompts, "plain": plain}.items()},
        "base": {**nest({k: float(v) for k, v in base_shares.items()}), "ci": {k: interval(v) for k, v in shares(base, base_draws).items()}},
        "types": {},
        "recipes": recipes(types),
    }
    for t in types:
        row = nest(summary[t]["point"])
        for pair, w in weights[t].items():
            row["fused"][pair].update(w)
        row["params"] = sw.list_adapters()[f"sks-{t}"]["params"]
        row["learning_rate"] = {c: manifest.get(f"{c}-{t}.safetensors", {}).get("learning_rate") for c in world.CONCEPTS}
        row["ci"] = summary[t]["ci"]
        if "minus_lora" in summary[t]:
            row["minus_lora"] = summary[t]["minus_lora"]
        result["types"][t] = row
    result["aim"] = aim(result["types"])
    # every generation's outcome (seed-major, 1 = passed), so the intervals can be recomputed
    result["outcomes"] = {t: {k: {"prompt_set": name, "seeds": a.shape[0], "passed": "".join("1" if v else "0" for v in a.reshape(-1))}
                              for k, (name, a) in c.items()} for t, c in cells.items()}
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["figure_pairs"] = figure(sw, args, types)
    return result


def aim(rows: dict) -> dict:
    """The bar, per SHiRA type: learns each concept as often as LoRA (intervals overlapping or
    above), keeps >= 0.9 of its concepts fused, and beats LoRA's retention by >= 0.1 with
    intervals that do not overlap."""
    lora = rows.get("lora")
    out = {}
    for t, row in rows.items():
        if t == "lora" or row["mean_retention"] is None:
            continue
        ci = row["ci"]
        entry = {"retention_ge_0.9": row["mean_retention"] >= 0.9}
        if lora is not None:
            lo = lora["ci"]
            entry["learns_as_often_as_lora"] = all(ci[f"{k}.{c}"][1] >= lo[f"{k}.{c}"][0] for k in ("single", "single_on_prompt") for c in world.CONCEPTS)
            entry["retention_ge_lora_plus_0.1"] = lora["mean_retention"] is not None and row["mean_retention"] >= lora["mean_retention"] + 0.1
            entry["retention_intervals_apart"] = (None if ci["mean_retention"] is None or lo["mean_retention"] is None
                                                  else ci["mean_retention"][0] > lo["mean_retention"][1])
            diff = row["minus_lora"]["mean_retention"]["ci"]  # the paired interval of SHiRA's minus LoRA's
            entry["retention_difference_ci"] = diff
            entry["retention_difference_above_0.1"] = None if diff is None else diff[0] > 0.1
        out[t] = entry
    return out


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


NAMES = {"lora": "LoRA", **{t: f"SHiRA-{t.removeprefix('shira-')}" for t in TYPES if t != "lora"}}


def tables(result: dict) -> str:
    """The README's two tables (Markdown) from a result: what each adapter learns, and what
    each pair keeps fused; ``v (lo–hi)`` is a value and its 95 % interval."""
    def ci(row, key, value):
        if value is None:
            return "–"
        lo_hi = row["ci"].get(key)
        return f"{value:.2f}" if lo_hi is None else f"{value:.2f} ({lo_hi[0]:.2f}–{lo_hi[1]:.2f})"

    def diff(row, key):
        d = row.get("minus_lora", {}).get(key)
        if not d or d["point"] is None or d["ci"] is None:
            return "–"
        lo, hi = d["ci"]
        return f"{d['point']:+.2f} ({lo:+.2f}–{hi:+.2f}){' *' if lo > 0 or hi < 0 else ''}"

    concepts = list(world.CONCEPTS)
    learn = ["| type | lr sks / bf / pt | single sks | bf | pt | on prompt sks | bf | pt | preservation | leak bf→pt | pt→bf |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    fuse = ["| type | sks+bf: sks / bf | sks+pt: sks / pt | bf+pt: bf / pt | mean retention | minus LoRA | pooled retention | minus LoRA | joint | overlap |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for t, row in result["types"].items():
        rates = " / ".join("?" if row.get("learning_rate", {}).get(c) is None else f"{row['learning_rate'][c]:g}" for c in concepts)
        learn.append(f"| {NAMES.get(t, t)} | {rates} | " + " | ".join(ci(row, f"single.{c}", row["single"][c]) for c in concepts) + " | "
                     + " | ".join(ci(row, f"single_on_prompt.{c}", row["single_on_prompt"][c]) for c in concepts)
                     + f" | {ci(row, 'mean_preservation', row['mean_preservation'])} | "
                     + " | ".join(ci(row, f"leak.{k}", row["leak"][k]) for k in ("bluefire on paintings", "paintings on bluefire")) + " |")
        pairs = [" / ".join(ci(row, f"fused.{p}.retention.{c}", f["retention"][c]) for c in f["retention"]) for p, f in row["fused"].items()]
        overlap = "1 (dense)" if t == "lora" else f"{np.mean([f['overlap'] for f in row['fused'].values()]):.2f}"
        fuse.append(f"| {NAMES.get(t, t)} | " + " | ".join(pairs) + f" | **{ci(row, 'mean_retention', row['mean_retention'])}** | "
                    f"{'' if t == 'lora' else diff(row, 'mean_retention')} | {ci(row, 'pooled_retention', row['pooled_retention'])} | "
                    f"{'' if t == 'lora' else diff(row, 'pooled_retention')} | {ci(row, 'mean_joint', row['mean_joint'])} | {overlap} |")
    return "\n".join(learn) + "\n\n" + "\n".join(fuse) + "\n"


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tables:
        print(tables(json.loads(args.tables.read_text())), end="")
        return
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    draw(result, args.out.with_suffix(".png"))
    args.out.write_text(json.dumps(result, indent=2))
    print(tables(result), end="")
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
