"""The one table of dtype names (``fp32``/``fp16``/``bf16``) and how the project prints a dtype."""

from __future__ import annotations

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype | None, missing: str = "mixed") -> str:
    """``float16`` for ``torch.float16``; ``missing`` for None (an adapter whose values differ in dtype)."""
    return str(dtype).removeprefix("torch.") if dtype is not None else missing
