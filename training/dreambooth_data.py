"""Images and prompts for DreamBooth training: reading, captions, SDXL micro-conditioning."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Example:
    pixels: torch.Tensor  # (3, H, W) in [-1, 1]
    prompt: str
    original_size: tuple[int, int]  # (height, width) before resize/crop
    crop_top_left: tuple[int, int]


def read_captions(folder: Path) -> dict[str, str]:
    """Captions from ``metadata.jsonl`` (``file_name`` + ``text``/``prompt``/``caption``) and ``<image>.txt``."""
    captions: dict[str, str] = {}
    meta = folder / "metadata.jsonl"
    if meta.is_file():
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name = row["file_name"]
                text = next(row[k] for k in ("text", "prompt", "caption") if k in row)
            except (ValueError, KeyError, StopIteration, TypeError):
                raise ValueError(f"{meta}:{n}: expected {{'file_name': ..., 'text': ...}}, got {line[:80]!r}") from None
            captions[name] = str(text)
    for txt in folder.glob("*.txt"):
        captions.setdefault(txt.stem, txt.read_text().strip())
    return captions


def transform(image: Image.Image, resolution: int, center_crop: bool, flip: bool, rng: random.Random):
    """Resize the short side to ``resolution``, crop a square, maybe flip; returns the SDXL conditioning too."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    original_size = (image.height, image.width)
    scale = resolution / min(image.width, image.height)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    if center_crop:
        top, left = (height - resolution) // 2, (width - resolution) // 2
    else:
        top, left = rng.randint(0, height - resolution), rng.randint(0, width - resolution)
    image = image.crop((left, top, left + resolution, top + resolution))
    if flip and rng.random() < 0.5:
        image = ImageOps.mirror(image)
        left = width - left - resolution
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3)
    pixels = pixels.permute(2, 0, 1).float() / 127.5 - 1.0
    return pixels, original_size, (top, left)


def load_examples(
    folder: str | Path,
    default_prompt: str | None,
    resolution: int,
    center_crop: bool = False,
    random_flip: bool = False,
    seed: int = 0,
) -> list[Example]:
    """Every readable image in ``folder`` as an :class:`Example` (augmented once, reproducibly)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {folder}")
    captions = read_captions(folder)
    rng = random.Random(seed)
    examples, skipped = [], []
    for path in files:
        prompt = captions.get(path.name) or captions.get(path.stem) or default_prompt
        if prompt is None:
            raise ValueError(f"{path.name} has no caption and no default prompt was given")
        try:
            with Image.open(path) as image:
                pixels, size, crop = transform(image, resolution, center_crop, random_flip, rng)
        except (OSError, ValueError) as err:
            skipped.append(f"{path.name} ({err})")
            continue
        examples.append(Example(pixels, prompt, size, crop))
    if skipped:
        logger.warning("skipped %d unreadable image(s) in %s: %s", len(skipped), folder, "; ".join(skipped))
    if not examples:
        raise ValueError(f"none of the {len(files)} images in {folder} could be read")
    return examples
