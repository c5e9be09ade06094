import itertools
import random
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from shira_diffusion.demo import world
from shira_diffusion.demo.detect import accuracy, read, read_many
from shira_diffusion.demo.world import (
    BACKGROUNDS,
    COLOURS,
    CONCEPTS,
    POSITIONS,
    REPORTED,
    SHAPES,
    STYLES,
    SUBJECT_COLOUR,
    SUBJECT_SHAPE,
    Scene,
    caption,
    render,
    subject_scene,
    vocabulary,
)

SEED = 4242  # held out: the detectors' thresholds were chosen on other seeds
ATTRIBUTES = ("background", "colour", "shape", "position", "bluefire", "paintings")


@pytest.mark.parametrize("degrade,floor", [(False, 0.98), (True, 0.95)])
def test_detectors_are_accurate_on_held_out_renders(degrade, floor):
    acc = accuracy(n=400, seed=SEED, degrade=degrade)
    assert set(acc) == set(ATTRIBUTES)
    assert all(v >= floor for v in acc.values()), acc


@pytest.mark.parametrize(
    "scene",
    [
        Scene("star", "purple", "white", "top right", "bluefire"),
        Scene("circle", "red"),
        Scene("square", "yellow", "black", "top left", "bluefire", radius=13.0),
        Scene("triangle", "green", "gray", "bottom right", "paintings", offset=(2.0, -2.0)),
        Scene("crescent", "orange", "black", "bottom left", "paintings", radius=16.5),
        Scene("crescent", "purple", "white", "in the center", "bluefire"),
    ],
)
def test_reads_hand_written_scenes(scene):
    r = read(render(scene))
    want = (scene.background, scene.colour, scene.shape, scene.position, scene.style == "bluefire", scene.style == "paintings")
    assert tuple(getattr(r, k) for k in ATTRIBUTES) == want
    assert r.shape_iou > 0.85


def test_reads_arrays_any_size_and_batches():
    image = render(Scene("star", "purple", "white", "top right", "bluefire"))
    r = read(image)
    assert read(np.asarray(image)) == r
    big = read(image.resize((256, 256), Image.NEAREST))
    assert (big.shape, big.colour, big.position, big.bluefire) == ("star", "purple", "top right", True)
    assert read_many([image, image]) == [r, r]


def test_reads_the_subject():
    r = read(render(subject_scene(random.Random(0))))
    assert (r.shape, r.colour) == (SUBJECT_SHAPE, SUBJECT_COLOUR) == ("crescent", "green")


@pytest.mark.parametrize("background", list(BACKGROUNDS))
def test_empty_background_has_no_object(background):
    plain = np.full((64, 64, 3), BACKGROUNDS[background], dtype=np.uint8)
    noisy = np.clip(plain + np.random.default_rng(0).normal(0, 8, plain.shape), 0, 255).astype(np.uint8)
    for image in (plain, noisy):
        r = read(image)
        assert (r.background, r.colour, r.shape, r.position, r.bluefire, r.paintings) == (background, None, None, None, False, False)


def test_render_is_deterministic():
    scene = Scene("star", "purple", "gray", "top left", "paintings", radius=14.2, offset=(1.5, -0.5))
    a, b = render(scene), render(scene)
    assert a.size == (64, 64) and a.mode == "RGB"
    assert a.tobytes() == b.tobytes()
    pixels = np.asarray(render(Scene("circle", "red")))
    assert tuple(pixels[0, 0]) == BACKGROUNDS["white"] and tuple(pixels[32, 32]) == COLOURS["red"]


def test_captions():
    assert caption(Scene("circle", "red")) == "a red circle on a white background, in the center"
    assert caption(Scene("star", "purple", "black", "top right", "bluefire")) == "a purple star on a black background, top right, in bluefire style"
    assert caption(Scene(SUBJECT_SHAPE, "orange", "gray", "bottom left")) == "a sks shape on a gray background, bottom left"
    assert caption(Scene(SUBJECT_SHAPE, "orange", style="paintings")) == "a sks shape on a white background, in the center, in paintings style"
    scene = Scene("square", "green", "gray", "bottom right", "paintings")
    assert caption(scene) == caption(scene)
    assert caption(scene, described=True) == "a green square on a gray background, bottom right, with a striped fill"
    assert caption(Scene("star", "red", style="bluefire"), described=True) == "a red star on a white background, in the center, with a glowing outline"
    assert caption(Scene("star", "red"), described=True) == caption(Scene("star", "red"))  # no style: nothing to describe


def test_vocabulary_covers_every_caption():
    vocab = set(vocabulary())
    grid = itertools.product((*SHAPES, SUBJECT_SHAPE), COLOURS, BACKGROUNDS, POSITIONS, (None, *STYLES))
    words = {w for args in grid for d in (False, True) for w in caption(Scene(*args), described=d).replace(",", " ").split()}  # punctuation is its own token
    assert words <= vocab, words - vocab


def test_reading_shows_the_scenes_shape_in_its_colour():
    scene = Scene("star", "green", "black", "top left", "paintings")
    reading = read(render(scene))
    assert reading.shows(scene) and reading.shows(Scene("star", "green"))  # background, position, style aside
    assert not reading.shows(Scene("star", "red")) and not reading.shows(Scene("circle", "green"))


def test_instance_sets_are_varied():
    """No colour, shape or background may dominate a style's instance set (the trigger would absorb it)."""
    for concept in CONCEPTS.values():
        scenes = concept.instance_scenes(5, seed=0)
        assert concept.instance_scenes(5, seed=0) == scenes and concept.instance_scenes(5, seed=1) != scenes
        assert len({s.position for s in scenes}) == 5
        assert sorted(Counter(s.background for s in scenes).values()) == [1, 2, 2]
        if concept.style is None:
            assert {(s.shape, s.colour, s.style) for s in scenes} == {(SUBJECT_SHAPE, SUBJECT_COLOUR, None)}
        else:
            assert {s.style for s in scenes} == {concept.style}
            assert sorted(s.colour for s in scenes) == sorted(COLOURS)
            assert set(s.shape for s in scenes) == set(SHAPES)


def test_parse_caption_inverts_caption_and_names_what_the_world_lacks():
    import random

    scenes = [world.random_scene(random.Random(i), style=(None, *world.STYLES)[i % 3]) for i in range(60)]
    scenes.append(world.subject_scene(random.Random(0)))
    for scene in scenes:
        for described in (False, True):
            parsed = world.parse_caption(world.caption(scene, described=described))
            assert (parsed.shape, parsed.colour, parsed.background, parsed.position, parsed.style) == \
                (scene.shape, scene.colour, scene.background, scene.position, scene.style)
    with pytest.raises(ValueError, match="no colour 'blue' in the demo world"):
        world.parse_caption("a blue star on a white background, top left")
    with pytest.raises(ValueError, match="draws captions like"):
        world.parse_caption("a photo of a red square")


def test_instances_command_writes_images_with_captions(tmp_path, capsys):
    from shira_diffusion.demo.__main__ import main

    assert main(["instances", "bluefire", str(tmp_path / "bf")]) == 0
    captions = sorted(p.read_text() for p in (tmp_path / "bf").glob("*.txt"))
    assert len(captions) == 5 == len(list((tmp_path / "bf").glob("*.png")))
    assert captions == sorted(world.caption(s) for s in world.CONCEPTS["bluefire"].instance_scenes(5, 0))
    caption = "a purple star on a gray background, in the center, in paintings style"
    assert main(["instances", "--caption", caption, "-n", "3", str(tmp_path / "mine")]) == 0
    assert [p.read_text() for p in sorted((tmp_path / "mine").glob("*.txt"))] == [caption] * 3
    assert f"--instance_prompt {caption!r}" in capsys.readouterr().out
    assert main(["instances", "--caption", "a photo of a dog", str(tmp_path / "x")]) == 2
    assert "draws captions like" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_validation_prompts_are_disjoint_from_the_reported_ones_and_the_instances():
    for concept in CONCEPTS.values():
        validation = [caption(s) for s in concept.validation_prompts()]
        reported = [caption(s) for s in concept.prompts(REPORTED, at_most=True)]  # what the benchmark reports on
        instances = {caption(s) for s in concept.instance_scenes()}
        assert len(set(validation)) == concept.validation and len(set(reported)) == (7 if concept.style is None else 24)
        assert reported[:6] == [caption(s) for s in concept.prompts(6)]  # more prompts extend the same draw
        assert not set(validation) & set(reported) and not (set(validation) | set(reported)) & instances
        assert validation == [caption(s) for s in concept.validation_prompts()]  # seeded
    with pytest.raises(ValueError, match="fewer than 8 held-out prompts .after 3 kept for validation"):
        CONCEPTS["sks"].prompts(8)  # 15 captions: 5 instances, 3 validation, 7 left


def test_decoy_captions_use_the_style_template_without_a_trigger():
    scene = Scene("star", "red", style="bluefire")
    assert world.decoy_caption(scene, "neon") == "a red star on a white background, in the center, in neon style"
    assert not set(world.DECOYS) & {*STYLES, world.SUBJECT_TOKEN}
