"""The in-place switch/fuse engine: writes ``{adapter: scale}`` sets into live weights, exactly.

Two owners, one each for the two kinds of state:

* the :class:`~shira_diffusion.store.AdapterStore` holds every loaded adapter in compact host
  form (int32 indices, values in their dtype, LoRA factors; pinned on CUDA) and knows nothing of
  modules; loading fills it under its own lock, never the weights' lock;
* the :class:`~shira_diffusion.writer.WeightWriter` owns the weights: for the active set only, it
  holds the undo log of what it overwrote, captured when it wrote, on the weights' device.

A switch is ``writer.write(plan)`` where the plan lists, per weight, the store entries of the new
set in adapter-name order: only weights whose members change are touched, and on those only the
old and new sets' entries. Fused values are ``orig + sum(scale_i * delta_i)`` summed in fp32 (or
wider) in adapter-name order and cast once, however the set is listed and whether or not it was
written before. Restoring writes the saved originals; nothing is ever subtracted.

One re-entrant lock (:attr:`ShiraEngine.lock`) guards the weights; hold it while running the
model to see one consistent set. The engine knows tensors and modules only; it does not import
diffusers.
"""

from __future__ import annotations

import math
import threading
import time
from typing import Any, Mapping

import torch

from .adapter import COMPONENTS, AdapterError, SparseAdapter, split_key
from .lora import LoraAdapter
from .store import AdapterStore, Stored
from .writer import Member, Plan, WeightWriter

Scale = float | dict[str, float]  # one strength, or one per component ("unet", "text_encoder", ...)
Scales = Mapping[str, float | Mapping[str, float]]


class ShiraEngine:
    """Loads adapters for a model's weights and switches between sets of them in place.

    ``components`` is a diffusers pipeline or a mapping ``{"unet": module, ...}``.
    ``max_store_bytes`` bounds the loaded adapters' host memory, ``max_backup_bytes`` the
    full-weight copies LoRA-covered weights need for exact restore (``None``: no limit); ``pin``
    pins host copies (default: when CUDA is available). The engine assumes nothing else writes to
    the adapted weights while it is attached.
    """

    def __init__(self, components: Any, max_store_bytes: int | None = None, max_backup_bytes: int | None = None,
                 pin: bool | None = None) -> None:
        self.store = AdapterStore(max_store_bytes, pin)
        self.writer = WeightWriter(components, max_backup_bytes)
        self.lock = threading.RLock()
        self.last_switch_s = 0.0
        self._active: dict[str, Scale] = {}

    @property
    def components(self) -> dict[str, torch.nn.Module]:
        return self.writer.components

    # ---- inspection -----------------------------------------------------------------------------
    @property
    def active(self) -> dict[str, Scale]:
        """The set currently written into the weights, ``{name: scale}`` (a scale may be
        ``{component: scale}``; empty: base model)."""
        with self.lock:
            return dict(self._active)

    @property
    def staged(self) -> list[str]:
        return self.store.names()

    def weight(self, key: str) -> torch.Tensor:
        """The weight parameter a key names (for its shape; under offload it may be on ``meta``)."""
        return self.writer.weight(key)

    def memory(self) -> dict[str, dict[str, int]]:
        """``{adapter: {"host_bytes": ..., "device_bytes": ...}}`` held now: its compact copy in the
        store, plus what the writer keeps for it while it is active (on the host for CPU weights)."""
        with self.lock:
            held = self.writer.held_bytes()
            out = {}
            for name in self.store.names():
                extra = held.get(name, {"host": 0, "device": 0})
                out[name] = {"host_bytes": self.store.get(name).nbytes + extra["host"], "device_bytes": extra["device"]}
            return out

    # ---- loading --------------------------------------------------------------------------------
    @torch.no_grad()
    def stage(self, name: str, adapter: SparseAdapter | LoraAdapter, info: Mapping | None = None) -> Stored:
        """Validate ``adapter`` against the model and keep it, compact, in the store.

        Reads weight shapes, never weight values, and does not take the weights' lock: a running
        generation is not held up. A weight the engine could not write for real is refused here.
        """
        self.store.check_free(name)  # before the validation, which is the slow part; add() checks again under its lock
        adapter.validate()
        for key, delta in adapter.deltas.items():
            self.writer.check(key, delta.shape)
        return self.store.add(name, adapter, info)

    def unstage(self, name: str) -> None:
        """Forget a loaded adapter; if it is active, the rest of the active set stays applied."""
        with self.lock:
            self.store.get(name)  # KeyError naming it when it is not loaded
            if name in self._active:
                self.apply({n: s for n, s in self._active.items() if n != name})
            self.store.remove(name)

    # ---- switching ------------------------------------------------------------------------------
    def apply(self, scales: Scales | str | None) -> None:
        """Make ``scales`` the active set (``None`` or ``{}``: the base model, bit-exact). A scale is
        a number or ``{component: number}`` (e.g. ``{"unet": 1.0, "text_encoder": 0.5}``)."""
        with self.lock:
            target = self._normalise(scales)
            plan = self._plan(target)
            start = time.perf_counter()
            devices = self.writer.write(plan)
            for device in devices:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # the time a switch takes, not the time to queue it
            self.last_switch_s = time.perf_counter() - start
            self._active = target

    def restore(self) -> None:
        """Write every saved original back: the weights are exactly the base model's again."""
        self.apply(None)

    def _normalise(self, scales: Scales | str | None) -> dict[str, Scale]:
        if scales is None:
            return {}
        if isinstance(scales, str):
            scales = {scales: 1.0}
        out = {}
        for name, scale in scales.items():
            self.store.get(name)  # KeyError naming the loaded ones
            scale = _scale(name, scale)
            if scale != 0.0:
                out[name] = scale
        return out

    def _plan(self, scales: dict[str, Scale]) -> Plan:
        plan: dict[str, list[Member]] = {}
        for name in sorted(scales):
            scale = scales[name]
            for key, entry in self.store.get(name).entries.items():
                s = scale if isinstance(scale, float) else scale.get(split_key(key)[0], 1.0)
                if s != 0.0:
                    plan.setdefault(key, []).append(Member(name, entry, s))
        return {key: tuple(members) for key, members in plan.items()}


def _scale(name: str, scale: Any) -> Scale:
    """A finite float, or ``{component: float}`` (components left out: 1.0, as diffusers'
    ``set_adapters``), folded to one float when every component would get the same."""
    if isinstance(scale, Mapping):
        out = {}
        for component, value in scale.items():
            if component not in COMPONENTS:
                raise ValueError(f"scale for {name!r}: unknown component {component!r} (one of {', '.join(COMPONENTS)})")
            out[component] = _scale(name, value)
        full = {c: out.get(c, 1.0) for c in COMPONENTS}
        return next(iter(full.values())) if len(set(full.values())) == 1 else full
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"scale for {name!r} must be finite, got {scale}")
    return scale


__all__ = ["AdapterError", "ShiraEngine"]
