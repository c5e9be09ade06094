"""Images and prompts for DreamBooth training: reading, captions, SDXL micro-conditioning."""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass(frozen=True, eq=False)  # compared by identity: a view is a new object
class Example:
    """One training image: resized once (short side = the resolution), cropped and maybe flipped
    per view, so each epoch can draw its own crop and flip (:meth:`redrawn`)."""

    image: torch.Tensor  # (3, H, W) uint8, uncropped
    prompt: str
    original_size: tuple[int, int]  # (height, width) before resize/crop
    crop_top_left: tuple[int, int]  # of this view, in the resized image (SDXL's crops_coords_top_left)
    flipped: bool = False

    @property
    def pixels(self) -> torch.Tensor:
        """This view as (3, R, R) floats in [-1, 1]."""
        size = min(self.image.shape[1:])
        top, left = self.crop_top_left
        if self.flipped:  # the crop's corner is recorded as on the flipped image
            left = self.image.shape[2] - left - size
        view = self.image[:, top : top + size, left : left + size]
        return (view.flip(-1) if self.flipped else view).float() / 127.5 - 1.0

    def redrawn(self, rng: random.Random, center_crop: bool, flip: bool) -> "Example":
        """The same image with a crop and flip drawn from ``rng``."""
        return replace(self, **_draw(self.image.shape[1], self.image.shape[2], center_crop, flip, rng))


def _draw(height: int, width: int, center_crop: bool, flip: bool, rng: random.Random) -> dict:
    size = min(height, width)
    if center_crop:
        top, left = (height - size) // 2, (width - size) // 2
    else:
        top, left = rng.randint(0, height - size), rng.randint(0, width - size)
    flipped = flip and rng.random() < 0.5
    return {"crop_top_left": (top, width - left - size if flipped else left), "flipped": flipped}


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


def resize(image: Image.Image, resolution: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Upright RGB with its short side at ``resolution``, as a (3, H, W) uint8 tensor, and its original (height, width)."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    original_size = (image.height, image.width)
    scale = resolution / min(image.width, image.height)
    width, height = max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))
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
                resized, size = resize(image, resolution)
        except (OSError, ValueError) as err:
            skipped.append(f"{path.name} ({err})")
            continue
        examples.append(Example(resized, prompt, size, **_draw(resized.shape[1], resized.shape[2], center_crop, random_flip, rng)))
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
        resized, size = resize(image, resolution)
        examples.append(Example(resized, str(prompt), size, **_draw(resized.shape[1], resized.shape[2], center_crop, random_flip, rng)))
    if not examples:
        raise ValueError(f"{name}: the {split!r} split is empty")
    return examples
