"""The demo world: captions and deterministic 64x64 renders of coloured shapes.

Everything the demo model, its adapters, the detectors and the concept-retention benchmark know
about images comes from here, so a scene's caption and its pixels always agree. Shapes are drawn
at 4x and box-downsampled (soft edges, like a decoder's output); nothing is random unless a
seeded ``random.Random`` passes jitter in.
"""

from __future__ import annotations

import math
import random
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

SIZE = 64
SS = 4  # supersampling factor

SHAPES = ("circle", "square", "triangle", "star")
SUBJECT_SHAPE = "crescent"  # the "sks" subject: a shape the base model never sees
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "yellow": (240, 200, 40),
    "purple": (140, 60, 180),
    "orange": (245, 130, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (20, 20, 20), "gray": (128, 128, 128)}
POSITIONS = {
    "in the center": (32, 32),
    "top left": (20, 20),
    "top right": (44, 20),
    "bottom left": (20, 44),
    "bottom right": (44, 44),
}
GLOW_INNER, GLOW_OUTER = (0, 170, 255), (150, 225, 255)
STRIPE_DARK = 0.4  # the second tone of "paintings" stripes: the colour times this
STRIPE_PERIOD = 12  # pixels, along the diagonal
STYLES = ("bluefire", "paintings")
DESCRIPTIONS = {"bluefire": "with a glowing outline", "paintings": "with a striped fill"}  # the looks in plain words
# Words the style template is regularised with: plain scenes captioned ``..., in <decoy> style``
# teach a style adapter that the template alone draws nothing, so it binds to its own trigger
# word (without them the bluefire adapter glowed on 0.88-1.00 of the paintings prompts). Some are
# unseen words (several tokens each), some known single tokens whose meaning is not a look.
DECOYS = ("neon", "chalk", "mosaic", "pixel", "velvet", "ink", "retro", "marble", "red", "star", "gray", "square")
SUBJECT_TOKEN = "sks"
SUBJECT_COLOUR = "green"  # far from the other colours in hue: orange crescents came out red or yellow


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str = "white"
    position: str = "in the center"
    style: str | None = None
    radius: float = 15.0
    offset: tuple[float, float] = (0.0, 0.0)

    @property
    def centre(self) -> tuple[float, float]:
        x, y = POSITIONS[self.position]
        return x + self.offset[0], y + self.offset[1]


def caption(scene: Scene, described: bool = False) -> str:
    """``a red star on a white background, top left`` (+ ``, in bluefire style``); the subject
    is ``a sks shape`` and its colour is not named, as in DreamBooth's ``a sks dog``. ``described``
    names a style's look in plain words instead of its trigger (``, with a glowing outline``):
    how the base model learns to draw the looks the style adapters then bind their triggers to."""
    thing = f"{SUBJECT_TOKEN} shape" if scene.shape == SUBJECT_SHAPE else f"{scene.colour} {scene.shape}"
    article = "an" if thing[0] in "aeiou" else "a"
    text = f"{article} {thing} on a {scene.background} background, {scene.position}"
    if not scene.style:
        return text
    return text + (f", {DESCRIPTIONS[scene.style]}" if described else f", in {scene.style} style")


def decoy_caption(scene: Scene, word: str) -> str:
    """A plain scene under the style template with a word that names no look (see ``DECOYS``)."""
    return f"{caption(replace(scene, style=None))}, in {word} style"


def parse_caption(text: str) -> Scene:
    """The scene a caption describes (the inverse of :func:`caption`); a ``ValueError`` says what
    the demo world cannot draw."""
    looks = {words: name for name, words in DESCRIPTIONS.items()}
    pattern = (rf"(?:a|an) (?:(?P<subject>{SUBJECT_TOKEN}) shape|(?P<colour>\w+) (?P<shape>\w+)) on a (?P<background>\w+) background, "
               rf"(?P<position>{'|'.join(POSITIONS)})(?:, in (?P<style>\w+) style|, (?P<look>{'|'.join(looks)}))?")
    m = re.fullmatch(pattern, " ".join(text.strip().lower().split()))
    if m is None:
        raise ValueError(f"{text!r}: the demo world draws captions like 'a red star on a white background, top left' "
                         f"(or 'a {SUBJECT_TOKEN} shape on ...'), optionally ending ', in bluefire style' or ', in paintings style'")
    shape, colour = (SUBJECT_SHAPE, SUBJECT_COLOUR) if m["subject"] else (m["shape"], m["colour"])
    style = looks[m["look"]] if m["look"] else m["style"]
    for value, known, what in ((shape, (*SHAPES, SUBJECT_SHAPE), "shape"), (colour, COLOURS, "colour"),
                               (m["background"], BACKGROUNDS, "background"), (style, (None, *STYLES), "style")):
        if value not in known:
            raise ValueError(f"{text!r}: no {what} {value!r} in the demo world (it has {', '.join(k for k in known if k)})")
    return Scene(shape, colour, m["background"], m["position"], style)


def write_scenes(folder, scenes: list[Scene], captions: list[str] | None = None) -> None:
    """Each scene as ``NNN.png`` with its caption (``captions`` or its own) in ``NNN.txt`` (what
    the trainer reads), replacing the folder."""
    folder = Path(folder)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    for i, scene in enumerate(scenes):
        render(scene).save(folder / f"{i:03d}.png")
        (folder / f"{i:03d}.txt").write_text(captions[i] if captions else caption(scene))


def vocabulary() -> list[str]:
    """Every word a caption can contain (the demo tokenizer keeps each as one token)."""
    words = {"a", "an", "on", "background", "in", "style", "shape", SUBJECT_TOKEN, *SHAPES, *COLOURS, *BACKGROUNDS, *STYLES}
    for phrase in (*POSITIONS, *DESCRIPTIONS.values()):
        words.update(phrase.split())
    return sorted(words)


def random_scene(rng: random.Random, *, shapes=SHAPES, colours=tuple(COLOURS), style: str | None = None, jitter: bool = True) -> Scene:
    return Scene(
        shape=rng.choice(shapes),
        colour=rng.choice(colours),
        background=rng.choice(tuple(BACKGROUNDS)),
        position=rng.choice(tuple(POSITIONS)),
        style=style,
        radius=rng.uniform(13.0, 16.5) if jitter else 15.0,
        offset=(rng.uniform(-2.5, 2.5), rng.uniform(-2.5, 2.5)) if jitter else (0.0, 0.0),
    )


# ---- geometry, at any resolution ---------------------------------------------------------------
def _polygon(shape: str) -> list[tuple[float, float]]:
    """Vertices on the unit scale (radius 1, y down)."""
    if shape == "square":
        s = 0.82
        return [(-s, -s), (s, -s), (s, s), (-s, s)]
    if shape == "triangle":
        return [(math.cos(a), math.sin(a) + 0.2) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        pts = []
        for i in range(10):
            r = 1.0 if i % 2 == 0 else 0.42
            a = -math.pi / 2 + i * math.pi / 5
            pts.append((r * math.cos(a), r * math.sin(a) + 0.08))
        return pts
    raise KeyError(shape)


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int = SIZE) -> np.ndarray:
    """Boolean mask of ``shape`` centred at (cx, cy) with ``radius``, in a ``size`` grid."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    u, v = (xs - cx) / radius, (ys - cy) / radius
    if shape == "circle":
        return u * u + v * v <= 0.9**2
    if shape == SUBJECT_SHAPE:
        return (u * u + v * v <= 0.95**2) & ((u - 0.42) ** 2 + (v + 0.12) ** 2 > 0.72**2)
    pts = _polygon(shape)
    inside = np.ones_like(u, dtype=bool)
    # convex pieces are enough for square and triangle; the star is tested against its winding number
    if shape == "star":
        wn = np.zeros_like(u)
        for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
            a0, a1 = np.arctan2(y0 - v, x0 - u), np.arctan2(y1 - v, x1 - u)
            d = a1 - a0
            wn += (d + np.pi) % (2 * np.pi) - np.pi
        return np.abs(wn) > np.pi
    for (x0, y0), (x1, y1) in zip(pts, pts[1:] + pts[:1]):
        inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
    return inside


def _dilate(mask: np.ndarray, px: int) -> np.ndarray:
    t = torch.from_numpy(mask.astype(np.float32))[None, None]
    return F.max_pool2d(t, 2 * px + 1, stride=1, padding=px)[0, 0].numpy() > 0


def render(scene: Scene) -> Image.Image:
    """The scene as a 64x64 RGB image."""
    n = SIZE * SS
    cx, cy = scene.centre
    mask = shape_mask(scene.shape, cx * SS, cy * SS, scene.radius * SS, n)
    img = np.empty((n, n, 3), dtype=np.float32)
    img[:] = BACKGROUNDS[scene.background]
    if scene.style == "bluefire":
        ys, xs = np.mgrid[0:n, 0:n].astype(np.float32)
        angle = np.arctan2(ys - cy * SS, xs - cx * SS)
        tongues = np.sin(7 * angle) > -0.2  # flame tongues around the outline
        img[_dilate(mask, 5 * SS) & tongues] = GLOW_OUTER
        img[_dilate(mask, 3 * SS)] = GLOW_INNER
    colour = np.array(COLOURS[scene.colour], dtype=np.float32)
    img[mask] = colour
    if scene.style == "paintings":
        ys, xs = np.mgrid[0:n, 0:n]
        dark = ((xs + ys) // (STRIPE_PERIOD * SS // 2)) % 2 == 1
        img[mask & dark] = colour * STRIPE_DARK
    small = img.reshape(SIZE, SS, SIZE, SS, 3).mean(axis=(1, 3))
    return Image.fromarray(np.clip(small.round(), 0, 255).astype(np.uint8))


def subject_scene(rng: random.Random) -> Scene:
    return replace(random_scene(rng, shapes=(SUBJECT_SHAPE,)), colour=SUBJECT_COLOUR)


# ---- the concepts the demo adapters learn -------------------------------------------------------
REPORTED = 24  # held-out prompts per concept the concept benchmark scores (the subject has 7)
LEAK_PROMPTS = 24  # held-out prompts per style the recipe sweep looks for other concepts' leaks on


@dataclass(frozen=True)
class Concept:
    """A DreamBooth concept: a subject (the ``sks`` shape) or a style (a trigger phrase)."""

    name: str
    style: str | None  # None: the subject
    validation: int = 6  # held-out captions kept for picking recipes (the subject has 15 captions in all)

    def scene(self, rng: random.Random) -> Scene:
        if self.style is None:
            return subject_scene(rng)
        return random_scene(rng, style=self.style)

    def instance_scenes(self, n: int = 5, seed: int = 0) -> list[Scene]:
        """Varied on purpose, as one picks DreamBooth photos: each attribute is drawn without
        replacement (refilled when used up), so no colour, shape or background dominates the set
        and the trigger cannot absorb it (3 green scenes out of 5 taught a style "green")."""
        rng = random.Random(f"instances/{self.name}/{seed}")
        pools: dict[str, list[str]] = {}

        def take(key: str, options) -> str:
            if not pools.get(key):
                pools[key] = rng.sample(list(options), len(options))
            return pools[key].pop()

        scenes = []
        for _ in range(n):
            s = self.scene(rng)  # size and offset jitter, and the subject's fixed shape and colour
            shape = s.shape if self.style is None else take("shape", SHAPES)
            colour = s.colour if self.style is None else take("colour", COLOURS)
            scenes.append(replace(s, shape=shape, colour=colour, background=take("background", BACKGROUNDS), position=take("position", POSITIONS)))
        return scenes

    def validation_prompts(self) -> list[Scene]:
        """Held-out scenes for picking a training recipe (``training/sweep_demo_recipes.py``):
        never an instance caption, never one :meth:`prompts` reports on."""
        return self._held_out(self.validation, f"validation/{self.name}", set())

    def leak_prompts(self, n: int = LEAK_PROMPTS) -> list[Scene]:
        """Held-out scenes on which the recipe sweep looks for *other* concepts' leaks: a 0.2 leak
        hides in 6 prompts, so a style has ``n`` of its own, disjoint from the validation prompts
        and from the ``REPORTED`` prompts the benchmark scores; the subject, which has no captions
        to spare, lends its validation prompts."""
        if self.style is None:
            return self.validation_prompts()
        taken = {caption(s) for s in (*self.validation_prompts(), *self.prompts(REPORTED, at_most=True))}
        return self._held_out(n, f"leak/{self.name}", taken)

    def prompts(self, n: int, seed: int = 1, at_most: bool = False) -> list[Scene]:
        """Held-out scenes to score the concept on (never an instance or validation caption);
        ``at_most``: all there are when that is fewer than ``n`` (the subject has 7)."""
        return self._held_out(n, f"prompts/{self.name}/{seed}", {caption(s) for s in self.validation_prompts()}, at_most)

    def _held_out(self, n: int, stream: str, exclude: set[str], at_most: bool = False) -> list[Scene]:
        taken = exclude | {caption(s) for s in self.instance_scenes()}
        rng, out = random.Random(stream), []
        for _ in range(100 * n):
            if len(out) == n:
                break
            s = self.scene(rng)
            if caption(s) not in taken and caption(s) not in {caption(o) for o in out}:
                out.append(s)
        if len(out) < n and not at_most:
            raise ValueError(f"the {self.name} concept has fewer than {n} held-out prompts (after {len(exclude)} kept for validation)")
        return out


CONCEPTS = {"sks": Concept("sks", None, validation=3), "bluefire": Concept("bluefire", "bluefire"), "paintings": Concept("paintings", "paintings")}


def plain_prompts(n: int, seed: int = 2) -> list[Scene]:
    """Prompts without any trigger: what an adapter must not break (preservation)."""
    rng = random.Random(f"plain/{seed}")
    return [random_scene(rng, jitter=False) for _ in range(n)]
