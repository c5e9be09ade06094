"""How much two adapters interfere when fused: index overlap, AWOM and AWOR.

From the SHiRA paper: for two deltas ``dW1``, ``dW2`` of one weight (rows x cols),
``AWOM = ||dW1^T dW2||_2`` (spectral norm) and ``AWOR = 1 - nnz(dW1^T dW2) / cols^2``. Low AWOM and
high AWOR mean the adapters act on nearly orthogonal subspaces, so fusing them loses less of each.
``overlap`` is the share of the smaller adapter's indices that the other adapter also changes.
LoRA deltas change every entry, so any pair involving one overlaps completely.
"""

from __future__ import annotations

import torch

from .adapter import AdapterError, SparseAdapter, SparseDelta, split_key
from .lora import DenseDelta, LoraAdapter

Delta = SparseDelta | DenseDelta


def _shared_count(a: Delta, b: Delta) -> int:
    if isinstance(a, DenseDelta) or isinstance(b, DenseDelta):
        return min(a.nnz, b.nnz)
    return int(torch.isin(a.indices.long(), b.indices.long()).sum())


def _matrix(delta: Delta) -> torch.Tensor:
    dense = delta.dense(torch.float32) if isinstance(delta, DenseDelta) else delta.to_dense(torch.float32)
    return dense.reshape(delta.shape[0], -1)


def weight_interference(a: Delta, b: Delta) -> dict[str, float]:
    """Overlap, AWOM and AWOR for two deltas of the same weight (exact, computed in fp32)."""
    if a.shape != b.shape:
        raise AdapterError(f"cannot compare deltas of shapes {a.shape} and {b.shape}")
    shared = _shared_count(a, b)
    dw1, dw2 = _matrix(a), _matrix(b)
    product = dw1.T @ dw2
    return {
        "shared": shared,
        "overlap": shared / max(1, min(a.nnz, b.nnz)),
        "awom": float(torch.linalg.matrix_norm(product, ord=2)),
        "awor": 1.0 - int(torch.count_nonzero(product)) / product.numel(),
    }


def _pool(a: SparseAdapter | LoraAdapter, b: SparseAdapter | LoraAdapter, per_weight: dict[str, dict]) -> dict:
    """``overlap`` pools counts over the weights; ``awom`` and ``awor`` are means over them."""
    smaller = sum(min(a.deltas[k].nnz, b.deltas[k].nnz) for k in per_weight)
    n = max(1, len(per_weight))
    return {
        "weights_shared": len(per_weight),
        "overlap": sum(m["shared"] for m in per_weight.values()) / max(1, smaller),
        "awom": sum(m["awom"] for m in per_weight.values()) / n,
        "awor": sum(m["awor"] for m in per_weight.values()) / n if per_weight else 1.0,
    }


def interference(a: SparseAdapter | LoraAdapter, b: SparseAdapter | LoraAdapter) -> dict:
    """Per-weight metrics for the weights both adapters change, pooled per component and overall.

    Weights only one adapter touches cannot interfere and are counted apart.
    """
    shared_keys = sorted(a.deltas.keys() & b.deltas.keys())
    per_weight = {k: weight_interference(a.deltas[k], b.deltas[k]) for k in shared_keys}
    aggregate = {
        **_pool(a, b, per_weight),
        "weights_only_a": len(a.deltas.keys() - b.deltas.keys()),
        "weights_only_b": len(b.deltas.keys() - a.deltas.keys()),
    }
    components = sorted({split_key(k)[0] for k in shared_keys})
    by_component = {c: _pool(a, b, {k: m for k, m in per_weight.items() if split_key(k)[0] == c}) for c in components}
    return {"aggregate": aggregate, "by_component": by_component, "per_weight": per_weight}
