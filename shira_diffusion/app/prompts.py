"""What the studio reads out of a prompt before the model sees it.

* A1111's adapter tags: ``<lora:name:0.8>`` (both strengths), ``<lora:name:0.8:0.5>`` (text
  encoders 0.8, UNet 0.5, A1111's order), ``<lora:name:te=0.8:unet=0.5>``; ``<shira:...>`` is the
  same. Any number of them, so a fusion has no fixed size. Tags are removed from the text.
* Prompts past CLIP's 77 tokens (75 of text) and A1111's weighting ``(word:1.2)``, ``(word)``,
  ``[word]``: :func:`encode` reads them with ``compel`` (the maintained library for this, SDXL's
  two encoders included): long prompts in 75-token chunks, weights on the token embeddings.
  Without compel installed, :func:`notes` says what diffusers will cut or read as plain text.
"""

from __future__ import annotations

import re

from ..adapter import COMPONENTS

TAG = re.compile(r"<(?:lora|shira):([^:>]+)((?::[^:>]*)*)>", re.IGNORECASE)
A1111_GROUP = re.compile(r"\(([^()\[\]]*?)(?::\s*(-?\d+(?:\.\d+)?))?\s*\)|\[([^()\[\]]*)\]")
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
        found[name] = te if te == unet else {c: unet if c == "unet" else te for c in COMPONENTS}
    clean = re.sub(r"\s+,", ",", re.sub(r"\s{2,}", " ", TAG.sub("", prompt or ""))).strip(" ,")
    return clean, found


def token_count(prompt: str, tokenizer) -> int:
    return len(tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"]) if tokenizer is not None and prompt else 0


def needs_encoding(prompt: str, negative: str, tokenizer) -> bool:
    """Whether diffusers' own encoding would cut or misread the prompts."""
    return any(token_count(p, tokenizer) > TEXT_TOKENS or (p and A1111_GROUP.search(p)) for p in (prompt, negative))


def has_compel() -> bool:
    try:
        import compel  # noqa: F401
    except ImportError:
        return False
    return True


def to_compel(prompt: str) -> str:
    """A1111 weighting in compel's syntax: ``(a b:1.2)`` -> ``(a b)1.2``, ``(a)`` -> ``(a)1.1``,
    ``[a]`` -> ``(a)0.9``, nested groups nested (both multiply); an unclosed bracket is text."""
    out, _, _ = _convert(prompt, 0, None)
    return out


_WEIGHT = re.compile(r"^(.*?):\s*(-?\d+(?:\.\d+)?)\s*$", re.S)


def _convert(text: str, i: int, close: str | None) -> tuple[str, int, bool]:
    """``(converted, next index, closed)`` from ``i`` up to ``close`` (None: the end)."""
    out = []
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            out.append(text[i:i + 2])
            i += 2
        elif c in "([":
            inner, i, closed = _convert(text, i + 1, ")" if c == "(" else "]")
            if not closed:
                out.append("\\" + c + inner)
            elif c == "[":
                out.append(f"({inner})0.9")
            else:
                m = _WEIGHT.match(inner)
                out.append(f"({m.group(1)}){m.group(2)}" if m else f"({inner})1.1")
        elif c == close:
            return "".join(out), i + 1, True
        else:
            out.append(c)
            i += 1
    return "".join(out), i, close is None


def encode(pipe, prompt: str, negative: str) -> dict:
    """Pipeline keywords (``prompt_embeds``, ``pooled_prompt_embeds``, ``negative_...``) for
    ``prompt`` read whole and weighted by compel, on the text encoders as they are now (with any
    adapter written into them); an empty negative is zeros where the model asks for that
    (SDXL's ``force_zeros_for_empty_prompt``), as diffusers does."""
    from compel import CompelForSD, CompelForSDXL

    device = getattr(pipe, "_execution_device", None)
    sdxl = getattr(pipe, "tokenizer_2", None) is not None
    encoder = (CompelForSDXL if sdxl else CompelForSD)(pipe, device=device)
    import torch

    with torch.no_grad():
        c = encoder(to_compel(prompt), negative_prompt=to_compel(negative or ""))
    out = {"prompt_embeds": c.embeds, "negative_prompt_embeds": c.negative_embeds}
    if sdxl:
        out.update(pooled_prompt_embeds=c.pooled_embeds, negative_pooled_prompt_embeds=c.negative_pooled_embeds)
    if not negative and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        out["negative_prompt_embeds"] = torch.zeros_like(out["negative_prompt_embeds"])
        if sdxl:
            out["negative_pooled_prompt_embeds"] = torch.zeros_like(out["negative_pooled_prompt_embeds"])
    return out


def notes(prompt: str, tokenizer, encoded: bool = False) -> list[str]:
    """Sentences about how ``prompt`` was read: in full and weighted (``encoded``, by compel), or
    what diffusers cuts or reads as plain text."""
    out = []
    n = token_count(prompt, tokenizer)
    if n > TEXT_TOKENS:
        if encoded:
            out.append(f"The prompt is {n} tokens, read in full in {-(-n // TEXT_TOKENS)} chunks of {TEXT_TOKENS} (compel).")
        else:
            ids = tokenizer(prompt, add_special_tokens=False, truncation=False)["input_ids"]
            cut = tokenizer.decode(ids[TEXT_TOKENS:]).strip()
            out.append(f"The prompt is {n} tokens; SDXL reads the first {TEXT_TOKENS}, so this is cut: “{cut}”.")
    if prompt and A1111_GROUP.search(prompt):
        out.append("Weighting like (word:1.2) was applied (compel)." if encoded else
                   "Weighting like (word:1.2) is read as plain text here (brackets and number included).")
    return out
