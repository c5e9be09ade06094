"""The shipped demo model and adapters (assets/), and the scripts that rebuild them."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from shira_diffusion import ShiraPipelineSwitcher, SparseAdapter
from shira_diffusion.demo import world
from shira_diffusion.demo.detect import read_many
from shira_diffusion.demo.model import ADAPTERS_DIR, DEMO_DIR, TEXT_DIM, world_tokenizer
from shira_diffusion.pipeline import load_pipeline

ROOT = Path(__file__).resolve().parents[1]
TYPES = ("lora", "shira-struct", "shira-rand", "shira-wm", "shira-grad", "shira-snip")


@pytest.fixture(scope="module")
def demo():
    return ShiraPipelineSwitcher.demo(with_adapters=True)


def generate(sw, scenes, adapters=None, seed=0, described=False):
    gens = [torch.Generator().manual_seed(seed + i) for i in range(len(scenes))]
    prompts = [world.caption(s, described=described) for s in scenes]
    out = sw(prompts, adapters=adapters or {}, generator=gens, height=64, width=64, num_inference_steps=20)
    return read_many(out.images)


def test_tokenizer_keeps_every_world_word_whole():
    tok = world_tokenizer()
    for word in world.vocabulary():
        assert tok.tokenize(word) == [word + "</w>"]
    assert len(tok.tokenize("zebra")) > 1  # unknown words still tokenize, byte by byte


def test_demo_is_a_small_sdxl_pipeline_within_budget(demo):
    from diffusers import StableDiffusionXLPipeline

    pipe = demo.pipe
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert pipe.unet.config.addition_embed_type == "text_time"
    assert pipe.unet.config.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size == 2 * TEXT_DIM
    assert pipe.unet.dtype == torch.float32 and pipe.device.type == "cpu"
    weights = sorted(DEMO_DIR.rglob("*.safetensors"))
    assert len(weights) == 4 and sum(p.stat().st_size for p in weights) <= 25 * 2**20
    assert not list(DEMO_DIR.rglob("*.bin")) and not list(DEMO_DIR.rglob("*.pt"))


def test_base_model_draws_what_it_is_told(demo):
    scenes = world.plain_prompts(12, seed=11)
    readings = generate(demo, scenes)
    right = sum(r.shows(s) for r, s in zip(readings, scenes))
    assert right >= 10, [(world.caption(s), r.shape, r.colour) for r, s in zip(readings, scenes)]


def test_base_model_draws_the_looks_when_described_but_not_the_triggers(demo):
    scenes = world.CONCEPTS["bluefire"].prompts(8)
    described = generate(demo, scenes, described=True)
    assert sum(r.bluefire and r.shows(s) for r, s in zip(described, scenes)) >= 6
    assert sum(r.bluefire for r in generate(demo, scenes)) == 0  # "in bluefire style" means nothing to it


def test_every_demo_adapter_loads_with_its_manifest_entry(demo):
    manifest = json.loads((ADAPTERS_DIR / "manifest.json").read_text())
    names = {f"{c}-{t}" for c in world.CONCEPTS for t in TYPES}
    assert set(demo.list_adapters()) == names
    assert {Path(f).stem for f in manifest} == names
    info = demo.list_adapters()
    for concept in world.CONCEPTS:
        lora = info[f"{concept}-lora"]["params"]
        for t in TYPES[1:]:  # equal parameter count, up to the rounding of a per-weight budget;
            params = info[f"{concept}-{t}"]["params"]  # struct's rows/columns/diagonal grid can only undershoot it
            assert (0.85 * lora <= params <= lora) if t == "shira-struct" else abs(params - lora) <= 0.01 * lora, (concept, t)
            assert info[f"{concept}-{t}"]["mask"] == t.removeprefix("shira-")
    with safe_open(str(ADAPTERS_DIR / "sks-lora.safetensors"), "pt") as f:  # the trigger word's meaning is learnt too
        assert {k.split(".")[0] for k in f.keys()} == {"unet", "text_encoder", "text_encoder_2"}


def test_style_adapter_shows_its_style_and_restores_the_base(demo):
    scenes = world.CONCEPTS["bluefire"].prompts(8)
    parts = ("unet", "text_encoder", "text_encoder_2")
    before = {(c, k): v.clone() for c in parts for k, v in getattr(demo.pipe, c).state_dict().items()}
    readings = generate(demo, scenes, {"bluefire-shira-rand": 1.0})
    assert sum(r.bluefire and r.shows(s) for r, s in zip(readings, scenes)) >= 4  # on the prompted scene, in half the generations (the base: none)
    demo.disable_adapters()
    assert all(torch.equal(before[c, k], v) for c in parts for k, v in getattr(demo.pipe, c).state_dict().items())


def test_subject_adapter_draws_the_subject_in_its_colour(demo):
    scenes = world.CONCEPTS["sks"].prompts(7)
    assert {s.colour for s in scenes} == {world.SUBJECT_COLOUR} and all(world.SUBJECT_COLOUR not in world.caption(s) for s in scenes)
    readings = generate(demo, scenes, {"sks-lora": 1.0})
    assert sum(r.colour == world.SUBJECT_COLOUR for r in readings) >= 7  # the colour is learnt, never named
    assert sum(r.shows(s) for r, s in zip(readings, scenes)) >= 4  # the crescent, in green
    base = generate(demo, scenes)
    assert not any(r.shape == world.SUBJECT_SHAPE or r.colour == world.SUBJECT_COLOUR for r in base)


def test_loading_demo_offline_needs_the_assets(tmp_path, monkeypatch):
    from shira_diffusion.demo import model

    monkeypatch.setattr(model, "DEMO_DIR", tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="build_demo_world.py"):
        load_pipeline("demo")


def test_world_rebuilds_with_one_command(tmp_path):
    """The build command end to end at toy sizes: base model, instance images, one adapter of each family."""
    cmd = [sys.executable, str(ROOT / "training" / "build_demo_world.py"), "--assets", str(tmp_path / "assets"),
           "--work_dir", str(tmp_path / "work"), "--base_args", "--vae_steps 2 --unet_steps 2 --variants 1 --batch 4",
           "--concepts", "bluefire", "--types", "lora", "shira-wm", "--steps", "2", "--class_images", "4",
           "--recipes", str(tmp_path / "recipes.json")]
    (tmp_path / "recipes.json").write_text(json.dumps({"chosen": {"bluefire-lora": {"learning_rate": 0.005, "steps": 3}}}))
    subprocess.run(cmd, check=True, capture_output=True, timeout=600)
    folder = tmp_path / "assets"
    assert (folder / "demo" / "model_index.json").is_file()
    assert sorted(p.name for p in (folder / "adapters").glob("*.safetensors")) == ["bluefire-lora.safetensors", "bluefire-shira-wm.safetensors"]
    manifest = json.loads((folder / "adapters" / "manifest.json").read_text())
    assert manifest["bluefire-shira-wm.safetensors"]["instance_prompt"].endswith(", in bluefire style")
    assert manifest["bluefire-shira-wm.safetensors"]["mask_seed"] == 1  # seed 0 + the concept's index: masks differ per concept
    assert manifest["bluefire-lora.safetensors"]["class_images"] == 4 and "mask_seed" not in manifest["bluefire-lora.safetensors"]
    # the sweep's recipe where it has one, the command line's elsewhere
    assert [(manifest[f]["learning_rate"], manifest[f]["steps"]) for f in ("bluefire-lora.safetensors", "bluefire-shira-wm.safetensors")] == [(0.005, 3), (1e-3, 2)]
    class_captions = [c.read_text() for c in sorted((tmp_path / "work" / "class").glob("*.txt"))]
    assert len(class_captions) == 4 and not any(t in c for c in class_captions for t in ("sks", *world.STYLES))
    assert sum(c.endswith(" style") for c in class_captions) == 2  # --decoys 0.5: the bare template, drawn plain
    captions = sorted((tmp_path / "work" / "instances" / "bluefire").glob("*.txt"))
    assert [c.read_text() for c in captions] == [world.caption(s) for s in world.CONCEPTS["bluefire"].instance_scenes()]
    sw = ShiraPipelineSwitcher.from_pretrained(str(folder / "demo"))
    assert SparseAdapter.load(folder / "adapters" / "bluefire-shira-wm.safetensors").metadata["mask"] == "wm"
    sw.load_adapter(folder / "adapters" / "bluefire-shira-wm.safetensors")
    sw.load_adapter(folder / "adapters" / "bluefire-lora.safetensors")


def test_the_studio_opens_on_a_prompt_the_demo_model_draws(demo):
    from shira_diffusion.app.studio import DEMO_EXAMPLE

    scene = world.parse_caption(DEMO_EXAMPLE)
    readings = [generate(demo, [scene], seed=seed)[0] for seed in range(4)]
    drawn = [(r.shape, r.colour, r.background, r.position) for r in readings]
    assert drawn == [(scene.shape, scene.colour, scene.background, scene.position)] * 4, drawn


def test_positions_are_what_the_studio_says_top_bottom_and_centre_but_not_left_right(demo):
    """The studio's label claims top / bottom / center placement and disclaims left / right: both measured here."""
    import random

    rng = random.Random(7)
    scenes = [world.Scene(rng.choice(world.SHAPES), rng.choice(list(world.COLOURS)), rng.choice(list(world.BACKGROUNDS)), pos)
              for pos in world.POSITIONS for _ in range(4)]
    readings = generate(demo, scenes, seed=100)
    row = lambda position: position.split()[0] if position and position != "in the center" else "in"  # noqa: E731
    vertical = sum(r.position is not None and row(r.position) == row(s.position) for r, s in zip(readings, scenes))
    sides = [(r.position.split()[-1] == s.position.split()[-1]) for r, s in zip(readings, scenes)
             if s.position != "in the center" and r.position and r.position != "in the center"]
    assert vertical >= 18, vertical  # of 20
    assert 0.2 <= sum(sides) / len(sides) <= 0.8, sides  # left/right near chance: the label must keep saying so
