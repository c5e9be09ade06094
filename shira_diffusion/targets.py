"""Which weights of an SDXL pipeline a SHiRA adapter touches, and how to find them by key.

Works on any mapping ``{component: nn.Module}`` (or anything with ``unet`` / ``text_encoder`` /
``text_encoder_2`` attributes, such as a diffusers pipeline) without importing diffusers.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .adapter import COMPONENTS, TEXT_ENCODERS, AdapterError, canonical_key, fingerprint, param_of, split_key  # noqa: F401  (re-exported)

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "unet": UNET_TARGETS,
    "text_encoder": TEXT_ENCODER_TARGETS,
    "text_encoder_2": TEXT_ENCODER_TARGETS,
}
# short names for the layer groups kohya-style trainers adapt, per component
ALIASES: dict[str, dict[str, tuple[str, ...]]] = {
    "unet": {"attn": UNET_TARGETS, "ff": ("ff.net.0.proj", "ff.net.2"), "proj": ("proj_in", "proj_out"),
             "conv": ("re:.*resnets\\.\\d+\\.conv[12]",)},
    "text_encoder": {"attn": TEXT_ENCODER_TARGETS, "mlp": ("mlp.fc1", "mlp.fc2")},
    "text_encoder_2": {"attn": TEXT_ENCODER_TARGETS, "mlp": ("mlp.fc1", "mlp.fc2")},
}
TRAINABLE = (nn.Linear, nn.Conv2d)  # what a wildcard pattern picks


def parse_targets(specs: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``["unet", "unet:attn,ff", "unet:*.proj_in", "text_encoder:*"]`` as :func:`find_targets` patterns.

    ``component`` alone is its default (attention projections); after ``:`` come comma-separated
    aliases (``attn``, ``ff``, ``proj``, ``conv``; ``mlp`` for text encoders), suffixes
    (``to_out.0``), wildcards (``*.proj_in``: Linear and Conv2d layers only) or ``re:`` regexes.
    """
    out: dict[str, list[str]] = {}
    for spec in specs:
        component, _, rest = spec.partition(":")
        if component not in COMPONENTS:
            raise AdapterError(f"--targets {spec!r}: unknown component {component!r}; expected one of {', '.join(COMPONENTS)}")
        patterns = out.setdefault(component, [])
        for item in (rest.split(",") if rest else [None]):
            if item is None:
                patterns += DEFAULT_TARGETS[component]
            elif not item.strip():
                raise AdapterError(f"--targets {spec!r}: an empty pattern")
            else:
                patterns += ALIASES[component].get(item.strip(), (item.strip(),))
    return {c: tuple(dict.fromkeys(p)) for c, p in out.items()}


def pipeline_components(pipe_or_components: Any) -> dict[str, nn.Module]:
    """``{component: module}`` for the adaptable components present (a pipeline or a mapping)."""
    if isinstance(pipe_or_components, Mapping):
        found = dict(pipe_or_components)
    else:
        found = {c: getattr(pipe_or_components, c, None) for c in COMPONENTS}
    unknown = sorted(set(found) - set(COMPONENTS))
    if unknown:
        raise AdapterError(f"unknown component {unknown[0]!r}; expected one of {COMPONENTS}")
    return {c: m for c, m in found.items() if m is not None}


def _wildcard(pattern: str) -> bool:
    return not pattern.startswith("re:") and any(ch in pattern for ch in "*?[")


def _matches(name: str, pattern: str, module: nn.Module) -> bool:
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    if _wildcard(pattern):  # a wildcard picks trainable layers, never norms or embeddings
        return isinstance(module, TRAINABLE) and fnmatch.fnmatchcase(name, pattern)
    return name == pattern or name.endswith("." + pattern)


def find_targets(
    pipe_or_components: Any,
    targets: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
) -> dict[str, nn.Parameter]:
    """Weights to adapt, as ``{"<component>.<module path>": weight}`` in module order.

    ``targets`` maps components to name patterns (a suffix like ``"to_out.0"``, a wildcard like
    ``"*.proj_in"`` or a regex written ``"re:..."``); a plain list of components uses each one's
    default patterns (see :func:`parse_targets` for the command-line form). The default is the
    UNet's attention projections only.
    """
    components = pipeline_components(pipe_or_components)
    if targets is None:
        targets = {"unet": UNET_TARGETS}
    elif not isinstance(targets, Mapping):
        targets = {c: DEFAULT_TARGETS[c] if c in DEFAULT_TARGETS else () for c in targets}
    found: dict[str, nn.Parameter] = {}
    for component, patterns in targets.items():
        if component not in COMPONENTS:
            raise AdapterError(f"unknown component {component!r}; expected one of {COMPONENTS}")
        if component not in components:
            raise AdapterError(f"the model has no {component!r} to adapt")
        for name, module in components[component].named_modules():
            weight = getattr(module, "weight", None)
            if isinstance(weight, torch.Tensor) and any(_matches(name, p, module) for p in patterns):
                found[canonical_key(f"{component}.{name}")] = weight
    return found


def module_paths(key: str) -> list[str]:
    """Where a (canonical) key's module may sit: text-encoder paths with and without ``text_model.``."""
    component, path = split_key(key)
    if component not in TEXT_ENCODERS:
        return [path]
    if path.startswith("text_model."):
        return [path, path.removeprefix("text_model.")]
    return [path, f"text_model.{path}"]


@functools.lru_cache(maxsize=None)
def _text_model_level(component: str) -> bool:
    """Whether the installed transformers keeps ``text_model`` inside this text encoder's class
    (SDXL: ``CLIPTextModel`` for text_encoder, ``CLIPTextModelWithProjection`` for text_encoder_2)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModel if component == "text_encoder" else CLIPTextModelWithProjection
    tiny = CLIPTextConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=1,
                          vocab_size=8, max_position_embeddings=4, projection_dim=8, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    return hasattr(cls(tiny), "text_model")


def installed_path(key: str) -> str:
    """A canonical key's module path as the installed transformers lays the module out (for
    formats that name a model's modules directly, such as PEFT folders)."""
    component, path = split_key(key)
    if component in TEXT_ENCODERS and path.startswith("text_model.") and not _text_model_level(component):
        return path.removeprefix("text_model.")
    return path


def resolve_module(components: Mapping[str, nn.Module], key: str) -> tuple[nn.Module, str]:
    """The module a key names and its path in the installed layout, or :class:`AdapterError` saying why not."""
    component, _ = split_key(key)
    if component not in components:
        raise AdapterError(f"{key}: the model has no {component!r}")
    for path in module_paths(key):
        try:
            return components[component].get_submodule(path), path
        except AttributeError:
            continue
    raise AdapterError(f"{key}: no such module in the model's {component}")


def resolve_weight(components: Mapping[str, nn.Module], key: str) -> nn.Parameter:
    """The weight a key names (``"unet.<module path>"``; ``"...:bias"`` its bias), or
    :class:`AdapterError` saying why not."""
    module_key, name = param_of(key)
    module, _ = resolve_module(components, module_key)
    weight = getattr(module, name, None)
    if not isinstance(weight, torch.Tensor):
        raise AdapterError(f"{key}: module {type(module).__name__} has no {name} tensor")
    return weight
