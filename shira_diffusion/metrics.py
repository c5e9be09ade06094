"""How much two adapters interfere when fused: index overlap, AWOM and AWOR.

From the SHiRA paper: for two deltas ``dW1``, ``dW2`` of one weight (rows x cols),
``AWOM = ||dW1^T dW2||_2`` (spectral norm) and ``AWOR = 1 - nnz(dW1^T dW2) / cols^2``. Low AWOM and
high AWOR mean the adapters act on nearly orthogonal subspaces, so fusing them loses less of each.
``overlap`` is the share of the smaller adapter's indices that the other adapter also changes.
LoRA deltas change every entry, so any pair involving one overlaps completely.
"""

from __future__ import annotations

import math

import torch

from .adapter import AdapterError, SparseAdapter, SparseDelta, split_key
from .lora import DenseDelta, LoraAdapter, LoraDelta

Delta = SparseDelta | DenseDelta


def _shared_count(a: Delta, b: Delta) -> int:
    if isinstance(a, DenseDelta) or isinstance(b, DenseDelta):
        return min(a.nnz, b.nnz)
    return int(torch.isin(a.indices.long(), b.indices.long()).sum())


class _Operand:
    """One delta as a ``(rows, cols)`` matrix that multiplies vectors without being densified:
    a sparse one as CSR (and its transpose), a LoRA as its two factors, any other kind dense."""

    def __init__(self, delta: Delta) -> None:
        self.rows = delta.shape[0]
        self.cols = math.prod(delta.shape) // self.rows
        self.sparse = isinstance(delta, SparseDelta)
        if self.sparse:
            idx = delta.indices.long().cpu()  # sorted and unique: rows, then columns within a row
            r, c = idx // self.cols, idx % self.cols
            values = delta.values.detach().cpu().double()
            self.csr = _csr(r, c, values, (self.rows, self.cols))
            order = torch.argsort(c * self.rows + r)
            self.csr_t = _csr(c[order], r[order], values[order], (self.cols, self.rows))
            self.flat = (idx, values)
        elif isinstance(delta, LoraDelta) and delta.mid is None and delta.dora_scale is None:
            self.up, self.down = delta.up.detach().cpu().double() * delta.scale, delta.down.detach().cpu().double()
        else:
            self.dense = delta.dense(torch.float64, "cpu").view(self.rows, self.cols)

    def mul(self, v: torch.Tensor) -> torch.Tensor:
        if self.sparse:
            return self.csr @ v
        if hasattr(self, "up"):
            return self.up @ (self.down @ v)
        return self.dense @ v

    def tmul(self, u: torch.Tensor) -> torch.Tensor:
        if self.sparse:
            return self.csr_t @ u
        if hasattr(self, "up"):
            return self.down.T @ (self.up.T @ u)
        return self.dense.T @ u

    def matrix(self) -> torch.Tensor:
        """Dense in fp32, for the one product AWOR needs."""
        if self.sparse:
            idx, values = self.flat
            return torch.zeros(self.rows * self.cols).index_put_((idx,), values.float()).view(self.rows, self.cols)
        return (self.up @ self.down if hasattr(self, "up") else self.dense).float()


def _csr(r: torch.Tensor, c: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """CSR from entries already sorted by row, then column."""
    import warnings

    crow = torch.zeros(shape[0] + 1, dtype=torch.int64)
    crow[1:] = torch.bincount(r, minlength=shape[0]).cumsum(0)
    with warnings.catch_warnings():  # torch's "sparse CSR is beta" notice
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, c, values, shape)


def _product(a: _Operand, b: _Operand) -> torch.Tensor:
    """``dW1^T dW2`` (cols x cols) from a sparse side times the other side dense: ``nnz * cols``
    multiply-adds, not ``rows * cols^2``."""
    if a.sparse:
        return a.csr_t.float() @ b.matrix()
    if b.sparse:
        return (b.csr_t.float() @ a.matrix()).T
    return a.matrix().T @ b.matrix()


def spectral_norm(mul, tmul, n: int, tol: float = 1e-6, max_steps: int = 200, seed: int = 0) -> float:
    """The largest singular value of an ``(m, n)`` operator given as ``x -> A x`` and ``y -> A^T y``,
    by Golub-Kahan-Lanczos bidiagonalisation with full reorthogonalisation (fp64): it converges to
    the top singular value in tens of steps, each two products with the sparse factors. Stops when
    the estimate moves by less than ``tol`` (relative); never above the true value."""
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=torch.float64)
    v /= v.norm()
    us, vs, alphas, betas = [], [v], [], []
    estimate, u_prev, beta = 0.0, None, 0.0
    for _ in range(min(max_steps, n)):
        u = mul(v)
        if u_prev is not None:
            u = u - beta * u_prev
        for q in us:
            u -= (q @ u) * q
        alpha = float(u.norm())
        if alpha == 0.0:
            break
        u = u / alpha
        us.append(u)
        alphas.append(alpha)
        w = tmul(u) - alpha * v
        for q in vs:
            w -= (q @ w) * q
        beta = float(w.norm())
        k = len(alphas)
        bidiagonal = torch.zeros(k, k + 1, dtype=torch.float64)
        bidiagonal[range(k), range(k)] = torch.tensor(alphas, dtype=torch.float64)
        bidiagonal[range(k), range(1, k + 1)] = torch.tensor([*betas, beta], dtype=torch.float64)
        new = float(torch.linalg.svdvals(bidiagonal)[0])
        if abs(new - estimate) <= tol * new or beta <= 1e-14 * new:
            return new
        estimate = new
        v = w / beta
        vs.append(v)
        betas.append(beta)
        u_prev = u
    return estimate


def weight_interference(a: Delta, b: Delta) -> dict[str, float]:
    """Overlap, AWOM and AWOR for two deltas of the same weight.

    ``dW1^T dW2`` is formed once in fp32 from the sparse side (``nnz * cols`` work) for AWOR, which
    counts its non-zeros; AWOM, its spectral norm, is exact (an SVD) for up to 64 columns and a
    Lanczos estimate on the factors above (relative error below 1e-5 on SDXL's weights; see
    ``benchmarks/interference.py``), never a dense SVD of a 1280 x 1280 product.
    """
    if a.shape != b.shape:
        raise AdapterError(f"cannot compare deltas of shapes {a.shape} and {b.shape}")
    shared = _shared_count(a, b)
    x, y = _Operand(a), _Operand(b)
    product = _product(x, y)
    if x.cols <= 64:
        awom = float(torch.linalg.matrix_norm(product.double(), ord=2))
    else:
        awom = spectral_norm(lambda v: x.tmul(y.mul(v)), lambda u: y.tmul(x.mul(u)), x.cols)
    return {
        "shared": shared,
        "overlap": shared / max(1, min(a.nnz, b.nnz)),
        "awom": awom,
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
