"""The studio: one loaded pipeline (a ShiraPipelineSwitcher) and its Gradio page.

Every generation switches and renders under the switcher's lock, so several browser tabs can
generate with different adapters at once and each gets exactly its own set.
"""

from __future__ import annotations

import random
import re
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import COMPONENTS, AdapterError, ShiraPipelineSwitcher
from ..loading import DEMO, TINY, load_pipeline as load_shira_pipeline
from .pnginfo import adapter_records, params as pnginfo_params, with_parameters
from .prompts import PromptError, adapter_tags, encode, has_compel, needs_encoding, notes as prompt_notes
from .samplers import Samplers

NONE = "(base model)"
FUSE_SLOTS = 4
EXAMPLE = "a photo of a red fox in the snow"
DEMO_EXAMPLE = "a red star on a white background, in the center"


def demo_label() -> str:
    from ..demo import world

    words = lambda names: ", ".join(names)  # noqa: E731
    return (
        "**Built-in demo model**: a small SDXL-architecture model trained on a world of coloured shapes. "
        f"It knows {len(world.vocabulary())} words and draws captions like *{DEMO_EXAMPLE}*: "
        f"colours {words(world.COLOURS)}; shapes {words(world.SHAPES)}; backgrounds {words(world.BACKGROUNDS)}; "
        "positions *in the center*, *top ...*, *bottom ...*. It puts a shape at the top, the bottom or the center as "
        "asked, but does not tell *left* from *right* (about half of either lands on the other side). "
        f"Its demo adapters teach a subject (`{world.SUBJECT_TOKEN}`, *a sks shape on a gray background, in the center*) "
        "and two styles (*..., in bluefire style*, *..., in paintings style*), each as SHiRA with every mask kind and "
        "as LoRA of the same size. Pass `--model` for a real SDXL checkpoint."
    )


TINY_LABEL = "**Tiny random-weight pipeline**: SDXL architecture, images are noise; for trying the controls."


def load_pipeline(model: str, device: str | None = None, dtype: str = "auto", **options):
    """``(pipeline, notes)``: the notes (``label``, ``example``, ``vocabulary``) say what the studio
    is showing; ``options`` (offload, vae, compile, config, loader keywords): see ``shira_diffusion.loading``."""
    pipe = load_shira_pipeline(model, device=device, dtype=dtype, **options)
    pipe.set_progress_bar_config(disable=False)
    if model == DEMO:
        from ..demo import world

        return pipe, {"label": demo_label(), "example": DEMO_EXAMPLE, "vocabulary": frozenset(world.vocabulary()), "model": model}
    return pipe, {"label": TINY_LABEL if model == TINY else f"SDXL pipeline: `{model}`", "model": model}


def unknown_words(text: str, vocabulary) -> list[str]:
    """Words of ``text`` outside ``vocabulary`` (None: the model knows any word), in order, once each."""
    if vocabulary is None:
        return []
    words = re.findall(r"[a-z0-9']+", (text or "").lower())
    return list(dict.fromkeys(w for w in words if w not in vocabulary))


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    """A markdown table whose cells may hold ``|`` (adapter names come from file names)."""
    def line(cells):
        return "| " + " | ".join(str(c).replace("\\", "\\\\").replace("|", "\\|") for c in cells) + " |"
    return "\n".join([line(headers), "|" + "---|" * len(headers), *map(line, rows)])


def training_summary(training: dict) -> str:
    """A file's training metadata in one cell: network, dim/alpha, base, resolution, trigger."""
    parts = []
    if training.get("network"):
        dim = f" dim {training['dim']}" + (f"/alpha {training['alpha']}" if training.get("alpha") else "") if training.get("dim") else ""
        parts.append(training["network"] + dim)
    parts += [training[k] for k in ("base_model", "resolution") if training.get(k)]
    if training.get("trigger"):
        parts.append(f"trigger: {training['trigger']}")
    return "; ".join(parts) or "-"


class StudioError(ValueError):
    """A request the studio cannot carry out, in one sentence the user can act on."""


def _scale(weight, te_weight=None):
    """One strength, or ``{component: strength}`` when the text encoders get their own."""
    weight = float(weight)
    if te_weight is None or str(te_weight).strip() == "":
        return weight
    try:
        te_weight = float(te_weight)
    except ValueError:
        raise StudioError(f"A text-encoder weight must be a number (or blank for the same as the weight), not {te_weight!r}.") from None
    if te_weight == weight:
        return weight
    return {c: weight if c == "unet" else te_weight for c in COMPONENTS}


def _add(a, b):
    """Two strengths of one adapter summed (per component where either is per component)."""
    if a is None:
        return b
    if isinstance(a, float) and isinstance(b, float):
        return a + b
    per = lambda s, c: s if isinstance(s, float) else s.get(c, 1.0)  # noqa: E731
    return {c: per(a, c) + per(b, c) for c in COMPONENTS}


def _strength(scale) -> str:
    if isinstance(scale, dict):
        return f"{scale['unet']:g} (text {scale['text_encoder']:g})"
    return f"{scale:g}"


@dataclass
class Generation:
    """What one Generate press made: the images (PNGs carrying their parameters), the seed of each,
    the status line, and each image's parameters."""

    images: list
    seeds: list[int]
    status: str
    params: list[dict] = field(default_factory=list)


MAX_BATCH = 16  # images per press (batch count x batch size)


class Studio:
    """What the page does, without the page: testable directly.

    ``allow_uploads``: whether browser users may add and remove adapters (the library is shared by
    every session; off by default in ``python -m app``). ``max_adapters`` caps how many are
    loaded; ``max_adapter_bytes`` what they may hold (host and device, by the engine's accounting).
    """

    def __init__(self, pipe, label: str = "", max_bytes: int = 512 * 2**20, example: str = EXAMPLE, vocabulary=None,
                 max_adapter_bytes: int | None = None, max_backup_bytes: int | None = None, model: str = "",
                 allow_uploads: bool = True, max_adapters: int | None = None, encoder=None) -> None:
        self.switcher = ShiraPipelineSwitcher(pipe, max_adapter_bytes=max_adapter_bytes, max_backup_bytes=max_backup_bytes)
        self.pipe = pipe
        self.label = label
        self.max_bytes = max_bytes
        self.example = example  # the prompt the page opens with
        self.vocabulary = vocabulary  # words the model knows (the demo model's 33); None: any
        self.model = model or type(pipe).__name__
        self.allow_uploads = allow_uploads
        self.max_adapters = max_adapters
        self.max_adapter_bytes = max_adapter_bytes
        self.samplers = Samplers(pipe)
        self.encoder = encoder  # an image encoder for the concept figures (compare.ImageEncoder), or None
        self._cancel: dict[str, threading.Event] = {}
        self._sources: dict[str, Path] = {}  # adapter name -> its file (hashed for the PNGs when first used)
        self.tmp = Path(tempfile.mkdtemp(prefix="shira_studio_"))  # compare grids, X/Y plots: removed with the studio
        weakref.finalize(self, shutil.rmtree, self.tmp, ignore_errors=True)

    @property
    def adapters(self) -> list[str]:
        return list(self.switcher.list_adapters())

    def add(self, path: str | Path, name: str | None = None) -> str:
        """Load, validate and stage one adapter (SHiRA file, PEFT folder or LoRA file)."""
        if self.max_adapters is not None and len(self.switcher.engine.staged) >= self.max_adapters:
            raise StudioError(f"the library holds {self.max_adapters} adapters, its limit (--max-adapters); remove one first")
        name = self.switcher.load_adapter(Path(path), adapter_name=name or Path(path).stem, max_bytes=self.max_bytes)
        self._sources[name] = Path(path)
        return name

    def upload(self, path: str | Path, name: str = "", file_name: str | None = None) -> str:
        """An adapter from the browser: ``path`` is the server's temporary copy of ``file_name``.
        A taken name gets a ``-2``, ``-3``, ... suffix; errors name the file, never the temp path."""
        if not self.allow_uploads:
            return "uploads are off: the library is shared by everyone using this studio (start it with --allow-uploads)"
        path = Path(path).resolve()
        file_name = file_name or path.name
        wanted = (name or "").strip() or Path(file_name).stem
        final, n, taken = wanted, 1, set(self.switcher.engine.staged)  # the store's names: no wait for a generation
        while final in taken:
            n += 1
            final = f"{wanted}-{n}"
        try:
            self.add(path, final)
        except (AdapterError, ValueError, OSError) as err:
            message = str(err).replace(str(path), file_name).replace(str(path.parent), "(upload)")
            if "over the store's budget" in message:
                message += f" (--max-adapter-memory {self.max_adapter_bytes // 2**20} MB)"
            return f"rejected {file_name}: {message}"
        return f"loaded **{final}**" + (f" (*{wanted}* was taken)" if final != wanted else "")

    def remove(self, name: str) -> None:
        if not self.allow_uploads:
            raise StudioError("removing adapters is off: the library is shared (start the studio with --allow-uploads)")
        self.switcher.delete_adapters(name)
        self._sources.pop(name, None)

    def scan(self, folder: str | Path) -> list[str]:
        """Stage every adapter in ``folder``; one report line per file, bad files skipped."""
        lines = []
        for path in sorted(Path(folder).glob("*.safetensors")):
            try:
                lines.append(f"loaded {self.add(path)} from {path.name}")
            except (AdapterError, ValueError) as err:
                lines.append(f"skipped {path.name}: {err}")
        return lines

    def library_rows(self) -> list[list]:
        rows = []
        for name, info in self.switcher.list_adapters().items():
            density = f"{info['density']:.3%}" if info.get("density") is not None else f"rank {info['rank']}" if info.get("rank") else "dense"
            size = f"{info['bytes'] / 2**20:.2f} MB" if info.get("bytes") else "-"
            held = f"{info['host_bytes'] / 2**20:.2f} MB" + (f" + {info['device_bytes'] / 2**20:.2f} MB GPU" if info["device_bytes"] else "")
            rows.append([name, info["kind"], info.get("mask") or "-", density, f"{info['params']:,}", size, info["dtype"],
                         "yes", "yes" if info["active"] else "", held, training_summary(info.get("training") or {})])
        return rows

    def generate(self, prompt: str, negative: str, seed: int, steps: int, guidance: float, adapters: dict | None,
                 width: int | None = None, height: int | None = None):
        """One image: ``(image, status)`` (see :meth:`run`)."""
        done = self.run(prompt, negative, seed, steps, guidance, adapters, width, height)
        return done.images[0], done.status

    def run(self, prompt: str, negative: str = "", seed=0, steps=20, guidance: float = 5.0, adapters: dict | None = None,
            width: int | None = None, height: int | None = None, sampler: str | None = None, batch_count: int = 1,
            batch_size: int = 1, session: str | None = None, kind: str = "text2img", image=None, mask_image=None,
            strength: float = 0.75) -> Generation:
        """Switch to ``adapters`` (plus any ``<lora:name:w>`` tags in the prompt) and render
        ``batch_count`` batches of ``batch_size``, atomically. Seed ``-1`` draws one; image ``i``
        has seed ``seed + i``. :meth:`cancel` with the same ``session`` stops it between steps.
        ``kind`` ``img2img`` / ``inpaint`` starts from ``image`` (and repaints ``mask_image``'s white)."""
        adapters, prompt, seed, steps = self._checked(prompt, adapters, seed, steps, batch_count, batch_size)
        pipe, extra = self._pipeline_for(kind, image, mask_image, strength, width, height)
        encoded = needs_encoding(prompt, negative, getattr(self.pipe, "tokenizer", None)) and has_compel()
        stop = self._cancel.setdefault(session or "", threading.Event())
        stop.clear()
        done_steps = [0]

        def on_step(pipe, step, timestep, kwargs):
            done_steps[0] = step + 1
            if stop.is_set():
                pipe._interrupt = True
            return kwargs

        images, seeds = [], []
        start = time.perf_counter()
        try:
            with self.switcher.engine.lock:
                self.switcher.set_adapters(adapters)
                switch_ms = self.switcher.last_switch_ms
                sampler_name = self.samplers.use(sampler, pipe)
                try:
                    # read whole and weighted by compel when diffusers would cut or misread it; on the text
                    # encoders as they are now, with this set's adapters written in
                    text = (encode(pipe, prompt, negative) if encoded else {"prompt": prompt, "negative_prompt": negative or None})
                    for b in range(int(batch_count)):
                        if stop.is_set():
                            break
                        batch = [seed + b * int(batch_size) + j for j in range(int(batch_size))]
                        out = self.switcher.generate(pipe, **text, num_inference_steps=steps,
                                                     guidance_scale=float(guidance), num_images_per_prompt=len(batch),
                                                     generator=[torch.Generator().manual_seed(s) for s in batch],
                                                     callback_on_step_end=on_step, **extra)
                        images += out.images
                        seeds += batch
                finally:
                    self.samplers.use(None, pipe)
        except torch.OutOfMemoryError:
            raise StudioError(self._oom(width, height, batch_size)) from None
        except RuntimeError as err:
            if "out of memory" in str(err).lower():
                raise StudioError(self._oom(width, height, batch_size)) from None
            raise
        took = time.perf_counter() - start - switch_ms / 1000
        size = images[0].size if images else (width, height)
        records = adapter_records(adapters, self._sources)  # the files hashed once per run, not per image
        params = [pnginfo_params(prompt, negative, s, steps, sampler_name, guidance, *size, self.model, records) for s in seeds]
        images = [with_parameters(image, p) for image, p in zip(images, params)]
        which = " + ".join(f"{k} x{_strength(v)}" for k, v in adapters.items()) or "base model"
        status = f"{which}: switch {switch_ms:.1f} ms, generation {took:.2f} s"
        status += f"; seed {seeds[0]}" if len(seeds) == 1 else f"; seeds {seeds[0]}-{seeds[-1]}" if seeds else ""
        if stop.is_set():
            status += f"\n\n**Cancelled** after step {done_steps[0]} of {steps}" + ("" if images else ": no image")
        unknown = unknown_words(f"{prompt} {negative or ''}", self.vocabulary)
        if unknown:
            status += f"\n\n**Unknown to this model:** {', '.join(unknown)} (it reads them as noise; its words are listed above)"
        for note in prompt_notes(prompt, getattr(self.pipe, "tokenizer", None), encoded):
            status += f"\n\n*Note:* {note}"
        return Generation(images, seeds, status, params)

    def _pipeline_for(self, kind: str, image, mask_image, strength, width, height) -> tuple:
        """The pipeline for ``kind`` (sharing this one's weights) and its extra arguments."""
        size = {"width": int(width) if width else None, "height": int(height) if height else None}
        if kind == "text2img":
            return self.pipe, size
        if kind not in ("img2img", "inpaint"):
            raise StudioError(f"unknown kind {kind!r} (text2img, img2img or inpaint)")
        if image is None:
            raise StudioError(f"{kind} starts from an image: add one.")
        if kind == "inpaint" and mask_image is None:
            raise StudioError("Inpainting needs a mask: paint (white) where the image should change.")
        if not 0.0 < float(strength) <= 1.0:
            raise StudioError("Denoising strength must be above 0 and at most 1.")
        extra = {"image": image.convert("RGB"), "strength": float(strength)}
        if kind == "inpaint":
            extra.update(size, mask_image=mask_image.convert("L"))  # img2img takes its size from the image
        return self.switcher.pipeline(kind), extra

    def cancel(self, session: str | None = None) -> None:
        """Stop ``session``'s running generation after its current step (a no-op when none runs)."""
        self._cancel.setdefault(session or "", threading.Event()).set()

    def _checked(self, prompt, adapters, seed, steps, batch_count, batch_size):
        """The request made valid, or a :class:`StudioError` saying what to change."""
        if seed is None or str(seed).strip() == "":
            raise StudioError("The seed is empty: enter a number, or -1 for a random seed.")
        try:
            seed = int(float(seed))
        except ValueError:
            raise StudioError(f"The seed must be a whole number (or -1 for a random one), not {seed!r}.") from None
        if steps is None or int(steps) < 1:
            raise StudioError("Steps must be at least 1.")
        if int(batch_count) < 1 or int(batch_size) < 1 or int(batch_count) * int(batch_size) > MAX_BATCH:
            raise StudioError(f"Batch count and batch size must be at least 1, and make at most {MAX_BATCH} images.")
        if prompt is not None and not isinstance(prompt, str):
            raise StudioError("The prompt must be text.")
        try:
            prompt, tagged = adapter_tags(prompt or "")
        except PromptError as err:
            raise StudioError(f"Bad prompt: {err}") from None
        loaded = self.switcher.engine.staged
        wanted = {k: v for k, v in (adapters or {}).items() if k and k != NONE}
        for name, scale in tagged.items():
            if name not in loaded:
                raise StudioError(f"Bad prompt: <lora:{name}> names no loaded adapter (loaded: {', '.join(loaded) or 'none'}).")
            wanted[name] = _add(wanted.get(name), scale)
        if seed == -1:
            seed = random.SystemRandom().randrange(2**32 - MAX_BATCH)
        elif not 0 <= seed < 2**63:
            raise StudioError("The seed must be -1 or between 0 and 2**63 - 1.")
        return wanted, prompt, seed, int(steps)

    @staticmethod
    def _oom(width, height, batch_size) -> str:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return (f"Out of memory at {width}x{height} with {batch_size} image(s) per batch: try a smaller size or batch size, "
                "or start the studio with --offload model.")

    @staticmethod
    def requested(mode: str, swap_name: str | None, swap_scale: float, fuse: list, swap_te: float | None = None,
                  fuse_te: list | None = None) -> tuple[dict, str]:
        """The adapter set the Generate controls ask for, and a note when some controls are ignored.
        ``fuse`` is ``[name, weight, name, weight, ...]``; a text-encoder weight (``swap_te``,
        ``fuse_te[i]``; blank: the same as the weight) gives the text encoders their own strength."""
        te = list(fuse_te or []) + [None] * len(fuse)
        slots = [(name, _scale(weight, te[i])) for i, (name, weight) in enumerate(zip(fuse[::2], fuse[1::2])) if name]
        if mode == "swap":
            adapters = {swap_name: _scale(swap_scale, swap_te)} if swap_name and swap_name != NONE else {}
            note = f"fuse slots ignored ({', '.join(n for n, _ in slots)}): Mode is *swap*" if slots else ""
            return adapters, note
        adapters: dict = {}
        for name, weight in slots:
            adapters[name] = _add(adapters.get(name), weight)
        note = f"swap adapter {swap_name} ignored: Mode is *fuse*" if swap_name and swap_name != NONE else ""
        return adapters, note

    def compare(self, prompt: str, adapters: list[str], lora_pair: list[str], seeds: str, steps: int, guidance: float):
        """Grid image, a markdown report of concept loss, and the grid saved as a PNG file."""
        seed_list = [int(s) for s in str(seeds).replace(",", " ").split()] or [0]
        grid, details = self.switcher.compare(prompt, adapters, seeds=seed_list, lora_pair=lora_pair or None, return_details=True,
                                              num_inference_steps=int(steps), guidance_scale=float(guidance), **self._measure)
        lines = [f"Columns: {' | '.join(details['columns'])}"]
        if "concept" in details:
            detector = details["metric"] == "detector"
            lines.append(f"\n**Concept kept in the fusion** ({details['metric_meaning']})\n")
            headers = ["adapter", "in the fusion", *(["alone"] if detector else []), "pixel distance fused / base to alone"]
            rows = []
            for label, figures in (("", details["concept"]), (" (LoRA)", details.get("lora_concept", {}))):
                for name, v in figures.items():
                    dist = details["image_distance"].get(name)
                    rows.append([name + label, f"{v['fused']:.2f}", *([f"{v['alone']:.2f}"] if detector else []),
                                 f"{dist['fused_vs_alone']:.4f} / {dist['base_vs_alone']:.4f}" if dist else ""])
            lines.append(markdown_table(headers, rows))
        if details.get("weight_space"):
            lines.append("\n**Weight space** (index overlap: share of the smaller adapter's entries the other also changes; "
                         "AWOM: spectral norm of dW1ᵀdW2, lower = less interference; AWOR: 1 - its density, 1 = orthogonal)\n")
            rows = [[f"{a} + {b}", f"{m['overlap']:.4%}", f"{m['awom']:.4g}", f"{m['awor']:.4f}"]
                    for (a, b), m in details["weight_space"].items()]
            lines.append(markdown_table(["pair", "index overlap", "AWOM", "AWOR"], rows))
        out = self._file("compare", ".png")
        grid.save(out)
        return grid, "\n".join(lines), str(out)

    def xy(self, prompt: str, x_adapter: str, x_values: str, y_axis: str, y_values: str, seed, steps: int, guidance: float):
        """The X/Y plot: grid, a markdown table of the cells, and the PNG and CSV files."""
        from ..compare import SEED, rows_csv

        def numbers(text, what):
            try:
                return [float(v) for v in str(text).replace(",", " ").split()]
            except ValueError:
                raise StudioError(f"{what} must be numbers separated by commas, like 0, 0.5, 1") from None

        if not x_adapter:
            raise StudioError("Pick the adapter for the X axis.")
        y_name = SEED if y_axis in ("", None, SEED) else y_axis
        xs, ys = numbers(x_values, "X values"), numbers(y_values, "Y values")
        if len(xs) * len(ys) > 64:
            raise StudioError("At most 64 cells (X values x Y values).")
        grid, rows = self.switcher.xy_plot(prompt, (x_adapter, xs), (y_name, ys), seed=int(seed or 0), num_inference_steps=int(steps),
                                           guidance_scale=float(guidance), **self._measure)
        png, table = self._file("xy", ".png"), self._file("xy", ".csv")
        grid.save(png)
        table.write_text(rows_csv(rows))
        headers = list(rows[0])
        return grid, markdown_table(headers, [[r[h] for h in headers] for r in rows]), [str(png), str(table)]

    @property
    def _measure(self) -> dict:
        return {"detector": self.vocabulary is not None and self.model == DEMO, "encoder": self.encoder}

    def _file(self, stem: str, suffix: str) -> Path:
        """A new file in the studio's own temporary folder (removed with the studio); only the
        newest few of each kind are kept."""
        old = sorted(self.tmp.glob(f"{stem}-*{suffix}"), key=lambda p: p.stat().st_mtime)
        for path in old[:-7]:
            path.unlink(missing_ok=True)
        return self.tmp / f"{stem}-{time.time_ns()}{suffix}"


def build_ui(studio: Studio):
    """The Gradio page (:mod:`.page`)."""
    from .page import build_ui as build

    return build(studio)
