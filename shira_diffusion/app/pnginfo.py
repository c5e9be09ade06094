"""Generation parameters inside the PNG, the way A1111 writes them, and read back.

Two text chunks: ``parameters`` in A1111's layout (the prompt; ``Negative prompt: ...``; one line
of ``Key: value`` pairs: steps, sampler, CFG scale, seed, size, model, adapters with their
strengths and file hashes), which A1111, ComfyUI and civitai read, and ``shira_studio``, the same
as JSON, which this studio reads back exactly. Reading falls back to the A1111 text for PNGs made
elsewhere.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from PIL import Image

CHUNK = "shira_studio"


def file_hash(path: str | Path | None) -> str | None:
    """A1111's short hash (``AutoV2``): the first 10 hex digits of the file's sha256, read once
    per file version (the first image that names the adapter pays for it, not its loading)."""
    if not path or not Path(path).is_file():
        return None
    stat = Path(path).stat()
    return _sha256_10(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1024)
def _sha256_10(path: str, mtime_ns: int, size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:10]


def _strength(scale: Any) -> str:
    if isinstance(scale, dict):
        return "/".join(f"{c}={v:g}" for c, v in scale.items())
    return f"{float(scale):g}"


def a1111_text(p: dict) -> str:
    """The ``parameters`` chunk for ``p`` (keys as :func:`params` makes them)."""
    lines = [p.get("prompt", "")]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [("Steps", p.get("steps")), ("Sampler", p.get("sampler")), ("CFG scale", p.get("cfg_scale")), ("Seed", p.get("seed")),
              ("Size", f"{p['width']}x{p['height']}" if p.get("width") else None), ("Model", p.get("model"))]
    adapters = p.get("adapters") or []
    if adapters:
        fields.append(("Adapters", '"' + ", ".join(f"{a['name']}: {_strength(a['scale'])}" for a in adapters) + '"'))
        hashes = [f"{a['name']}: {a['hash']}" for a in adapters if a.get("hash")]
        if hashes:
            fields.append(("Lora hashes", '"' + ", ".join(hashes) + '"'))
    fields.append(("Version", f"shira-studio {p.get('version', '')}".strip()))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields if v is not None and v != ""))
    return "\n".join(lines)


def params(prompt: str, negative: str | None, seed: int, steps: int, sampler: str, guidance: float, width: int, height: int,
           model: str, adapters: list[dict]) -> dict:
    """The parameters one image records (what both chunks carry). ``adapters`` as
    :func:`adapter_records` makes them, once per generation."""
    from .. import __version__

    return {"prompt": prompt, "negative_prompt": negative or "", "steps": steps, "sampler": sampler, "cfg_scale": float(guidance),
            "seed": seed, "width": width, "height": height, "model": model, "adapters": adapters, "version": __version__}


def adapter_records(adapters, sources) -> list[dict]:
    """``[{name, scale, hash}]`` for ``adapters`` (``{name: scale}`` or ``(name, scale)`` pairs),
    hashing the files ``sources`` names."""
    items = adapters.items() if isinstance(adapters, dict) else adapters
    return [{"name": n, "scale": v, "hash": file_hash(sources.get(n))} for n, v in items]


def _chunks(p: dict) -> dict[str, str]:
    return {"parameters": a1111_text(p), CHUNK: json.dumps(p, sort_keys=True)}


def with_parameters(image: Image.Image, p: dict) -> Image.Image:
    """``image`` carrying ``p`` as both chunks in ``image.info``, which Gradio writes into the
    PNGs it serves."""
    image.info.update(_chunks(p))
    return image


def png_bytes(image: Image.Image, p: dict) -> bytes:
    """``image`` as PNG bytes with ``p`` as both chunks (PIL writes text only through ``pnginfo``)."""
    import io

    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    for key, value in _chunks(p).items():
        info.add_text(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def read_parameters(source: str | Path | Image.Image) -> dict:
    """The parameters a PNG carries: this studio's JSON chunk, or A1111's text parsed into the
    same keys (``prompt``, ``negative_prompt``, ``steps``, ``sampler``, ``cfg_scale``, ``seed``,
    ``width``, ``height``, ``model``, ``adapters``); ``{}`` for a PNG with neither."""
    image = source if isinstance(source, Image.Image) else Image.open(source)
    info = getattr(image, "text", None) or image.info
    if info.get(CHUNK):
        try:
            return json.loads(info[CHUNK])
        except ValueError:
            pass
    return parse_a1111(info["parameters"]) if info.get("parameters") else {}


_FIELD = re.compile(r'\s*([\w \-/]+):\s*("(?:\\.|[^"\\])*"|[^,]*)(?:,|$)')


def parse_a1111(text: str) -> dict:
    """A1111's ``parameters`` text in :func:`read_parameters`' keys (unknown fields under ``extra``)."""
    lines = text.strip().split("\n")
    last = lines.pop() if lines and _FIELD.match(lines[-1]) and "Steps:" in lines[-1] else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out: dict[str, Any] = {"prompt": "\n".join(prompt).strip(), "negative_prompt": "\n".join(negative).strip()}
    fields = {k.strip(): v.strip().strip('"') for k, v in _FIELD.findall(last)}
    for key, name, cast in (("Steps", "steps", int), ("Sampler", "sampler", str), ("CFG scale", "cfg_scale", float),
                            ("Seed", "seed", int), ("Model", "model", str)):
        if key in fields:
            try:
                out[name] = cast(fields.pop(key))
            except ValueError:
                pass
    if "Size" in fields:
        w, _, h = fields.pop("Size").partition("x")
        if w.isdigit() and h.isdigit():
            out["width"], out["height"] = int(w), int(h)
    adapters = []
    for item in fields.pop("Adapters", "").split(", "):
        name, _, scale = item.rpartition(": ")
        try:
            value = {c: float(v) for c, v in (part.split("=") for part in scale.split("/"))} if "=" in scale else float(scale)
        except ValueError:
            continue
        adapters.append({"name": name, "scale": value})
    if adapters:
        out["adapters"] = adapters
    if fields:
        out["extra"] = fields
    return out
