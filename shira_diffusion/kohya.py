"""kohya sd-scripts / LyCORIS adapter files: key names, every delta kind, and training metadata.

Keys look like ``lora_unet_<module>.<part>``, ``lora_te1_...`` / ``lora_te2_...`` (SDXL's text
encoders; ``lora_te_`` for SD 1.x), the module path joined with ``_``: in diffusers' names
(``down_blocks_1_attentions_0_...``) or, for kohya's SDXL UNet, the original checkpoint's
(``input_blocks_4_1_...``). Names are matched against a table built from the model itself, so a
key names a real module of this pipeline or the file is refused. The parts a module may have:

==========  ===============================================================================
LoRA/LoCon  ``lora_down.weight``, ``lora_up.weight``, optional ``lora_mid.weight`` (Tucker)
LoHa        ``hada_w1_a``, ``hada_w1_b``, ``hada_w2_a``, ``hada_w2_b``, optional ``hada_t1/t2``
LoKr        ``lokr_w1`` or ``lokr_w1_a/_b``, ``lokr_w2`` or ``lokr_w2_a/_b``, optional ``lokr_t2``
full        ``diff`` (the weight's), ``diff_b`` (the bias's)
any         ``alpha`` (scale ``alpha / rank``; none or 0: 1), ``dora_scale`` (DoRA magnitude)
==========  ===============================================================================

A key outside this list, or a module with a part missing, is an :class:`AdapterError` naming the
first such key: a file is read whole or not at all. The scale rules follow LyCORIS: LoKr uses
``alpha / rank`` only where a side is low-rank, else 1.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any, Mapping

import torch

from .adapter import BIAS, AdapterError, canonical_key
from .lora import DenseDelta, FullDelta, LoraAdapter, LoraDelta, LohaDelta, LokrDelta
from .targets import resolve_module

PREFIXES = {"lora_unet_": "unet", "lora_te1_": "text_encoder", "lora_te2_": "text_encoder_2", "lora_te_": "text_encoder"}

_KINDS = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full": ("diff", "diff_b"),
}
_PART_KIND = {part: kind for kind, parts in _KINDS.items() for part in parts}
_COMMON = ("alpha", "dora_scale")


def is_kohya(keys) -> bool:
    """Whether a file's tensor names are kohya/LyCORIS style (``lora_unet_...``, ``lora_te1_...``)."""
    return any(k.startswith(tuple(PREFIXES)) for k in keys)


# ---- names ----------------------------------------------------------------------------------------

# diffusers -> original (ldm/sgm) names inside a UNet resnet block
RESNET_LDM = [("norm1.", "in_layers.0."), ("conv1.", "in_layers.2."), ("norm2.", "out_layers.0."), ("conv2.", "out_layers.3."),
              ("time_emb_proj.", "emb_layers.1."), ("conv_shortcut.", "skip_connection.")]


def ldm_unet_prefixes(config: Any) -> dict[str, str]:
    """diffusers UNet block prefixes -> the original checkpoint's (``down_blocks.1.attentions.0.`` ->
    ``input_blocks.4.1.`` on SDXL), for any block and layer count."""
    n, lpb = len(config.block_out_channels), config.layers_per_block
    prefix = {"time_embedding.linear_1.": "time_embed.0.", "time_embedding.linear_2.": "time_embed.2.",
              "add_embedding.linear_1.": "label_emb.0.0.", "add_embedding.linear_2.": "label_emb.0.2.",
              "conv_in.": "input_blocks.0.0.", "conv_norm_out.": "out.0.", "conv_out.": "out.2.",
              "mid_block.attentions.0.": "middle_block.1.", "mid_block.resnets.0.": "middle_block.0.",
              "mid_block.resnets.1.": "middle_block.2."}
    for i in range(n):
        for j in range(lpb):
            prefix[f"down_blocks.{i}.resnets.{j}."] = f"input_blocks.{(lpb + 1) * i + j + 1}.0."
            prefix[f"down_blocks.{i}.attentions.{j}."] = f"input_blocks.{(lpb + 1) * i + j + 1}.1."
        for j in range(lpb + 1):
            prefix[f"up_blocks.{i}.resnets.{j}."] = f"output_blocks.{(lpb + 1) * i + j}.0."
            prefix[f"up_blocks.{i}.attentions.{j}."] = f"output_blocks.{(lpb + 1) * i + j}.1."
        if i < n - 1:
            prefix[f"down_blocks.{i}.downsamplers.0.conv."] = f"input_blocks.{(lpb + 1) * (i + 1)}.0.op."
            after = 2 if "CrossAttn" in config.up_block_types[i] else 1
            prefix[f"up_blocks.{i}.upsamplers.0."] = f"output_blocks.{(lpb + 1) * i + lpb}.{after}."
    return prefix


def ldm_name(name: str, prefixes: Mapping[str, str]) -> str | None:
    """A diffusers UNet parameter or module name (``a.b.weight`` or ``a.b`` + ``.``) in the original
    layout, or None where no block prefix covers it."""
    hits = [p for p in prefixes if name.startswith(p)]
    if not hits:
        return None
    hit = max(hits, key=len)
    rest = name[len(hit):]
    if "resnets" in hit:
        for a, b in RESNET_LDM:
            if rest.startswith(a):
                rest = b + rest[len(a):]
                break
    return prefixes[hit] + rest


def kohya_names(components: Mapping[str, torch.nn.Module]) -> dict[str, str]:
    """``{kohya module name: canonical key}`` for every module with a weight in ``components``, in
    diffusers' names and (UNet) the original layout's."""
    prefix_of = {c: [p for p, comp in PREFIXES.items() if comp == c] for c in components}
    names: dict[str, str] = {}
    for component, module in components.items():
        ldm = ldm_unet_prefixes(module.config) if component == "unet" and hasattr(module, "config") else None
        for path, sub in module.named_modules():
            if not path or not isinstance(getattr(sub, "weight", None), torch.Tensor):
                continue
            key = canonical_key(f"{component}.{path}")
            spellings = [key.partition(".")[2]]
            if ldm is not None and (original := ldm_name(path + ".", ldm)) is not None:
                spellings.append(original.removesuffix("."))
            for prefix in prefix_of.get(component, ()):
                for spelling in spellings:
                    names[prefix + spelling.replace(".", "_")] = key
    return names


# ---- deltas ---------------------------------------------------------------------------------------


def _scale(key: str, parts: Mapping[str, torch.Tensor], rank: int | None) -> float:
    alpha = parts.get("alpha")
    if alpha is None or rank is None:
        return 1.0
    if alpha.numel() != 1:
        raise AdapterError(f"{key}.alpha: expected one number, got shape {tuple(alpha.shape)}")
    value = float(alpha)
    return 1.0 if value == 0 else value / rank  # kohya/LyCORIS: alpha 0 or absent means alpha = rank


def _delta(module: str, kind: str, parts: dict[str, torch.Tensor], shape: tuple[int, ...]) -> DenseDelta:
    dora = parts.get("dora_scale")
    if kind == "lora":
        need = ("lora_down.weight", "lora_up.weight")
        _require(module, parts, need)
        down = parts["lora_down.weight"]
        return LoraDelta(down, parts["lora_up.weight"], _scale(module, parts, int(down.shape[0])), shape,
                         mid=parts.get("lora_mid.weight"), dora_scale=dora)
    if kind == "loha":
        _require(module, parts, ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"))
        w1_b = parts["hada_w1_b"]
        return LohaDelta(parts["hada_w1_a"], w1_b, parts["hada_w2_a"], parts["hada_w2_b"], _scale(module, parts, int(w1_b.shape[0])),
                         shape, t1=parts.get("hada_t1"), t2=parts.get("hada_t2"), dora_scale=dora)
    if kind == "lokr":
        got = {name.removeprefix("lokr_"): t for name, t in parts.items() if name.startswith("lokr_")}
        low = got.get("w2_b", got.get("w1_b"))
        return LokrDelta(_scale(module, parts, None if low is None else int(low.shape[0])), shape, dora_scale=dora, **got)
    if dora is not None:
        raise AdapterError(f"{module}.dora_scale: a full diff has no DoRA magnitude")
    _require(module, parts, ("diff",))
    return FullDelta(parts["diff"], shape)


def _require(module: str, parts: Mapping[str, torch.Tensor], need: tuple[str, ...]) -> None:
    for name in need:
        if name not in parts:
            raise AdapterError(f"{module}.{name}: missing (the file has {', '.join(f'{module}.{p}' for p in sorted(parts))})")


def read_kohya(tensors: Mapping[str, torch.Tensor], components: Mapping[str, torch.nn.Module],
               metadata: Mapping[str, str] | None = None, source: str | None = None) -> LoraAdapter:
    """A kohya/LyCORIS state dict as one :class:`LoraAdapter` (any mix of kinds), or
    :class:`AdapterError` naming the first key that cannot be read. Reads weight shapes only."""
    names = kohya_names(components)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name in sorted(tensors):
        module, dot, part = name.partition(".")
        if not dot or (part not in _PART_KIND and part not in _COMMON):
            raise AdapterError(f"{name}: not a key this reader understands (kohya/LyCORIS LoRA, LoCon, LoHa, LoKr, DoRA or full diff)")
        if module not in names:
            raise AdapterError(f"{name}: names no module of this pipeline (made for another model?)")
        groups.setdefault(module, {})[part] = tensors[name]
    deltas: dict[str, DenseDelta] = {}
    for module, parts in groups.items():
        factors = sorted(p for p in parts if p in _PART_KIND)
        if not factors:
            raise AdapterError(f"{module}.{sorted(parts)[0]}: no factors for this module (only {', '.join(sorted(parts))})")
        kind = _PART_KIND[factors[0]]
        other = next((p for p in factors if _PART_KIND[p] != kind), None)
        if other is not None:
            raise AdapterError(f"{module}.{other}: a {_PART_KIND[other]} part next to {kind} parts in one module")
        key = names[module]
        weight, bias = _shapes(components, key)
        if kind == "full" and "diff_b" in parts:
            if bias is None:
                raise AdapterError(f"{module}.diff_b: the module has no bias")
            deltas[key + BIAS] = FullDelta(parts.pop("diff_b"), bias)
            if "diff" not in parts:
                continue
        deltas[key] = _delta(module, kind, parts, weight)
    if not deltas:
        raise AdapterError(f"{source or 'the file'}: no adapter tensors")
    meta = {"source": source, "format": "kohya"}
    training = training_metadata(metadata or {})
    if training:
        meta["training"] = training
    try:
        return LoraAdapter(deltas, meta)
    except AdapterError as err:  # name the file's module, not only the canonical key
        raise AdapterError(f"{source or 'the file'}: {err}") from None


def _shapes(components: Mapping[str, torch.nn.Module], key: str) -> tuple[tuple[int, ...], tuple[int, ...] | None]:
    module, _ = resolve_module(components, key)
    bias = getattr(module, "bias", None)
    return tuple(module.weight.shape), tuple(bias.shape) if isinstance(bias, torch.Tensor) else None


def read_kohya_file(path: str | Path, components: Mapping[str, torch.nn.Module]) -> LoraAdapter:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = f.metadata() or {}
    return read_kohya(tensors, components, metadata, str(path))


# ---- metadata -------------------------------------------------------------------------------------

_ALGO_NAMES = {"lora": "LoRA", "locon": "LoCon", "loha": "LoHa", "lokr": "LoKr", "full": "full", "dylora": "DyLoRA", "ia3": "IA3"}


def training_metadata(header: Mapping[str, str], top: int = 10) -> dict[str, Any]:
    """What a kohya (``ss_*``) or ModelSpec (``modelspec.*``) header says about how the file was
    trained, and a suggested trigger prompt; ``{}`` for a file without either."""
    get = lambda k: (header.get(k) or "").strip() or None  # noqa: E731
    out: dict[str, Any] = {}
    base = get("modelspec.architecture") or get("ss_base_model_version") or get("ss_sd_model_name")
    if base:
        out["base_model"] = base
    network = get("ss_network_module")
    args = _json(get("ss_network_args")) or {}
    algo = str(args.get("algo", "")).lower() if isinstance(args, dict) else ""
    if network or algo:
        out["network"] = _ALGO_NAMES.get(algo, algo or ("LoRA" if network == "networks.lora" else network))
        if isinstance(args, dict) and str(args.get("dora_wd", "")).lower() in ("true", "1"):
            out["network"] += " + DoRA"
    for field, key in (("dim", "ss_network_dim"), ("alpha", "ss_network_alpha"), ("title", "modelspec.title"),
                       ("output_name", "ss_output_name"), ("epochs", "ss_num_epochs"), ("steps", "ss_max_train_steps"),
                       ("images", "ss_num_train_images"), ("comment", "ss_training_comment")):
        if (value := get(key)) is not None and value != "None":
            out[field] = value
    resolution = get("modelspec.resolution") or get("ss_resolution")
    if resolution:
        out["resolution"] = resolution.strip("()").replace(", ", "x").replace(",", "x")
    tags = _tag_counts(get("ss_tag_frequency"))
    if tags:
        out["tags"] = dict(tags.most_common(top))
    trigger = get("modelspec.trigger_phrase") or _trigger_from(tags, _json(get("ss_tag_frequency")))
    if trigger:
        out["trigger"] = trigger
    return out


def _json(text: str | None) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        return None


def _tag_counts(text: str | None) -> Counter:
    counts: Counter = Counter()
    data = _json(text)
    if isinstance(data, dict):
        for tags in data.values():
            if isinstance(tags, dict):
                for tag, n in tags.items():
                    if isinstance(n, (int, float)) and str(tag).strip():
                        counts[str(tag).strip()] += int(n)
    return counts


def _trigger_from(tags: Counter, folders: Any) -> str | None:
    """The tags (up to three) on at least as many images as the most common one has, in kohya's
    experience the trigger words; else a DreamBooth folder's prompt (``10_sks dog`` -> ``sks dog``)."""
    if tags:
        most = tags.most_common(1)[0][1]
        return ", ".join(t for t, n in tags.most_common(3) if n >= math.ceil(0.9 * most))
    if isinstance(folders, dict):
        for folder in folders:
            repeats, sep, prompt = str(folder).partition("_")
            if sep and repeats.isdigit() and prompt.strip():
                return prompt.strip()
    return None


def describe(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, int]:
    """``{kind: modules}`` of a kohya file from its tensor names and shapes alone (no model needed):
    ``lora``, ``locon`` (a LoRA on a convolution), ``loha``, ``lokr``, ``full``, and ``dora`` for
    modules with a DoRA magnitude."""
    modules: dict[str, set] = {}
    for name in shapes:
        module, _, part = name.partition(".")
        kind = _PART_KIND.get(part)
        if kind is not None:
            modules.setdefault(module, set()).add(kind)
    counts: Counter = Counter()
    for module, kinds in modules.items():
        for kind in kinds:
            counts["locon" if kind == "lora" and len(shapes.get(f"{module}.lora_down.weight", ())) == 4 else kind] += 1
        if f"{module}.dora_scale" in shapes:
            counts["dora"] += 1
    return dict(sorted(counts.items()))
