"""Side-by-side comparison: base | each adapter | their fusion, same prompt and seed, and how much
of each adapter's effect survives the fusion (concept loss), in weight space and image space."""

from __future__ import annotations

from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

LABEL_HEIGHT = 18


def image_distance(a: Image.Image, b: Image.Image) -> dict[str, float]:
    """Offline distances in [0, 1]: mean absolute pixel difference at 64x64, and colour-histogram L1 / 2."""
    x = torch.tensor(list(a.convert("RGB").resize((64, 64)).getdata()), dtype=torch.float32) / 255
    y = torch.tensor(list(b.convert("RGB").resize((64, 64)).getdata()), dtype=torch.float32) / 255
    hx = torch.cat([torch.histc(x[:, c], bins=16, min=0, max=1) for c in range(3)]) / x.shape[0]
    hy = torch.cat([torch.histc(y[:, c], bins=16, min=0, max=1) for c in range(3)]) / y.shape[0]
    return {"pixel_l1": float((x - y).abs().mean()), "histogram_l1": float((hx - hy).abs().sum() / 6)}


def retention(base: Image.Image, alone: Image.Image, fused: Image.Image) -> float:
    """1 when the fused image is as close to the adapter's own image as can be, 0 when it is as far
    from it as the base model's image is (the adapter's effect is lost)."""
    moved = image_distance(base, alone)["pixel_l1"]
    if moved == 0:
        return 1.0
    return 1.0 - image_distance(fused, alone)["pixel_l1"] / moved


def grid(rows: list[list[Image.Image]], labels: list[str], row_labels: list[str]) -> Image.Image:
    """Images in a table with a label over each column and the row label in the first cell."""
    w, h = rows[0][0].size
    out = Image.new("RGB", (w * len(labels), (h + LABEL_HEIGHT) * len(rows)), "white")
    draw = ImageDraw.Draw(out)
    font = ImageFont.load_default()
    for r, images in enumerate(rows):
        top = r * (h + LABEL_HEIGHT)
        for c, image in enumerate(images):
            text = labels[c] if c else f"{labels[0]} ({row_labels[r]})"
            draw.text((c * w + 2, top + 3), text, fill="black", font=font)
            out.paste(image.convert("RGB"), (c * w, top + LABEL_HEIGHT))
    return out


def compare_sets(sw, prompt: str, adapters: list[str], seeds: list[int], adapter_weights=None, lora_pair=None,
                 return_details: bool = False, **kwargs) -> Any:
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
    return picture, _details(sw, adapters, columns, per_seed, lora_pair)


def _details(sw, adapters, columns, per_seed, lora_pair) -> dict:
    from .metrics import interference

    details: dict[str, Any] = {"columns": [label for label, _ in columns], "images": per_seed}
    if len(adapters) > 1:
        fused = "+".join(adapters)
        details["image_retention"] = {
            name: sum(retention(s["base"], s[name], s[fused]) for s in per_seed) / len(per_seed) for name in adapters
        }
        details["image_distance"] = {
            name: {"fused_vs_alone": sum(image_distance(s[fused], s[name])["pixel_l1"] for s in per_seed) / len(per_seed),
                   "base_vs_alone": sum(image_distance(s["base"], s[name])["pixel_l1"] for s in per_seed) / len(per_seed)}
            for name in adapters
        }
        kinds = sw.list_adapters()
        sparse = [n for n in adapters if kinds[n]["kind"] == "shira"]
        details["weight_space"] = {
            (a, b): interference(sw.get_adapter(a), sw.get_adapter(b))["aggregate"]
            for i, a in enumerate(sparse) for b in sparse[i + 1 :]
        }
    if lora_pair and len(lora_pair) > 1:
        fused = "LoRA " + "+".join(lora_pair)
        details["lora_image_retention"] = {
            name: sum(retention(s["base"], s[name], s[fused]) for s in per_seed) / len(per_seed) for name in lora_pair
        }
    return details
