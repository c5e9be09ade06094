"""Side-by-side comparison (base | each adapter | their fusion, same prompt and seed) and the X/Y
strength plot, with a concept-loss figure that means what it says.

How much of an adapter's concept survives in an image, by the best measure available:

* ``detector`` (the demo model): the demo world's analytic detectors say whether the image shows
  the concept (the ``sks`` shape, the bluefire glow, the paintings stripes): yes or no;
* ``embedding`` (an image encoder is given, e.g. a local CLIP vision model): how much closer the
  image's embedding is to the adapter's own image than the base image is, ``(cos(x, alone) -
  cos(base, alone)) / (1 - cos(base, alone))``: 1 = as close as the adapter's own image, 0 = no
  closer than the base;
* ``pixel`` (fallback): where the image sits on the way from the base image to the adapter's own
  image, the projection ``<x - base, alone - base> / |alone - base|^2`` over pixels: 1 = at the
  adapter's image, 0 = at the base; a fusion of two concepts typically lands between.
"""

from __future__ import annotations

import csv
import io
import textwrap
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

MIN_CELL = 160  # px: small models' images are upscaled (nearest neighbour) to at least this
CHAR_W, LINE_H = 6, 12  # Pillow's default bitmap font

METRICS = {
    "detector": "demo detector: share of seeds whose image shows the concept (0 to 1; the adapter alone, for reference)",
    "embedding": "image-embedding similarity to the adapter's own image, relative to the base (1 = as close as the adapter's "
                 "own image, 0 = no closer than the base; below 0: farther)",
    "pixel": "pixel fallback: position between the base image (0) and the adapter's own image (1); a fusion of two concepts "
             "usually lands between. Less reliable than a detector or an image embedding",
}


def demo_concept(adapter_name: str) -> str | None:
    """The demo concept an adapter of the demo model teaches, from its name (``bluefire-shira-wm``)."""
    from .demo.world import CONCEPTS

    head = adapter_name.split("-", 1)[0]
    return head if head in CONCEPTS else None


class ImageEncoder:
    """A local image-embedding model (a CLIP vision model folder, through transformers)."""

    def __init__(self, path: str) -> None:
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        self.processor = CLIPImageProcessor.from_pretrained(path)
        self.model = CLIPVisionModelWithProjection.from_pretrained(path).eval()

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        return torch.nn.functional.normalize(self.model(pixel_values=pixels).image_embeds.float(), dim=-1)


class _EncodedOnce:
    """An encoder that embeds each image object once per figure: the base and single-adapter
    references are compared with every cell, and CLIP costs far more than the comparison. The
    images are held, so an ``id`` is never reused while the figure is made."""

    def __init__(self, encoder) -> None:
        self.encoder, self.seen = encoder, {}

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        new = list({id(im): im for im in images if id(im) not in self.seen}.values())
        if new:
            for im, e in zip(new, self.encoder(new)):
                self.seen[id(im)] = (im, e)
        return torch.stack([self.seen[id(im)][1] for im in images])


def encoded_once(encoder):
    return None if encoder is None else _EncodedOnce(encoder)


def _pixels(image: Image.Image) -> torch.Tensor:
    return torch.tensor(list(image.convert("RGB").resize((64, 64)).getdata()), dtype=torch.float64).view(-1) / 255


def image_distance(a: Image.Image, b: Image.Image) -> float:
    """Mean absolute pixel difference at 64x64, in [0, 1]."""
    return float((_pixels(a) - _pixels(b)).abs().mean())


def concept_kept(base: Image.Image, alone: Image.Image, image: Image.Image, metric: str, concept: str | None = None,
                 encoder: ImageEncoder | None = None) -> float:
    """One image's concept figure (see the module docstring): 1.0 / 0.0 for the detector."""
    if metric == "detector":
        from .demo.detect import read, shows_concept

        return float(shows_concept(read(image), concept))
    if metric == "embedding":
        e_base, e_alone, e = encoder([base, alone, image])
        reach = 1.0 - float(e_base @ e_alone)
        return (float(e @ e_alone) - float(e_base @ e_alone)) / reach if reach > 1e-6 else 1.0
    b, a, x = _pixels(base), _pixels(alone), _pixels(image)
    span = float((a - b) @ (a - b))
    return float((x - b) @ (a - b)) / span if span > 0 else 1.0


def pick_metric(adapters: list[str], detector: bool, encoder) -> str:
    if detector and all(demo_concept(n) for n in adapters):
        return "detector"
    return "embedding" if encoder is not None else "pixel"


# ---- pictures -----------------------------------------------------------------------------------


def _wrap(text: str, width_px: int) -> list[str]:
    return textwrap.wrap(text, max(4, width_px // CHAR_W - 1), break_long_words=True) or [""]


def _cell(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    if min(w, h) >= size:
        return image.convert("RGB")
    k = -(-size // min(w, h))
    return image.convert("RGB").resize((w * k, h * k), Image.NEAREST)


def grid(rows: list[list[Image.Image]], labels: list[str], row_labels: list[str], captions: list[list[str]] | None = None,
         corner: str = "") -> Image.Image:
    """Images in a table: wrapped column labels on top, row labels on the left, an optional caption
    under each cell; cells upscaled to at least :data:`MIN_CELL` px."""
    cells = [[_cell(im, MIN_CELL) for im in row] for row in rows]
    w, h = cells[0][0].size
    font = ImageFont.load_default()
    head = [_wrap(t, w) for t in labels]
    top = LINE_H * max(len(x) for x in head) + 6
    side = max(CHAR_W * min(24, max(len(t) for t in (*row_labels, corner))) + 12, 60)
    wrapped_captions = [[_wrap(c, w) for c in row] for row in captions] if captions else None
    below = LINE_H * max((len(c) for row in wrapped_captions for c in row), default=0) + 4 if wrapped_captions else 0
    out = Image.new("RGB", (side + w * len(labels), top + (h + below) * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    draw.text((4, 4), "\n".join(_wrap(corner, side)), fill="gray", font=font)
    for c, lines in enumerate(head):
        draw.text((side + c * w + 3, 3), "\n".join(lines), fill="black", font=font)
    for r, row in enumerate(cells):
        y = top + r * (h + below)
        draw.text((4, y + 4), "\n".join(_wrap(row_labels[r], side)), fill="black", font=font)
        for c, image in enumerate(row):
            out.paste(image, (side + c * w, y))
            if wrapped_captions:
                draw.text((side + c * w + 3, y + h + 2), "\n".join(wrapped_captions[r][c]), fill="black", font=font)
    return out


# ---- side by side ---------------------------------------------------------------------------------


def compare_sets(sw, prompt: str, adapters: list[str], seeds: list[int], adapter_weights=None, lora_pair=None,
                 return_details: bool = False, detector: bool = False, encoder: ImageEncoder | None = None, **kwargs) -> Any:
    if not adapters:
        raise ValueError("pick at least one adapter to compare")
    weights = sw.scales(adapters, adapter_weights)
    columns: list[tuple[str, dict | None]] = [("base", None)]
    columns += [(name, {name: weights[name]}) for name in adapters]
    if len(adapters) > 1:
        columns.append(("+".join(adapters), weights))
    if lora_pair:  # LoRA counterparts of the same concepts: each alone, then fused
        columns += [(name, {name: 1.0}) for name in lora_pair if name not in adapters]
        if len(lora_pair) > 1:
            columns.append(("LoRA " + "+".join(lora_pair), {n: 1.0 for n in lora_pair}))
    rows, per_seed = [], []
    for seed in seeds:
        images = {}
        for label, scales in columns:
            gen = torch.Generator().manual_seed(int(seed))
            images[label] = sw(prompt, adapters=scales, generator=gen, **kwargs).images[0]
        rows.append([images[label] for label, _ in columns])
        per_seed.append(images)
    picture = grid(rows, [label for label, _ in columns], [f"seed {s}" for s in seeds])
    if not return_details:
        return picture
    return picture, _details(sw, adapters, columns, per_seed, lora_pair, detector, encoded_once(encoder))


def _kept(per_seed, names, fused, metric, encoder) -> dict[str, dict[str, float]]:
    out = {}
    for name in names:
        concept = demo_concept(name)
        fused_v = [concept_kept(s["base"], s[name], s[fused], metric, concept, encoder) for s in per_seed]
        row = {"fused": sum(fused_v) / len(fused_v)}
        if metric == "detector":
            alone = [concept_kept(s["base"], s[name], s[name], metric, concept, encoder) for s in per_seed]
            row["alone"] = sum(alone) / len(alone)
        out[name] = row
    return out


def _details(sw, adapters, columns, per_seed, lora_pair, detector, encoder) -> dict:
    from .metrics import interference

    details: dict[str, Any] = {"columns": [label for label, _ in columns], "images": per_seed}
    if len(adapters) > 1:
        metric = pick_metric(adapters + list(lora_pair or []), detector, encoder)
        details["metric"], details["metric_meaning"] = metric, METRICS[metric]
        details["concept"] = _kept(per_seed, adapters, "+".join(adapters), metric, encoder)
        details["image_distance"] = {
            name: {"fused_vs_alone": sum(image_distance(s["+".join(adapters)], s[name]) for s in per_seed) / len(per_seed),
                   "base_vs_alone": sum(image_distance(s["base"], s[name]) for s in per_seed) / len(per_seed)}
            for name in adapters
        }
        kinds = sw.list_adapters()
        sparse = [n for n in adapters if kinds[n]["kind"] == "shira"]
        details["weight_space"] = {
            (a, b): interference(sw.get_adapter(a), sw.get_adapter(b))["aggregate"]
            for i, a in enumerate(sparse) for b in sparse[i + 1 :]
        }
        if lora_pair and len(lora_pair) > 1:
            details["lora_concept"] = _kept(per_seed, lora_pair, "LoRA " + "+".join(lora_pair), metric, encoder)
    return details


# ---- X/Y plot -------------------------------------------------------------------------------------

SEED = "seed"


def xy_plot(sw, prompt: str, x: tuple[str, list], y: tuple[str, list], seed: int = 0, detector: bool = False,
            encoder: ImageEncoder | None = None, **kwargs) -> tuple[Image.Image, list[dict]]:
    """A1111's X/Y plot for concept loss: adapter ``x[0]`` at each strength ``x[1]`` across, and
    down ``y[0]`` (another adapter, or ``"seed"``) at each of ``y[1]``. Every cell is written from
    the same base in one switch (its time is in the caption and the rows); each cell's concept
    figure per adapter is measured against that adapter alone at strength 1 and the base, same seed.

    Returns the labelled grid and one row per cell (``x``, ``y``, ``switch_ms``, one
    ``kept:<adapter>`` per adapter), which :func:`rows_csv` writes as CSV.
    """
    (x_name, x_values), (y_name, y_values) = x, y
    if not x_values or not y_values:
        raise ValueError("each axis needs at least one value")
    if x_name == SEED:
        raise ValueError("put the seed on the Y axis; the X axis is an adapter's strength")
    names = [x_name] + ([y_name] if y_name != SEED else [])
    if len(set(names)) != len(names):
        raise ValueError("the two axes name the same adapter")
    for name in names:
        sw.engine.store.get(name)  # KeyError naming the loaded ones
    metric = pick_metric(names, detector, encoder)
    encoder = encoded_once(encoder)
    seeds = [int(v) for v in y_values] if y_name == SEED else [int(seed)]

    drawn: dict = {}

    def render(adapters: dict, s: int):
        """Each (active set, seed) once: a cell equal to a reference (one adapter at 1 and the rest
        at 0, or all at 0: the base) reuses its image and switch time."""
        key = (frozenset((n, float(v)) for n, v in adapters.items() if float(v) != 0.0), s)
        if key not in drawn:
            with sw.engine.lock:
                out = sw(prompt, adapters=adapters, generator=torch.Generator().manual_seed(s), **kwargs).images[0]
                drawn[key] = out, sw.last_switch_ms
        return drawn[key]

    refs = {s: {"base": render({}, s)[0], **{n: render({n: 1.0}, s)[0] for n in names}} for s in seeds}
    cells, captions, rows = [], [], []
    for yv in y_values:
        line, line_captions = [], []
        for xv in x_values:
            s = int(yv) if y_name == SEED else int(seed)
            adapters = {x_name: float(xv), **({y_name: float(yv)} if y_name != SEED else {})}
            image, switch_ms = render(adapters, s)
            kept = {n: concept_kept(refs[s]["base"], refs[s][n], image, metric, demo_concept(n), encoder) for n in names}
            rows.append({"x": float(xv), "y": float(yv) if y_name != SEED else int(yv), "seed": s, "switch_ms": round(switch_ms, 2),
                         **{f"kept:{n}": round(v, 4) for n, v in kept.items()}})
            line.append(image)
            line_captions.append(f"{switch_ms:.0f} ms; " + ", ".join(f"{n[:10]} {v:.2f}" for n, v in kept.items()))
        cells.append(line)
        captions.append(line_captions)
    picture = grid(cells, [f"{x_name} {float(v):g}" for v in x_values],
                   [f"{y_name} {v:g}" if y_name != SEED else f"seed {int(v)}" for v in y_values], captions,
                   corner=f"{metric} figure: 1 = kept")
    return picture, rows


def rows_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["x", "y"])
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()
