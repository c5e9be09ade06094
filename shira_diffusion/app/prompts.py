"""What the studio reads out of a prompt before the model sees it.

* A1111's adapter tags: ``<lora:name:0.8>`` (both strengths), ``<lora:name:0.8:0.5>`` (text
  encoders 0.8, UNet 0.5, A1111's order), ``<lora:name:te=0.8:unet=0.5>``; ``<shira:...>`` is the
  same. Any number of them, so a fusion has no fixed size. Tags are removed from the text.
* What SDXL will not read as written: CLIP sees 77 tokens (75 of text), the rest is cut; and
  A1111's weighting ``(word:1.2)`` is plain text to diffusers. Both are said, never silent.
"""

from __future__ import annotations

import re

TAG = re.compile(r"<(?:lora|shira):([^:>]+)((?::[^:>]*)*)>", re.IGNORECASE)
WEIGHTING = re.compile(r"\([^()]*:\s*-?\d+(?:\.\d+)?\s*\)")
TEXT_TOKENS = 75  # CLIP's 77 minus the start and end markers


class PromptError(ValueError):
    """A prompt the studio cannot honour, said in one sentence."""


def adapter_tags(prompt: str) -> tuple[str, dict[str, float | dict[str, float]]]:
    """``(prompt without tags, {name: strength})``; a strength is one number or
    ``{"unet": u, "text_encoder": t, "text_encoder_2": t}``."""
    found: dict[str, float | dict[str, float]] = {}
    for match in TAG.finditer(prompt or ""):
        name, args = match.group(1).strip(), [a.strip() for a in match.group(2).split(":")[1:]]
        te = unet = None
        positional = []
        for arg in args:
            key, eq, value = arg.partition("=")
            try:
                number = float(value if eq else arg)
            except ValueError:
                raise PromptError(f"{match.group(0)}: strengths must be numbers, like <lora:{name}:0.8>") from None
            if eq and key.strip() == "te":
                te = number
            elif eq and key.strip() == "unet":
                unet = number
            elif eq:
                raise PromptError(f"{match.group(0)}: unknown argument {key.strip()!r} (te= or unet=)")
            else:
                positional.append(number)
        if len(positional) > 2:
            raise PromptError(f"{match.group(0)}: at most two strengths (text encoders, then UNet)")
        te = te if te is not None else positional[0] if positional else 1.0
        unet = unet if unet is not None else positional[1] if len(positional) > 1 else te
        if name in found:
            raise PromptError(f"{match.group(0)}: {name} is tagged twice")
        found[name] = te if te == unet else {"unet": unet, "text_encoder": te, "text_encoder_2": te}
    clean = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", TAG.sub("", prompt or ""))).strip(" ,")
    return clean, found


def notes(prompt: str, tokenizer) -> list[str]:
    """Sentences about what of ``prompt`` the model will not read as written."""
    out = []
    if tokenizer is not None and prompt:
        ids = tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"]
        if len(ids) > TEXT_TOKENS:
            cut = tokenizer.decode(ids[TEXT_TOKENS:]).strip()
            out.append(f"The prompt is {len(ids)} tokens; SDXL reads the first {TEXT_TOKENS}, so this is cut: “{cut}”.")
    if prompt and WEIGHTING.search(prompt):
        out.append("Weighting like (word:1.2) is read as plain text here (brackets and number included).")
    return out
