"""Loaded adapters in compact host form: what a loaded, inactive adapter costs.

The store knows nothing of modules or weights. It keeps, per adapter and per target weight, an
:class:`Entry` that can give its delta on any device: SHiRA entries as int32 indices (every SDXL
weight has fewer than 2**31 entries) plus values in the file's dtype, LoRA-family entries as their
factors. Host tensors are pinned when CUDA is available, so uploading them to a GPU is a
``non_blocking`` copy. It has its own small lock, so loading an adapter never waits for a
generation that holds the weights' lock.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .adapter import AdapterError, SparseAdapter, SparseDelta
from .index_codec import index_dtype
from .lora import DenseDelta, LoraAdapter


def _host(t: torch.Tensor, pin: bool) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous()
    return t.pin_memory() if pin and not t.is_pinned() else t


def nbytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True, eq=False)
class SparseEntry:
    """SHiRA: ``weight.view(-1)[indices] += values``."""

    indices: torch.Tensor  # int32 (int64 only for a weight of 2**31 entries or more), host
    values: torch.Tensor  # the file's dtype, host
    shape: tuple[int, ...]

    dense = False

    @property
    def count(self) -> int:
        return self.values.numel()

    @property
    def nbytes(self) -> int:
        return nbytes(self.indices, self.values)


@dataclass(frozen=True, eq=False)
class DenseEntry:
    """The LoRA family: ``weight += scale * delta`` over the whole (flattened) weight, kept as the
    delta's factors on the host and expanded on the weight's device when written."""

    delta: DenseDelta  # host tensors
    shape: tuple[int, ...]

    dense = True

    @property
    def nbytes(self) -> int:
        return self.delta.nbytes

    def scaled(self, device: torch.device, acc: torch.dtype, scale: float, base: torch.Tensor | None = None) -> torch.Tensor:
        """``scale`` times the delta in ``acc`` on ``device``; ``base`` (the weight's original values) for DoRA."""
        dense = self.delta.dense(acc, device, base)  # the delta's own scale, then the set's scale on it
        return dense if scale == 1.0 else dense.mul_(scale)


Entry = SparseEntry | DenseEntry


def entries_of(adapter: SparseAdapter | LoraAdapter, pin: bool = False) -> dict[str, Entry]:
    """The compact host form of a validated adapter."""
    out: dict[str, Entry] = {}
    for key, delta in adapter.deltas.items():
        if isinstance(delta, DenseDelta):
            out[key] = DenseEntry(delta.map_tensors(lambda t: _host(t, pin)), delta.shape)
        else:
            out[key] = SparseEntry(_host(delta.indices.to(index_dtype(math.prod(delta.shape))), pin), _host(delta.values, pin), delta.shape)
    return out


@dataclass(eq=False)
class Stored:
    """One loaded adapter: its compact entries (the only copy held) and facts about it."""

    name: str
    entries: dict[str, Entry]
    metadata: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    @property
    def adapter(self) -> SparseAdapter | LoraAdapter:
        """The adapter rebuilt from the entries, for analysis (weight-space metrics, export)."""
        if any(e.dense for e in self.entries.values()):
            return LoraAdapter({k: e.delta for k, e in self.entries.items()}, self.metadata)
        return SparseAdapter._trusted({k: SparseDelta(e.indices, e.values, e.shape) for k, e in self.entries.items()},
                                      self.metadata)


class AdapterStore:
    """``{name: Stored}`` with a byte budget on what it holds (``None``: no limit)."""

    def __init__(self, max_bytes: int | None = None, pin: bool | None = None) -> None:
        self.max_bytes = max_bytes
        self.pin = torch.cuda.is_available() if pin is None else pin
        self.lock = threading.RLock()
        self._items: dict[str, Stored] = {}

    def add(self, name: str, adapter: SparseAdapter | LoraAdapter, info: Mapping | None = None) -> Stored:
        """Convert (outside any lock: this is the slow part) and publish under ``name``."""
        stored = Stored(name, entries_of(adapter, self.pin), dict(adapter.metadata), dict(info or {}))
        with self.lock:
            self.check_free(name)
            if self.max_bytes is not None and self.nbytes + stored.nbytes > self.max_bytes:
                raise AdapterError(f"{name}: loading it would hold {self.nbytes + stored.nbytes:,} bytes of adapters, "
                                   f"over the store's budget of {self.max_bytes:,}; delete some first")
            self._items[name] = stored
        return stored

    def check_free(self, name: str) -> None:
        if name in self:
            raise ValueError(f"an adapter named {name!r} is already loaded; delete it first or pick another name")

    def remove(self, name: str) -> Stored:
        with self.lock:
            if name not in self._items:
                raise KeyError(f"no adapter named {name!r} is loaded")
            return self._items.pop(name)

    def get(self, name: str) -> Stored:
        with self.lock:
            if name not in self._items:
                raise KeyError(f"no adapter named {name!r} is loaded (loaded: {sorted(self._items)})")
            return self._items[name]

    def names(self) -> list[str]:
        with self.lock:
            return list(self._items)

    def __contains__(self, name: str) -> bool:
        with self.lock:
            return name in self._items

    @property
    def nbytes(self) -> int:
        with self.lock:
            return sum(s.nbytes for s in self._items.values())
