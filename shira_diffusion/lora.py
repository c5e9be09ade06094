"""LoRA adapters as dense low-rank deltas, so the engine can switch and fuse them like SHiRA.

A LoRA changes every entry of a weight: ``delta = scale * up @ down``. The engine applies it with
the same guarantees as a sparse adapter (saved originals, exact restore, fp32 sums), which is what
lets the studio put SHiRA and LoRA side by side and show what dense switching costs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch

from .adapter import AdapterError, canonical_keys, split_key


@dataclass
class LoraDelta:
    """``weight += scale * up @ down`` with ``down: (rank, in)``, ``up: (out, rank)`` (for a
    convolution, over its weight flattened to ``(out, in * kh * kw)``)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        # a convolution's LoRA (diffusers/PEFT Conv2d LoRA, kohya LoCon): down (rank, in, kh, kw) and
        # up (out, rank, 1, 1) are the same product over the weight flattened to (out, in * kh * kw)
        if self.down.dim() == 4:
            self.down = self.down.flatten(1)
        if self.up.dim() == 4 and self.up.shape[2:] == (1, 1):
            self.up = self.up.flatten(1)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def num_params(self) -> int:
        return self.down.numel() + self.up.numel()

    @property
    def nnz(self) -> int:
        """Entries of the weight it changes: all of them."""
        return math.prod(self.shape)

    def validate(self, key: str) -> None:
        if self.down.dim() != 2 or self.up.dim() != 2:
            raise AdapterError(f"{key}: LoRA factors must be 2-D, or a convolution's (rank, in, kh, kw) down and (out, rank, 1, 1) "
                               f"up; got {tuple(self.up.shape)} @ {tuple(self.down.shape)}")
        rows, cols = self.shape[0], math.prod(self.shape) // self.shape[0]
        if self.up.shape[1] != self.down.shape[0] or self.up.shape[0] != rows or self.down.shape[1] != cols:
            raise AdapterError(f"{key}: LoRA factors {tuple(self.up.shape)} @ {tuple(self.down.shape)} do not make a {self.shape} weight")
        if not math.isfinite(self.scale):
            raise AdapterError(f"{key}: non-finite LoRA scale {self.scale}")
        for t in (self.down, self.up):
            lo, hi = torch.aminmax(t)
            if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                raise AdapterError(f"{key}: non-finite values (nan or inf)")

    def dense(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> torch.Tensor:
        """The full delta, flattened, computed in ``dtype``."""
        up, down = self.up.to(device=device, dtype=dtype), self.down.to(device=device, dtype=dtype)
        return (up @ down).mul_(self.scale).view(-1)


class LoraAdapter:
    """A validated set of :class:`LoraDelta` keyed like :class:`SparseAdapter` (``"unet.<path>"``)."""

    def __init__(self, deltas: Mapping[str, LoraDelta], metadata: Mapping[str, Any] | None = None) -> None:
        self.deltas = canonical_keys(deltas)
        self.metadata = dict(metadata or {})
        for key, delta in self.deltas.items():
            split_key(key)
            delta.validate(key)

    @property
    def num_params(self) -> int:
        return sum(d.num_params for d in self.deltas.values())

    @property
    def components(self) -> list[str]:
        return sorted({split_key(k)[0] for k in self.deltas})

    def validate(self) -> None:
        for key, delta in self.deltas.items():
            delta.validate(key)

    def summary(self) -> str:
        ranks = sorted({d.rank for d in self.deltas.values()})
        return f"LoRA adapter: {len(self.deltas)} weights, {self.num_params:,} params, rank {'/'.join(map(str, ranks))}"

    def __repr__(self) -> str:
        return f"LoraAdapter({len(self.deltas)} weights, {self.num_params:,} params)"
