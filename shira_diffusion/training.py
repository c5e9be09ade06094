"""Sparse training: only the masked entries of each target weight are trainable.

Each adapted ``nn.Linear`` (or ``nn.Conv2d``: the mask is over its flattened weight) gets one fp32 parameter ``shira_values`` (the masked entries' current
values) and runs through :class:`_SparseLinear`, which

* writes the values into the frozen weight in place before the matmul, so the forward uses the
  model's own weight tensor: no dense clone, no extra copy kept for backward;
* saves the input activation as the matmul saw it (bf16/fp16 under autocast, not an fp32 copy);
* in backward, forms this layer's dense weight gradient, gathers it at the mask into the values'
  gradient and drops it at once, so at most one dense weight gradient exists at a time. A mask
  made of whole rows, whole columns and diagonal entries (``struct``) needs no dense gradient:
  ``g[:, R]^T x``, ``g^T x[:, C]`` and a row-wise product for the diagonal give exactly its
  entries, at a cost that scales with the mask (:class:`_Slices`).

The optimizer and DDP only see the values; the values stay fp32 whatever dtype the model runs in
(they are the master copy), and :meth:`SparseTraining.export` turns them into a
:class:`SparseAdapter` (delta = trained - original).
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
import types
import weakref
from pathlib import Path
from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .adapter import SparseAdapter, SparseDelta
from .index_codec import index_dtype
from .store import nbytes
from .targets import pipeline_components, resolve_module


@dataclass(frozen=True)
class _Slices:
    """A mask that is whole rows ``rows``, whole columns ``cols`` (of the other rows) and diagonal
    entries ``diag``: its weight gradient is three small products, concatenated, then ``gather``
    (each mask entry's position in that concatenation, in the mask's sorted order)."""

    rows: torch.Tensor
    cols: torch.Tensor
    diag: torch.Tensor
    gather: torch.Tensor

    @staticmethod
    def of(indices: torch.Tensor, shape: tuple[int, int], device: torch.device) -> "_Slices | None":
        """The slices of a mask, or None where it has other entries or the slices cost more than half the dense gradient."""
        out_f, in_f = shape
        idx = indices.detach().to("cpu", torch.int64)
        r, c = idx // in_f, idx % in_f
        full_rows = torch.bincount(r, minlength=out_f) == in_f
        rest = ~full_rows[r]
        others = out_f - int(full_rows.sum())
        full_cols = (torch.bincount(c[rest], minlength=in_f) == others) if others else torch.zeros(in_f, dtype=torch.bool)
        on_diag = rest & ~full_cols[c]
        if not torch.equal(r[on_diag], c[on_diag]):
            return None
        rows, cols, diag = full_rows.nonzero().view(-1), full_cols.nonzero().view(-1), r[on_diag]
        if rows.numel() * in_f + out_f * cols.numel() + diag.numel() > out_f * in_f // 2:
            return None
        row_pos = torch.zeros(out_f, dtype=torch.int64)
        row_pos[rows] = torch.arange(rows.numel())
        col_pos = torch.zeros(in_f, dtype=torch.int64)
        col_pos[cols] = torch.arange(cols.numel())
        in_rows, in_cols = ~rest, rest & full_cols[c]
        gather = torch.empty_like(idx)
        gather[in_rows] = row_pos[r[in_rows]] * in_f + c[in_rows]
        gather[in_cols] = rows.numel() * in_f + r[in_cols] * cols.numel() + col_pos[c[in_cols]]
        gather[on_diag] = rows.numel() * in_f + out_f * cols.numel() + torch.arange(diag.numel())
        # int32 where it fits: the map is held for the whole run, one entry per mask entry
        gather = gather.to(torch.int32) if gather.numel() and int(gather.max()) < 2**31 else gather
        return _Slices(*(t.to(device) for t in (rows, cols, diag, gather)))

    def grad(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The mask entries of ``g^T x`` (``g``: (N, out), ``x``: (N, in)), without forming it."""
        parts = []
        if self.rows.numel():
            parts.append((g.index_select(1, self.rows).T @ x).reshape(-1))
        if self.cols.numel():
            parts.append((g.T @ x.index_select(1, self.cols)).reshape(-1))
        if self.diag.numel():  # summed in fp32: a dot product per entry, not a matmul's accumulator
            parts.append((g.index_select(1, self.diag).float() * x.index_select(1, self.diag).float()).sum(0).to(g.dtype))
        return torch.cat(parts).index_select(0, self.gather)


class _Mask:
    """A layer's mask, held for the whole run in 2 bytes per entry where it can be: each entry's
    column as int16 plus one int32 count per row (the weight flattened to ``(rows, cols)``), and
    expanded to flat int64 indices only while a forward or a backward uses them (one layer's at a
    time). A weight with 2**15 columns or more, or on the meta device, keeps int32 flat indices."""

    def __init__(self, indices: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
        rows = shape[0]
        cols = math.prod(shape) // rows
        idx = indices.detach().to("cpu", torch.int64)
        self.rows, self.cols, self.n = rows, cols, idx.numel()
        if torch.device(device).type == "meta" or cols >= 2**15:
            self.flat_indices = idx.to(device, index_dtype(rows * cols))
            self.col = self.counts = None
            return
        self.flat_indices = None
        self.col = (idx % cols).to(torch.int16).to(device)
        self.counts = torch.bincount(idx // cols, minlength=rows).to(torch.int32).to(device)

    def flat(self) -> torch.Tensor:
        """The sorted flat indices, built now (int64; the int32 ones kept for wide or meta weights)."""
        if self.flat_indices is not None:
            return self.flat_indices
        device = self.col.device
        rows = torch.repeat_interleave(torch.arange(self.rows, device=device), self.counts.long(), output_size=self.n)
        return rows.mul_(self.cols).add_(self.col)

    @property
    def nbytes(self) -> int:
        return nbytes(*(t for t in (self.flat_indices, self.col, self.counts) if t is not None))


def _autocast(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """``x``, weight and bias in the autocast dtype when autocast is on (what the layer itself would run in)."""
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):  # meta: FLOP counting
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), weight.to(dtype), bias.to(dtype) if bias is not None else None
    return x, weight, bias


class _SparseLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, mask, values, slices=None):
        with torch.no_grad():
            weight.view(-1).index_put_((mask.flat(),), values.to(weight.dtype))
        x, w, b = _autocast(x, weight, bias)
        ctx.weight = weight  # the live tensor, not a saved copy: rewritten only by the next forward
        ctx.mask = mask  # its compact form: the flat indices are rebuilt in backward, not kept until then
        ctx.save_for_backward(x)
        ctx.values_dtype = values.dtype
        ctx.slices = slices
        return F.linear(x, w, b)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        weight = ctx.weight
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_out @ weight.to(grad_out.dtype)
        if ctx.needs_input_grad[4]:
            g = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)
            if ctx.slices is not None:
                grad_values = ctx.slices.grad(g, x.reshape(-1, x.shape[-1])).to(ctx.values_dtype)
            else:
                dense = g.T @ x.reshape(-1, x.shape[-1])  # this layer's dW, freed on return
                grad_values = dense.view(-1).index_select(0, ctx.mask.flat()).to(ctx.values_dtype)
                del dense
        return grad_x, None, None, None, grad_values, None


def _sparse_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _SparseLinear.apply(x, self.weight, self.bias, self.shira_mask, self.shira_values, self.shira_slices)


class _SparseConv2d(torch.autograd.Function):
    """:class:`_SparseLinear` for ``nn.Conv2d``: the mask is over the flattened (out, in, kh, kw) weight."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, values, conv):
        with torch.no_grad():
            weight.view(-1).index_put_((mask.flat(),), values.to(weight.dtype))
        x, w, b = _autocast(x, weight, bias)
        ctx.weight, ctx.conv, ctx.values_dtype, ctx.mask = weight, conv, values.dtype, mask
        ctx.save_for_backward(x)
        return F.conv2d(x, w, b, conv.stride, conv.padding, conv.dilation, conv.groups)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        m, g = ctx.conv, grad_out.to(x.dtype)
        grad_x = grad_values = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv2d_input(x.shape, ctx.weight.to(g.dtype), g, m.stride, m.padding, m.dilation, m.groups)
        if ctx.needs_input_grad[4]:
            dense = torch.nn.grad.conv2d_weight(x, ctx.weight.shape, g, m.stride, m.padding, m.dilation, m.groups)
            grad_values = dense.reshape(-1).index_select(0, ctx.mask.flat()).to(ctx.values_dtype)
            del dense
        return grad_x, None, None, None, grad_values, None


def _sparse_conv_forward(self: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return _SparseConv2d.apply(x, self.weight, self.bias, self.shira_mask, self.shira_values, self)


def mask_bytes(module: nn.Module) -> int:
    """Bytes a sparsely trained module holds for the whole run besides its values: the mask, the
    base values at it (unless they wait on disk) and, for row/column/diagonal masks, the slice map."""
    slices = getattr(module, "shira_slices", None)
    held = [getattr(module, "shira_base", None), *((slices.rows, slices.cols, slices.diag, slices.gather) if slices is not None else ())]
    mask = getattr(module, "shira_mask", None)
    return nbytes(*(t for t in held if t is not None)) + (mask.nbytes if mask is not None else 0)


class SparseTraining:
    """Makes the masked entries of the given Linear / Conv2d weights trainable, in place.

    ``masks`` maps adapter keys (``"unet.<module path>"``) to sorted flat indices. The values
    start at the base weights' entries; :meth:`export` gives the adapter, :meth:`remove` puts the
    base weights and the modules' own forwards back.

    The base values at the mask are needed only by :meth:`export`, :meth:`load_values` and
    :meth:`remove`; with ``base_on_disk`` they wait in a safetensors file in a temporary folder
    (``base_dir``: where; removed by :meth:`remove` or with this object) instead of memory: 2 bytes per entry of the
    run's peak (bf16/fp16 weights), the last held memory a sparse run has beyond LoRA's.
    """

    def __init__(self, pipe_or_components: Any, masks: Mapping[str, torch.Tensor], base_on_disk: bool = False,
                 base_dir: str | Path | None = None) -> None:
        components = pipeline_components(pipe_or_components)
        self.modules: dict[str, nn.Linear | nn.Conv2d] = {}
        for key in masks:
            module, _ = resolve_module(components, key)  # either text-encoder layout; a clear error for unknown keys
            if not isinstance(module, (nn.Linear, nn.Conv2d)):
                raise TypeError(f"{key}: sparse training supports nn.Linear and nn.Conv2d, got {type(module).__name__}")
            if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
                raise TypeError(f"{key}: sparse training supports zero-padded convolutions with numeric padding")
            self.modules[key] = module
        bases = {}
        for key, module in self.modules.items():
            w = module.weight
            w.requires_grad_(False)
            mask = _Mask(masks[key], tuple(w.shape), w.device)
            base = w.detach().view(-1).index_select(0, mask.flat())
            # plain attributes, not buffers: they are not model state, and DDP would resend every
            # buffer to every rank before each forward (0.14 GB at r16 on SDXL, 0.56 GB at r64)
            module.shira_mask = mask
            linear = isinstance(module, nn.Linear)
            module.shira_slices = _Slices.of(masks[key], tuple(w.shape), w.device) if linear else None  # host mask: meta works too
            module.shira_values = nn.Parameter(base.to(torch.float32, copy=True))
            module.forward = types.MethodType(_sparse_forward if linear else _sparse_conv_forward, module)
            if base_on_disk and w.device.type != "meta":
                bases[key] = base.cpu()
            else:
                module.shira_base = base
        self._base_file = None
        if bases:
            from safetensors.torch import save_file

            self._base_dir = Path(tempfile.mkdtemp(prefix="shira_base_", dir=base_dir))
            self._base_file = self._base_dir / "base.safetensors"
            save_file(bases, str(self._base_file))
            self._cleanup = weakref.finalize(self, shutil.rmtree, self._base_dir, ignore_errors=True)  # also without remove()

    def parameters(self) -> list[nn.Parameter]:
        return [m.shira_values for m in self.modules.values()]

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def base(self, key: str) -> torch.Tensor:
        """The base weight's values at ``key``'s mask, on the weight's device."""
        with self._bases() as base:
            return base(key)

    @contextlib.contextmanager
    def _bases(self):
        """``base(key)`` for many keys with the temporary file opened (and its header read) once."""
        from safetensors import safe_open

        with contextlib.ExitStack() as stack:
            f = stack.enter_context(safe_open(str(self._base_file), framework="pt")) if self._base_file is not None else None

            def base(key: str) -> torch.Tensor:
                module = self.modules[key]
                held = getattr(module, "shira_base", None)
                return held if held is not None else f.get_tensor(key).to(module.weight.device)

            yield base

    @torch.no_grad()
    def sync_weights(self) -> None:
        """Write the current values into the weights (the forward does this too)."""
        for m in self.modules.values():
            m.weight.view(-1).index_put_((m.shira_mask.flat(),), m.shira_values.to(m.weight.dtype))

    @torch.no_grad()
    def export(self, metadata: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None) -> SparseAdapter:
        """The trained adapter: per weight, ``trained - original`` at the mask (fp32 unless ``dtype``)."""
        deltas = {}
        with self._bases() as base:
            for key, m in self.modules.items():
                delta = m.shira_values.detach().float() - base(key).float()
                deltas[key] = SparseDelta(m.shira_mask.flat().cpu(), delta.to(dtype or torch.float32).cpu(), tuple(m.weight.shape))
        return SparseAdapter(deltas, dict(metadata or {}))

    @torch.no_grad()
    def load_values(self, adapter: SparseAdapter) -> None:
        """Set the values to ``original + delta`` (resuming from an exported adapter)."""
        with self._bases() as base:
            for key, m in self.modules.items():
                d = adapter.deltas[key]
                if not torch.equal(d.indices.long().to(m.weight.device), m.shira_mask.flat()):
                    raise ValueError(f"{key}: adapter mask differs from the training mask")
                m.shira_values.copy_(base(key).float() + d.values.to(m.shira_values))
        self.sync_weights()

    @torch.no_grad()
    def remove(self) -> None:
        """Restore the base weights exactly and detach from the modules."""
        with self._bases() as base:
            for key, m in self.modules.items():
                m.weight.view(-1).index_put_((m.shira_mask.flat(),), base(key))
        for m in self.modules.values():
            del m.forward
            del m.shira_values
            del m.shira_mask, m.shira_slices
            if hasattr(m, "shira_base"):
                del m.shira_base
        self.modules = {}
        if self._base_file is not None:
            self._cleanup()  # the temporary base file, now
            self._base_file = None
