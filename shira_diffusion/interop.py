"""Adapters made elsewhere: PEFT SHiRA folders in and out, LoRA-family files in, LoRA -> SHiRA.

* PEFT SHiRA: ``adapter_config.json`` (``peft_type: SHIRA``) + ``adapter_model.safetensors`` with
  ``base_model.model.<module>.shira_weight`` (values) and ``.shira_indices`` (``(2, n)`` row/col,
  int or float32). PEFT gives every layer exactly ``r * (rows + cols)`` entries, so an export pads
  layers with fewer entries with zero-valued ones (they change nothing).
* LoRA family: kohya / LyCORIS files (``lora_unet_*``, ``lora_te1_*``, ``lora_te2_*``: LoRA,
  LoCon, LoHa, LoKr, DoRA, full diffs) by :mod:`~shira_diffusion.kohya`; diffusers
  ``save_lora_weights`` and PEFT-named files through diffusers itself (so names and scales match
  ``load_lora_weights``). Both read back as :class:`LoraAdapter`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .adapter import BIAS, COMPONENTS, AdapterError, SparseAdapter, SparseDelta, check_file_size, param_of, portable_model_id, split_key
from .kohya import is_kohya, read_kohya_file
from .lora import DenseDelta, FullDelta, LoraAdapter, LoraDelta
from .masks import budget
from .targets import installed_path, module_paths, pipeline_components

PEFT_PREFIX = "base_model.model."
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


# ---- PEFT SHiRA -----------------------------------------------------------------------------------


def _shapes_from(model: Any, component: str) -> dict[str, tuple[int, ...]]:
    module = pipeline_components(model)[component] if not isinstance(model, torch.nn.Module) else model
    return {name: tuple(m.weight.shape) for name, m in module.named_modules() if isinstance(getattr(m, "weight", None), torch.Tensor)}


def read_peft_shira(path: str | os.PathLike, component: str = "unet", model: Any = None) -> SparseAdapter:
    """A PEFT SHiRA save as a :class:`SparseAdapter` keyed ``"<component>.<module>"``.

    Weight shapes come from ``model`` (a module or pipeline) when given; otherwise they are inferred
    from PEFT's ``r * (rows + cols)`` rule and the largest row and column indices, and an
    ambiguous layer is an :class:`AdapterError` asking for the model.
    """
    from safetensors.torch import load_file

    folder = Path(path)
    config_path = folder / PEFT_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"{folder}: no {PEFT_CONFIG}; not a PEFT adapter folder")
    try:
        config = json.loads(config_path.read_text())
    except ValueError as err:
        raise AdapterError(f"{config_path}: not valid JSON ({err})") from None
    if str(config.get("peft_type", "")).upper() != "SHIRA":
        raise AdapterError(f"{config_path}: peft_type is {config.get('peft_type')!r}, expected 'SHIRA'")
    weights_path = folder / PEFT_WEIGHTS
    if not weights_path.is_file():
        raise AdapterError(f"{folder}: no {PEFT_WEIGHTS} (pickled adapter_model.bin files are not read)")
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # the parser's own error types vary
        raise AdapterError(f"{weights_path}: not a readable safetensors file ({err})") from None
    shapes = _shapes_from(model, component) if model is not None else None
    r = config.get("r")
    deltas = {}
    for name in sorted(k for k in tensors if k.endswith(".shira_weight")):
        module = name[: -len(".shira_weight")]
        path_in_model = module.removeprefix(PEFT_PREFIX)
        key = f"{component}.{path_in_model}"
        pairs = tensors.get(f"{module}.shira_indices")
        if pairs is None:
            raise AdapterError(f"{key}: missing tensor '{module}.shira_indices'")
        values = tensors[name]
        if pairs.dim() != 2 or pairs.shape[0] != 2 or pairs.shape[1] != values.numel():
            raise AdapterError(f"{key}: shira_indices must be (2, {values.numel()}), got {tuple(pairs.shape)}")
        if pairs.is_floating_point() and not torch.equal(pairs, pairs.round()):
            raise AdapterError(f"{key}: float shira_indices are not whole numbers")
        pairs = pairs.long()
        if shapes is not None:
            found = [p for p in module_paths(key) if p in shapes]  # a folder written under either text-encoder layout
            if not found:
                raise AdapterError(f"{key}: no such module in the model")
            shape = shapes[found[0]]
        else:
            shape = _infer_shape(key, pairs, values.numel(), r)
        if int(pairs.min()) < 0 or int(pairs[0].max()) >= shape[0] or int(pairs[1].max()) >= shape[1]:
            raise AdapterError(f"{key}: shira_indices out of range for a {shape} weight")
        flat = pairs[0] * shape[1] + pairs[1]
        order = torch.argsort(flat)
        deltas[key] = SparseDelta(flat[order], values.float()[order] if not values.is_floating_point() else values[order], shape)
    if not deltas:
        raise AdapterError(f"{weights_path}: no '*.shira_weight' tensors")
    meta = {"base_model": config.get("base_model_name_or_path"), "mask": f"peft-{config.get('mask_type', 'unknown')}", "peft_r": r}
    return SparseAdapter(deltas, meta)


def _infer_shape(key: str, pairs: torch.Tensor, n: int, r: Any) -> tuple[int, int]:
    rows, cols = int(pairs[0].max()) + 1, int(pairs[1].max()) + 1
    if isinstance(r, int) and r > 0 and n == r * (rows + cols):
        return rows, cols
    raise AdapterError(f"{key}: cannot tell the weight's shape from the file; pass the model (--model, or model=...)")


def write_peft_shira(adapter: SparseAdapter, path: str | os.PathLike, component: str = "unet") -> Path:
    """Write ``component``'s deltas as a PEFT SHiRA folder that ``PeftModel.from_pretrained`` loads."""
    from safetensors.torch import save_file

    parts = {installed_path(k): d for k, d in adapter.deltas.items() if split_key(k)[0] == component}
    if not parts:
        raise AdapterError(f"the adapter has no {component!r} weights")
    for module, d in parts.items():
        if len(d.shape) != 2:
            raise AdapterError(f"{component}.{module}: PEFT SHiRA supports 2-D (Linear) weights only")
    r = max(math.ceil(d.nnz / (d.shape[0] + d.shape[1])) for d in parts.values())
    tensors = {}
    for module, d in parts.items():
        need = budget(d.shape, rank=r)
        if need < r * (d.shape[0] + d.shape[1]):
            raise AdapterError(f"{component}.{module}: PEFT needs r*(rows+cols)={r * sum(d.shape)} entries, more than the weight has")
        idx, values = _pad(d, need)
        tensors[f"{PEFT_PREFIX}{module}.shira_weight"] = values.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.shira_indices"] = torch.stack([idx // d.shape[1], idx % d.shape[1]]).to(torch.int32).contiguous()
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / PEFT_WEIGHTS))
    config = {
        "peft_type": "SHIRA",
        "r": r,
        "mask_type": "random",
        "random_seed": None,
        "target_modules": sorted(parts),
        "fan_in_fan_out": False,
        "init_weights": True,
        "modules_to_save": None,
        "base_model_name_or_path": portable_model_id(adapter.metadata.get("base_model")),
        "revision": None,
        "task_type": None,
        "inference_mode": True,
    }
    (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=2))
    return folder


def _pad(d: SparseDelta, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``d``'s entries plus zero-valued ones at the first unused indices, ``n`` in all, sorted."""
    idx = d.indices.long().cpu()
    values = d.values.cpu()
    if n == idx.numel():
        return idx, values
    free = torch.ones(d.numel, dtype=torch.bool)
    free[idx] = False
    extra = free.nonzero().view(-1)[: n - idx.numel()]
    all_idx = torch.cat([idx, extra])
    order = torch.argsort(all_idx)
    return all_idx[order], torch.cat([values, values.new_zeros(extra.numel())])[order]


# ---- LoRA files -----------------------------------------------------------------------------------


def read_lora(path: str | os.PathLike, pipe: Any, name: str = "_shira_import") -> LoraAdapter:
    """Any SDXL / SD 1.x LoRA-family file as a :class:`LoraAdapter`.

    kohya / LyCORIS files (``lora_unet_*``, ``lora_te1_*`` ...: LoRA, LoCon, LoHa, LoKr, DoRA, full
    diffs) are read by :mod:`~shira_diffusion.kohya` from the file alone. Others (diffusers'
    ``save_lora_weights``, PEFT names) are parsed by diffusers into temporary PEFT layers on
    ``pipe`` (so names and scales match ``load_lora_weights``); the factors, scales, DoRA
    magnitudes and bias deltas are copied out and the layers removed again. The pipeline's weights
    are never written.
    """
    path = Path(path)
    if path.suffix != ".safetensors":
        raise AdapterError(f"{path}: LoRA files must be .safetensors (pickled files are not read)")
    if file_kind(path) == "kohya":
        return read_kohya_file(path, pipeline_components(pipe))
    try:
        with _quiet_weight_loading():
            pipe.load_lora_weights(str(path), adapter_name=name)
    except Exception as err:  # diffusers raises many types for files it cannot map
        _remove_lora_layers(pipe, name)
        raise AdapterError(f"{path}: not a LoRA file diffusers can load for this pipeline ({type(err).__name__}: {err})") from None
    try:
        deltas = _peft_deltas(pipe, name)
    finally:
        _remove_lora_layers(pipe, name)
    if not deltas:
        raise AdapterError(f"{path}: no LoRA layers matched this pipeline")
    return LoraAdapter(deltas, {"source": str(path), "format": "lora"})


def _peft_deltas(pipe: Any, name: str) -> dict[str, DenseDelta]:
    """The deltas of PEFT LoRA layers named ``name`` on ``pipe``: factors and scaling, a DoRA
    magnitude as the ``(out, 1, ...)`` one it is (PEFT normalises the merged weight's rows), and
    ``lora_bias`` as a bias delta of ``scaling * lora_B.bias``."""
    from peft.tuners.lora import LoraLayer

    deltas: dict[str, DenseDelta] = {}
    for component, module in pipeline_components(pipe).items():
        for mod_name, sub in module.named_modules():
            if not (isinstance(sub, LoraLayer) and name in sub.lora_A):
                continue
            base = sub.get_base_layer()
            shape, scaling, key = tuple(base.weight.shape), float(sub.scaling[name]), f"{component}.{mod_name}"
            magnitudes = getattr(sub, "lora_magnitude_vector", None) or {}
            dora = magnitudes[name].weight.detach().clone().reshape(shape[0], *[1] * (len(shape) - 1)) if name in magnitudes else None
            up = sub.lora_B[name]
            deltas[key] = LoraDelta(sub.lora_A[name].weight.detach().clone(), up.weight.detach().clone(), scaling, shape, dora_scale=dora)
            if getattr(up, "bias", None) is not None:
                deltas[key + BIAS] = FullDelta(up.bias.detach().float() * scaling, tuple(up.bias.shape))
    return deltas


@contextlib.contextmanager
def _quiet_weight_loading():
    """No per-file "Loading weights" bar from transformers while a LoRA is parsed (a folder of
    LoRA files would print one per text encoder per file)."""
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()


def _remove_lora_layers(pipe: Any, name: str) -> None:
    """Drop the temporary adapter; unwrap PEFT layers that are left with none."""
    try:
        pipe.delete_adapters(name)
    except (ValueError, KeyError, AttributeError):
        pass
    from peft.tuners.lora import LoraLayer

    still_used = any(
        isinstance(sub, LoraLayer) and len(sub.lora_A) > 0
        for module in pipeline_components(pipe).values()
        for sub in module.modules()
    )
    if not still_used:
        pipe.unload_lora_weights()


def lora_to_shira(lora: LoraAdapter, density: float | None = None, rank: int | None = None,
                  weights: Mapping[str, torch.Tensor] | None = None) -> tuple[SparseAdapter, dict[str, float]]:
    """Keep the top-k entries (by magnitude) of each weight's dense delta, any kind (convolutions
    over the flattened weight). ``weights`` (``{key: base weight}``) is needed for DoRA deltas,
    which depend on the weight. Bias deltas are left out: SHiRA adapts weights.

    Returns the SHiRA adapter and the retained energy ``||kept|| / ||delta||`` per component.
    """
    deltas, kept_sq, total_sq = {}, {}, {}
    for key, d in lora.deltas.items():
        if param_of(key)[1] != "weight":
            continue
        if d.needs_base and (weights is None or key not in weights):
            raise AdapterError(f"{key}: a {d.label} delta depends on the base weight; pass the model's weights")
        dense = d.dense(torch.float32, "cpu", weights[key] if d.needs_base else None)
        k = budget(d.shape, density=density, rank=rank)
        idx = torch.topk(dense.abs(), k, sorted=False).indices.sort().values
        values = dense[idx]
        deltas[key] = SparseDelta(idx, values, d.shape)
        component = split_key(key)[0]
        kept_sq[component] = kept_sq.get(component, 0.0) + float(values.double().pow(2).sum())
        total_sq[component] = total_sq.get(component, 0.0) + float(dense.double().pow(2).sum())
    if not deltas:
        raise AdapterError("the adapter has no weight deltas to convert (only bias deltas)")
    energy = {c: math.sqrt(kept_sq[c] / total_sq[c]) if total_sq[c] else 1.0 for c in kept_sq}
    meta: Mapping[str, Any] = {**lora.metadata, "mask": "lora-topk", "converted_from": ",".join(lora.kinds)}
    return SparseAdapter(deltas, {k: v for k, v in meta.items() if k != "format"}), energy


# ---- any adapter --------------------------------------------------------------------------------


def write_peft_folders(adapter: SparseAdapter, path: str | os.PathLike, components: list[str] | None = None) -> dict[str, Path]:
    """``components`` (default: all the adapter has) as PEFT SHiRA folders: ``path`` itself for one
    component, ``path/<component>/`` each for several (diffusers' pipeline layout)."""
    components = components or adapter.components
    folder = Path(path)
    if len(components) == 1:
        return {components[0]: write_peft_shira(adapter, folder, components[0])}
    return {c: write_peft_shira(adapter, folder / c, c) for c in components}


def read_peft_folders(path: str | os.PathLike, pipe: Any = None, component: str = "unet") -> SparseAdapter:
    """A PEFT SHiRA folder (as ``component``) or a folder of per-component ones (``unet/``,
    ``text_encoder/``, ``text_encoder_2/``, as :func:`write_peft_folders` writes) as one adapter."""
    folder = Path(path)
    model = lambda c: getattr(pipe, c, None) if pipe is not None else None  # noqa: E731
    if (folder / PEFT_CONFIG).is_file():
        return read_peft_shira(folder, component, model(component))
    parts = [c for c in COMPONENTS if (folder / c / PEFT_CONFIG).is_file()]
    if not parts:
        raise AdapterError(f"{folder}: no {PEFT_CONFIG} (nor {', '.join(c + '/' for c in COMPONENTS)} with one); not a PEFT adapter folder")
    read = [read_peft_shira(folder / c, c, model(c)) for c in parts]
    return SparseAdapter({k: d for a in read for k, d in a.deltas.items()}, read[0].metadata)


def load_any(path: str | os.PathLike, pipe: Any = None, component: str = "unet", max_bytes: int | None = None):
    """A SHiRA file, a PEFT SHiRA folder, or (given ``pipe``) a LoRA file, told apart by content."""
    path = Path(path)
    kind = file_kind(path)
    if kind == "peft":
        return read_peft_folders(path, pipe, component)
    if not path.is_file():
        raise AdapterError(f"{path}: no such file")
    check_file_size(path, max_bytes)
    if kind in ("shira", "unreadable"):  # a broken file: the SHiRA loader says what is wrong
        return SparseAdapter.load(path)
    if pipe is None:
        raise AdapterError(f"{path}: not a SHiRA adapter; LoRA files need the model (--model) to be read")
    if kind == "kohya":
        return read_kohya_file(path, pipeline_components(pipe))
    return read_lora(path, pipe)


def file_kind(path: str | os.PathLike) -> str:
    """``shira``, ``peft`` (a folder), ``kohya`` (kohya / LyCORIS tensor names: read from the file
    alone, no model lock), ``unreadable`` (no safetensors file) or ``other`` (a diffusers LoRA
    file, or some other safetensors file), from the header alone."""
    path = Path(path)
    if path.is_dir():
        return "peft"
    header = _header(path) if path.is_file() else None
    if header is None:
        return "unreadable"
    fmt, keys = header
    return "shira" if fmt == "shira" else "kohya" if is_kohya(keys) else "other"


def _header(path: Path) -> tuple[str, list[str]] | None:
    """The safetensors header's ``format`` (``shira``, ``pt``, ...; ``""`` if none) and tensor
    names; None for a file that is no safetensors at all."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format", ""), list(f.keys())
    except Exception:  # the parser's own error types vary
        return None
