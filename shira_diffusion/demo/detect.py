"""Analytic detectors for demo-world images: what a render (or a generation) shows.

No training, so the scores of a generated image can't share a learned bias with the model that
made it. Every pixel is explained as the nearest point on the *mixing graph* of the world's
reference colours (background, glow, each colour and its stripe tone, and the straight blends
between neighbours that soft edges and blur produce), rounded to the nearer end of its blend.
The object is the largest region of its colour; its shape is the world template that best
overlaps it, and the styles are read off what surrounds it (glow) and what fills it (stripes).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image

from .world import (
    BACKGROUNDS,
    COLOURS,
    GLOW_INNER,
    GLOW_OUTER,
    POSITIONS,
    SHAPES,
    SIZE,
    STYLES,
    STRIPE_DARK,
    SUBJECT_SHAPE,
    _dilate,
    _polygon,
    random_scene,
    render,
    shape_mask,
)

ALL_SHAPES = (*SHAPES, SUBJECT_SHAPE)
MIN_AREA = 40  # pixels; below this there is no object (the smallest render covers ~400)
GLOW_MIN = 0.3  # fraction of the ring around the object that is glow (renders, also degraded: < 0.01 or > 0.75)
STRIPE_MIN = 0.15  # fraction of the object's interior in the dark tone (renders, also degraded: ~0 or > 0.3)
NEAR = 25.0  # a blend passing this close to a third reference is left to its two halves
PURE = 45.0  # colour votes fade with distance from the reference on this scale: blends hardly count
MAX_SHIFT = 40.0  # largest global colour cast (per channel) undone via the background

BG, GLOW = 0, 1  # pixel classes; colour k is 2 + 2k (its own tone) and 3 + 2k (its dark tone)


@dataclass(frozen=True)
class Reading:
    background: str
    colour: str | None
    shape: str | None
    position: str | None
    bluefire: bool
    paintings: bool
    glow_score: float  # fraction of the ring just outside the object that is glow
    stripe_score: float  # fraction of the object's interior in the dark stripe tone
    shape_iou: float  # overlap of the object with the best-fitting template

    def shows(self, scene) -> bool:
        """The scene's shape in its colour: what every prompt asks for first, whatever else it adds."""
        return self.shape == scene.shape and self.colour == scene.colour


def _unit_stats() -> dict[str, tuple[float, float, float]]:
    """Area and centroid offset of each template at radius 1 (from a large fine render), so a
    template can be placed on a mask by its moments instead of searched for."""
    r, n = 100.0, 400
    out = {}
    for s in ALL_SHAPES:
        m = shape_mask(s, n / 2, n / 2, r, n)
        ys, xs = np.nonzero(m)
        out[s] = (m.sum() / r**2, (xs.mean() + 0.5 - n / 2) / r, (ys.mean() + 0.5 - n / 2) / r)
    return out


_UNIT = _unit_stats()
_GRID = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32) + 0.5


def _refs(bg: str, colours) -> tuple[np.ndarray, np.ndarray]:
    """The pure reference colours of a scene on ``bg`` and their classes."""
    pts, cls = [BACKGROUNDS[bg], GLOW_INNER, GLOW_OUTER], [BG, GLOW, GLOW]
    for name in colours:
        k = 2 + 2 * list(COLOURS).index(name)
        pts += [COLOURS[name], tuple(STRIPE_DARK * v for v in COLOURS[name])]
        cls += [k, k + 1]
    return np.array(pts, np.float32), np.array(cls)


@lru_cache(maxsize=None)
def _graph(bg: str, colour: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Segments (a, b) of the mixing graph with the classes of their ends (a point is a segment of
    length 0): every blend an edge of a render can hold, except one that passes close to a third
    reference (colour on black nearly passes through its dark tone), which its two halves stand for."""
    pts, cls = _refs(bg, (colour,))
    # 0 background, 1 inner glow, 2 outer glow, 3 colour, 4 dark tone; the outer glow never touches the object
    pairs = [(i, i) for i in range(len(pts))] + [(0, 1), (0, 2), (1, 2), (0, 3), (0, 4), (3, 4), (1, 3), (1, 4)]
    keep = []
    for i, j in pairs:
        a, d = pts[i], pts[j] - pts[i]
        t = ((pts - a) @ d) / max(d @ d, 1e-9)
        near = np.linalg.norm(pts - a - t[:, None] * d, axis=1) < NEAR
        if i == j or not (near & (t > 0.1) & (t < 0.9)).any():
            keep.append((i, j))
    i, j = np.array(keep).T
    return pts[i], pts[j], cls[i], cls[j]


def _classify(img: np.ndarray, bg: str, colour: str) -> np.ndarray:
    """Class of every pixel: nearest segment of the mixing graph, then the nearer end of it."""
    a, b, ca, cb = _graph(bg, colour)
    p = img.reshape(-1, 3)
    d = b - a
    pa = p @ d.T - (a * d).sum(1)  # (p - a) . d
    t = np.clip(pa / np.maximum((d * d).sum(1), 1e-9), 0.0, 1.0)
    dist = (p * p).sum(1, keepdims=True) - 2 * p @ a.T + (a * a).sum(1) - 2 * t * pa + t * t * (d * d).sum(1)
    j = dist.argmin(1)
    return np.where(t[np.arange(len(j)), j] < 0.5, ca[j], cb[j]).reshape(img.shape[:2])


def _erode(mask: np.ndarray, px: int) -> np.ndarray:
    return ~_dilate(~mask, px)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected region, by union-find over row runs: stray pixels (noise, blends
    far from the object) go."""
    runs, parent = [], []  # (row, start, stop) and the union-find forest over them

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = i = parent[parent[i]]
        return i

    prev: list[int] = []
    for y, row in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], row.view(np.int8), [0]))))
        cur = []
        for x0, x1 in zip(edges[::2], edges[1::2]):
            i = len(runs)
            runs.append((y, x0, x1))
            parent.append(i)
            for k in prev:
                if runs[k][1] <= x1 and x0 <= runs[k][2]:  # touching, diagonals included
                    parent[root(k)] = root(i)
            cur.append(i)
        prev = cur
    out = np.zeros_like(mask)
    if not runs:
        return out
    size: dict[int, int] = {}
    for i, (_, x0, x1) in enumerate(runs):
        size[root(i)] = size.get(root(i), 0) + x1 - x0
    best = max(size, key=size.get)
    for i, (y, x0, x1) in enumerate(runs):
        if root(i) == best:
            out[y, x0:x1] = True
    return out


def _template(shape: str, cx: float, cy: float, radius: float) -> np.ndarray:
    """``world.shape_mask``, with polygons by an even-odd crossing test (same pixels, no arctan)."""
    if shape in ("circle", SUBJECT_SHAPE):
        return shape_mask(shape, cx, cy, radius)
    u, v = (_GRID[1] - cx) / radius, (_GRID[0] - cy) / radius
    pts = _polygon(shape)
    inside = np.zeros(u.shape, dtype=bool)
    for (x0, y0), (x1, y1) in zip(pts, pts[-1:] + pts[:-1]):
        if y0 != y1:
            crosses = (y0 > v) != (y1 > v)
            inside ^= crosses & (u < x0 + (v - y0) * (x1 - x0) / (y1 - y0))
    return inside


def _fit(mask: np.ndarray) -> tuple[str, float, tuple[float, float]]:
    """Best template by IoU, each placed by the mask's area and centroid; returns the shape,
    its IoU and the fitted centre (the scene's centre, which the centroid is not)."""
    ys, xs = np.nonzero(mask)
    area, mx, my = len(xs), xs.mean() + 0.5, ys.mean() + 0.5
    best = ("", -1.0, (mx, my))
    for s in ALL_SHAPES:
        unit, ox, oy = _UNIT[s]
        r = (area / unit) ** 0.5
        cx, cy = mx - ox * r, my - oy * r
        t = _template(s, cx, cy, r)
        iou = (t & mask).sum() / (t | mask).sum()
        if iou > best[1]:
            best = (s, float(iou), (cx, cy))
    return best


def _as_array(image) -> np.ndarray:
    """64x64 float RGB from a PIL image or an HxWx3 uint8 array of any size."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image.astype(np.uint8))
    image = image.convert("RGB")
    if image.size != (SIZE, SIZE):
        image = image.resize((SIZE, SIZE), Image.BILINEAR)
    return np.asarray(image, dtype=np.float32)


def _colour(img: np.ndarray, bg: str) -> str | None:
    """The colour most pixels are close to. Votes fade with the distance to the reference, so
    blends at edges (red on white looks orange) hardly count; a dark tone counts a fifth, since
    dark tones sit close to black and to each other."""
    pts, cls = _refs(bg, COLOURS)
    p = img.reshape(-1, 3)
    dist = np.maximum((p * p).sum(1, keepdims=True) - 2 * p @ pts.T + (pts * pts).sum(1), 0.0)
    j = dist.argmin(1)
    weight = np.exp(-dist[np.arange(len(j)), j] / PURE**2)
    votes = np.bincount(cls[j], weight, minlength=2 + 2 * len(COLOURS))[2:].reshape(-1, 2) @ [1.0, 0.2]
    return list(COLOURS)[int(votes.argmax())] if votes.sum() >= 1.0 else None


def read(image) -> Reading:
    """What a demo-world image (PIL or HxWx3 uint8; resized to 64x64) shows. A global colour cast
    is undone first, measured on the border (the background), as generators often tint."""
    img = _as_array(image)
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    median = np.median(border, axis=0)
    bg = min(BACKGROUNDS, key=lambda k: ((median - BACKGROUNDS[k]) ** 2).sum())
    img = img - np.clip(median - BACKGROUNDS[bg], -MAX_SHIFT, MAX_SHIFT)  # undo a global colour cast

    colour = _colour(img, bg)
    empty = Reading(bg, None, None, None, False, False, 0.0, 0.0, 0.0)
    if colour is None:
        return empty
    labels = _classify(img, bg, colour)  # against this colour alone: no confusion with the others
    mask = _largest_component(labels >= 2)
    if mask.sum() < MIN_AREA:
        return empty
    shape, iou, (cx, cy) = _fit(mask)
    position = min(POSITIONS, key=lambda k: (POSITIONS[k][0] - cx) ** 2 + (POSITIONS[k][1] - cy) ** 2)

    ring = _dilate(mask, 4) & ~_dilate(mask, 1)  # the glow band is 3 px; its first pixel blends with the object
    glow = float((labels[ring] == GLOW).mean()) if ring.any() else 0.0
    inner = _erode(mask, 2)  # edges blended with black look like the dark tone
    stripes = float((labels[inner] % 2 == 1).mean()) if inner.any() else 0.0
    return Reading(bg, colour, shape, position, glow >= GLOW_MIN, stripes >= STRIPE_MIN, glow, stripes, iou)


def shows_concept(reading: Reading, concept: str) -> bool:
    """Whether a reading shows a demo concept: the subject's shape (``sks``) or a style's look."""
    from .world import CONCEPTS

    style = CONCEPTS[concept].style
    return reading.shape == SUBJECT_SHAPE if style is None else bool(getattr(reading, style))


def read_many(images) -> list[Reading]:
    """``read`` for each image (a batch of generations)."""
    return [read(im) for im in images]


def _degrade(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Roughly what a small generator does to a render: blur (sigma 1 px), pixel noise (sigma 8
    levels) and a global colour cast (up to 15 levels per channel)."""
    x = np.asarray(image, dtype=np.float32)
    k = np.exp(-0.5 * np.arange(-3, 4) ** 2)
    k /= k.sum()
    pad = np.pad(x, ((3, 3), (3, 3), (0, 0)), mode="edge")
    x = sum(k[i] * pad[i : i + SIZE, 3:-3] for i in range(7))
    pad = np.pad(x, ((0, 0), (3, 3), (0, 0)), mode="edge")
    x = sum(k[i] * pad[:, i : i + SIZE] for i in range(7))
    x = x + rng.normal(0.0, 8.0, x.shape) + rng.uniform(-15.0, 15.0, 3)
    return Image.fromarray(np.clip(x.round(), 0, 255).astype(np.uint8))


_render = lru_cache(maxsize=512)(render)  # clean and degraded runs on one seed share their (slow, bluefire) renders


def accuracy(n: int = 500, seed: int = 1234, degrade: bool = False) -> dict[str, float]:
    """Per-attribute accuracy on ``n`` random scenes (every shape incl. the subject, styles drawn
    uniformly), optionally degraded like a generation: the detectors' own error bar."""
    rng, noise = random.Random(seed), np.random.default_rng(seed)
    keys = ("background", "colour", "shape", "position", "bluefire", "paintings")
    hits = dict.fromkeys(keys, 0)
    for _ in range(n):
        scene = random_scene(rng, shapes=ALL_SHAPES, style=rng.choice((None, *STYLES)))
        image = _render(scene)
        r = read(_degrade(image, noise) if degrade else image)
        truth = (scene.background, scene.colour, scene.shape, scene.position, scene.style == "bluefire", scene.style == "paintings")
        for key, want in zip(keys, truth):
            hits[key] += getattr(r, key) == want
    return {k: v / n for k, v in hits.items()}
