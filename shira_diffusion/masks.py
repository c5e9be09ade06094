"""Mask strategies: which entries of each weight a SHiRA adapter may change.

A mask is a sorted int64 tensor of flat indices into ``weight.view(-1)``. The budget is either a
density (``0.01`` = 1 % of the weight) or a LoRA-equivalent rank ``r`` (``r * (rows + cols)``
entries, what a rank-``r`` LoRA trains on that weight), so SHiRA and LoRA compare at equal
parameter count. Every strategy is deterministic for a given seed and key.
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Iterable, Mapping

import torch

MASK_KINDS = ("rand", "wm", "grad", "snip", "struct")


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    rows = shape[0]
    return rows, math.prod(shape) // rows


def budget(shape: tuple[int, ...] | torch.Size, density: float | None = None, rank: int | None = None) -> int:
    """Number of entries a weight of ``shape`` gets: ``density * numel`` or ``rank * (rows + cols)``."""
    if (density is None) == (rank is None):
        raise ValueError("give exactly one of density or rank")
    numel = math.prod(shape)
    if density is not None:
        if not 0 < density <= 1:
            raise ValueError(f"density must be in (0, 1], got {density}")
        return max(1, min(numel, round(density * numel)))
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    rows, cols = _rows_cols(tuple(shape))
    return min(numel, rank * (rows + cols))


def key_seed(seed: int, key: str) -> int:
    """A per-weight seed: stable across runs and processes (unlike ``hash``)."""
    return (seed * 1_000_003 + zlib.crc32(key.encode())) % (2**63)


def _top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(score.reshape(-1).float(), k, sorted=False).indices.sort().values


def _struct_offset(f: int, shift: tuple[float, float]) -> tuple[int, int]:
    return (int(shift[0] * f), int(shift[1] * f)) if f else (0, 0)


def _struct_count(rows: int, cols: int, f: int, shift: tuple[float, float] = (0.0, 0.0)) -> int:
    d = min(rows, cols)
    if f == 0:
        return d
    r0, c0 = _struct_offset(f, shift)
    r, c = len(range(r0, rows, f)), len(range(c0, cols, f))
    on_grid = len(range(r0, d, f)) + (len(range(c0, d, f)) if c0 != r0 else 0)  # diagonal entries already in
    return r * cols + c * rows - r * c + d - on_grid


def struct_stride(rows: int, cols: int, k: int, shift: tuple[float, float] = (0.0, 0.0)) -> int:
    """Smallest stride ``f`` whose rows + columns + diagonal pattern fits in ``k`` entries.

    ``0`` means only the diagonal fits (budgets below about one row plus one column). ``shift``
    moves the grid (see :func:`struct_shift`).
    """
    for f in (*range(1, max(rows, cols) + 1), 0):
        if _struct_count(rows, cols, f, shift) <= k:
            return f
    raise ValueError(f"a struct mask on a {rows}x{cols} weight needs at least {min(rows, cols)} entries; budget is {k}")


def struct_shift(seed: int) -> tuple[float, float]:
    """Where a seed puts the struct grid, as fractions of the stride for its rows and columns.

    Adapters trained with different mask seeds then use different rows and columns, so they
    overlap little when fused (the point of sparse adapters); seed 0 is the unshifted grid.
    """
    if seed == 0:
        return (0.0, 0.0)
    g = torch.Generator().manual_seed(seed)
    return tuple(float(u) for u in torch.rand(2, generator=g, dtype=torch.float64))


def struct_mask(rows: int, cols: int, f: int, shift: tuple[float, float] = (0.0, 0.0)) -> torch.Tensor:
    """Every ``f``-th row and column (from the offset ``shift`` gives) and the main diagonal:
    sparse but full rank."""
    keep = torch.zeros(rows, cols, dtype=torch.bool)
    if f:
        r0, c0 = _struct_offset(f, shift)
        keep[r0::f, :] = True
        keep[:, c0::f] = True
    diag = torch.arange(min(rows, cols))
    keep[diag, diag] = True
    return keep.view(-1).nonzero().view(-1)


def make_mask(
    weight: torch.Tensor,
    kind: str,
    *,
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sorted flat indices (int64, on CPU) of the entries to train in ``weight``.

    ``grad`` and ``snip`` need ``scores``: the absolute gradient accumulated over calibration
    batches (see :func:`calibration_scores`).
    """
    if kind not in MASK_KINDS:
        raise ValueError(f"unknown mask kind {kind!r}; choose from {MASK_KINDS}")
    shape = tuple(weight.shape)
    k = budget(shape, density, rank)
    if kind == "rand":
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(math.prod(shape), generator=g)[:k].sort().values
    if kind == "struct":
        rows, cols = _rows_cols(shape)
        shift = struct_shift(seed)
        return struct_mask(rows, cols, struct_stride(rows, cols, k, shift), shift)
    w = weight.detach().to("cpu")
    if kind in ("grad", "snip"):
        if scores is None:
            raise ValueError(f"the {kind!r} mask needs gradient scores from calibration batches")
        if tuple(scores.shape) != shape:
            raise ValueError(f"scores shape {tuple(scores.shape)} does not match weight {shape}")
        s = scores.detach().to("cpu", torch.float32).abs()
        return _top_k(s if kind == "grad" else s * w.float().abs(), k)
    return _top_k(w.abs(), k)  # wm


def make_masks(
    weights: Mapping[str, torch.Tensor],
    kind: str,
    *,
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    scores: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`make_mask` for each named weight, with a per-key seed derived from ``seed``."""
    return {
        key: make_mask(
            w, kind, density=density, rank=rank, seed=key_seed(seed, key),
            scores=None if scores is None else scores[key],
        )
        for key, w in weights.items()
    }


def calibration_scores(
    params: Mapping[str, torch.Tensor],
    loss_fn: Callable[[object], torch.Tensor],
    batches: Iterable[object],
) -> dict[str, torch.Tensor]:
    """Sum of ``|d loss / d weight|`` over ``batches`` for each weight in ``params``, in fp32 on
    the weight's device (no host copy per step; several processes sum theirs before choosing a mask).

    The weights get ``requires_grad`` only for the duration; their ``.grad`` is left as it was.
    """
    saved = {k: (p.requires_grad, p.grad) for k, p in params.items()}
    totals = {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in params.items()}
    try:
        for p in params.values():
            p.requires_grad_(True)
            p.grad = None
        for batch in batches:
            loss_fn(batch).backward()
            for k, p in params.items():
                if p.grad is not None:
                    totals[k] += p.grad.detach().abs()
                    p.grad = None
    finally:
        for k, p in params.items():
            p.requires_grad_(saved[k][0])
            p.grad = saved[k][1]
    return totals
