"""The studio's generation controls, PNG parameters, errors, X/Y plot and shared-library rules."""

import gc
import io
import threading

import pytest
import torch
from PIL import Image

from shira_diffusion import find_targets
from shira_diffusion.app.pnginfo import a1111_text, parse_a1111, read_parameters
from shira_diffusion.app.prompts import adapter_tags, notes
from shira_diffusion.app.samplers import NAMES as SAMPLERS
from shira_diffusion.app.studio import Studio, StudioError
from shira_diffusion.testing import random_adapter, tiny_sdxl_pipeline


@pytest.fixture(scope="module")
def studio(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapters")
    studio = Studio(tiny_sdxl_pipeline(seed=0), "tiny", model="tiny")
    weights = find_targets(studio.pipe, ["unet", "text_encoder", "text_encoder_2"])
    random_adapter(weights, "rand", density=0.05, seed=1, std=0.3).save(folder / "a.safetensors")
    random_adapter(weights, "wm", density=0.05, seed=2, std=0.3).save(folder / "b.safetensors")
    studio.scan(folder)
    return studio


def png_roundtrip(image: Image.Image) -> Image.Image:
    """Through the encoder Gradio uses for ``format="png"`` outputs, and back."""
    from gradio.processing_utils import encode_pil_to_bytes

    return Image.open(io.BytesIO(encode_pil_to_bytes(image, "png")))


def pixels(image):
    return torch.tensor(list(image.convert("RGB").getdata()), dtype=torch.int16)


def test_png_carries_a1111_parameters_and_json_that_read_back(studio):
    done = studio.run("a red square", "blurry", 7, 2, 5.0, {"a": 0.8}, 64, 64, sampler="Euler a")
    image = png_roundtrip(done.images[0])
    import hashlib

    h = hashlib.sha256(studio._sources["a"].read_bytes()).hexdigest()[:10]  # A1111's short hash of the file
    assert len(h) == 10
    assert image.info["parameters"] == ("a red square\nNegative prompt: blurry\nSteps: 2, Sampler: Euler a, CFG scale: 5.0, Seed: 7, "
                                        f'Size: 64x64, Model: tiny, Adapters: "a: 0.8", Lora hashes: "a: {h}", Version: shira-studio 0.1.0')
    assert read_parameters(image) == done.params[0]
    assert done.params[0] == {"prompt": "a red square", "negative_prompt": "blurry", "steps": 2, "sampler": "Euler a", "cfg_scale": 5.0,
                              "seed": 7, "width": 64, "height": 64, "model": "tiny", "adapters": [{"name": "a", "scale": 0.8, "hash": h}],
                              "version": "0.1.0"}
    # a PNG made elsewhere: A1111's text alone, parsed into the same keys
    del image.info["shira_studio"]
    image = png_roundtrip(image)
    parsed = read_parameters(image)
    assert {k: parsed[k] for k in ("prompt", "negative_prompt", "steps", "sampler", "cfg_scale", "seed", "width", "height", "model")} == {
        k: done.params[0][k] for k in ("prompt", "negative_prompt", "steps", "sampler", "cfg_scale", "seed", "width", "height", "model")}
    assert parsed["adapters"] == [{"name": "a", "scale": 0.8}]


def test_a1111_text_from_a1111_itself_parses():
    text = ("masterpiece, a castle\nat dusk\nNegative prompt: lowres, bad hands\nSteps: 30, Sampler: DPM++ 2M Karras, Schedule type: Karras, "
            "CFG scale: 7, Seed: 1234567, Size: 832x1216, Model hash: 31e35c80fc, Model: sd_xl_base_1.0, "
            'Lora hashes: "style: 0123456789", Version: v1.10.1')
    p = parse_a1111(text)
    assert p["prompt"] == "masterpiece, a castle\nat dusk" and p["negative_prompt"] == "lowres, bad hands"
    assert (p["steps"], p["sampler"], p["cfg_scale"], p["seed"], p["width"], p["height"], p["model"]) == (
        30, "DPM++ 2M Karras", 7.0, 1234567, 832, 1216, "sd_xl_base_1.0")
    assert p["extra"] == {"Schedule type": "Karras", "Model hash": "31e35c80fc", "Lora hashes": "style: 0123456789", "Version": "v1.10.1"}
    assert parse_a1111(a1111_text({**p, "adapters": [{"name": "x", "scale": {"unet": 1.0, "text_encoder": 0.5}}]}))["adapters"] == [
        {"name": "x", "scale": {"unet": 1.0, "text_encoder": 0.5}}]


def test_batches_seeds_and_random_seed(studio):
    done = studio.run("a red square", "", 11, 2, 5.0, None, 64, 64, batch_count=2, batch_size=2)
    assert done.seeds == [11, 12, 13, 14] and len(done.images) == 4 and "seeds 11-14" in done.status
    single = studio.run("a red square", "", 13, 2, 5.0, None, 64, 64)
    assert (pixels(done.images[2]) - pixels(single.images[0])).abs().max() <= 2  # image i is seed + i's image (batched maths)
    random_one = studio.run("a red square", "", -1, 1, 5.0, None, 64, 64)
    assert random_one.seeds[0] >= 0 and f"seed {random_one.seeds[0]}" in random_one.status
    assert random_one.params[0]["seed"] == random_one.seeds[0]


def test_every_sampler_runs_and_the_default_comes_back(studio):
    default = studio.pipe.scheduler
    images = {}
    for name in SAMPLERS:
        done = studio.run("a red square", "", 0, 3, 5.0, None, 64, 64, sampler=name)
        assert studio.pipe.scheduler is default
        images[name] = pixels(done.images[0])
        assert done.params[0]["sampler"] == (name if name != "model default" else type(default).__name__)
    assert not torch.equal(images["Euler"], images["DDIM"]) and not torch.equal(images["DPM++ 2M"], images["DPM++ 2M Karras"])
    with pytest.raises(ValueError, match="unknown sampler 'Heun'"):
        studio.run("a red square", "", 0, 1, 5.0, None, 64, 64, sampler="Heun")


def test_cancel_stops_between_steps(studio):
    started = threading.Event()
    original = studio.pipe.unet.forward

    def forward(*args, **kwargs):
        started.set()
        return original(*args, **kwargs)

    studio.pipe.unet.forward = forward
    try:
        result = {}
        worker = threading.Thread(target=lambda: result.update(done=studio.run("a red square", "", 0, 60, 5.0, None, 64, 64,
                                                                                   batch_count=3, session="tab-1")))
        worker.start()
        assert started.wait(60)
        studio.cancel("other-tab")  # another session's cancel does nothing to this one
        studio.cancel("tab-1")
        worker.join(120)
    finally:
        del studio.pipe.unet.forward
    done = result["done"]
    assert "**Cancelled** after step" in done.status and len(done.images) == 1
    assert int(done.status.split("after step ")[1].split(" ")[0]) < 60
    assert studio.run("a red square", "", 0, 1, 5.0, None, 64, 64, session="tab-1").status.count("Cancelled") == 0  # a new run starts clean


@pytest.mark.parametrize("kwargs, message", [
    ({"seed": None}, "The seed is empty: enter a number, or -1 for a random seed."),
    ({"seed": ""}, "The seed is empty: enter a number, or -1 for a random seed."),
    ({"steps": 0}, "Steps must be at least 1."),
    ({"batch_count": 8, "batch_size": 4}, "Batch count and batch size must be at least 1, and make at most 16 images."),
    ({"prompt": "a cat <lora:nope:0.5>"}, "Bad prompt: <lora:nope> names no loaded adapter (loaded: a, b)."),
    ({"prompt": "a cat <lora:a:strong>"}, "Bad prompt: <lora:a:strong>: strengths must be numbers, like <lora:a:0.8>"),
])
def test_errors_are_one_sentence(studio, kwargs, message):
    args = {"prompt": "a red square", "negative": "", "seed": 0, "steps": 2, "guidance": 5.0, "adapters": None, "width": 64, "height": 64}
    args.update(kwargs)
    with pytest.raises(StudioError) as err:
        studio.run(**args)
    assert str(err.value) == message


def test_out_of_memory_is_one_sentence(studio, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(studio.switcher, "generate", oom)
    with pytest.raises(StudioError) as err:
        studio.run("a red square", "", 0, 2, 5.0, None, 2048, 2048, batch_size=4)
    assert str(err.value) == ("Out of memory at 2048x2048 with 4 image(s) per batch: try a smaller size or batch size, "
                              "or start the studio with --offload model.")


def test_prompt_tags_fuse_any_number_with_a1111_strengths(studio):
    assert adapter_tags("a cat <lora:a:0.8>, <lora:b:1:0.5> at night") == (
        "a cat, at night", {"a": 0.8, "b": {"unet": 0.5, "text_encoder": 1.0, "text_encoder_2": 1.0}})
    assert adapter_tags("<shira:a:te=0.2:unet=0.9>")[1] == {"a": {"unet": 0.9, "text_encoder": 0.2, "text_encoder_2": 0.2}}
    tagged = studio.run("a red square <lora:a:0.8> <lora:b:0.5>", "", 3, 2, 5.0, None, 64, 64)
    assert studio.switcher.engine.active == {"a": 0.8, "b": 0.5}
    assert tagged.params[0]["prompt"] == "a red square"
    direct = studio.run("a red square", "", 3, 2, 5.0, {"a": 0.8, "b": 0.5}, 64, 64)
    assert torch.equal(pixels(tagged.images[0]), pixels(direct.images[0]))
    both = studio.run("a red square <lora:a:0.2>", "", 3, 1, 5.0, {"a": 0.6}, 64, 64)  # slots and tags add up
    assert studio.switcher.engine.active == {"a": pytest.approx(0.8)} and both.images


def test_long_prompts_are_read_whole_and_weighting_applied(studio):
    """Past 75 tokens and with (word:1.2) weighting the prompt goes through compel: the tail changes
    the image, a weight changes the image, and the status says how the prompt was read."""
    from shira_diffusion.app.prompts import to_compel

    tokenizer = studio.pipe.tokenizer
    long = " ".join(["red"] * 80) + " square at the end"
    n = len(tokenizer(long, add_special_tokens=False)["input_ids"])
    assert n > 75
    assert notes(long, tokenizer, encoded=True) == [f"The prompt is {n} tokens, read in full in {-(-n // 75)} chunks of 75 (compel)."]
    ids = tokenizer(long, add_special_tokens=False)["input_ids"]
    assert notes(long, tokenizer) == [f"The prompt is {n} tokens; SDXL reads the first 75, so this is cut: “{tokenizer.decode(ids[75:]).strip()}”."]
    assert notes("a red square", tokenizer) == []
    assert notes("a (red:1.3) square", None) == ["Weighting like (word:1.2) is read as plain text here (brackets and number included)."]
    assert to_compel("a (red square:1.3), (glow), [blur] and ((deep))") == "a (red square)1.3, (glow)1.1, (blur)0.9 and ((deep)1.1)1.1"

    def image(prompt):
        return pixels(studio.run(prompt, "", 0, 2, 5.0, None, 64, 64).images[0])

    tail_a, tail_b = image(long), image(long.replace("at the end", "in the blue"))
    assert not torch.equal(tail_a, tail_b)  # the words past 75 tokens were read
    done = studio.run(long, "", 0, 1, 5.0, None, 64, 64)
    assert f"*Note:* The prompt is {n} tokens, read in full" in done.status
    assert not torch.equal(image("a (red:1.6) square"), image("a (red:0.4) square"))
    assert "*Note:* Weighting like (word:1.2) was applied (compel)." in studio.run("a (red:1.6) square", "", 0, 1, 5.0, None, 64, 64).status


def test_text_encoder_weight_per_slot():
    assert Studio.requested("swap", "a", 1.0, ["", 1.0] * 4, swap_te=0.3) == (
        {"a": {"unet": 1.0, "text_encoder": 0.3, "text_encoder_2": 0.3}}, "")
    assert Studio.requested("fuse", None, 1.0, ["a", 0.5, "b", 1.0, "", 1.0, "", 1.0], fuse_te=[None, 1.0, None, None]) == (
        {"a": 0.5, "b": 1.0}, "")


def test_img2img_and_inpaint_use_the_same_adapters(studio):
    start = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    a = studio.run("a red square", "", 0, 2, 5.0, {"a": 1.0}, kind="img2img", image=start, strength=0.5)
    assert studio.switcher.engine.active == {"a": 1.0} and a.images[0].size == (64, 64)
    base = studio.run("a red square", "", 0, 2, 5.0, None, kind="img2img", image=start, strength=0.5)
    assert not torch.equal(pixels(a.images[0]), pixels(base.images[0]))
    painted = studio.run("a red square", "", 0, 2, 5.0, {"b": 1.0}, 64, 64, kind="inpaint", image=start, mask_image=mask)
    assert painted.images[0].size == (64, 64)
    with pytest.raises(StudioError, match="Inpainting needs a mask"):
        studio.run("a red square", "", 0, 2, 5.0, None, kind="inpaint", image=start)


def test_xy_plot_cells_are_exact_switches_with_figures(studio, tmp_path, monkeypatch):
    from shira_diffusion.compare import rows_csv

    sw = studio.switcher
    calls = []
    draw = type(sw).__call__
    monkeypatch.setattr(type(sw), "__call__", lambda self, *a, **k: calls.append(k["adapters"]) or draw(self, *a, **k))
    grid, rows = sw.xy_plot("a red square", ("a", [0, 1]), ("b", [0, 0.5]), seed=4, num_inference_steps=2, width=64, height=64)
    # the references (base, a, b) and the two cells that equal none of them: (0, 0) is the base, (1, 0) is a alone
    assert calls == [{}, {"a": 1.0}, {"b": 1.0}, {"a": 0.0, "b": 0.5}, {"a": 1.0, "b": 0.5}]
    assert [(r["x"], r["y"]) for r in rows] == [(0.0, 0.0), (1.0, 0.0), (0.0, 0.5), (1.0, 0.5)]
    assert rows[0]["kept:a"] == 0.0 and rows[0]["kept:b"] == 0.0  # the base model's own image, drawn once
    zero, base = (pixels(sw("a red square", adapters=a, generator=torch.Generator().manual_seed(4), num_inference_steps=2, width=64,
                            height=64).images[0]) for a in ({"a": 0.0, "b": 0.0}, {}))
    assert torch.equal(zero, base)  # which is what reusing it assumes: strength 0 is the base, bit for bit
    assert rows[1]["kept:a"] == 1.0  # a alone at 1: the reference itself
    assert all(r["switch_ms"] >= 0 for r in rows)
    assert rows_csv(rows).splitlines()[0] == "x,y,seed,switch_ms,kept:a,kept:b"
    assert grid.size[0] >= 2 * 192 and grid.size[1] >= 2 * 192
    _, seed_rows = sw.xy_plot("a red square", ("a", [0.5]), ("seed", [1, 2]), num_inference_steps=2, width=64, height=64)
    assert [r["seed"] for r in seed_rows] == [1, 2]
    with pytest.raises(ValueError, match="same adapter"):
        sw.xy_plot("a red square", ("a", [0]), ("a", [1]))
    grid, table, files = studio.xy("a red square", "a", "0, 1", "b", "0", 4, 2, 5.0)
    assert files[0].endswith(".png") and files[1].endswith(".csv") and "| x | y | seed | switch_ms |" in table


def test_uploads_are_off_unless_allowed_and_the_library_has_a_cap(tmp_path):
    weights = find_targets(tiny_sdxl_pipeline(seed=0))
    random_adapter(weights, "rand", density=0.05, seed=1).save(tmp_path / "a.safetensors")
    shared = Studio(tiny_sdxl_pipeline(seed=0), allow_uploads=False)
    assert shared.upload(tmp_path / "a.safetensors") == ("uploads are off: the library is shared by everyone using this studio "
                                                        "(start it with --allow-uploads)")
    shared.add(tmp_path / "a.safetensors")  # the operator's own folder still loads
    with pytest.raises(StudioError, match="removing adapters is off"):
        shared.remove("a")
    capped = Studio(tiny_sdxl_pipeline(seed=0), max_adapters=1)
    capped.add(tmp_path / "a.safetensors")
    assert "holds 1 adapters, its limit (--max-adapters)" in capped.upload(tmp_path / "a.safetensors")
    budget = Studio(tiny_sdxl_pipeline(seed=0), max_adapter_bytes=1000)
    said = budget.upload(tmp_path / "a.safetensors")
    assert "over the store's budget of 1,000" in said and said.endswith("(--max-adapter-memory 0 MB)")


def test_temporary_files_go_with_the_studio(tmp_path):
    studio = Studio(tiny_sdxl_pipeline(seed=0))
    random_adapter(find_targets(studio.pipe), "rand", density=0.05, seed=1).save(tmp_path / "a.safetensors")
    studio.add(tmp_path / "a.safetensors")
    for _ in range(9):
        studio.compare("a fox", ["a"], [], "0", 1, 5.0)
    folder = studio.tmp
    assert len(list(folder.glob("compare-*.png"))) == 8  # the newest few only
    del studio
    gc.collect()
    assert not folder.exists()


def test_concept_figures_demo_detector_on_a_render():
    from shira_diffusion.compare import concept_kept, demo_concept, pick_metric
    from shira_diffusion.demo import world

    scene = world.Scene("star", "red", "white", "in the center", style="bluefire")
    plain = world.render(world.Scene("star", "red", "white", "in the center"))
    glowing = world.render(scene)
    assert demo_concept("bluefire-shira-wm") == "bluefire" and demo_concept("mystyle") is None
    assert pick_metric(["bluefire-shira-wm", "sks-lora"], True, None) == "detector"
    assert pick_metric(["bluefire-shira-wm", "mine"], True, None) == "pixel"
    assert concept_kept(plain, glowing, glowing, "detector", "bluefire") == 1.0
    assert concept_kept(plain, glowing, plain, "detector", "bluefire") == 0.0
    assert concept_kept(plain, glowing, glowing, "pixel") == 1.0 and concept_kept(plain, glowing, plain, "pixel") == 0.0


def test_image_embedding_concept_figure_with_a_local_clip(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    from shira_diffusion.compare import ImageEncoder, concept_kept, encoded_once, pick_metric

    config = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=32,
                              patch_size=8, projection_dim=8)
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path / "clip")
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path / "clip")
    encoder = ImageEncoder(str(tmp_path / "clip"))
    base, alone = Image.new("RGB", (64, 64), (20, 20, 200)), Image.new("RGB", (64, 64), (220, 40, 10))
    half = Image.blend(base, alone, 0.5)
    assert pick_metric(["x"], False, encoder) == "embedding"
    assert concept_kept(base, alone, alone, "embedding", encoder=encoder) == pytest.approx(1.0, abs=1e-6)
    assert concept_kept(base, alone, base, "embedding", encoder=encoder) == pytest.approx(0.0, abs=1e-6)
    assert concept_kept(base, alone, half, "embedding", encoder=encoder) != pytest.approx(0.0, abs=1e-6)
    seen = []  # a figure embeds its references once, not once per cell

    def counting(images):
        seen.extend(images)
        return encoder(images)

    once = encoded_once(counting)
    cells = [half, Image.blend(base, alone, 0.25), alone]
    figures = [concept_kept(base, alone, c, "embedding", encoder=once) for c in cells]
    assert figures == pytest.approx([concept_kept(base, alone, c, "embedding", encoder=encoder) for c in cells], abs=1e-5)
    assert len(seen) == 4 and all(any(im is s for s in seen) for im in (base, alone, *cells[:2]))
