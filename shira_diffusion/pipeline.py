"""The switcher: one loaded pipeline plus a library of adapters swapped or fused into it in place."""

from __future__ import annotations

from pathlib import Path

import torch

from .dtypes import dtype_name
from .loading import DEMO, load_pipeline, vae_memory

KINDS = ("text2img", "img2img", "inpaint")


class ShiraPipelineSwitcher:
    """One diffusers SDXL pipeline plus a library of adapters swapped or fused into it in place.

    Mirrors diffusers' adapter API (``load_adapter``/``set_adapters``/``disable_adapters``/
    ``delete_adapters``/``get_active_adapters``). Generation and switching share the engine's
    lock: ``sw(prompt, adapters=...)`` switches and generates as one step, so concurrent callers
    each get exactly the set they asked for.
    """

    _KEEP = object()

    def __init__(self, pipe, max_adapter_bytes: int | None = None, max_backup_bytes: int | None = None) -> None:
        """``max_adapter_bytes`` bounds the host memory of loaded adapters, ``max_backup_bytes`` the
        host copies of LoRA-covered weights kept for exact restore (``None``: no limit)."""
        from .engine import ShiraEngine

        self.pipe = pipe
        self._pipes: dict[tuple, object] = {}  # other pipelines on the same components, by (kind, extra components)
        self.engine = ShiraEngine(pipe, max_store_bytes=max_adapter_bytes, max_backup_bytes=max_backup_bytes)

    # ---- construction ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model: str, torch_dtype: torch.dtype | str | None = None, device: str | None = None, *,
                        offload: str = "none", vae: str | None = None, compile: bool = False,
                        max_adapter_bytes: int | None = None, max_backup_bytes: int | None = None,
                        **kwargs) -> "ShiraPipelineSwitcher":
        """A hub id or a local diffusers folder (``demo`` for the built-in demo model, ``tiny`` for
        random weights). ``offload``, ``vae``, ``compile``: see :mod:`.loading`; other keywords
        (``device_map``, ``revision``, ...) go to diffusers' loader."""
        pipe = load_pipeline(model, device=device, dtype=torch_dtype or "auto", offload=offload, vae=vae, compile=compile, **kwargs)
        return cls(pipe, max_adapter_bytes=max_adapter_bytes, max_backup_bytes=max_backup_bytes)

    @classmethod
    def from_single_file(cls, path: str, torch_dtype: torch.dtype | str | None = None, device: str | None = None, *,
                         config: str | None = None, **kwargs) -> "ShiraPipelineSwitcher":
        """A single ``.safetensors`` checkpoint; ``config``: a local diffusers folder whose configs
        and tokenizers describe it, so nothing is fetched."""
        if not Path(path).is_file():
            raise FileNotFoundError(f"{path}: no such checkpoint file")
        return cls.from_pretrained(str(path), torch_dtype, device, config=config, **kwargs)

    @classmethod
    def demo(cls, with_adapters: bool = False) -> "ShiraPipelineSwitcher":
        """The built-in demo model (CPU, fp32); ``with_adapters`` also loads the demo adapters."""
        sw = cls(load_pipeline(DEMO, device="cpu", dtype=torch.float32))
        if with_adapters:
            from .demo.model import ADAPTERS_DIR

            for path in sorted(ADAPTERS_DIR.glob("*.safetensors")):
                sw.load_adapter(path, adapter_name=path.stem)
        return sw

    # ---- the adapter library ---------------------------------------------------------------------
    def load_adapter(self, adapter, adapter_name: str | None = None, max_bytes: int | None = None) -> str:
        """Validate an adapter against the pipeline and load it; returns its name.

        ``adapter`` is a SHiRA file, a PEFT SHiRA folder, a LoRA file, or a ``SparseAdapter`` /
        ``LoraAdapter``. A mismatch (fingerprint, shapes, unknown modules) raises ``AdapterError``
        and leaves the pipeline and the library as they were. SHiRA files and PEFT folders are
        read, decoded and validated without the generation lock, so a running generation goes
        on, as are kohya / LyCORIS files; other LoRA files are parsed by diffusers on the pipeline
        itself, which takes the lock.
        """
        from .adapter import AdapterError, fingerprint
        from .interop import file_kind, load_any

        source = None
        if not hasattr(adapter, "deltas"):
            source = Path(adapter)
            if file_kind(source) in ("shira", "peft", "unreadable", "kohya"):
                adapter = load_any(source, self.pipe, max_bytes=max_bytes)
            else:
                with self.engine.lock:
                    adapter = load_any(source, self.pipe, max_bytes=max_bytes)
        name = adapter_name or (source.stem if source is not None else f"adapter_{len(self.engine.staged)}")
        expected = adapter.metadata.get("fingerprint")
        if expected:
            here = fingerprint({key: tuple(self.engine.weight(key).shape) for key in adapter.deltas})
            if here != expected:
                raise AdapterError(f"{name}: made for another model (fingerprint {expected} != {here} here)")
        self.engine.stage(name, adapter, self._describe(adapter, source))
        return name

    @staticmethod
    def _describe(adapter, source: Path | None) -> dict:
        from .adapter import SparseAdapter

        info = {
            "kind": "shira" if isinstance(adapter, SparseAdapter) else "lora",
            "params": adapter.num_params,
            "components": adapter.components,
            "source": str(source) if source else None,
            "bytes": (source.stat().st_size if source.is_file() else None) if source else None,
        }
        if isinstance(adapter, SparseAdapter):
            info.update(mask=adapter.metadata.get("mask"), density=adapter.density,
                        dtype=dtype_name(adapter.dtype), base_model=adapter.metadata.get("base_model"))
        else:
            kinds = adapter.kinds
            training = adapter.metadata.get("training") or {}
            info.update(kind="+".join(kinds), mask=None, density=None, dtype=dtype_name(adapter.dtype),
                        base_model=training.get("base_model"), rank=max(adapter.ranks, default=None),
                        kinds=kinds, training=training, trigger=training.get("trigger"))
        return info

    def get_adapter(self, name: str):
        """The loaded ``SparseAdapter`` / ``LoraAdapter`` object itself (for analysis)."""
        return self.engine.store.get(name).adapter

    def list_adapters(self) -> dict[str, dict]:
        """``{name: metadata}`` for every loaded adapter (all fit the pipeline: they were checked),
        with ``active`` and the bytes it holds now on the host and on the weights' device."""
        with self.engine.lock:
            memory, active = self.engine.memory(), self.engine.active
            return {name: dict(self.engine.store.get(name).info, active=name in active, **memory[name]) for name in memory}

    def delete_adapters(self, adapter_names: str | list[str]) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        with self.engine.lock:
            missing = [n for n in names if n not in self.engine.store]
            if missing:
                raise KeyError(f"no adapter named {missing[0]!r} is loaded")
            for name in names:
                self.engine.unstage(name)

    # ---- switching -------------------------------------------------------------------------------
    @staticmethod
    def scales(adapter_names, adapter_weights=None) -> dict:
        """``{name: weight}`` from diffusers-style ``(names, weights)`` (or a dict, or None); a
        weight is a number or, as in diffusers, ``{"unet": ..., "text_encoder": ...}`` (components
        left out: 1.0)."""
        if adapter_names is None:
            return {}
        weight = lambda w: dict(w) if isinstance(w, dict) else float(w)  # noqa: E731
        if isinstance(adapter_names, dict):
            return {str(k): weight(v) for k, v in adapter_names.items()}
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if adapter_weights is None:
            weights = [1.0] * len(names)
        elif isinstance(adapter_weights, (int, float, dict)):
            weights = [weight(adapter_weights)] * len(names)
        else:
            weights = [weight(w) for w in adapter_weights]
        if len(weights) != len(names):
            raise ValueError(f"{len(names)} adapters but {len(weights)} weights")
        return dict(zip(names, weights))

    def set_adapters(self, adapter_names, adapter_weights=None) -> None:
        """Swap (one name) or fuse (several, weighted) in place; ``None`` or ``[]`` is the base."""
        self.engine.apply(self.scales(adapter_names, adapter_weights))

    def disable_adapters(self) -> None:
        """Back to the base model, bit-exact."""
        self.engine.restore()

    def get_active_adapters(self) -> list[str]:
        return list(self.engine.active)

    @property
    def last_switch_ms(self) -> float:
        return self.engine.last_switch_s * 1000

    def __call__(self, prompt=None, *args, adapters=_KEEP, adapter_weights=None, **kwargs):
        """Generate; with ``adapters=`` (a name, names, ``{name: weight}`` or None) switch first,
        atomically with the generation."""
        return self.generate(self.pipe, prompt, *args, adapters=adapters, adapter_weights=adapter_weights, **kwargs)

    def img2img(self, prompt=None, image=None, *args, adapters=_KEEP, adapter_weights=None, controlnet=None, **kwargs):
        """diffusers' img2img pipeline on this switcher's weights (``strength`` etc. as there)."""
        return self.generate(self.pipeline("img2img", controlnet), prompt, *args, adapters=adapters, adapter_weights=adapter_weights,
                             image=image, **kwargs)

    def inpaint(self, prompt=None, image=None, mask_image=None, *args, adapters=_KEEP, adapter_weights=None, controlnet=None,
                **kwargs):
        """diffusers' inpainting pipeline on this switcher's weights (white in ``mask_image`` is repainted)."""
        return self.generate(self.pipeline("inpaint", controlnet), prompt, *args, adapters=adapters, adapter_weights=adapter_weights,
                             image=image, mask_image=mask_image, **kwargs)

    def pipeline(self, kind: str | type = "img2img", controlnet=None, **components):
        """A diffusers pipeline of ``kind`` (``text2img``, ``img2img``, ``inpaint`` or a pipeline
        class; with ``controlnet``, its ControlNet variant) built with ``from_pipe`` on this
        switcher's components: the same weights in memory, so the same adapters apply, and it is
        run under the same lock by :meth:`generate`. Built once per kind and kept."""
        from diffusers import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image

        if controlnet is not None:
            components["controlnet"] = controlnet
        key = (kind, tuple(sorted((name, id(c)) for name, c in components.items())))
        if isinstance(kind, str):
            auto = {"text2img": AutoPipelineForText2Image, "img2img": AutoPipelineForImage2Image,
                    "inpaint": AutoPipelineForInpainting}.get(kind)
            if auto is None:
                raise ValueError(f"unknown pipeline kind {kind!r}; one of {', '.join(KINDS)} or a diffusers pipeline class")
            if kind == "text2img" and not components:
                return self.pipe
        else:
            auto = kind
        with self.engine.lock:  # from_pipe touches the shared components: never during a generation
            if key not in self._pipes:
                if controlnet is not None and not hasattr(self.pipe.unet, "_hf_hook"):  # offloaded: accelerate places it
                    controlnet.to(device=self.pipe.unet.device, dtype=self.pipe.unet.dtype)
                # the dtype keeps from_pipe from casting the shared components (its default is fp32)
                new = auto.from_pipe(self.pipe, dtype=self.pipe.unet.dtype, **components)
                if new.unet is not self.pipe.unet:
                    raise ValueError(f"{type(new).__name__} did not take this pipeline's UNet; adapters would not reach it")
                if hasattr(new, "set_progress_bar_config") and hasattr(self.pipe, "_progress_bar_config"):
                    new.set_progress_bar_config(**self.pipe._progress_bar_config)
                self._pipes[key] = new
        return self._pipes[key]

    def generate(self, pipe, prompt=None, *args, adapters=_KEEP, adapter_weights=None, **kwargs):
        """Run ``pipe`` (this pipeline or one of :meth:`pipeline`'s) with ``adapters`` switched in,
        under the lock, large images decoded in tiles (:func:`.loading.vae_memory`)."""
        images = max(1, len(prompt) if isinstance(prompt, list) else 1) * int(kwargs.get("num_images_per_prompt") or 1)
        with self.engine.lock, vae_memory(pipe, kwargs.get("height"), kwargs.get("width"), images):
            if adapters is not self._KEEP:
                self.set_adapters(adapters, adapter_weights)
            return pipe(prompt, *args, **kwargs)

    # ---- comparing -------------------------------------------------------------------------------
    def compare(self, prompt: str, adapters: list[str], seeds=(0,), adapter_weights=None, lora_pair: list[str] | None = None,
                return_details: bool = False, **kwargs):
        """A labelled grid, one row per seed: base | each adapter alone | their fusion
        (| the fusion of ``lora_pair``, LoRA counterparts of the same concepts).

        With ``return_details`` also returns the images and concept-loss figures (``concept``:
        how much of each adapter's concept the fusion keeps, by the measure in ``metric``; see
        :mod:`.compare`), pixel distances and, for SHiRA pairs, weight-space interference.
        ``detector=True`` (demo model) / ``encoder=`` (an image encoder) pick the measure.
        """
        from .compare import compare_sets

        return compare_sets(self, prompt, list(adapters), list(seeds), adapter_weights, lora_pair, return_details, **kwargs)

    def xy_plot(self, prompt: str, x: tuple[str, list], y: tuple[str, list], seed: int = 0, **kwargs):
        """A1111's X/Y plot: ``x = (adapter, strengths)`` across, ``y = (adapter or "seed", values)``
        down, each cell one exact switch from the base; returns ``(grid, rows)`` with each cell's
        switch time and concept figures (:func:`.compare.xy_plot`, :func:`.compare.rows_csv`)."""
        from .compare import xy_plot

        return xy_plot(self, prompt, x, y, seed, **kwargs)
