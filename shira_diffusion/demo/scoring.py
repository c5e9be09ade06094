"""Scoring generations in the demo world: what the concept benchmark and the recipe sweep count.

Every (prompt, seed) pair is one generation with its own generator, so batching never changes an
image, and its outcome is kept per generation: shares are means of them and confidence intervals
resample them (``benchmarks/concept_retention.py``).
"""

from __future__ import annotations

import numpy as np
import torch

from . import world
from .detect import read_many, shows_concept


class Scorer:
    def __init__(self, switcher, seeds: int, steps: int = 20, guidance: float = 5.0, batch: int = 32) -> None:
        self.sw, self.seeds, self.steps, self.guidance, self.batch = switcher, seeds, steps, guidance, batch

    def generate(self, prompts: list[str], adapters: dict[str, float] | None):
        """Every prompt x seed, seed-major; generation ``i`` always uses seed ``1000 * seed + i``."""
        jobs = [(p, s) for s in range(self.seeds) for p in prompts]
        images = []
        for i in range(0, len(jobs), self.batch):
            chunk = jobs[i : i + self.batch]
            gens = [torch.Generator().manual_seed(1000 * s + j) for j, (_, s) in enumerate(chunk, start=i)]
            out = self.sw([p for p, _ in chunk], adapters=adapters or {}, generator=gens, height=world.SIZE, width=world.SIZE,
                          num_inference_steps=self.steps, guidance_scale=self.guidance)
            images += out.images
        return images

    def outcomes(self, scenes: list[world.Scene], adapters, *tests, described: bool = False, captions: list[str] | None = None) -> list[np.ndarray]:
        """One boolean array per test, ``seeds x len(scenes)`` (seed-major): did generation pass it.
        ``described`` prompts a style by its look in plain words instead of its trigger;
        ``captions`` replaces the scenes' own captions (the scenes are still what is expected)."""
        prompts = captions or [world.caption(s, described=described) for s in scenes]
        readings = read_many(self.generate(prompts, adapters))
        expected = [s for _ in range(self.seeds) for s in scenes]
        return [np.array([bool(t(r, s)) for r, s in zip(readings, expected)]).reshape(self.seeds, len(scenes)) for t in tests]


def concept_seen(name: str):
    return lambda r, s: shows_concept(r, name)


def concept_on_prompt(name: str):
    """The concept seen *and* the prompted shape in its colour (for the subject: the crescent in
    its own colour; for a style: the prompted shape and colour): wiping out the scene does not count."""
    seen = concept_seen(name)
    return lambda r, s: seen(r, s) and r.shows(s)

