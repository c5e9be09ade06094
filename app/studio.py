"""The studio's state (one pipeline, its engine, the loaded adapters) and its Gradio page."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from shira_diffusion import AdapterError, ShiraEngine
from shira_diffusion.interop import load_any
from shira_diffusion.pipeline import DEMO
from shira_diffusion.pipeline import load_pipeline as load_shira_pipeline

DEMO_LABEL = (
    "Tiny offline demo pipeline: SDXL architecture with random weights, so images are noise. "
    "It shows switching and fusing without a download; pass --model for a real checkpoint."
)
NONE = "(base model)"


def load_pipeline(model: str, device: str | None = None, dtype: str = "auto"):
    """``(pipeline, label)``; the label says what the studio is showing."""
    pipe = load_shira_pipeline(model, device=device, dtype=dtype)
    pipe.set_progress_bar_config(disable=False)
    return pipe, DEMO_LABEL if model == DEMO else f"SDXL pipeline: {model}"


class Studio:
    """One pipeline and its engine; adapters are staged once and swapped per generation."""

    def __init__(self, pipe, label: str = "", max_bytes: int = 512 * 2**20) -> None:
        self.pipe = pipe
        self.label = label
        self.max_bytes = max_bytes
        self.engine = ShiraEngine(pipe)

    @property
    def adapters(self) -> list[str]:
        return self.engine.staged

    def add(self, path: str | Path, name: str | None = None) -> str:
        """Load, validate and stage one adapter (SHiRA or LoRA file); returns its listed name."""
        path = Path(path)
        name = name or path.stem
        with self.engine.lock:  # reading a LoRA briefly wraps the pipeline's layers: not mid-generation
            adapter = load_any(path, self.pipe, max_bytes=self.max_bytes)
            self.engine.stage(name, adapter)
        return name

    def scan(self, folder: str | Path) -> list[str]:
        """Stage every adapter in ``folder``; one report line per file, bad files skipped."""
        lines = []
        for path in sorted(Path(folder).glob("*.safetensors")):
            try:
                lines.append(f"loaded {self.add(path)} from {path.name}")
            except (AdapterError, ValueError) as err:
                lines.append(f"skipped {path.name}: {err}")
        return lines

    def generate(self, prompt: str, negative: str, seed: int, steps: int, guidance: float, adapter: str, scale: float):
        """Switch to ``adapter`` at ``scale`` and render, atomically; returns ``(image, status)``."""
        with self.engine.lock:
            self.engine.apply(None if adapter in (None, "", NONE) else {adapter: scale})
            switch_ms = self.engine.last_switch_s * 1000
            start = time.perf_counter()
            image = self.pipe(
                prompt,
                negative_prompt=negative or None,
                num_inference_steps=int(steps),
                guidance_scale=float(guidance),
                generator=torch.Generator().manual_seed(int(seed)),
            ).images[0]
        took = time.perf_counter() - start
        which = "base model" if adapter in (None, "", NONE) else f"{adapter} x{scale:g}"
        return image, f"{which}: switch {switch_ms:.1f} ms, generation {took:.2f} s"


def build_ui(studio: Studio):
    import gradio as gr

    def choices():
        return [NONE, *studio.adapters]

    def upload(file):
        if file is None:
            return gr.update(), "no file"
        try:
            name = studio.add(file, Path(file).stem)
        except (AdapterError, ValueError) as err:
            return gr.update(), f"rejected: {err}"
        return gr.update(choices=choices(), value=name), f"loaded {name}"

    def run(prompt, negative, seed, steps, guidance, adapter, scale, progress=gr.Progress(track_tqdm=True)):
        return studio.generate(prompt, negative, seed, steps, guidance, adapter, scale)

    with gr.Blocks(title="shira-studio") as page:
        gr.Markdown(f"# shira-studio\n{studio.label}")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value="a photo of a red square")
                negative = gr.Textbox(label="Negative prompt")
                with gr.Row():
                    seed = gr.Number(label="Seed", value=0, precision=0)
                    steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
                    guidance = gr.Slider(0.0, 15.0, value=5.0, step=0.5, label="Guidance")
                adapter = gr.Dropdown(choices(), value=NONE, label="Adapter")
                scale = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Adapter scale")
                upload_box = gr.File(label="Add a SHiRA adapter (.safetensors)", file_types=[".safetensors"], type="filepath")
                button = gr.Button("Generate", variant="primary")
            with gr.Column():
                image = gr.Image(label="Result", type="pil")
                status = gr.Markdown()
        upload_box.upload(upload, upload_box, [adapter, status])
        button.click(run, [prompt, negative, seed, steps, guidance, adapter, scale], [image, status])
    return page
