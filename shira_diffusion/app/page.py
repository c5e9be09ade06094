"""The studio's Gradio page: Generate (and img2img / Inpaint on the same adapters), PNG info,
Compare, X/Y plot, Library. Everything it does is a :class:`~.studio.Studio` method; this file
only lays out controls and turns errors into one ``gr.Error`` sentence.

Generations, comparisons and plots share one pipeline and one lock, so they run one at a time in
one queue (``concurrency_id="engine"``): a waiting request shows its place in the queue instead
of claiming to be processing.
"""

from __future__ import annotations

from pathlib import Path

from .. import AdapterError
from ..compare import SEED
from .pnginfo import a1111_text, read_parameters
from .samplers import DEFAULT, NAMES as SAMPLERS
from .studio import FUSE_SLOTS, NONE, Studio, StudioError

ERRORS = (AdapterError, KeyError, ValueError, StudioError)


def _private(event) -> dict:
    """Keep a UI-only event out of the API: ``api_visibility`` (gradio 6) or ``show_api`` (4 and 5)."""
    import inspect

    return {"api_visibility": "private"} if "api_visibility" in inspect.signature(event).parameters else {"show_api": False}


def _steps_and_cfg(gr, elem_prefix: str = ""):
    """The Steps and CFG scale sliders every tab that renders has."""
    ids = ({"elem_id": f"{elem_prefix}steps"}, {"elem_id": f"{elem_prefix}guidance"}) if elem_prefix is not None else ({}, {})
    return (gr.Slider(1, 100, value=20, step=1, label="Steps", **ids[0]),
            gr.Slider(0.0, 15.0, value=5.0, step=0.5, label="CFG scale", **ids[1]))


def _message(err: Exception) -> str:
    return str(err.args[0]) if isinstance(err, KeyError) and err.args else str(err)


def build_ui(studio: Studio):
    import gradio as gr

    def names():
        return studio.adapters

    def loras():
        return [n for n, info in studio.switcher.list_adapters().items() if info["kind"] != "shira"]

    def refreshed(status: str):
        choices = names()
        updates = [gr.update(choices=[NONE, *choices])]
        updates += [gr.update(choices=["", *choices]) for _ in range(FUSE_SLOTS)]
        updates += [gr.update(choices=choices, value=[]), gr.update(choices=loras(), value=[]), gr.update(choices=choices, value=None),
                    gr.update(choices=choices, value=None), gr.update(choices=[SEED, *choices], value=SEED)]
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
        except ERRORS as err:
            return refreshed(_message(err))
        return refreshed(f"removed **{name}**")

    def adapter_set(mode, swap_name, swap_scale, swap_te, slots):
        fuse = list(slots[: 2 * FUSE_SLOTS])
        fuse_te = list(slots[2 * FUSE_SLOTS:])
        return studio.requested(mode, swap_name, swap_scale, fuse, swap_te=swap_te, fuse_te=fuse_te)

    def session_of(request) -> str:
        return getattr(request, "session_hash", None) or ""

    def run(prompt, negative, seed, steps, guidance, width, height, sampler, batch_count, batch_size, mode, swap_name, swap_scale,
            swap_te, *rest, request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
        *slots, history = rest
        adapters, note = adapter_set(mode, swap_name, swap_scale, swap_te, slots)
        try:
            done = studio.run(prompt, negative, seed, steps, guidance, adapters, width, height, sampler, batch_count, batch_size,
                              session=session_of(request))
        except ERRORS as err:
            raise gr.Error(_message(err)) from None
        history = [*[(im, f"seed {p['seed']}") for im, p in zip(done.images, done.params)], *(history or [])][:48]
        status = done.status + (f"\n\n*Note:* {note}" if note else "")
        first = done.images[0] if done.images else None
        return first, status, studio.library_rows(), history, history, done.seeds[0] if done.seeds else None

    def run_from_image(kind):
        def handler(prompt, negative, image, mask, strength, seed, steps, guidance, mode, swap_name, swap_scale, swap_te, *slots,
                    request: gr.Request = None, progress=gr.Progress(track_tqdm=True)):
            adapters, note = adapter_set(mode, swap_name, swap_scale, swap_te, slots)
            try:
                done = studio.run(prompt, negative, seed, steps, guidance, adapters, kind=kind, image=image, mask_image=mask,
                                  strength=strength, session=session_of(request))
            except ERRORS as err:
                raise gr.Error(_message(err)) from None
            return (done.images[0] if done.images else None), done.status + (f"\n\n*Note:* {note}" if note else "")
        return handler

    def cancel(request: gr.Request = None):
        studio.cancel(session_of(request))

    def read_png(file):
        if file is None:
            return "", {}
        try:
            params = read_parameters(file)
        except OSError as err:
            raise gr.Error(f"not an image this studio can read: {err}") from None
        if not params:
            return "This PNG carries no generation parameters.", {}
        return f"```\n{a1111_text(params)}\n```", params

    def send(params):
        if not params:
            raise gr.Error("Drop a PNG with generation parameters first.")
        loaded = set(studio.switcher.engine.staged)  # one lock-free read, not one list_adapters() per name
        adapters = [a for a in params.get("adapters") or [] if a.get("name") in loaded]
        missing = [a["name"] for a in params.get("adapters") or [] if a not in adapters]
        out = [params.get("prompt", ""), params.get("negative_prompt", ""), params.get("seed", 0), params.get("steps", 20),
               params.get("cfg_scale", 5.0), params.get("width") or default_size, params.get("height") or default_size,
               params.get("sampler") if params.get("sampler") in SAMPLERS else DEFAULT]
        single = len(adapters) == 1 and not isinstance(adapters[0]["scale"], dict)
        mode_value = "swap" if len(adapters) <= 1 else "fuse"
        out += [mode_value, adapters[0]["name"] if single else NONE, adapters[0]["scale"] if single else 1.0]
        slots = (adapters + [None] * FUSE_SLOTS)[:FUSE_SLOTS] if not single else [None] * FUSE_SLOTS
        for a in slots:
            scale = a["scale"] if a else 1.0
            out += [a["name"] if a else "", scale["unet"] if isinstance(scale, dict) else scale]
        out += [(str(a["scale"]["text_encoder"]) if a and isinstance(a["scale"], dict) else "") for a in slots]
        note = f"Sent to Generate. Not loaded here: {', '.join(missing)}." if missing else "Sent to Generate."
        return [*out, note]

    default_size = studio.pipe.default_sample_size * studio.pipe.vae_scale_factor
    engine = {"concurrency_id": "engine", "concurrency_limit": 1}
    with gr.Blocks(title="shira-studio") as page:
        gr.Markdown(f"# shira-studio\n{studio.label}")
        history = gr.State([])
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="Prompt", value=studio.example, elem_id="prompt",
                                        info="<lora:name:0.8> fuses any loaded adapter (any number); long prompts and A1111 "
                                             "weighting like (word:1.2) are read in full (compel)")
                    negative = gr.Textbox(label="Negative prompt", elem_id="negative")
                    with gr.Row():
                        seed = gr.Number(label="Seed (-1: random)", value=0, precision=0, elem_id="seed")
                        reuse = gr.Button("Reuse last seed", size="sm", elem_id="reuse-seed")
                        steps, guidance = _steps_and_cfg(gr)
                    with gr.Row():
                        sampler = gr.Dropdown(list(SAMPLERS), value=DEFAULT, label="Sampler", elem_id="sampler")
                        batch_count = gr.Slider(1, 8, value=1, step=1, label="Batch count", elem_id="batch-count")
                        batch_size = gr.Slider(1, 4, value=1, step=1, label="Batch size", elem_id="batch-size")
                    with gr.Row():
                        width = gr.Slider(64, 2048, value=default_size, step=8, label="Width", elem_id="width")
                        height = gr.Slider(64, 2048, value=default_size, step=8, label="Height", elem_id="height")
                    mode = gr.Radio(["swap", "fuse"], value="swap", label="Mode", elem_id="mode")
                    with gr.Group():
                        with gr.Row():
                            swap_name = gr.Dropdown([NONE, *names()], value=NONE, label="Adapter (swap)", elem_id="swap-name")
                            swap_scale = gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label="Weight")
                            swap_te = gr.Textbox(value="", label="Text-encoder weight", placeholder="same", elem_id="swap-te")
                    fuse_names, fuse_weights, fuse_te = [], [], []
                    with gr.Accordion("Fuse: adapters and weights (more with <lora:name:w> in the prompt)", open=False):
                        for i in range(FUSE_SLOTS):
                            with gr.Row():
                                fuse_names.append(gr.Dropdown(["", *names()], value="", label=f"Adapter {i + 1}", elem_id=f"fuse-{i + 1}"))
                                fuse_weights.append(gr.Slider(-2.0, 2.0, value=1.0, step=0.05, label=f"Weight {i + 1}"))
                                fuse_te.append(gr.Textbox(value="", label=f"Text-encoder weight {i + 1}", placeholder="same"))
                    with gr.Row():
                        button = gr.Button("Generate", variant="primary", elem_id="generate")
                        stop = gr.Button("Cancel", variant="stop", elem_id="cancel")
                with gr.Column():
                    image = gr.Image(label="Result", type="pil", format="png", elem_id="result")
                    status = gr.Markdown(elem_id="status")
                    gallery = gr.Gallery(label="This session", columns=4, format="png", elem_id="history")
                    last_seed = gr.State(None)
        fuse_inputs = [x for pair in zip(fuse_names, fuse_weights) for x in pair]
        adapter_inputs = [mode, swap_name, swap_scale, swap_te, *fuse_inputs, *fuse_te]
        from_image = {}
        for kind, title in (("img2img", "img2img"), ("inpaint", "Inpaint")):
            with gr.Tab(title):
                gr.Markdown("Uses the adapters chosen on the Generate tab." + (" White in the mask is repainted." if kind == "inpaint" else ""))
                with gr.Row():
                    with gr.Column():
                        i_prompt = gr.Textbox(label="Prompt", value=studio.example)
                        i_negative = gr.Textbox(label="Negative prompt")
                        i_image = gr.Image(label="Start image", type="pil", elem_id=f"{kind}-image")
                        i_mask = gr.Image(label="Mask (white: repaint)", type="pil", image_mode="L") if kind == "inpaint" else gr.State(None)
                        i_strength = gr.Slider(0.05, 1.0, value=0.75 if kind == "img2img" else 1.0, step=0.05, label="Denoising strength")
                        with gr.Row():
                            i_seed = gr.Number(label="Seed (-1: random)", value=0, precision=0)
                            i_steps, i_guidance = _steps_and_cfg(gr, None)
                        i_button = gr.Button("Generate", variant="primary", elem_id=f"{kind}-generate")
                    with gr.Column():
                        i_result = gr.Image(label="Result", type="pil", format="png", elem_id=f"{kind}-result")
                        i_status = gr.Markdown(elem_id=f"{kind}-status")
            from_image[kind] = (i_button, [i_prompt, i_negative, i_image, i_mask, i_strength, i_seed, i_steps, i_guidance], [i_result, i_status])
        with gr.Tab("PNG info"):
            png_file = gr.File(label="Drop a PNG to read how it was made", file_types=[".png"], type="filepath", elem_id="png-drop")
            png_text = gr.Markdown(elem_id="png-text")
            png_params = gr.State({})
            png_send = gr.Button("Send to Generate", elem_id="png-send")
            png_status = gr.Markdown(elem_id="png-status")
        with gr.Tab("Compare"):
            with gr.Row():
                with gr.Column():
                    c_prompt = gr.Textbox(label="Prompt", value=studio.example, elem_id="compare-prompt")
                    c_adapters = gr.CheckboxGroup(names(), label="Adapters (each alone, then fused)", elem_id="compare-adapters")
                    c_lora = gr.CheckboxGroup(loras(), label="LoRA counterparts (each alone, then fused)", elem_id="compare-lora")
                    c_seeds = gr.Textbox(label="Seeds", value="0, 1", elem_id="compare-seeds")
                    with gr.Row():
                        c_steps, c_guidance = _steps_and_cfg(gr, "compare-")
                    c_button = gr.Button("Compare", variant="primary", elem_id="compare-button")
                with gr.Column():
                    c_grid = gr.Image(label="base | each adapter | fusion", type="pil", format="png", elem_id="compare-grid")
                    c_report = gr.Markdown(elem_id="compare-report")
                    c_file = gr.File(label="Download grid (PNG)")
        with gr.Tab("X/Y plot"):
            with gr.Row():
                with gr.Column():
                    x_prompt = gr.Textbox(label="Prompt", value=studio.example, elem_id="xy-prompt")
                    with gr.Row():
                        x_adapter = gr.Dropdown(names(), value=None, label="X: adapter", elem_id="x-adapter")
                        x_values = gr.Textbox(label="X: strengths", value="0, 0.5, 1", elem_id="x-values")
                    with gr.Row():
                        y_axis = gr.Dropdown([SEED, *names()], value=SEED, label="Y: another adapter, or seed", elem_id="y-axis")
                        y_values = gr.Textbox(label="Y: strengths (or seeds)", value="0, 1", elem_id="y-values")
                    with gr.Row():
                        x_seed = gr.Number(label="Seed (when Y is not the seed)", value=0, precision=0)
                        x_steps, x_guidance = _steps_and_cfg(gr, "xy-")
                    x_button = gr.Button("Plot", variant="primary", elem_id="xy-plot")
                with gr.Column():
                    x_grid = gr.Image(label="X/Y plot", type="pil", format="png", elem_id="xy-grid")
                    x_table = gr.Markdown(elem_id="xy-table")
                    x_files = gr.File(label="Download (PNG, CSV)", file_count="multiple")
        with gr.Tab("Library"):
            table = gr.Dataframe(
                headers=["name", "kind", "mask", "density", "params", "size", "dtype", "fits model", "active", "memory held", "trained as"],
                value=studio.library_rows(), interactive=False,
            )
            with gr.Group(visible=studio.allow_uploads):
                upload_box = gr.File(label=f"Add an adapter (.safetensors, at most {studio.max_bytes // 2**20} MB)",
                                     file_types=[".safetensors"], type="filepath")
                upload_name = gr.Textbox(label="Name for the next upload (default: the file name; a taken name gets -2, -3, ...)")
                with gr.Row():
                    remove_name = gr.Dropdown(names(), value=None, label="Remove adapter", elem_id="remove-name")
                    remove_button = gr.Button("Remove")
            if not studio.allow_uploads:
                gr.Markdown("Adding and removing adapters is off: the library is shared by everyone using this studio "
                            "(start it with `--allow-uploads` to allow it).")
            library_status = gr.Markdown()

        choice_outputs = [swap_name, *fuse_names, c_adapters, c_lora, remove_name, x_adapter, y_axis, table, library_status]
        upload_box.upload(upload, [upload_box, upload_name], choice_outputs, api_name="upload")
        remove_button.click(remove, remove_name, choice_outputs, api_name="remove")
        generate_inputs = [prompt, negative, seed, steps, guidance, width, height, sampler, batch_count, batch_size, *adapter_inputs, history]
        button.click(run, generate_inputs, [image, status, table, gallery, history, last_seed], api_name="generate", **engine)
        stop.click(cancel, None, None, queue=False, api_name="cancel")
        reuse.click(lambda s: s if s is not None else gr.update(), last_seed, seed, queue=False, **_private(reuse.click))
        for kind, (i_button, inputs, outputs) in from_image.items():
            i_button.click(run_from_image(kind), [*inputs, *adapter_inputs], outputs, api_name=kind, **engine)
        for slot in fuse_names:  # picking an adapter for a fuse slot means fusing
            slot.input(lambda name, current: "fuse" if name else current, [slot, mode], mode, queue=False, **_private(slot.input))
        png_file.change(read_png, png_file, [png_text, png_params], api_name="png_info")
        png_send.click(send, png_params, [prompt, negative, seed, steps, guidance, width, height, sampler, mode, swap_name, swap_scale,
                                          *fuse_inputs, *fuse_te, png_status], **_private(png_send.click))

        def run_compare(prompt, adapters, lora_pair, seeds, steps, guidance, progress=gr.Progress(track_tqdm=True)):
            try:
                return studio.compare(prompt, adapters, lora_pair, seeds, steps, guidance)
            except ERRORS as err:
                raise gr.Error(_message(err)) from None

        def run_xy(prompt, x_adapter, x_values, y_axis, y_values, seed, steps, guidance, progress=gr.Progress(track_tqdm=True)):
            try:
                return studio.xy(prompt, x_adapter, x_values, y_axis, y_values, seed, steps, guidance)
            except ERRORS as err:
                raise gr.Error(_message(err)) from None

        c_button.click(run_compare, [c_prompt, c_adapters, c_lora, c_seeds, c_steps, c_guidance], [c_grid, c_report, c_file],
                       api_name="compare", **engine)
        x_button.click(run_xy, [x_prompt, x_adapter, x_values, y_axis, y_values, x_seed, x_steps, x_guidance], [x_grid, x_table, x_files],
                       api_name="xy_plot", **engine)
    return page.queue(default_concurrency_limit=1)

