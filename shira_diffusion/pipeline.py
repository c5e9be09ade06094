"""Loading SDXL pipelines from every source the studio and the command line accept."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEMO = "demo"


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str | torch.dtype | None, device: str) -> torch.dtype:
    """``auto``/None: fp16 on CUDA, fp32 elsewhere."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    return torch.float16 if str(device).startswith("cuda") else torch.float32


def load_pipeline(model: str, device: str | None = None, dtype: str | torch.dtype | None = "auto"):
    """An SDXL pipeline from ``demo`` (built in, offline), a single ``.safetensors`` checkpoint,
    a local diffusers folder or a hub id."""
    from diffusers import StableDiffusionXLPipeline

    device = device or default_device()
    torch_dtype = resolve_dtype(dtype, device)
    if model == DEMO:
        from .testing import tiny_sdxl_pipeline

        pipe = tiny_sdxl_pipeline()
    else:
        path = Path(model)
        if path.is_file():
            if path.suffix != ".safetensors":
                raise ValueError("single-file checkpoints must be .safetensors (pickled .ckpt files are refused)")
            pipe = StableDiffusionXLPipeline.from_single_file(str(path), torch_dtype=torch_dtype)
        else:
            pipe = StableDiffusionXLPipeline.from_pretrained(model, torch_dtype=torch_dtype, use_safetensors=True)
    return pipe.to(device, torch_dtype)
