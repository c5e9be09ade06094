"""Loading SDXL (and Stable Diffusion 1.x/2.x) pipelines from every source the studio, the switcher and the command line accept,
placed the way a user's GPU can afford them.

* ``dtype``: ``auto`` is fp16 on CUDA and fp32 elsewhere. In fp16 a source's ``fp16`` variant is
  read where it has one (half the download, no fp32 copy in RAM), the full files where it has not.
* ``offload``: ``model`` keeps one component at a time on the GPU (SDXL on 12 GB),
  ``sequential`` streams each layer's weights in for its forward (8 GB). Adapters write through
  accelerate's hooks either way (see :mod:`.writer`).
* ``vae``: a separate VAE, the fp16-fix SDXL VAE for fp16 users (the stock one overflows in fp16
  and diffusers upcasts it to fp32 for every decode).
* ``compile``: ``torch.compile`` the UNet in place (``nn.Module.compile``), so the module every
  adapter writes into stays the module the pipeline calls, and switching never recompiles.
* Loader keywords (``device_map``, ``revision``, ``local_files_only``, ...) pass straight to
  diffusers; with ``device_map`` nothing moves the pipeline afterwards.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any

import torch

from .dtypes import DTYPES

DEMO = "demo"  # the trained demo model in the package's assets
TINY = "tiny"  # a tiny random-weight pipeline built in memory (tests, smoke runs)
OFFLOAD = ("none", "model", "sequential")
TILE_ABOVE = 1024 * 1024  # pixels: the VAE decodes larger images tile by tile, batches image by image


class _TorchvisionNotice(logging.Filter):
    """Drops transformers' notice that its image processors fall back to PIL without torchvision:
    SDXL pipelines hold one only as an optional watermark/safety feature extractor, never used here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


logging.getLogger("transformers.utils.import_utils").addFilter(_TorchvisionNotice())


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``auto``/None: fp16 on CUDA, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The loader keyword for a dtype: ``dtype`` where diffusers has it (it warns on the older
    ``torch_dtype``), ``torch_dtype`` on diffusers that predate it."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (present since the rename)
    except ImportError:
        return {"torch_dtype": dtype}
    return {"dtype": dtype}


def load_vae(source: str, dtype: torch.dtype, **kwargs):
    """An ``AutoencoderKL`` from a hub id, a diffusers folder (or its ``vae/`` subfolder) or a
    single ``.safetensors`` file."""
    from diffusers import AutoencoderKL

    path = Path(source)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError(f"{source}: VAE files must be .safetensors (pickled files are refused)")
        return AutoencoderKL.from_single_file(str(path), **dtype_kwargs(dtype), **kwargs)
    if path.is_dir() and not (path / "config.json").is_file() and (path / "vae" / "config.json").is_file():
        kwargs = {"subfolder": "vae", **kwargs}
    return AutoencoderKL.from_pretrained(source, use_safetensors=True, **dtype_kwargs(dtype), **kwargs)


def _pretrained(cls, source: str, dtype: torch.dtype, kwargs: dict):
    """``cls.from_pretrained`` reading the fp16 variant in fp16 where the source has one."""
    def load(**variant):
        return cls.from_pretrained(source, use_safetensors=True, **dtype_kwargs(dtype), **kwargs, **variant)

    if dtype != torch.float16 or "variant" in kwargs:
        return load()
    try:
        return load(variant="fp16")
    except ValueError as err:  # diffusers' words when no component has the variant's files
        if "variant=fp16" not in str(err):
            raise
    return load()


SUPPORTED = ("StableDiffusionXLPipeline", "StableDiffusionPipeline")  # text-to-image classes; others run via from_pipe


def check_supported(pipe) -> None:
    """Raise a clear ``ValueError`` unless ``pipe`` is an SDXL or a Stable Diffusion 1.x/2.x text-to-image pipeline."""
    if type(pipe).__name__ not in SUPPORTED:
        raise ValueError(
            f"{type(pipe).__name__} is not supported: load an SDXL (StableDiffusionXLPipeline) or Stable Diffusion 1.x/2.x "
            "(StableDiffusionPipeline) model; img2img, inpainting and ControlNet run on it through "
            "ShiraPipelineSwitcher.img2img / .inpaint / .pipeline(kind, controlnet=...)")


def _single_file_class(config: str | None):
    """The pipeline class for a single-file checkpoint: the config folder's, or SDXL."""
    import json

    import diffusers

    name = "StableDiffusionXLPipeline"
    index = Path(config) / "model_index.json" if config is not None else None
    if index is not None and index.is_file():
        name = json.loads(index.read_text()).get("_class_name", name)
    if name not in SUPPORTED:
        raise ValueError(f"{config}: its model_index.json names {name}; supported: {', '.join(SUPPORTED)}")
    return getattr(diffusers, name)


def _read(model: str, dtype: torch.dtype, config: str | None, kwargs: dict):
    from diffusers import DiffusionPipeline

    if model == DEMO:
        from .demo.model import load_demo_pipeline

        return load_demo_pipeline()
    if model == TINY:
        from .testing import tiny_sdxl_pipeline

        return tiny_sdxl_pipeline()
    path = Path(model)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValueError("single-file checkpoints must be .safetensors (pickled .ckpt files are refused)")
        if config is not None:  # the folder's configs and tokenizers: nothing to fetch
            kwargs = {"config": str(config), "local_files_only": True, **kwargs}
        return _single_file_class(config).from_single_file(str(path), **dtype_kwargs(dtype), **kwargs)
    if config is not None:
        raise ValueError("config= is for single-file checkpoints; a folder or hub id carries its own")
    return _pretrained(DiffusionPipeline, model, dtype, kwargs)


def load_pipeline(model: str, device: str | None = None, dtype: str | torch.dtype | None = "auto", *,
                  offload: str = "none", vae: str | None = None, compile: bool = False, config: str | None = None,
                  **loader_kwargs: Any):
    """An SDXL pipeline from ``demo`` (the trained demo model, offline), ``tiny`` (random weights,
    offline), a single ``.safetensors`` checkpoint (``config``: a local diffusers folder with its
    configs, for offline use), a local diffusers folder or a hub id; see the module docstring."""
    if offload not in OFFLOAD:
        raise ValueError(f"offload must be one of {', '.join(OFFLOAD)}, got {offload!r}")
    if offload != "none" and "device_map" in loader_kwargs:
        raise ValueError("offload and device_map both place the pipeline; pass one of them")
    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if vae is not None:
        loader_kwargs["vae"] = load_vae(vae, torch_dtype, **{k: v for k, v in loader_kwargs.items() if k in ("local_files_only", "cache_dir", "token")})
    pipe = _read(model, torch_dtype, config, loader_kwargs)
    check_supported(pipe)
    if model in (DEMO, TINY) and vae is not None:
        pipe.vae = loader_kwargs["vae"]
    if pipe.unet.dtype != torch_dtype:  # demo/tiny, or a checkpoint stored in another dtype
        pipe.to(dtype=torch_dtype)
    if "device_map" not in loader_kwargs:
        if offload == "model":
            pipe.enable_model_cpu_offload(device=device)
        elif offload == "sequential":
            check_sequential_offload(device)
            pipe.enable_sequential_cpu_offload(device=device)
        else:
            pipe.to(device)
    if compile:
        pipe.unet.compile()  # in place: pipe.unet stays the module the adapters write into
    return pipe


def check_sequential_offload(device: str) -> None:
    """Raise a clear ``ValueError`` if accelerate's per-layer offload hooks cannot round-trip a
    weight to ``device`` here (with torch 2.13 and accelerate 1.15 a parameter comes back from the
    execution device as a plain tensor, and the next move to ``meta`` raises a ``TypeError``
    deep inside the first generation). Probed on a 2x2 layer before the pipeline is touched."""
    import accelerate
    from accelerate import cpu_offload

    target = torch.device(device)
    if target.index is None and target.type != "cpu":
        target = torch.device(target.type, 0)
    if target.type == "cpu":
        target = torch.device("cpu", 0)  # what diffusers' enable_sequential_cpu_offload passes
    probe = torch.nn.Sequential(torch.nn.Linear(2, 2))
    cpu_offload(probe, execution_device=target)
    try:
        for _ in range(2):
            probe(torch.zeros(1, 2, device=target))
    except TypeError as err:
        raise ValueError(
            f"sequential offload does not work with torch {torch.__version__} and accelerate {accelerate.__version__} "
            f"on {target} ({err.args[0].splitlines()[0]}); use offload='model' (--offload model), which keeps SDXL "
            "within ~12 GB, or another accelerate release") from None


@contextlib.contextmanager
def vae_memory(pipe, height: int | None, width: int | None, images: int = 1):
    """Decode images above 1024x1024 tile by tile and several images one by one (what keeps a
    2048x2048 SDXL decode inside 24 GB), and the usual way otherwise, for one call."""
    vae = getattr(pipe, "vae", None)
    if vae is None or not hasattr(vae, "enable_tiling"):
        yield
        return
    scale = getattr(pipe, "vae_scale_factor", 8)
    default = getattr(pipe, "default_sample_size", 128) * scale
    large = (height or default) * (width or default) > TILE_ABOVE
    before = (getattr(vae, "use_tiling", False), getattr(vae, "use_slicing", False))
    vae.use_tiling, vae.use_slicing = before[0] or large, before[1] or large or images > 1
    try:
        yield
    finally:
        vae.use_tiling, vae.use_slicing = before
