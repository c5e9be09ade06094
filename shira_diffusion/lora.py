"""Dense adapters (the LoRA family) as deltas over whole weights, so the engine can switch and fuse
them like SHiRA.

Every kind kohya sd-scripts, LyCORIS and diffusers write changes every entry of a weight; each is
kept as its factors (what the file holds) and expanded to ``delta = scale * product`` only when it
is written, on the weight's device, in fp32:

* :class:`LoraDelta`: LoRA and LoCon, ``up @ down`` (a convolution's over its weight flattened to
  ``(out, in * kh * kw)``), or with a Tucker core ``mid`` (LyCORIS ``lora_mid``);
* :class:`LohaDelta`: LoHa, ``(w1_a @ w1_b) * (w2_a @ w2_b)`` (Hadamard), optionally Tucker;
* :class:`LokrDelta`: LoKr, ``kron(w1, w2)`` with either side optionally low-rank or Tucker;
* :class:`FullDelta`: a full difference (LyCORIS ``diff`` / ``diff_b``), also for bias deltas.

Any of the factored kinds may carry a DoRA magnitude (``dora_scale``): the merged weight is
re-normalised along the axis the magnitude has, as LyCORIS (which trains it) and PEFT compute it,
``W' = (W + d) * m / ||W + d||``; its delta ``W' - W`` needs the base weight, which the writer has.
A strength ``s`` scales that delta, ``W + s * (W' - W)``, so every kind fuses the same way.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch

from .adapter import AdapterError, canonical_keys, split_key


def _rows_cols(shape: tuple[int, ...]) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


class DenseDelta:
    """What the dense kinds share: ``shape`` (the weight's), ``scale`` (alpha / rank, or 1), an
    optional DoRA magnitude, and the tensors they hold (``_TENSORS``)."""

    kind: ClassVar[str]
    _TENSORS: ClassVar[tuple[str, ...]]
    shape: tuple[int, ...]
    scale: float
    dora_scale: torch.Tensor | None

    def _init(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.dora_scale is not None and self.dora_scale.dim() == 1:  # PEFT's (out,) magnitude vector
            self.dora_scale = self.dora_scale.view(-1, *[1] * (len(self.shape) - 1))

    # ---- what it holds --------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        names = (*self._TENSORS, "dora_scale")
        return {n: t for n in names if (t := getattr(self, n)) is not None}

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "DenseDelta":
        """The same delta with ``fn`` applied to every tensor (to the host, pinned, ...)."""
        return dataclasses.replace(self, **{n: fn(t) for n, t in self.tensors().items()})

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.tensors().values())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def nnz(self) -> int:
        """Entries of the weight it changes: all of them."""
        return math.prod(self.shape)

    @property
    def rank(self) -> int | None:
        return None

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype

    @property
    def label(self) -> str:
        return f"do{self.kind.removeprefix('lo')}" if self.dora_scale is not None and self.kind != "full" else self.kind

    @property
    def needs_base(self) -> bool:
        """Whether the delta depends on the weight it is added to (DoRA)."""
        return self.dora_scale is not None

    # ---- checks ---------------------------------------------------------------------------------
    def validate(self, key: str) -> None:
        made = self._product_shape(key)
        if made != _rows_cols(self.shape):
            raise AdapterError(f"{key}: {self.kind} factors make a {made[0]}x{made[1]} delta, not one for a {self.shape} weight")
        if not math.isfinite(self.scale):
            raise AdapterError(f"{key}: non-finite {self.kind} scale {self.scale}")
        if self.dora_scale is not None:
            self._dora_on_out(key)
        for t in self.tensors().values():
            if not t.is_floating_point():
                raise AdapterError(f"{key}: {self.kind} factors must be floating point, got {t.dtype}")
            lo, hi = torch.aminmax(t)
            if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
                raise AdapterError(f"{key}: non-finite values (nan or inf)")

    def _dora_on_out(self, key: str = "") -> bool:
        """DoRA's axis from its magnitude's shape: ``(out, 1, ...)`` rows, ``(1, in, ...)`` columns."""
        m, out = tuple(self.dora_scale.shape), self.shape[0]
        if len(self.shape) < 2 or len(m) != len(self.shape):
            raise AdapterError(f"{key}: dora_scale {m} does not fit a {self.shape} weight")
        if m == (out, *[1] * (len(m) - 1)):
            return True
        if m == (1, self.shape[1], *[1] * (len(m) - 2)):
            return False
        raise AdapterError(f"{key}: dora_scale {m} is neither ({out}, 1) nor (1, {self.shape[1]}) for a {self.shape} weight")

    # ---- the delta ------------------------------------------------------------------------------
    def _product_shape(self, key: str) -> tuple[int, int]:
        raise NotImplementedError

    def _product(self, dtype: torch.dtype, device: Any) -> torch.Tensor:
        """The unscaled product as a ``(rows, cols)`` matrix, freshly allocated."""
        raise NotImplementedError

    def dense(self, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
              base: torch.Tensor | None = None) -> torch.Tensor:
        """The full delta, flattened, computed in ``dtype`` on ``device``; DoRA needs ``base`` (the
        weight's original values, any shape with its number of entries)."""
        delta = self._product(dtype, device).view(-1)
        if self.scale != 1.0:
            delta.mul_(self.scale)
        if self.dora_scale is None:
            return delta
        if base is None:
            raise AdapterError(f"a {self.label} delta depends on the weight it is added to; pass base=")
        base = base.to(device=delta.device, dtype=dtype).reshape(self.shape)
        merged = delta.view(self.shape).add_(base)  # delta is ours (fresh): normalise it in place
        if self._dora_on_out():
            norm = merged.reshape(self.shape[0], -1).norm(dim=1).view(self.dora_scale.shape)
        else:
            norm = merged.transpose(0, 1).reshape(self.shape[1], -1).norm(dim=1).view(self.dora_scale.shape)
        norm = norm + torch.finfo(dtype).eps  # as LyCORIS: no division by zero for an all-zero row
        return merged.mul_(_mat(self.dora_scale, dtype, delta.device) / norm).sub_(base).view(-1)


def _mat(t: torch.Tensor, dtype: torch.dtype, device: Any) -> torch.Tensor:
    """``t`` on ``device`` in ``dtype``: moved first (from pinned host memory, without waiting), then cast there."""
    if device is not None:
        t = t.to(device, non_blocking=True)
    return t.to(dtype)


@dataclass
class LoraDelta(DenseDelta):
    """``weight += scale * up @ down`` with ``down: (rank, in)``, ``up: (out, rank)`` (a convolution's
    over its weight flattened to ``(out, in * kh * kw)``); with ``mid: (rank, rank, kh, kw)`` (LoCon's
    Tucker form) ``delta[o, i, k] = sum(mid[a, b, k] * up[o, a] * down[b, i])``."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float
    shape: tuple[int, ...]
    mid: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    kind: ClassVar[str] = "lora"
    _TENSORS: ClassVar[tuple[str, ...]] = ("down", "up", "mid")

    def __post_init__(self) -> None:
        self._init()
        # a convolution's LoRA (diffusers/PEFT Conv2d LoRA, kohya LoCon): down (rank, in, kh, kw) and
        # up (out, rank, 1, 1) are the same product over the weight flattened to (out, in * kh * kw)
        if self.down.dim() == 4:
            self.down = self.down.flatten(1)
        if self.up.dim() == 4 and self.up.shape[2:] == (1, 1):
            self.up = self.up.flatten(1)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def _product_shape(self, key: str) -> tuple[int, int]:
        if self.down.dim() != 2 or self.up.dim() != 2:
            raise AdapterError(f"{key}: LoRA factors must be 2-D, or a convolution's (rank, in, kh, kw) down and (out, rank, 1, 1) "
                               f"up; got {tuple(self.up.shape)} @ {tuple(self.down.shape)}")
        if self.up.shape[1] != self.down.shape[0]:
            raise AdapterError(f"{key}: LoRA factors {tuple(self.up.shape)} @ {tuple(self.down.shape)} do not chain")
        if self.mid is None:
            return int(self.up.shape[0]), int(self.down.shape[1])
        if self.mid.dim() < 2 or tuple(self.mid.shape[:2]) != (self.rank, self.rank):
            raise AdapterError(f"{key}: lora_mid {tuple(self.mid.shape)} is not ({self.rank}, {self.rank}, kh, kw)")
        return int(self.up.shape[0]), int(self.down.shape[1]) * math.prod(self.mid.shape[2:])

    def _product(self, dtype: torch.dtype, device: Any) -> torch.Tensor:
        up, down = _mat(self.up, dtype, device), _mat(self.down, dtype, device)
        if self.mid is None:
            return up @ down
        mid = _mat(self.mid, dtype, device).flatten(2)
        return torch.einsum("abk,oa,bi->oik", mid, up, down).reshape(up.shape[0], -1)


@dataclass
class LohaDelta(DenseDelta):
    """LoHa: ``(w1_a @ w1_b) * (w2_a @ w2_b)`` with ``w*_a: (out, rank)``, ``w*_b: (rank, cols)``;
    with Tucker cores ``t1, t2: (rank, rank, kh, kw)`` (then ``w*_a: (rank, out)``, ``w*_b: (rank,
    in)``) each half is ``sum(t[a, b, k] * w_a[a, o] * w_b[b, i])``, as LyCORIS rebuilds it."""

    w1_a: torch.Tensor
    w1_b: torch.Tensor
    w2_a: torch.Tensor
    w2_b: torch.Tensor
    scale: float
    shape: tuple[int, ...]
    t1: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    kind: ClassVar[str] = "loha"
    _TENSORS: ClassVar[tuple[str, ...]] = ("w1_a", "w1_b", "w2_a", "w2_b", "t1", "t2")

    def __post_init__(self) -> None:
        self._init()

    @property
    def rank(self) -> int:
        return int(self.w1_b.shape[0])

    def _half_shape(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, key: str) -> tuple[int, int]:
        if a.dim() != 2 or b.dim() < 2:
            raise AdapterError(f"{key}: LoHa factors must be 2-D, got {tuple(a.shape)} and {tuple(b.shape)}")
        if t is None:
            if a.shape[1] != b.shape[0]:
                raise AdapterError(f"{key}: LoHa factors {tuple(a.shape)} @ {tuple(b.shape)} do not chain")
            return int(a.shape[0]), math.prod(b.shape[1:])
        if t.dim() < 2 or t.shape[0] != a.shape[0] or t.shape[1] != b.shape[0]:
            raise AdapterError(f"{key}: LoHa Tucker core {tuple(t.shape)} does not fit factors {tuple(a.shape)}, {tuple(b.shape)}")
        return int(a.shape[1]), int(b.shape[1]) * math.prod(t.shape[2:])

    def _product_shape(self, key: str) -> tuple[int, int]:
        if (self.t1 is None) != (self.t2 is None):
            raise AdapterError(f"{key}: LoHa with one Tucker core (hada_t1 and hada_t2 come together)")
        one = self._half_shape(self.w1_a, self.w1_b, self.t1, key)
        two = self._half_shape(self.w2_a, self.w2_b, self.t2, key)
        if one != two:
            raise AdapterError(f"{key}: LoHa halves make {one} and {two} deltas")
        return one

    def _half(self, a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | None, dtype: torch.dtype, device: Any) -> torch.Tensor:
        a, b = _mat(a, dtype, device), _mat(b, dtype, device).flatten(1)
        if t is None:
            return a @ b
        return torch.einsum("abk,ao,bi->oik", _mat(t, dtype, device).flatten(2), a, b).reshape(a.shape[1], -1)

    def _product(self, dtype: torch.dtype, device: Any) -> torch.Tensor:
        one = self._half(self.w1_a, self.w1_b, self.t1, dtype, device)
        return one.mul_(self._half(self.w2_a, self.w2_b, self.t2, dtype, device))


@dataclass
class LokrDelta(DenseDelta):
    """LoKr: ``kron(w1, w2)``; ``w1`` is ``lokr_w1`` or ``w1_a @ w1_b``, ``w2`` is ``lokr_w2``,
    ``w2_a @ w2_b``, or with ``t2`` the Tucker rebuild. Over the flattened weight ``kron`` of
    ``(a, b)`` and ``(c, d * kh * kw)`` is the ``(a * c, b * d * kh * kw)`` delta."""

    scale: float
    shape: tuple[int, ...]
    w1: torch.Tensor | None = None
    w1_a: torch.Tensor | None = None
    w1_b: torch.Tensor | None = None
    w2: torch.Tensor | None = None
    w2_a: torch.Tensor | None = None
    w2_b: torch.Tensor | None = None
    t2: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    kind: ClassVar[str] = "lokr"
    _TENSORS: ClassVar[tuple[str, ...]] = ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")

    def __post_init__(self) -> None:
        self._init()

    @property
    def rank(self) -> int | None:
        b = self.w2_b if self.w2_b is not None else self.w1_b
        return None if b is None else int(b.shape[0])

    def _side_shape(self, side: str, key: str) -> tuple[int, int]:
        full, a, b = (getattr(self, f"{side}{s}") for s in ("", "_a", "_b"))
        t = self.t2 if side == "w2" else None
        if full is not None:
            if a is not None or b is not None or t is not None:
                raise AdapterError(f"{key}: LoKr has lokr_{side} and its factors; give one")
            return int(full.shape[0]), math.prod(full.shape[1:])
        if a is None or b is None:
            raise AdapterError(f"{key}: LoKr needs lokr_{side}, or both lokr_{side}_a and lokr_{side}_b")
        if t is not None:
            if t.dim() < 2 or t.shape[0] != a.shape[0] or t.shape[1] != b.shape[0]:
                raise AdapterError(f"{key}: LoKr Tucker core {tuple(t.shape)} does not fit {tuple(a.shape)}, {tuple(b.shape)}")
            return int(a.shape[1]), int(b.shape[1]) * math.prod(t.shape[2:])
        if a.dim() != 2 or a.shape[1] != b.shape[0]:
            raise AdapterError(f"{key}: LoKr factors {tuple(a.shape)} @ {tuple(b.shape)} do not chain")
        return int(a.shape[0]), math.prod(b.shape[1:])

    def _product_shape(self, key: str) -> tuple[int, int]:
        (a, b), (c, d) = self._side_shape("w1", key), self._side_shape("w2", key)
        return a * c, b * d

    def _side(self, side: str, dtype: torch.dtype, device: Any) -> torch.Tensor:
        full, a, b = (getattr(self, f"{side}{s}") for s in ("", "_a", "_b"))
        if full is not None:
            return _mat(full, dtype, device).flatten(1)
        a, b = _mat(a, dtype, device), _mat(b, dtype, device).flatten(1)
        if side == "w2" and self.t2 is not None:
            return torch.einsum("abk,ao,bi->oik", _mat(self.t2, dtype, device).flatten(2), a, b).reshape(a.shape[1], -1)
        return a @ b

    def _product(self, dtype: torch.dtype, device: Any) -> torch.Tensor:
        return torch.kron(self._side("w1", dtype, device), self._side("w2", dtype, device))


@dataclass
class FullDelta(DenseDelta):
    """A full difference: ``weight += diff`` (LyCORIS ``diff``; a bias's ``diff_b``)."""

    diff: torch.Tensor
    shape: tuple[int, ...]
    scale: float = 1.0
    dora_scale: None = None

    kind: ClassVar[str] = "full"
    _TENSORS: ClassVar[tuple[str, ...]] = ("diff",)

    def __post_init__(self) -> None:
        self._init()

    def _product_shape(self, key: str) -> tuple[int, int]:
        if self.diff.numel() != math.prod(self.shape) or self.diff.shape[0] != self.shape[0]:
            raise AdapterError(f"{key}: diff of shape {tuple(self.diff.shape)} for a {self.shape} weight")
        return _rows_cols(self.shape)

    def _product(self, dtype: torch.dtype, device: Any) -> torch.Tensor:
        diff = _mat(self.diff, dtype, device)
        return (diff.clone() if diff is self.diff else diff).reshape(_rows_cols(self.shape))


class LoraAdapter:
    """A validated set of :class:`DenseDelta` (any kind, mixed) keyed like :class:`SparseAdapter`
    (``"unet.<path>"``; a bias delta ``"unet.<path>:bias"``)."""

    def __init__(self, deltas: Mapping[str, DenseDelta], metadata: Mapping[str, Any] | None = None) -> None:
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

    @property
    def kinds(self) -> dict[str, int]:
        """``{label: weights}``: ``lora``, ``loha``, ``lokr``, ``full``, ``dora``/``doha``/``dokr`` (with DoRA)."""
        out: dict[str, int] = {}
        for d in self.deltas.values():
            out[d.label] = out.get(d.label, 0) + 1
        return dict(sorted(out.items()))

    @property
    def ranks(self) -> list[int]:
        return sorted({r for d in self.deltas.values() if (r := d.rank) is not None})

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.deltas.values())).dtype

    def validate(self) -> None:
        for key, delta in self.deltas.items():
            delta.validate(key)

    def summary(self) -> str:
        kinds = ", ".join(f"{n} {k}" for k, n in self.kinds.items())
        ranks = f", rank {'/'.join(map(str, self.ranks))}" if self.ranks else ""
        return f"dense adapter: {len(self.deltas)} weights ({kinds}), {self.num_params:,} params{ranks}"

    def __repr__(self) -> str:
        return f"LoraAdapter({len(self.deltas)} weights, {self.num_params:,} params)"


__all__ = ["DenseDelta", "FullDelta", "LoraAdapter", "LoraDelta", "LohaDelta", "LokrDelta"]
