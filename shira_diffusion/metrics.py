"""How much two adapters interfere when fused: index overlap, AWOM and AWOR.

From the SHiRA paper: for two deltas ``dW1``, ``dW2`` of one weight (rows x cols),
``AWOM = ||dW1^T dW2||_2`` (spectral norm) and ``AWOR = 1 - nnz(dW1^T dW2) / cols^2``. Low AWOM and
high AWOR mean the adapters act on nearly orthogonal subspaces, so fusing them loses less of each.
``overlap`` is the share of the smaller adapter's indices that the other adapter also changes.
"""

from __future__ import annotations

import torch

from .adapter import AdapterError, SparseAdapter, SparseDelta, split_key


def _shared_count(a: torch.Tensor, b: torch.Tensor) -> int:
    return int(torch.isin(a.long(), b.long()).sum())


def weight_interference(a: SparseDelta, b: SparseDelta) -> dict[str, float]:
    """Overlap, AWOM and AWOR for two deltas of the same weight (exact, computed in fp32)."""
    if a.shape != b.shape:
        raise AdapterError(f"cannot compare deltas of shapes {a.shape} and {b.shape}")
    shared = _shared_count(a.indices, b.indices)
    rows = a.shape[0]
    dw1 = a.to_dense(torch.float32).reshape(rows, -1)
    dw2 = b.to_dense(torch.float32).reshape(rows, -1)
    product = dw1.T @ dw2
    return {
        "shared": shared,
        "overlap": shared / max(1, min(a.nnz, b.nnz)),
        "awom": float(torch.linalg.matrix_norm(product, ord=2)),
        "awor": 1.0 - int(torch.count_nonzero(product)) / product.numel(),
    }


def _pool(a: SparseAdapter, b: SparseAdapter, per_weight: dict[str, dict]) -> dict:
    """``overlap`` pools counts over the weights; ``awom`` and ``awor`` are means over them."""
    smaller = sum(min(a.deltas[k].nnz, b.deltas[k].nnz) for k in per_weight)
    n = max(1, len(per_weight))
    return {
        "weights_shared": len(per_weight),
        "overlap": sum(m["shared"] for m in per_weight.values()) / max(1, smaller),
        "awom": sum(m["awom"] for m in per_weight.values()) / n,
        "awor": sum(m["awor"] for m in per_weight.values()) / n if per_weight else 1.0,
    }


def interference(a: SparseAdapter, b: SparseAdapter) -> dict:
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
