"""The SHiRA adapter: sparse (index, value) deltas per target weight, stored as one safetensors file.

Nothing here knows about diffusers. Keys are ``"<component>.<module path>"`` with component one of
:data:`COMPONENTS`; indices point into ``weight.view(-1)``. Every way into a ``SparseAdapter``
(constructor, :meth:`SparseAdapter.load`) validates, so code that holds one may write it into
weights without checking again; a bad file or tensor raises :class:`AdapterError` naming the key.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from . import index_codec
from .dtypes import dtype_name

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
FORMAT = "shira"
FORMAT_VERSION = 1
_RESERVED = ("format", "format_version", "shapes")


class AdapterError(ValueError):
    """An adapter (file or object) is malformed or does not fit the model it is applied to."""


@dataclass
class SparseDelta:
    """The change to one weight: ``weight.view(-1)[indices] += values``."""

    indices: torch.Tensor
    values: torch.Tensor
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    def validate(self, key: str = "<delta>", *, indices_checked: bool = False) -> None:
        """Raise :class:`AdapterError` unless this delta is safe to scatter into a weight of ``shape``.

        ``indices_checked`` skips the order and range scan for indices that are sorted, unique and
        in range by construction (the file decoder guarantees it). A delta that passed once and
        whose tensors are the same objects, not modified in place since (their version counters
        say so), is not scanned again: loading a file and staging it checks its values once.
        """
        if self._still_valid():
            return

        def fail(problem: str) -> None:
            raise AdapterError(f"{key}: {problem}")

        idx, val = self.indices, self.values
        if not self.shape or any(s <= 0 for s in self.shape):
            fail(f"invalid weight shape {self.shape}")
        if not isinstance(idx, torch.Tensor) or idx.dim() != 1 or idx.is_floating_point() or idx.is_complex() or idx.dtype == torch.bool:
            fail("indices must be a 1-D integer tensor")
        if not isinstance(val, torch.Tensor) or val.dim() != 1 or not val.is_floating_point():
            fail("values must be a 1-D floating-point tensor")
        if idx.numel() != val.numel():
            fail(f"indices/values length mismatch: {idx.numel()} indices, {val.numel()} values")
        if idx.device != val.device:
            fail(f"indices on {idx.device} but values on {val.device}")
        if idx.numel() == 0:
            return
        if not indices_checked:
            self._check_order_and_range(fail)
        lo, hi = torch.aminmax(val)  # one pass; NaN and +-inf both surface in the extremes
        if not (math.isfinite(float(lo)) and math.isfinite(float(hi))):
            fail("non-finite values (nan or inf)")
        self._mark_valid()

    _stamp = None  # what the last successful validate saw; unannotated, so not a dataclass field

    def _mark_valid(self) -> None:
        idx, val = self.indices, self.values
        if idx.is_inference() or val.is_inference():  # no version counter to trust: checked every time
            return
        self._stamp = (weakref.ref(idx), idx._version, weakref.ref(val), val._version, self.shape)

    def __getstate__(self) -> dict:  # weak references do not pickle; a copy is checked afresh
        return {k: v for k, v in self.__dict__.items() if k != "_stamp"}

    def _still_valid(self) -> bool:
        if self._stamp is None:
            return False
        idx_ref, idx_version, val_ref, val_version, shape = self._stamp
        idx, val = self.indices, self.values
        return (idx_ref() is idx and val_ref() is val and idx._version == idx_version
                and val._version == val_version and shape == self.shape)

    def _check_order_and_range(self, fail) -> None:
        idx = self.indices
        steps = torch.diff(idx)
        if steps.numel():
            smallest = int(steps.min())
            if smallest == 0:
                fail("duplicate indices")
            if smallest < 0:
                fail("indices are not sorted")
        first, last = int(idx[0]), int(idx[-1])
        if first < 0 or last >= self.numel:
            fail(f"index out of range: {first if first < 0 else last} not in [0, {self.numel})")

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SparseDelta":
        idx, val = self.indices.to(device), self.values.to(device=device, dtype=dtype)
        if idx is self.indices and val is self.values:
            return self
        out = SparseDelta(idx, val, self.shape)
        if val.dtype == self.values.dtype and self._still_valid():  # a move copies checked values exactly
            out._mark_valid()
        return out

    def to_dense(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The delta as a dense tensor of ``shape`` (for analysis; the engine never densifies)."""
        values = self.values if dtype is None else self.values.to(dtype)
        dense = torch.zeros(self.numel, dtype=values.dtype, device=values.device)
        dense[self.indices.long()] = values
        return dense.view(self.shape)


def fingerprint(weights: Mapping[str, torch.Tensor | Sequence[int]]) -> str:
    """A short hash of weights' names and shapes: an adapter fits a model whose weights hash alike."""
    lines = []
    for name in sorted(weights):
        w = weights[name]
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else tuple(w)
        lines.append(f"{name}:{'x'.join(map(str, shape))}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]


def module_patterns(keys: Iterable[str]) -> dict[str, list[str]]:
    """``{component: [module name suffix, ...]}`` covering ``keys`` (``to_out.0`` keeps its index)."""
    found: dict[str, set[str]] = {}
    for key in keys:
        component, path = split_key(key)
        parts = path.split(".")
        suffix = ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]
        found.setdefault(component, set()).add(suffix)
    return {c: sorted(v) for c, v in sorted(found.items())}


def portable_model_id(source: str | os.PathLike | None) -> str | None:
    """What a file records as its base model: ``demo``, a hub id, or a local folder's (or file's)
    name; never a local absolute path, which names nothing on another machine (the fingerprint
    identifies the weights)."""
    if source is None:
        return None
    path = Path(str(source)).expanduser()
    if not path.is_absolute() and not path.exists():
        return str(source)  # a hub id ("org/name") or a name such as "demo"
    from .demo.model import DEMO_DIR

    path = path.resolve()
    return "demo" if path == DEMO_DIR.resolve() else path.name


def check_file_size(path: Path, max_bytes: int | None) -> None:
    """Refuse files over ``max_bytes`` before reading any of them."""
    if max_bytes is not None and path.stat().st_size > max_bytes:
        raise AdapterError(f"{path}: file is {path.stat().st_size:,} bytes, over the {max_bytes:,} byte limit")


def split_key(key: str) -> tuple[str, str]:
    """``"unet.a.b"`` -> ``("unet", "a.b")``; raises :class:`AdapterError` on an unknown component."""
    component, _, path = key.partition(".")
    if component not in COMPONENTS or not path:
        raise AdapterError(f"{key}: unknown component {component!r}; keys look like '<{'|'.join(COMPONENTS)}>.<module path>'")
    return component, path


BIAS = ":bias"  # a key's suffix for a delta of the module's bias instead of its weight


def param_of(key: str) -> tuple[str, str]:
    """``"unet.a.b:bias"`` -> ``("unet.a.b", "bias")``; ``"unet.a.b"`` -> ``("unet.a.b", "weight")``."""
    return (key[: -len(BIAS)], "bias") if key.endswith(BIAS) else (key, "weight")


TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
_CLIP_TOP = ("embeddings", "encoder", "final_layer_norm")  # what CLIPTextModel held under `text_model` before transformers 5


def canonical_key(key: str) -> str:
    """The key as diffusers' LoRA files and the original checkpoints spell it, whatever
    transformers is installed: text-encoder paths start with ``text_model.`` (transformers 5
    dropped that level inside ``CLIPTextModel``, not inside ``CLIPTextModelWithProjection``)."""
    component, path = split_key(key)
    if component in TEXT_ENCODERS and path.split(".", 1)[0] in _CLIP_TOP:
        return f"{component}.text_model.{path}"
    return key


def canonical_keys(deltas: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, delta in deltas.items():
        canon = canonical_key(key)
        if canon in out:
            raise AdapterError(f"{key}: the same weight as {canon} under the other text-encoder layout; give it once")
        out[canon] = delta
    return dict(sorted(out.items()))


class SparseAdapter:
    """A validated set of :class:`SparseDelta` keyed by ``"<component>.<module path>"``.

    ``metadata`` holds JSON-serialisable facts about provenance (``base_model``, ``mask``,
    anything else). ``num_params``, ``density``, ``dtype``, ``fingerprint`` (of the adapted
    weights' names and shapes) and ``targets`` (module name patterns per component, unless given)
    are derived from the deltas and written into the file header on save.
    """

    def __init__(self, deltas: Mapping[str, SparseDelta], metadata: Mapping[str, Any] | None = None) -> None:
        self.deltas: dict[str, SparseDelta] = canonical_keys(deltas)
        self.metadata: dict[str, Any] = {k: v for k, v in (metadata or {}).items() if k not in _RESERVED}
        self.validate()

    def validate(self) -> None:
        for key, delta in self.deltas.items():
            split_key(key)
            if not isinstance(delta, SparseDelta):
                raise AdapterError(f"{key}: expected a SparseDelta, got {type(delta).__name__}")
            delta.validate(key)
        try:
            json.dumps(self.metadata)
        except (TypeError, ValueError) as err:
            raise AdapterError(f"metadata is not JSON-serialisable: {err}") from None

    # ---- derived facts -------------------------------------------------------------------------
    @property
    def num_params(self) -> int:
        return sum(d.nnz for d in self.deltas.values())

    @property
    def density(self) -> float:
        total = sum(d.numel for d in self.deltas.values())
        return self.num_params / total if total else 0.0

    @property
    def dtype(self) -> torch.dtype | None:
        dtypes = {d.values.dtype for d in self.deltas.values()}
        return dtypes.pop() if len(dtypes) == 1 else None

    @property
    def components(self) -> list[str]:
        return sorted({split_key(k)[0] for k in self.deltas})

    def by_component(self) -> dict[str, tuple[int, int, int]]:
        """``{component: (weights, params, entries of those weights)}``."""
        out: dict[str, tuple[int, int, int]] = {}
        for key, d in self.deltas.items():
            w, nnz, numel = out.get(split_key(key)[0], (0, 0, 0))
            out[split_key(key)[0]] = (w + 1, nnz + d.nnz, numel + d.numel)
        return out

    def summary(self) -> str:
        lines = [
            f"SHiRA adapter: {len(self.deltas)} weights, {self.num_params:,} params, "
            f"density {self.density:.4%}, dtype {dtype_name(self.dtype)}"
        ]
        for name in ("base_model", "mask"):
            if self.metadata.get(name) is not None:
                lines.append(f"  {name}: {self.metadata[name]}")
        for component, (weights, nnz, numel) in self.by_component().items():
            lines.append(f"  {component}: {weights} weights, {nnz:,} params ({nnz / numel:.4%} of {numel:,})")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"SparseAdapter({len(self.deltas)} weights, {self.num_params:,} params, density={self.density:.4%})"

    @classmethod
    def _trusted(cls, deltas: Mapping[str, SparseDelta], metadata: Mapping[str, Any]) -> "SparseAdapter":
        """Build from deltas the caller has already validated (casts, the file reader)."""
        out = cls.__new__(cls)
        out.deltas = canonical_keys(deltas)
        out.metadata = {k: v for k, v in metadata.items() if k not in _RESERVED}
        return out

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "SparseAdapter":
        out = SparseAdapter._trusted({k: d.to(device, dtype) for k, d in self.deltas.items()}, self.metadata)
        if dtype is not None:  # a narrower dtype can overflow to inf
            out.validate()
        return out

    def check_fits(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        """Raise :class:`AdapterError` unless every key exists in ``shapes`` with the same shape."""
        for key, delta in self.deltas.items():
            if key not in shapes:
                raise AdapterError(f"{key}: no such weight in the model")
            if tuple(shapes[key]) != delta.shape:
                raise AdapterError(f"{key}: shape mismatch, adapter {delta.shape} vs model {tuple(shapes[key])}")

    # ---- other formats --------------------------------------------------------------------------
    @classmethod
    def from_peft(cls, path: str | os.PathLike, component: str = "unet", model: Any = None) -> "SparseAdapter":
        """Read a PEFT SHiRA folder; see :func:`shira_diffusion.interop.read_peft_shira`."""
        from .interop import read_peft_shira

        return read_peft_shira(path, component, model)

    def to_peft(self, path: str | os.PathLike, component: str = "unet") -> Path:
        """Write a PEFT SHiRA folder; see :func:`shira_diffusion.interop.write_peft_shira`."""
        from .interop import write_peft_shira

        return write_peft_shira(self, path, component)

    # ---- file format ----------------------------------------------------------------------------
    def header(self) -> dict[str, str]:
        """The safetensors metadata written by :meth:`save` (string values, JSON where structured)."""
        facts = {
            "base_model": None,
            "mask": None,
            "targets": module_patterns(self.deltas),
            **self.metadata,
            "base_model": portable_model_id(self.metadata.get("base_model")),
            "fingerprint": fingerprint({k: d.shape for k, d in self.deltas.items()}),
            "num_params": self.num_params,
            "density": self.density,
            "dtype": dtype_name(self.dtype),
        }
        header = {"format": FORMAT, "format_version": str(FORMAT_VERSION)}
        header["shapes"] = json.dumps({k: list(d.shape) for k, d in self.deltas.items()})
        header.update({k: json.dumps(v) for k, v in facts.items()})
        return header

    def save(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write one safetensors file (values in ``dtype`` if given) and return its path."""
        from safetensors.torch import save_file

        adapter = self.to("cpu", dtype) if dtype is not None else self.to("cpu")
        tensors: dict[str, torch.Tensor] = {}
        for key, delta in adapter.deltas.items():
            tensors[f"{key}.values"] = delta.values.contiguous()
            tensors[f"{key}.indices"] = index_codec.encode(delta.indices)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path), metadata=adapter.header())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: torch.device | str = "cpu", max_bytes: int | None = None) -> "SparseAdapter":
        """Read and validate a file written by :meth:`save`. Never unpickles anything."""
        path = Path(path)
        if not path.is_file():
            raise AdapterError(f"{path}: no such file")
        check_file_size(path, max_bytes)
        header, tensors = _read_safetensors(path)
        return _from_parts(header, tensors, str(path)).to(device)


def _read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:  # the parser's own errors vary by failure; all mean "not a valid file"
        raise AdapterError(f"{path}: not a readable safetensors file ({type(err).__name__}: {err})") from None
    return header, tensors


def _from_parts(header: Mapping[str, str], tensors: Mapping[str, torch.Tensor], where: str) -> SparseAdapter:
    if header.get("format") != FORMAT:
        raise AdapterError(f"{where}: not a SHiRA adapter (header format={header.get('format')!r}, expected {FORMAT!r})")
    if header.get("format_version") != str(FORMAT_VERSION):
        raise AdapterError(f"{where}: unknown format version {header.get('format_version')!r} (this build reads {FORMAT_VERSION})")

    def parse(field: str) -> Any:
        try:
            return json.loads(header[field])
        except (ValueError, TypeError) as err:
            raise AdapterError(f"{where}: header field {field!r} is not valid JSON ({err})") from None

    shapes = parse("shapes") if "shapes" in header else None
    if not isinstance(shapes, dict):
        raise AdapterError(f"{where}: header field 'shapes' is missing or not a mapping")
    metadata = {k: parse(k) for k in header if k not in _RESERVED}

    expected = {f"{k}.{part}" for k in shapes for part in ("values", "indices")}
    extra = sorted(set(tensors) - expected)
    if extra:
        raise AdapterError(f"{where}: unexpected tensor {extra[0]!r} (not listed in the header)")
    deltas = {}
    for key, shape in shapes.items():
        split_key(key)
        for part in ("values", "indices"):
            if f"{key}.{part}" not in tensors:
                raise AdapterError(f"{key}: missing tensor '{key}.{part}'")
        if not isinstance(shape, list) or not shape or not all(isinstance(s, int) and s > 0 for s in shape):
            raise AdapterError(f"{key}: invalid shape {shape!r} in header")
        values = tensors[f"{key}.values"]
        if values.dim() != 1 or not values.is_floating_point():
            raise AdapterError(f"{key}: values must be a 1-D floating-point tensor, got {tuple(values.shape)} {values.dtype}")
        try:
            indices = index_codec.decode(tensors[f"{key}.indices"], values.numel(), math.prod(shape))
        except index_codec.IndexCodecError as err:
            raise AdapterError(f"{key}: {err}") from None
        delta = SparseDelta(indices, values, tuple(shape))
        delta.validate(key, indices_checked=True)
        deltas[key] = delta
    canon = canonical_keys(deltas)
    if canon.keys() != deltas.keys() and metadata.get("fingerprint") == fingerprint({k: d.shape for k, d in deltas.items()}):
        metadata["fingerprint"] = fingerprint({k: d.shape for k, d in canon.items()})  # written before keys were canonical
    return SparseAdapter._trusted(canon, metadata)
