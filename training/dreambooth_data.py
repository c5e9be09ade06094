"""Images and prompts for DreamBooth training: reading, captions, SDXL micro-conditioning."""

from __future__ import annotations

import json
import logging
import math
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True, eq=False)  # compared by identity: a view is a new object
class Example:
    """One training image: resized once to cover its training size (the resolution squared, or its
    aspect-ratio bucket), cropped and maybe flipped per view, so each epoch can draw its own crop
    and flip (:meth:`redrawn`)."""

    image: torch.Tensor  # (3, H, W) uint8, uncropped
    prompt: str
    original_size: tuple[int, int]  # (height, width) before resize/crop
    crop_top_left: tuple[int, int]  # of this view, in the resized image (SDXL's crops_coords_top_left)
    flipped: bool = False
    size: tuple[int, int] | None = None  # (height, width) trained at (SDXL's target_size); None: square

    @property
    def target(self) -> tuple[int, int]:
        side = min(self.image.shape[1:])
        return self.size or (side, side)

    @property
    def pixels(self) -> torch.Tensor:
        """This view as (3, h, w) floats in [-1, 1]."""
        (h, w), (top, left) = self.target, self.crop_top_left
        if self.flipped:  # the crop's corner is recorded as on the flipped image
            left = self.image.shape[2] - left - w
        view = self.image[:, top : top + h, left : left + w]
        return (view.flip(-1) if self.flipped else view).float() / 127.5 - 1.0

    def redrawn(self, rng: random.Random, center_crop: bool, flip: bool) -> "Example":
        """The same image with a crop and flip drawn from ``rng``."""
        return replace(self, **_draw(self.image.shape[1], self.image.shape[2], self.target, center_crop, flip, rng))


def _draw(height: int, width: int, size: tuple[int, int], center_crop: bool, flip: bool, rng: random.Random) -> dict:
    h, w = size
    if center_crop:
        top, left = (height - h) // 2, (width - w) // 2
    else:
        top, left = rng.randint(0, height - h), rng.randint(0, width - w)
    flipped = flip and rng.random() < 0.5
    return {"crop_top_left": (top, width - left - w if flipped else left), "flipped": flipped}


def sdxl_buckets(resolution: int, min_reso: int = 256, max_reso: int = 2048, step: int = 64) -> list[tuple[int, int]]:
    """(height, width) training sizes of about ``resolution**2`` pixels in ``step``s, both
    orientations (at 1024: 1024x1024, 1088x960, ..., 1536x640 and 640x1536 and so on, SDXL's set)."""
    out = set()
    for w in range(min_reso, max_reso + 1, step):
        h = resolution * resolution // w // step * step
        if min_reso <= h <= max_reso:
            out |= {(h, w), (w, h)}
    return sorted(out, key=lambda hw: (hw[1] / hw[0], hw))


def nearest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to the image's (in log ratio)."""
    ratio = math.log(width / height)
    return min(buckets, key=lambda hw: (abs(math.log(hw[1] / hw[0]) - ratio), -hw[0] * hw[1]))


def _example(image: Image.Image, prompt: str, resolution: int, center_crop: bool, flip: bool, rng: random.Random,
             buckets: list[tuple[int, int]] | None) -> Example:
    upright = ImageOps.exif_transpose(image).convert("RGB")
    size = nearest_bucket(upright.height, upright.width, buckets) if buckets else None
    resized, original = resize(upright, size or (resolution, resolution))
    return Example(resized, prompt, original, **_draw(resized.shape[1], resized.shape[2], size or (resolution, resolution),
                                                      center_crop, flip, rng), size=size)


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


def resize(image: Image.Image, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """An upright RGB image scaled to just cover ``size`` (height, width), as a (3, H, W) uint8
    tensor, and its original (height, width)."""
    original_size = (image.height, image.width)
    scale = max(size[0] / image.height, size[1] / image.width)
    width, height = max(size[1], round(image.width * scale)), max(size[0], round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR)
    pixels = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(height, width, 3)
    return pixels.permute(2, 0, 1).contiguous(), original_size


def load_examples(
    folder: str | Path,
    default_prompt: str | None,
    resolution: int,
    center_crop: bool = False,
    random_flip: bool = False,
    seed: int = 0,
    buckets: list[tuple[int, int]] | None = None,
) -> list[Example]:
    """Every readable image in ``folder`` as an :class:`Example`, with a first crop and flip drawn
    reproducibly from ``seed`` (training draws new ones per epoch unless latents are cached)."""
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
                example = _example(image, prompt, resolution, center_crop, random_flip, rng, buckets)
        except (OSError, ValueError) as err:
            skipped.append(f"{path.name} ({err})")
            continue
        examples.append(example)
    if skipped:
        logger.warning("skipped %d unreadable image(s) in %s: %s", len(skipped), folder, "; ".join(skipped))
    if not examples:
        raise ValueError(f"none of the {len(files)} images in {folder} could be read")
    return examples


def load_dataset_examples(
    name: str,
    image_column: str = "image",
    caption_column: str | None = "text",
    default_prompt: str | None = None,
    resolution: int = 1024,
    center_crop: bool = False,
    random_flip: bool = False,
    seed: int = 0,
    split: str = "train",
    buckets: list[tuple[int, int]] | None = None,
) -> list[Example]:
    """Examples from a ``datasets`` dataset: a hub id, a local folder of images (the ``imagefolder``
    layout, captions in ``metadata.jsonl``) or a dataset written by ``save_to_disk``."""
    import datasets

    path = Path(name)
    if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        data = datasets.load_from_disk(str(path))
    else:
        data = datasets.load_dataset(name)
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{name}: no {split!r} split (has {', '.join(data)})")
        data = data[split]
    for column in (image_column, caption_column):
        if column is not None and column not in data.column_names:
            raise ValueError(f"{name}: no column {column!r} (columns: {', '.join(data.column_names)}); "
                             "pick them with --image_column / --caption_column")
    rng = random.Random(seed)
    examples = []
    for n, row in enumerate(data):
        image = row[image_column]
        if not isinstance(image, Image.Image):
            raise ValueError(f"{name}: row {n}: column {image_column!r} holds {type(image).__name__}, not an image")
        prompt = (row[caption_column] if caption_column is not None else None) or default_prompt
        if not prompt:
            raise ValueError(f"{name}: row {n} has no caption and no default prompt was given")
        examples.append(_example(image, str(prompt), resolution, center_crop, random_flip, rng, buckets))
    if not examples:
        raise ValueError(f"{name}: the {split!r} split is empty")
    return examples
