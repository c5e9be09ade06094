"""What the benchmark scripts share: a median timer and PNG bar charts drawn with Pillow only."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

def unet_arguments(parser) -> None:
    """The options of the scripts that time the engine on the full-size SDXL UNet."""
    from shira_diffusion.dtypes import DTYPES

    parser.add_argument("--rank", type=int, default=16, help="LoRA rank; SHiRA gets r*(rows+cols) entries per weight")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reduced", action="store_true", help="tiny SDXL-layout UNet instead of the full one (smoke runs)")


def sync() -> None:
    """Wait for queued CUDA work: a GPU time without it is the time to queue the kernels."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def clock(fn) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def median(fn, repeats: int, before=None, after=None, warmup: int = 0) -> float:
    """Median seconds of ``fn()``; ``before``/``after`` run untimed around each call; the first
    ``warmup`` calls are not counted (first-touch page faults, lazy initialisation)."""
    samples = []
    for i in range(warmup + repeats):
        if before:
            before()
        took = clock(fn)
        if i >= warmup:
            samples.append(took)
        if after:
            after()
    return statistics.median(samples)


COLOURS = ["#d1495b", "#00798c", "#edae49", "#30638e", "#66a182", "#8d96a3"]


def bar_chart(path: str | Path, title: str, bars: list[tuple[str, float]], unit: str = "s", width: int = 900) -> Path:
    """One bar per ``(label, value)``, scaled to the largest, value printed at the bar's end."""
    font = ImageFont.load_default()
    row, left, top = 26, 260, 34
    image = Image.new("RGB", (width, top + row * len(bars) + 12), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black", font=font)
    biggest = max((v for _, v in bars), default=1.0) or 1.0
    for i, (label, value) in enumerate(bars):
        y = top + i * row
        length = int((width - left - 110) * value / biggest)
        draw.text((10, y + 6), label, fill="black", font=font)
        draw.rectangle((left, y + 3, left + max(1, length), y + row - 5), fill=COLOURS[i % len(COLOURS)])
        draw.text((left + length + 6, y + 6), f"{value:.4g} {unit}", fill="black", font=font)
    path = Path(path)
    image.save(path)
    return path
