"""Compact storage for sorted, unique flat indices.

A SHiRA file is mostly values; the indices must cost less than the values do, or the sparse
adapter loses its size advantage over LoRA. Indices are stored as gaps (``g_i = idx_i -
idx_{i-1}``, with ``idx_{-1} = -1`` so every gap is >= 1) written in b-bit units: a gap ``g`` is
``(g - 1) // cap`` zero units followed by one non-zero unit ``r``, where ``cap = 2**b - 1``.
Eight units pack into ``b`` bytes, so the stream is a ``(groups, b)`` uint8 tensor whose shape
carries ``b``. The encoder picks ``b`` per weight: about 7 bits per index at 2 % density, and
``b = 1`` degenerates into a plain bitmap for dense masks.

Decoding is a handful of vectorised tensor ops and a cumulative sum; no Python loop runs per
index. Sortedness and uniqueness hold by construction, so a decoded stream only needs a count
and a range check.
"""

from __future__ import annotations

import torch

_SHIFTS = {bits: torch.arange(0, 8 * bits, bits, dtype=torch.int64) for bits in range(1, 9)}


def index_dtype(numel: int) -> torch.dtype:
    """The narrowest dtype for flat indices into ``numel`` entries: int32 for every SDXL weight."""
    return torch.int32 if numel < 2**31 else torch.int64


class IndexCodecError(ValueError):
    """The packed stream does not decode to the expected indices."""


def _units_per_gap(gaps: torch.Tensor, bits: int) -> torch.Tensor:
    return (gaps - 1) // ((1 << bits) - 1) + 1


def encode(indices: torch.Tensor) -> torch.Tensor:
    """Pack sorted unique non-negative indices into the smallest ``(groups, bits)`` uint8 stream."""
    idx = indices.detach().to("cpu", torch.int64).reshape(-1)
    gaps = torch.diff(idx, prepend=idx.new_tensor([-1]))
    if gaps.numel() and int(gaps.min()) < 1:
        raise IndexCodecError("indices must be sorted, unique and non-negative")

    def packed_bytes(bits: int) -> int:
        units = int(_units_per_gap(gaps, bits).sum()) if gaps.numel() else 0
        return -(-units // 8) * bits

    bits = min(range(1, 9), key=lambda b: (packed_bytes(b), -b))
    cap = (1 << bits) - 1
    per_gap = _units_per_gap(gaps, bits)
    total = int(per_gap.sum()) if gaps.numel() else 0
    groups = -(-total // 8)
    units = torch.zeros(groups * 8, dtype=torch.int64)
    if total:
        ends = torch.cumsum(per_gap, 0) - 1
        units[ends] = gaps - (per_gap - 1) * cap
    words = (units.view(groups, 8) << _SHIFTS[bits]).sum(dim=1, keepdim=True)
    return words.view(torch.uint8).view(groups, 8)[:, :bits].contiguous()


def decode(packed: torch.Tensor, count: int, numel: int) -> torch.Tensor:
    """Unpack a stream made by :func:`encode`; checks it holds ``count`` indices below ``numel``.

    Returns int32 indices where ``numel`` fits (every SDXL weight: half the memory of int64 and
    what the adapter store keeps), else int64.

    Index ``k`` ends at unit ``p_k``: it is the sum of the units up to there, plus ``cap`` for each
    zero unit before it (``p_k - k`` of them), minus one. So one cumulative sum over the units and
    one gather at the non-zero units decode it; no mask is filled or compacted.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2 or not 1 <= packed.shape[1] <= 8:
        raise IndexCodecError(
            f"index stream must be a (groups, bits) uint8 tensor with 1 <= bits <= 8, got "
            f"{tuple(packed.shape)} {packed.dtype}"
        )
    groups, bits = packed.shape
    cap = (1 << bits) - 1
    padded = torch.zeros(groups, 8, dtype=torch.uint8)
    padded[:, :bits] = packed
    units = (padded.view(torch.int64) >> _SHIFTS[bits]).bitwise_and_(cap).view(-1)
    ends = units.nonzero().view(-1)
    if ends.numel() != count:
        raise IndexCodecError(f"indices/values length mismatch: {ends.numel()} indices for {count} values")
    if not count:
        return torch.empty(0, dtype=torch.int32)
    # int64 while summing: a stream of zero units could overflow a narrower running sum
    last = int(units[: int(ends[-1]) + 1].sum()) + cap * (int(ends[-1]) - count + 1) - 1
    if last >= numel:
        raise IndexCodecError(f"index out of range: {last} >= {numel} entries")
    dtype = index_dtype(numel)  # the largest index is `last`, below numel
    indices = torch.cumsum(units, 0, dtype=dtype)[ends]
    zeros_before = ends.sub_(torch.arange(count, dtype=torch.int64))  # p_k - k
    return indices.add_(zeros_before.to(dtype), alpha=cap).sub_(1)
