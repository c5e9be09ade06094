"""shira_diffusion: Sparse High Rank Adapters (SHiRA) for SDXL, switched and fused in place."""

from .adapter import COMPONENTS, AdapterError, SparseAdapter, SparseDelta, fingerprint
from .engine import ShiraEngine
from .lora import DenseDelta, FullDelta, LoraAdapter, LoraDelta, LohaDelta, LokrDelta
from .masks import MASK_KINDS, budget, calibration_scores, make_mask, make_masks
from .metrics import interference
from .pipeline import ShiraPipelineSwitcher
from .targets import DEFAULT_TARGETS, find_targets

__version__ = "0.1.0"

__all__ = [
    "COMPONENTS",
    "DEFAULT_TARGETS",
    "MASK_KINDS",
    "AdapterError",
    "DenseDelta",
    "FullDelta",
    "LoraAdapter",
    "LoraDelta",
    "LohaDelta",
    "LokrDelta",
    "ShiraEngine",
    "ShiraPipelineSwitcher",
    "SparseAdapter",
    "SparseDelta",
    "budget",
    "calibration_scores",
    "find_targets",
    "fingerprint",
    "interference",
    "make_mask",
    "make_masks",
]
