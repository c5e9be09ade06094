"""The studio: one loaded pipeline (a ShiraPipelineSwitcher) and its Gradio page.

Every generation switches and renders under the switcher's lock, so several browser tabs can
generate with different adapters at once and each gets exactly its own set.
"""

from __future__ import annotations

import re
import tempfile
import time
from pathlib import Path

import torch

from .. import AdapterError, ShiraPipelineSwitcher
from ..loading import DEMO, TINY, load_pipeline as load_shira_pipeline

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

        return pipe, {"label": demo_label(), "example": DEMO_EXAMPLE, "vocabulary": frozenset(world.vocabulary())}
    return pipe, {"label": TINY_LABEL if model == TINY else f"SDXL pipeline: `{model}`"}


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


class Studio:
    """What the page does, without the page: testable directly."""

    def __init__(self, pipe, label: str = "", max_bytes: int = 512 * 2**20, example: str = EXAMPLE, vocabulary=None,
                 max_adapter_bytes: int | None = None, max_backup_bytes: int | None = None) -> None:
        self.switcher = ShiraPipelineSwitcher(pipe, max_adapter_bytes=max_adapter_bytes, max_backup_bytes=max_backup_bytes)
        self.pipe = pipe
        self.label = label
        self.max_bytes = max_bytes
        self.example = example  # the prompt the page opens with
        self.vocabulary = vocabulary  # words the model knows (the demo model's 33); None: any

    @property
    def adapters(self) -> list[str]:
        return list(self.switcher.list_adapters())

    def add(self, path: str | Path, name: str | None = None) -> str:
        """Load, validate and stage one adapter (SHiRA file, PEFT folder or LoRA file)."""
        return self.switcher.load_adapter(Path(path), adapter_name=name or Path(path).stem, max_bytes=self.max_bytes)

    def upload(self, path: str | Path, name: str = "", file_name: str | None = None) -> str:
        """An adapter from the browser: ``path`` is the server's temporary copy of ``file_name``.
        A taken name gets a ``-2``, ``-3``, ... suffix; errors name the file, never the temp path."""
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
            return f"rejected {file_name}: {message}"
        return f"loaded **{final}**" + (f" (*{wanted}* was taken)" if final != wanted else "")

    def remove(self, name: str) -> None:
        self.switcher.delete_adapters(name)

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

    def generate(self, prompt: str, negative: str, seed: int, steps: int, guidance: float, adapters: dict[str, float] | None,
                 width: int | None = None, height: int | None = None):
        """Switch to ``adapters`` and render, atomically; returns ``(image, status)``."""
        adapters = {k: v for k, v in (adapters or {}).items() if k and k != NONE}
        start = time.perf_counter()
        with self.switcher.engine.lock:
            self.switcher.set_adapters(adapters)
            switch_ms = self.switcher.last_switch_ms
            image = self.switcher(
                prompt,
                negative_prompt=negative or None,
                num_inference_steps=int(steps),
                guidance_scale=float(guidance),
                width=int(width) if width else None,
                height=int(height) if height else None,
                generator=torch.Generator().manual_seed(int(seed)),
            ).images[0]
        took = time.perf_counter() - start - switch_ms / 1000
        which = " + ".join(f"{k} x{v:g}" for k, v in adapters.items()) or "base model"
        status = f"{which}: switch {switch_ms:.1f} ms, generation {took:.2f} s"
        unknown = unknown_words(f"{prompt} {negative or ''}", self.vocabulary)
        if unknown:
            status += f"\n\n**Unknown to this model:** {', '.join(unknown)} (it reads them as noise; its words are listed above)"
        return image, status

    @staticmethod
    def requested(mode: str, swap_name: str | None, swap_scale: float, fuse: list) -> tuple[dict[str, float], str]:
        """The adapter set the Generate controls ask for, and a note when some controls are ignored."""
        slots = [(name, float(weight)) for name, weight in zip(fuse[::2], fuse[1::2]) if name]
        if mode == "swap":
            adapters = {swap_name: float(swap_scale)} if swap_name and swap_name != NONE else {}
            note = f"fuse slots ignored ({', '.join(n for n, _ in slots)}): Mode is *swap*" if slots else ""
            return adapters, note
        adapters: dict[str, float] = {}
        for name, weight in slots:
            adapters[name] = adapters.get(name, 0.0) + weight
        note = f"swap adapter {swap_name} ignored: Mode is *fuse*" if swap_name and swap_name != NONE else ""
        return adapters, note

    def compare(self, prompt: str, adapters: list[str], lora_pair: list[str], seeds: str, steps: int, guidance: float):
        """Grid image, a markdown report of concept loss, and the grid saved as a PNG file."""
        seed_list = [int(s) for s in str(seeds).replace(",", " ").split()] or [0]
        grid, details = self.switcher.compare(prompt, adapters, seeds=seed_list, lora_pair=lora_pair or None, return_details=True,
                                              num_inference_steps=int(steps), guidance_scale=float(guidance))
        lines = [f"Columns: {' | '.join(details['columns'])}"]
        if "image_retention" in details:
            lines.append("\n**Image space** (retention: 1 = the fusion keeps the adapter's look, 0 = lost as far as the base)\n")
            rows = [[name, f"{value:.3f}", f"{details['image_distance'][name]['fused_vs_alone']:.4f}",
                     f"{details['image_distance'][name]['base_vs_alone']:.4f}"] for name, value in details["image_retention"].items()]
            rows += [[f"{name} (LoRA)", f"{value:.3f}", "", ""] for name, value in details.get("lora_image_retention", {}).items()]
            lines.append(markdown_table(["adapter", "retention", "fused vs alone", "base vs alone"], rows))
        if details.get("weight_space"):
            lines.append("\n**Weight space**\n")
            rows = [[f"{a} + {b}", f"{m['overlap']:.4%}", f"{m['awom']:.4g}", f"{m['awor']:.4f}"]
                    for (a, b), m in details["weight_space"].items()]
            lines.append(markdown_table(["pair", "index overlap", "AWOM", "AWOR"], rows))
        out = Path(tempfile.mkdtemp(prefix="shira_compare_")) / "compare.png"
        grid.save(out)
        return grid, "\n".join(lines), str(out)


def _private(event) -> dict:
    """Keep a UI-only event out of the API: ``api_visibility`` (gradio 6) or ``show_api`` (4 and 5)."""
    import inspect

    return {"api_visibility": "private"} if "api_visibility" in inspect.signature(event).parameters else {"show_api": False}


def build_ui(studio: Studio):
    import gradio as gr

    def names():
        return studio.adapters

    def refreshed(status: str):
        choices = names()
        updates = [gr.update(choices=[NONE, *choices])]
        updates += [gr.update(choices=["", *choices]) for _ in range(FUSE_SLOTS)]
        updates += [gr.update(choices=choices, value=[]), gr.update(choices=choices, value=[]), gr.update(choices=choices, value=None)]
        return [*updates, studio.library_rows(), status]

    def upload(file, name):
        if file is None:
            return refreshed("no file")
        return refreshed(studio.upload(file, name, getattr(file, "orig_name", None) or Path(file).name))

    def remove(name):
        if not name:
            return refreshed("pick an adapter to remove")
        try:
            studio.remove(name)
        except KeyError as err:
            return refreshed(str(err))
        return refreshed(f"removed **{name}**")

    def run(prompt, negative, seed, steps, guidance, width, height, mode, swap_name, swap_scale, *fuse,
            progress=gr.Progress(track_tqdm=True)):
        adapters, note = studio.requested(mode, swap_name, swap_scale, list(fuse))
        try:
            image, status = studio.generate(prompt, negative, seed, steps, guidance, adapters, width, height)
        except (AdapterError, KeyError, ValueError) as err:
            raise gr.Error(str(err)) from None
        return image, status + (f"\n\n*Note:* {note}" if note else ""), studio.library_rows()

    def run_compare(prompt, adapters, lora_pair, seeds, steps, guidance, progress=gr.Progress(track_tqdm=True)):
        try:
            return studio.compare(prompt, adapters, lora_pair, seeds, steps, guidance)
        except (AdapterError, KeyError, ValueError) as err:
            raise gr.Error(str(err)) from None

    default_size = studio.pipe.default_sample_size * studio.pipe.vae_scale_factor
    with gr.Blocks(title="shira-studio") as page:
        gr.Markdown(f"# shira-studio\n{studio.label}")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", value=studio.example, elem_id="prompt")
                    negative = gr.Textbox(label="Negative prompt")
                    with gr.Row():
                        seed = gr.Number(label="Seed", value=0, precision=0)
                        steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                        guidance = gr.Slider(0.0, 15.0, value=5.0, step=0.5, label="Guidance")
                    with gr.Row():
                        width = gr.Slider(64, 2048, value=default_size, step=8, label="Width")
                        height = gr.Slider(64, 2048, value=default_size, step=8, label="Height")
                    mode = gr.Radio(["swap", "fuse"], value="swap", label="Mode", elem_id="mode")
                    with gr.Group():
                        swap_name = gr.Dropdown([NONE, *names()], value=NONE, label="Adapter (swap)")
                        swap_scale = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Scale (swap)")
                    fuse_inputs = []
                    with gr.Accordion("Fuse: adapters and weights", open=False):
                        for i in range(FUSE_SLOTS):
                            with gr.Row():
                                fuse_inputs.append(gr.Dropdown(["", *names()], value="", label=f"Adapter {i + 1}", elem_id=f"fuse-{i + 1}"))
                                fuse_inputs.append(gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label=f"Weight {i + 1}"))
                    button = gr.Button("Generate", variant="primary", elem_id="generate")
                with gr.Column():
                    image = gr.Image(label="Result", type="pil", elem_id="result")
                    status = gr.Markdown(elem_id="status")
        with gr.Tab("Compare"):
            with gr.Row():
                with gr.Column():
                    c_prompt = gr.Textbox(label="Prompt", value=studio.example)
                    c_adapters = gr.CheckboxGroup(names(), label="Adapters (each alone, then fused)")
                    c_lora = gr.CheckboxGroup(names(), label="LoRA counterparts (each alone, then fused)")
                    c_seeds = gr.Textbox(label="Seeds", value="0, 1")
                    with gr.Row():
                        c_steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                        c_guidance = gr.Slider(0.0, 15.0, value=5.0, step=0.5, label="Guidance")
                    c_button = gr.Button("Compare", variant="primary")
                with gr.Column():
                    c_grid = gr.Image(label="base | each adapter | fusion", type="pil")
                    c_report = gr.Markdown()
                    c_file = gr.File(label="Download grid (PNG)")
        with gr.Tab("Library"):
            table = gr.Dataframe(
                headers=["name", "kind", "mask", "density", "params", "size", "dtype", "fits model", "active", "memory held", "trained as"],
                value=studio.library_rows(), interactive=False,
            )
            upload_box = gr.File(label=f"Add an adapter (.safetensors, at most {studio.max_bytes // 2**20} MB)",
                                 file_types=[".safetensors"], type="filepath")
            upload_name = gr.Textbox(label="Name for the next upload (default: the file name; a taken name gets -2, -3, ...)")
            with gr.Row():
                remove_name = gr.Dropdown(names(), value=None, label="Remove adapter", elem_id="remove-name")
                remove_button = gr.Button("Remove")
            library_status = gr.Markdown()

        choice_outputs = [swap_name, *fuse_inputs[::2], c_adapters, c_lora, remove_name, table, library_status]
        upload_box.upload(upload, [upload_box, upload_name], choice_outputs, api_name="upload")
        remove_button.click(remove, remove_name, choice_outputs, api_name="remove")
        button.click(run, [prompt, negative, seed, steps, guidance, width, height, mode, swap_name, swap_scale, *fuse_inputs],
                     [image, status, table], api_name="generate")
        for slot in fuse_inputs[::2]:  # picking an adapter for a fuse slot means fusing
            slot.input(lambda name, current: "fuse" if name else current, [slot, mode], mode, queue=False, **_private(slot.input))
        c_button.click(run_compare, [c_prompt, c_adapters, c_lora, c_seeds, c_steps, c_guidance], [c_grid, c_report, c_file],
                       api_name="compare")
    return page.queue(default_concurrency_limit=4)
