"""The in-place switch/fuse engine: writes ``{adapter: scale}`` sets into live weights, exactly.

How it stays exact and fast:

* When an adapter is *staged*, everything a switch needs is prepared on the weights' device:
  int64 indices, the base values at those indices (``orig``) and the values to write at scale 1
  (``new``). A switch is then one ``index_copy_`` per weight to put the old set's originals back
  and one to write the new set: no gathers, no host-to-device copies, and only the union of the
  two sets' indices is touched.
* Restoring always writes the saved originals; nothing is ever subtracted, so no round-off can
  accumulate, in any dtype, however many switches run.
* Fused values are ``orig + sum(scale_i * delta_i)`` summed in fp32 (or wider), in adapter-name
  order (so a set gives the same bits however it is listed), and cast once.
* A switch is transactional: inputs are checked before the first write, and if anything raises
  part-way, every weight already touched is put back to the previous set's exact values.
* One re-entrant lock guards every change; hold :attr:`ShiraEngine.lock` while running the model
  to see one consistent set.

LoRA adapters (:class:`~shira_diffusion.lora.LoraAdapter`) are dense: their entries cover the
whole weight (``idx is None``), their originals are one shared copy of the base weight, and their
values are computed (``scale * up @ down``) when a plan is built, as a LoRA fuse would.

The engine knows tensors and modules only; it does not import diffusers.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Mapping, NamedTuple

import torch

from .adapter import AdapterError, SparseAdapter
from .lora import LoraAdapter, LoraDelta
from .targets import pipeline_components, resolve_weight


@dataclass(frozen=True, eq=False)
class _Entry:
    """What one adapter set writes into one weight: ``weight.view(-1)[idx] = new``; undo: ``= orig``.

    ``idx is None`` means the whole weight (a dense, LoRA-style entry).
    """

    idx: torch.Tensor | None  # int64, sorted, on the weight's device
    orig: torch.Tensor  # base values at idx, weight dtype
    new: torch.Tensor | None  # values written at idx, weight dtype (None: built per plan)


@dataclass(frozen=True, eq=False)
class _Staged(_Entry):
    delta: torch.Tensor | LoraDelta  # adapter values at idx on the weight's device, or LoRA factors

    def dense_delta(self, acc: torch.dtype) -> torch.Tensor:
        return self.delta.dense(acc, self.orig.device) if isinstance(self.delta, LoraDelta) else self.delta.to(acc)


class _Layout(NamedTuple):
    idx: torch.Tensor
    orig: torch.Tensor
    members: list[tuple[str, _Staged, torch.Tensor | None]]  # (adapter, staged part, positions in idx)


Plan = dict[str, _Entry]
Scales = Mapping[str, float]


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _scaled(orig: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    """``orig + scale * delta`` computed in fp32 (or wider) and cast once, as fusion does."""
    acc = _accumulate_dtype(orig.dtype)
    step = delta.to(acc) if scale == 1.0 else delta.to(acc) * scale  # x * 1.0 == x: skip the copy
    return (orig.to(acc) + step).to(orig.dtype)


class ShiraEngine:
    """Stages adapters against a model's weights and switches between sets of them in place.

    ``components`` is a diffusers pipeline or a mapping ``{"unet": module, ...}``. Keys of staged
    adapters are resolved inside those modules; the engine assumes nothing else writes to the
    adapted weights while it is attached.
    """

    def __init__(self, components: Any, plan_cache_size: int = 4) -> None:
        self.components = pipeline_components(components)
        self.lock = threading.RLock()
        self.plan_cache_size = plan_cache_size
        self.last_switch_s = 0.0
        self._staged: dict[str, dict[str, _Staged]] = {}
        self._weights: dict[str, torch.Tensor] = {}
        self._active: dict[str, float] = {}
        self._plan: Plan = {}
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self._layouts: OrderedDict[tuple, dict[str, _Layout]] = OrderedDict()
        self._dense_base: dict[str, torch.Tensor] = {}  # full base copies for dense (LoRA) adapters

    # ---- inspection -----------------------------------------------------------------------------
    @property
    def active(self) -> dict[str, float]:
        """The set currently written into the weights, ``{name: scale}`` (empty: base model)."""
        with self.lock:
            return dict(self._active)

    @property
    def staged(self) -> list[str]:
        with self.lock:
            return list(self._staged)

    def weight(self, key: str) -> torch.Tensor:
        if key not in self._weights:
            self._weights[key] = resolve_weight(self.components, key)
        return self._weights[key]

    # ---- staging --------------------------------------------------------------------------------
    @torch.no_grad()
    def stage(self, name: str, adapter: SparseAdapter | LoraAdapter) -> None:
        """Validate ``adapter`` against the model and prepare it on the weights' devices.

        Reads weights, never writes them. Originals are taken from the engine's saved copies
        where the active set has changed a weight, so staging works while adapters are applied.
        """
        with self.lock:
            if name in self._staged:
                raise ValueError(f"an adapter named {name!r} is already loaded; unload it first")
            adapter.validate()
            weights = {}
            for key, delta in adapter.deltas.items():
                w = self.weight(key)
                if tuple(w.shape) != delta.shape:
                    raise AdapterError(f"{key}: shape mismatch, adapter {delta.shape} vs model {tuple(w.shape)}")
                if not w.is_contiguous():
                    raise AdapterError(f"{key}: the model's weight is not contiguous; cannot adapt it in place")
                weights[key] = w
            parts = {}
            for key, delta in adapter.deltas.items():
                w = weights[key]
                if isinstance(delta, LoraDelta):
                    factors = LoraDelta(delta.down.to(w.device), delta.up.to(w.device), delta.scale, delta.shape)
                    parts[key] = _Staged(None, self._dense_original(key, w), None, factors)
                    continue
                idx = delta.indices.to(w.device, torch.int64)
                values = delta.values.to(w.device)
                orig = self._base_values(key, w, idx)
                parts[key] = _Staged(idx, orig, _scaled(orig, values, 1.0), values)
            self._staged[name] = parts

    def _dense_original(self, key: str, w: torch.Tensor) -> torch.Tensor:
        """One shared copy of the base weight per key, for every dense adapter on it."""
        if key not in self._dense_base:
            live = self._plan.get(key)
            if live is not None and live.idx is None:
                self._dense_base[key] = live.orig
            else:
                base = w.detach().reshape(-1).clone()
                if live is not None:
                    base.index_copy_(0, live.idx, live.orig)
                self._dense_base[key] = base
        return self._dense_base[key]

    def _base_values(self, key: str, w: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        live = self._plan.get(key)
        if live is not None and live.idx is None:
            return live.orig.index_select(0, idx)
        current = w.detach().view(-1).index_select(0, idx)
        if live is not None and idx.numel():
            pos = torch.searchsorted(live.idx, idx).clamp_(max=live.idx.numel() - 1)
            hit = live.idx[pos] == idx
            current[hit] = live.orig[pos[hit]]
        return current

    def unstage(self, name: str) -> None:
        """Forget a staged adapter; if it is active, the rest of the active set stays applied."""
        with self.lock:
            if name not in self._staged:
                raise KeyError(f"no adapter named {name!r} is loaded")
            if name in self._active:
                self.apply({n: s for n, s in self._active.items() if n != name})
            del self._staged[name]
            still_dense = {k for parts in self._staged.values() for k, p in parts.items() if p.idx is None}
            for key in [k for k in self._dense_base if k not in still_dense]:
                del self._dense_base[key]
            for cache_key in [k for k in self._plans if any(n == name for n, _ in k)]:
                del self._plans[cache_key]
            for cache_key in [k for k in self._layouts if name in k]:
                del self._layouts[cache_key]

    # ---- switching ------------------------------------------------------------------------------
    def apply(self, scales: Scales | str | None) -> None:
        """Make ``scales`` the active set (``None`` or ``{}``: the base model, bit-exact)."""
        with self.lock:
            target = self._normalise(scales)
            start = time.perf_counter()
            plan = self._plan_for(target)
            self._check_live(plan)
            self._switch(self._plan, plan)
            self._plan, self._active = plan, target
            self.last_switch_s = time.perf_counter() - start

    def restore(self) -> None:
        """Write every saved original back: the weights are exactly the base model's again."""
        self.apply(None)

    def _normalise(self, scales: Scales | str | None) -> dict[str, float]:
        if scales is None:
            return {}
        if isinstance(scales, str):
            scales = {scales: 1.0}
        out = {}
        for name, scale in scales.items():
            if name not in self._staged:
                raise KeyError(f"no adapter named {name!r} is loaded (loaded: {sorted(self._staged)})")
            scale = float(scale)
            if not math.isfinite(scale):
                raise ValueError(f"scale for {name!r} must be finite, got {scale}")
            if scale != 0.0:
                out[name] = scale
        return out

    def _plan_for(self, scales: dict[str, float]) -> Plan:
        if not scales:
            return {}
        if len(scales) == 1 and next(iter(scales.values())) == 1.0:
            parts = self._staged[next(iter(scales))]
            if all(p.new is not None for p in parts.values()):
                return dict(parts)
        return self._cached(self._plans, tuple(sorted(scales.items())), lambda: self._build_plan(scales))

    def _cached(self, cache: OrderedDict, key: tuple, build) -> Any:
        """A small LRU: fused plans and layouts cost memory, rebuilding them costs time."""
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
        value = build()
        if self.plan_cache_size > 0:
            cache[key] = value
            while len(cache) > self.plan_cache_size:
                cache.popitem(last=False)
        return value

    @torch.no_grad()
    def _layout(self, names: tuple[str, ...]) -> dict[str, _Layout]:
        """Per weight: the union of the named adapters' indices, its originals, and where each lands."""
        by_key: dict[str, list[tuple[str, _Staged]]] = {}
        for name in names:
            for key, part in self._staged[name].items():
                by_key.setdefault(key, []).append((name, part))
        layout = {}
        for key, members in by_key.items():
            if len(members) == 1:
                name, part = members[0]
                layout[key] = _Layout(part.idx, part.orig, [(name, part, None)])
            elif any(p.idx is None for _, p in members):  # a dense member makes the union the whole weight
                layout[key] = _Layout(None, self._dense_base[key], [(n, p, p.idx) for n, p in members])
            else:
                idx, where = torch.unique(torch.cat([p.idx for _, p in members]), sorted=True, return_inverse=True)
                orig = torch.empty(idx.numel(), dtype=members[0][1].orig.dtype, device=idx.device)
                placed, start = [], 0
                for name, part in members:
                    pos = where[start : start + part.idx.numel()]
                    start += part.idx.numel()
                    orig[pos] = part.orig
                    placed.append((name, part, pos))
                layout[key] = _Layout(idx, orig, placed)
        return layout

    @torch.no_grad()
    def _build_plan(self, scales: dict[str, float]) -> Plan:
        names = tuple(sorted(scales))
        layout = self._cached(self._layouts, names, lambda: self._layout(names))
        plan: Plan = {}
        for key, (idx, orig, members) in layout.items():
            acc = _accumulate_dtype(orig.dtype)
            if len(members) == 1:
                name, part, _ = members[0]
                total = part.dense_delta(acc) * scales[name]
            else:
                total = torch.zeros(orig.numel(), dtype=acc, device=orig.device)
                for name, part, pos in members:
                    if pos is None:
                        total += part.dense_delta(acc) * scales[name]
                    else:
                        total.index_add_(0, pos, part.dense_delta(acc) * scales[name])
            plan[key] = _Entry(idx, orig, (orig.to(acc) + total).to(orig.dtype))
        return plan

    def _check_live(self, plan: Plan) -> None:
        """Refuse to write if a weight moved device or dtype since its adapters were staged."""
        for key in plan.keys() | self._plan.keys():
            entry = plan.get(key) or self._plan[key]
            w = self.weight(key)
            if w.device != entry.orig.device or w.dtype != entry.orig.dtype:
                raise RuntimeError(
                    f"{key}: the weight is now {w.dtype} on {w.device} but adapters were staged for "
                    f"{entry.orig.dtype} on {entry.orig.device}; unload and reload the adapters after moving the model"
                )

    @torch.no_grad()
    def _switch(self, old: Plan, new: Plan) -> None:
        done: list[str] = []
        try:
            for key in list(old.keys() | new.keys()):
                before, after = old.get(key), new.get(key)
                if before is after:
                    continue
                flat = self.weight(key).detach().view(-1)
                done.append(key)
                if before is not None and (after is None or after.idx is not before.idx):
                    self._write(flat, before.idx, before.orig)
                if after is not None:
                    self._write(flat, after.idx, after.new)
        except BaseException:
            for key in done:  # back to base on both index sets, then the old set's exact values
                before, after = old.get(key), new.get(key)
                flat = self.weight(key).detach().view(-1)
                if after is not None:
                    _put(flat, after.idx, after.orig)
                if before is not None:
                    _put(flat, before.idx, before.new)
            raise

    @staticmethod
    def _write(flat: torch.Tensor, idx: torch.Tensor | None, values: torch.Tensor) -> None:
        _put(flat, idx, values)


def _put(flat: torch.Tensor, idx: torch.Tensor | None, values: torch.Tensor) -> None:
    if idx is None:
        flat.copy_(values)
    else:
        flat.index_copy_(0, idx, values)

