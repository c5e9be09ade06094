"""Compact storage for sorted, unique flat indices.

A SHiRA file is mostly values; the indices must cost less than the values do, or the sparse
adapter loses its size advantage over LoRA. Indices are stored as gaps (``g_i = idx_i -
idx_{i-1}``, with ``idx_{-1} = -1`` so every gap is >= 1) written in b-bit units: a gap ``g`` is
``(g - 1) // cap`` zero units followed by one non-zero unit ``r``, where ``cap = 2**b - 1``.
Eight units pack into ``b`` bytes, so the stream is a ``(groups, b)`` uint8 tensor whose shape
carries ``b``. The encoder picks ``b`` per weight: about 7 bits per index at 2 % density, and
``b = 1`` degenerates into a plain bitmap for dense masks.

Decoding is a handful of vectorised array passes and a cumulative sum; no Python loop runs per
index. Sortedness and uniqueness hold by construction, so a decoded stream only needs a count
and a range check.
"""

from __future__ import annotations

import threading

import numpy as np
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


class _Scratch(threading.local):
    """Per-thread decode buffers, reused between weights: fresh memory of this size costs page
    faults as slow as the decode itself. Buffers above ``KEEP_BYTES`` (a dense bitmap of a big
    weight) are dropped after the call."""

    KEEP_BYTES = 32 * 2**20

    def __init__(self) -> None:
        self.bufs: dict[tuple[str, type], np.ndarray] = {}

    def get(self, slot: str, n: int, dtype) -> np.ndarray:
        have = self.bufs.get((slot, dtype))
        if have is None or have.size < n:
            have = self.bufs[(slot, dtype)] = np.empty(n, dtype)
        return have[:n]

    def trim(self) -> None:
        if sum(b.nbytes for b in self.bufs.values()) > self.KEEP_BYTES:
            self.bufs.clear()


_scratch = _Scratch()


def decode(packed: torch.Tensor, count: int, numel: int) -> torch.Tensor:
    """Unpack a stream made by :func:`encode`; checks it holds ``count`` indices below ``numel``.

    Returns int32 indices where ``numel`` fits (every SDXL weight: half the memory of int64 and
    what the adapter store keeps), else int64.

    A zero unit stands for ``cap`` and ends no index; a non-zero unit ``r`` adds ``r`` and ends
    one. So with zero units replaced by ``cap`` (and one subtracted from the first unit), index
    ``k`` is the cumulative sum at the ``k``-th non-zero unit: one fill, one cumulative sum and
    one compaction. The units are unpacked as bytes from unaligned 64-bit reads of the stream
    (each group of 8 units is ``bits`` bytes), and the passes run in NumPy on reused buffers:
    its byte-wide cumulative sum and compaction are several times faster than PyTorch's on a CPU,
    and loading a file is mostly this.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 2 or not 1 <= packed.shape[1] <= 8:
        raise IndexCodecError(
            f"index stream must be a (groups, bits) uint8 tensor with 1 <= bits <= 8, got "
            f"{tuple(packed.shape)} {packed.dtype}"
        )
    groups, bits = packed.shape
    cap = (1 << bits) - 1
    if groups * 8 > numel + 7:  # every unit advances at least one entry; 7 more are padding
        raise IndexCodecError(f"index stream of {groups * 8} units is too long for a weight of {numel} entries")
    try:
        return _decode(packed.detach().cpu().contiguous().numpy(), groups, bits, cap, count, numel)
    finally:
        _scratch.trim()


def _decode(packed: np.ndarray, groups: int, bits: int, cap: int, count: int, numel: int) -> torch.Tensor:
    buf = _scratch.get
    size = groups * bits
    raw = buf("raw", size + 8, np.uint8)  # 8 spare bytes: the last group's 64-bit read stays inside
    raw[:size] = packed.reshape(-1)
    words = buf("words", groups, np.int64)  # group g's bits start at byte g * bits; above 8 * bits: the next group's, masked off
    np.copyto(words, np.ndarray((groups,), dtype="<i8", buffer=raw, strides=(bits,)))
    units = buf("units", groups * 8, np.uint8)
    grid, shifted = units.reshape(groups, 8), buf("shifted", groups, np.int64)
    for j in range(8):
        np.bitwise_and(np.right_shift(words, j * bits, out=shifted), cap, out=grid[:, j], casting="unsafe")
    ends = np.not_equal(units, 0, out=buf("ends", units.size, np.bool_))
    if not count:
        if ends.any():
            raise IndexCodecError(f"indices/values length mismatch: {int(ends.sum())} indices for 0 values")
        return torch.empty(0, dtype=torch.int32)
    zeros = np.logical_not(ends, out=buf("zeros", units.size, np.bool_))
    np.maximum(units, np.multiply(zeros, np.uint8(cap), out=buf("fill", units.size, np.uint8)), out=units)
    units[0] -= 1
    # the running sum is at most cap per unit: narrow it only where that cannot wrap (a hostile
    # stream of zero units included); the range check below then holds for the true sum
    dtype = np.int32 if groups * 8 * cap < 2**31 else np.int64
    indices = np.compress(ends, np.cumsum(units, dtype=dtype, out=buf(f"sums{dtype.__name__}", units.size, dtype)))
    if indices.size != count:
        raise IndexCodecError(f"indices/values length mismatch: {indices.size} indices for {count} values")
    if int(indices[-1]) >= numel:
        raise IndexCodecError(f"index out of range: {int(indices[-1])} >= {numel} entries")
    return torch.from_numpy(indices).to(index_dtype(numel))

