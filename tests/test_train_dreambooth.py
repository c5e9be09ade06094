"""End-to-end runs of training/train_shira_dreambooth.py on the tiny pipeline saved to disk."""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from shira_diffusion import ShiraEngine, SparseAdapter, find_targets
from shira_diffusion.testing import tiny_sd_pipeline, tiny_sdxl_pipeline

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "training" / "train_shira_dreambooth.py"
# `accelerate launch` through this interpreter, never a bare `accelerate` from PATH
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]


def env_without_venv_on_path(**extra) -> dict:
    """The environment of a user who ran ``.venv/bin/python -m pytest`` without activating the venv."""
    bin_dir = str(Path(sys.executable).parent)
    path = os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep) if p and p != bin_dir)
    return {**os.environ, "PATH": path, "HF_HUB_OFFLINE": "1", **extra}


def _load_script():
    spec = importlib.util.spec_from_file_location("train_shira_dreambooth", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train = _load_script()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    tiny_sdxl_pipeline(seed=0).save_pretrained(root / "model")
    tiny_sd_pipeline(seed=0).save_pretrained(root / "model_sd15")  # Stable Diffusion 1.5's layout
    tiny_sdxl_pipeline(seed=0).to(torch.float16).save_pretrained(root / "model_fp16")  # as shira_diffusion/assets/demo and hub SDXL ship
    images = root / "instance"
    images.mkdir()
    for i, colour in enumerate(["red", "blue", "green"]):
        im = Image.new("RGB", (80, 64), "white")
        ImageDraw.Draw(im).ellipse((10 + 5 * i, 8, 60, 56), fill=colour)
        im.save(images / f"img{i}.png")
    (images / "img1.txt").write_text("a photo of sks blob in blue")
    (images / "broken.png").write_bytes(b"not an image")
    return root


def base_args(world, out, *extra):
    budget = [] if "--lora_equivalent_rank" in extra else ["--density", "0.05"]
    return [*budget,
        "--pretrained_model_name_or_path", str(world / "model"),
        "--instance_data_dir", str(world / "instance"),
        "--instance_prompt", "a photo of sks blob",
        "--output_dir", str(out),
        "--resolution", "64",
        "--train_batch_size", "2",
        "--max_train_steps", "3",
        "--learning_rate", "1e-3",
        "--mixed_precision", "no",
        "--save_dtype", "fp32",
        *extra,
    ]


@pytest.fixture(autouse=True)
def _fresh_accelerate_state():
    yield
    _reset()


def render(pipe_dir, adapter=None):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(pipe_dir))
    pipe.set_progress_bar_config(disable=True)
    if adapter is not None:
        engine = ShiraEngine(pipe)
        engine.stage("a", adapter)
        engine.apply("a")
    return pipe("a photo of sks blob", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="pt").images


def test_documented_accelerate_command_trains_and_writes_a_loadable_adapter(world, tmp_path):
    out = tmp_path / "out"
    cmd = [*ACCELERATE, "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(SCRIPT), *base_args(world, out, "--mask", "rand", "--gradient_checkpointing")]
    env = env_without_venv_on_path(ACCELERATE_USE_CPU="1")
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "skipped 1 unreadable image(s)" in run.stderr
    cores = len(os.sched_getaffinity(0))
    assert f"{cores} CPU thread(s) per process" in run.stderr  # not the 1 thread accelerate launch leaves
    adapter = SparseAdapter.load(out / "shira_adapter.safetensors")
    targets = find_targets(tiny_sdxl_pipeline())
    assert set(adapter.deltas) == set(targets)
    assert adapter.metadata["mask"] == "rand" and adapter.metadata["base_model"] == "model"  # the folder's name, not this machine's path
    assert all(d.nnz == round(0.05 * d.numel) for d in adapter.deltas.values())
    assert sum(int(torch.count_nonzero(d.values)) for d in adapter.deltas.values()) > 0.5 * adapter.num_params
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 3 and summary["trainable_params"] == adapter.num_params
    assert not torch.equal(render(world / "model"), render(world / "model", adapter))


@pytest.mark.parametrize(
    "mask,extra",
    [
        ("wm", ["--cache_latents"]),
        ("grad", ["--snr_gamma", "5.0", "--noise_offset", "0.05"]),
        ("snip", ["--mixed_precision", "bf16", "--cache_latents"]),
        ("struct", ["--random_flip", "--center_crop", "--repeats", "2"]),
    ],
)
def test_each_mask_kind_trains(world, tmp_path, mask, extra):
    args = base_args(world, tmp_path, "--mask", mask, "--max_train_steps", "2", "--calibration_steps", "2")
    if "--mixed_precision" in extra:
        i = args.index("--mixed_precision")
        del args[i : i + 2]
    path = train.main(args + extra)
    adapter = SparseAdapter.load(path)
    assert adapter.metadata["mask"] == mask
    assert sum(int(torch.count_nonzero(d.values)) for d in adapter.deltas.values()) > 0


def test_text_encoders_train_too(world, tmp_path):
    path = train.main(base_args(world, tmp_path, "--train_text_encoder", "--max_train_steps", "2", "--text_encoder_lr", "5e-3"))
    adapter = SparseAdapter.load(path)
    assert set(adapter.components) == {"unet", "text_encoder", "text_encoder_2"}
    te = [d for k, d in adapter.deltas.items() if k.startswith("text_encoder")]
    assert te and sum(int(torch.count_nonzero(d.values)) for d in te) > 0


def test_stable_diffusion_1_5_trains_shira_and_lora_with_its_one_text_encoder(world, tmp_path):
    from diffusers import StableDiffusionPipeline

    from shira_diffusion import ShiraPipelineSwitcher

    args = ["--pretrained_model_name_or_path", str(world / "model_sd15"), "--max_train_steps", "2", "--validation_prompt", "sks",
            "--num_validation_images", "1", "--validation_inference_steps", "2"]
    shira = train.main(base_args(world, tmp_path / "shira", "--train_text_encoder", *args))
    adapter = SparseAdapter.load(shira)
    assert set(adapter.components) == {"unet", "text_encoder"}  # no text_encoder_2 asked of a one-encoder model
    assert (tmp_path / "shira" / "validation").is_dir()
    lora = train.main(base_args(world, tmp_path / "lora", "--adapter_type", "lora", "--train_text_encoder", *args))
    pipe = StableDiffusionPipeline.from_pretrained(str(world / "model_sd15"))
    pipe.set_progress_bar_config(disable=True)
    sw = ShiraPipelineSwitcher(pipe)
    sw.load_adapter(shira, "shira")
    sw.load_adapter(lora, "lora")
    assert sorted(sw.list_adapters()["lora"]["components"]) == ["text_encoder", "unet"]

    def image(adapters):
        return sw("a photo of sks blob", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt",
                  adapters=adapters).images

    base = image(None)
    assert not torch.equal(image("shira"), base) and not torch.equal(image("lora"), base)
    assert torch.equal(image(None), base)


def test_unsupported_pipeline_classes_are_refused_before_loading(world, tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    folder = tmp_path / "img2img"
    StableDiffusionXLImg2ImgPipeline.from_pipe(tiny_sdxl_pipeline(), dtype=torch.float32).save_pretrained(folder)
    args = base_args(world, tmp_path / "out")
    args[args.index("--pretrained_model_name_or_path") + 1] = str(folder)
    with pytest.raises(SystemExit, match="StableDiffusionXLImg2ImgPipeline is not supported; train an SDXL"):
        train.main(args)


def test_prior_preservation_generates_missing_class_images(world, tmp_path):
    classes = tmp_path / "class"
    path = train.main(base_args(world, tmp_path / "out", "--with_prior_preservation", "--class_data_dir", str(classes),
                                "--class_prompt", "a photo of a blob", "--num_class_images", "2", "--sample_batch_size", "2",
                                "--max_train_steps", "2"))
    assert len(list(classes.glob("*.png"))) == 2
    assert SparseAdapter.load(path).num_params > 0


def test_class_images_use_their_caption_files(world, tmp_path, monkeypatch):
    from PIL import Image

    classes = tmp_path / "class"
    classes.mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (64, 64), colour).save(classes / f"{i}.png")
    (classes / "0.txt").write_text("a red square")  # 1.png has no caption: it takes --class_prompt
    seen = []
    encode = train.encode_prompts
    monkeypatch.setattr(train, "encode_prompts", lambda models, prompts: seen.extend(prompts) or encode(models, prompts))
    train.main(base_args(world, tmp_path / "out", "--with_prior_preservation", "--class_data_dir", str(classes),
                         "--class_prompt", "a blob", "--num_class_images", "2", "--max_train_steps", "1"))
    assert {"a red square", "a blob"} <= set(seen)


def test_lora_adapter_type_writes_diffusers_lora(world, tmp_path):
    path = train.main(base_args(world, tmp_path, "--adapter_type", "lora", "--lora_equivalent_rank", "2", "--max_train_steps", "2", "--train_text_encoder"))
    assert path.name == "pytorch_lora_weights.safetensors"
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(str(world / "model"))
    pipe.load_lora_weights(str(path))
    lora_params = sum(p.numel() for c in ("unet", "text_encoder", "text_encoder_2") for n, p in getattr(pipe, c).named_parameters() if "lora_" in n)
    targets = find_targets(tiny_sdxl_pipeline(), ["unet", "text_encoder", "text_encoder_2"])
    # SDXL reads text encoder 1's penultimate layer: its last layer (of 5 here) is not adapted
    unused = {k for k in targets if k.startswith("text_encoder.") and ".layers.4." in k}
    te1_lora = [n for n in pipe.text_encoder.state_dict() if "lora_" in n]
    assert len(unused) == 4 and te1_lora and not any(".layers.4." in n for n in te1_lora)
    assert any(".layers.4." in n for n in pipe.text_encoder_2.state_dict() if "lora_" in n)  # its last layer feeds the pooled output
    assert lora_params == sum(2 * (w.shape[0] + w.shape[1]) for k, w in targets.items() if k not in unused)


def test_resume_from_checkpoint_is_bit_exact(world, tmp_path):
    import shutil

    common = ["--max_train_steps", "4", "--checkpointing_steps", "2", "--gradient_accumulation_steps", "2",
              "--lr_scheduler", "cosine", "--lr_warmup_steps", "1", "--checkpoints_total_limit", "1"]
    straight_dir = tmp_path / "straight"
    straight = SparseAdapter.load(train.main(base_args(world, straight_dir, *common)))
    assert sorted(p.name for p in straight_dir.glob("checkpoint-*")) == ["checkpoint-2"]
    assert SparseAdapter.load(straight_dir / "checkpoint-2" / "shira_adapter.safetensors").num_params == straight.num_params

    # a run that stopped right after its step-2 checkpoint
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(straight_dir / "checkpoint-2", resumed_dir / "checkpoint-2")
    _reset()
    resumed = SparseAdapter.load(train.main(base_args(world, resumed_dir, *common, "--resume_from_checkpoint", "latest")))
    assert json.loads((resumed_dir / "training_summary.json").read_text())["steps"] == 4
    for key, d in straight.deltas.items():
        assert torch.equal(d.values, resumed.deltas[key].values), key


def _reset():
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def test_validation_images_are_written(world, tmp_path):
    train.main(base_args(world, tmp_path, "--max_train_steps", "2", "--validation_prompt", "a sks blob", "--num_validation_images", "1",
                         "--validation_steps", "1", "--validation_inference_steps", "2"))
    assert sorted(p.name for p in (tmp_path / "validation").glob("*.png")) == ["step-000001-0.png", "step-000002-0.png"]


def test_missing_or_empty_instance_folder_is_a_clear_error(world, tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        train.main(base_args(world, tmp_path, "--instance_data_dir", str(tmp_path / "nope")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        train.main(base_args(world, tmp_path, "--instance_data_dir", str(tmp_path / "empty")))


def test_help_lists_the_shira_options():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for flag in ("--mask", "--lora_equivalent_rank", "--calibration_steps", "--adapter_type", "--resume_from_checkpoint", "--cache_latents"):
        assert flag in out.stdout


def test_captions_from_metadata_jsonl_and_txt(tmp_path):
    sys.path.insert(0, str(ROOT / "training"))
    from dreambooth_data import load_examples, read_captions

    for name in ("a.png", "b.png", "c.png"):
        Image.new("RGB", (64, 96), "red").save(tmp_path / name)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "from jsonl"}\n')
    (tmp_path / "b.txt").write_text("from txt\n")
    assert read_captions(tmp_path) == {"a.png": "from jsonl", "b": "from txt"}
    examples = load_examples(tmp_path, "default", 32)
    assert [e.prompt for e in examples] == ["from jsonl", "from txt", "default"]
    assert examples[0].pixels.shape == (3, 32, 32) and examples[0].original_size == (96, 64)
    (tmp_path / "metadata.jsonl").write_text('{"file": "a.png"}\n')
    with pytest.raises(ValueError, match="metadata.jsonl:1: expected"):
        read_captions(tmp_path)


def test_missing_optional_optimizers_say_how_to_install(monkeypatch):
    args = train.parse_args(["--pretrained_model_name_or_path", "x", "--instance_data_dir", "x", "--instance_prompt", "x",
                             "--output_dir", "x", "--use_8bit_adam"])
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(SystemExit, match="pip install bitsandbytes"):
        train.make_optimizer(args, [{"params": [torch.nn.Parameter(torch.zeros(2))]}])
    args.use_8bit_adam, args.optimizer = False, "prodigy"
    monkeypatch.setitem(sys.modules, "prodigyopt", None)
    with pytest.raises(SystemExit, match="pip install prodigyopt"):
        train.make_optimizer(args, [{"params": [torch.nn.Parameter(torch.zeros(2))]}])


def test_two_process_ddp_run_matches_the_adapter_format(world, tmp_path):
    out = tmp_path / "ddp"
    cmd = [*ACCELERATE, "--multi_gpu" if torch.cuda.device_count() > 1 else "--cpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
           *base_args(world, out, "--train_batch_size", "1", "--max_train_steps", "2")]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env_without_venv_on_path(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    adapter = SparseAdapter.load(out / "shira_adapter.safetensors")
    assert sum(int(torch.count_nonzero(d.values)) for d in adapter.deltas.values()) > 0


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_validation_on_an_fp16_folder_on_a_cpu(world, tmp_path, precision):
    """Saved in fp16 (as shira_diffusion/assets/demo is): validation and class images run in the training dtype, the VAE in fp32."""
    args = base_args(world, tmp_path, "--pretrained_model_name_or_path", str(world / "model_fp16"), "--max_train_steps", "1",
                     "--cache_latents", "--validation_prompt", "a sks blob", "--num_validation_images", "1",
                     "--validation_inference_steps", "2", "--with_prior_preservation", "--class_data_dir", str(tmp_path / "class"),
                     "--class_prompt", "a blob", "--num_class_images", "1")
    i = args.index("--mixed_precision")
    args[i + 1] = precision
    train.main(args)
    assert [p.name for p in (tmp_path / "validation").glob("*.png")] == ["step-000001-0.png"]
    assert len(list((tmp_path / "class").glob("*.png"))) == 1
    assert json.loads((tmp_path / "training_summary.json").read_text())["steps"] == 1


def test_resolution_defaults_to_the_native_size_and_warns_far_from_it(caplog):
    import logging

    args = train.parse_args(["--pretrained_model_name_or_path", "demo", "--instance_data_dir", "x", "--instance_prompt", "x", "--output_dir", "x"])
    assert args.resolution is None and Path(args.pretrained_model_name_or_path).name == "demo"
    with caplog.at_level(logging.INFO, logger="train_shira_dreambooth"):
        train.check_resolution(args, 64)
        assert args.resolution == 64 and not [r for r in caplog.records if r.levelno >= logging.WARNING]
        args.resolution = 1024
        train.check_resolution(args, 64)
    assert "--resolution 1024 is far from the model's native 64 px" in caplog.text
    components = tiny_sdxl_pipeline().components
    assert train.native_resolution(components) == 64  # sample_size 32 x VAE downsampling 2


def readme_commands(marker: str) -> list[list[str]]:
    """The commands of the README's fenced block after ``marker``, one argv each."""
    import shlex

    text = (ROOT / "README.md").read_text()
    start = text.index("```bash", text.index(marker)) + len("```bash")
    block = text[start : text.index("```", start)].replace("\\\n", " ")
    return [shlex.split(line) for line in block.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_the_documented_demo_recipe_learns_on_the_shipped_fp16_demo(tmp_path):
    from shira_diffusion import ShiraPipelineSwitcher

    commands = readme_commands("<!-- demo-recipe")
    assert [c[:3] for c in commands] == [["python", "-m", "shira_diffusion.demo"], ["accelerate", "launch", "training/train_shira_dreambooth.py"]]
    local = lambda argv: [str(tmp_path / a) if a.startswith(("data/", "out/")) else a for a in argv]  # noqa: E731
    instances, training = map(local, commands)
    run = subprocess.run([sys.executable, *instances[1:]], cwd=ROOT, capture_output=True, text=True, env=env_without_venv_on_path(), timeout=120)
    assert run.returncode == 0, run.stderr
    assert len(list((tmp_path / "data" / "sks").glob("*.png"))) == 5
    toy = ["--max_train_steps", "20", "--num_validation_images", "1", "--validation_inference_steps", "4"]  # argparse: the last one wins
    run = subprocess.run([*ACCELERATE, "--num_processes", "1", "--num_machines", "1", "--dynamo_backend", "no", *training[2:], *toy],
                         cwd=ROOT, capture_output=True, text=True, env=env_without_venv_on_path(), timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    out = tmp_path / "out" / "sks"
    assert (out / "validation" / "step-000020-0.png").is_file() and json.loads((out / "training_summary.json").read_text())["steps"] == 20
    adapter = SparseAdapter.load(out / "shira_adapter.safetensors")
    assert adapter.metadata["base_model"] == "demo" and set(adapter.components) == {"unet", "text_encoder", "text_encoder_2"}
    prompt = training[training.index("--validation_prompt") + 1]
    sw = ShiraPipelineSwitcher.demo()
    sw.load_adapter(adapter, adapter_name="sks")
    images = [sw(prompt, adapters=a, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
              for a in (None, "sks")]
    assert (images[0] - images[1]).abs().max() > 1 / 255  # the adapter changes the prompted image


# ---- correct at scale: several processes, memory, loss weighting, augmentation ----------------------

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(prediction):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(prediction_type=prediction)
    t = torch.tensor([0, 10, 250, 500, 999])
    snr = compute_snr(scheduler, t)
    want = torch.minimum(snr, torch.full_like(snr, 5.0)) / (snr + 1 if prediction == "v_prediction" else snr)
    assert torch.equal(train.min_snr_weights(scheduler, t, 5.0), want)
    if prediction == "v_prediction":  # not divided by snr as well
        assert not torch.allclose(want, torch.minimum(snr, torch.full_like(snr, 5.0)) / snr / (snr + 1))


@pytest.mark.parametrize("mask", ["grad", "snip"])
def test_two_processes_choose_one_mask_and_export_it(world, tmp_path, mask):
    out = tmp_path / "out"
    # two real processes on a CPU (MULTI_CPU over gloo): `--cpu --num_processes 2` would start one
    cmd = [*ACCELERATE, "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(SCRIPT), *base_args(world, out, "--mask", mask, "--max_train_steps", "1", "--calibration_steps", "2", "--train_batch_size", "1")]
    env = env_without_venv_on_path(ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    digest = re.search(r"mask digest ([0-9a-f]{16}), the same on 2 process\(es\)", run.stderr)
    assert digest, run.stderr[-2000:]
    adapter = SparseAdapter.load(out / "shira_adapter.safetensors")
    assert f"{train.mask_digest({k: d.indices for k, d in adapter.deltas.items()}):016x}" == digest.group(1)


def test_processes_that_disagree_on_the_mask_stop():
    class TwoRanks:
        device = torch.device("cpu")

        def gather(self, t):
            return torch.cat([t, t + 1])

    with pytest.raises(RuntimeError, match="the processes chose different masks"):
        train.agreed_masks(TwoRanks(), {"unet.a": torch.tensor([1, 2])})


def test_sparse_training_state_is_not_a_buffer_ddp_would_resend():
    from shira_diffusion.training import SparseTraining

    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    sparse = SparseTraining({"unet": model}, {"unet.0": torch.tensor([1, 5, 7])})
    assert list(model.buffers()) == [] and model[0].shira_mask.flat().tolist() == [1, 5, 7]
    sparse.remove()
    assert not hasattr(model[0], "shira_mask") and not hasattr(model[0], "shira_base")


def test_checkpointing_is_on_before_calibration_and_calibration_stays_on_the_device(world, tmp_path, monkeypatch):
    seen = {}
    real = train.calibration_scores

    def spy(weights, loss_fn, batches):
        models_unet = next(iter(weights.values()))
        seen["device"] = models_unet.device
        seen["checkpointing"] = unet_ref["unet"].is_gradient_checkpointing
        out = real(weights, loss_fn, batches)
        seen["score_devices"] = {v.device for v in out.values()}
        return out

    unet_ref = {}
    load = train.load_components
    monkeypatch.setattr(train, "load_components", lambda args: unet_ref.update(load(args)) or unet_ref)
    monkeypatch.setattr(train, "calibration_scores", spy)
    train.main(base_args(world, tmp_path, "--mask", "grad", "--max_train_steps", "1", "--calibration_steps", "1", "--gradient_checkpointing"))
    assert seen["checkpointing"] is True and seen["score_devices"] == {seen["device"]}


def test_each_epoch_draws_its_own_crop_and_flip_and_the_noise_changes_per_step(world):
    from types import SimpleNamespace

    from dreambooth_data import load_examples

    examples = load_examples(world / "instance", "a blob", 48, random_flip=True, seed=3)  # 80x64 images: room to crop
    args = SimpleNamespace(repeats=1, train_batch_size=1, seed=3, random_flip=True, center_crop=False, cache_latents=False)
    batches = train.Batches(args, examples, [], 0, 1)
    views = [(e.crop_top_left, e.flipped) for step in range(0, 30, 3) for e in batches(step)[0]]
    assert len(set(views)) > 3 and views == [(e.crop_top_left, e.flipped) for step in range(0, 30, 3) for e in batches(step)[0]]
    first = batches(0)[0][0]
    assert first in examples  # epoch 0: the views drawn at load
    for view in (e for step in range(3, 30, 3) for e in batches(step)[0]):
        assert view.pixels.shape == (3, 48, 48) and any(view.image is x.image for x in examples)  # no copy of the image
    cached = train.Batches(SimpleNamespace(**{**vars(args), "cache_latents": True}), examples, [], 0, 1)
    assert all(e in examples for step in range(30) for e in cached(step)[0])  # cached latents keep their views
    mean, std = torch.zeros(2, 4, 8, 8), torch.ones(2, 4, 8, 8)
    a, b = train.posterior_sample(mean, std, 0, 5), train.posterior_sample(mean, std, 0, 6)
    assert torch.equal(a, train.posterior_sample(mean, std, 0, 5)) and not torch.equal(a, b) and not torch.equal(a[0], a[1])


def test_a_flipped_view_is_the_mirror_of_the_same_crop():
    from dreambooth_data import Example

    image = torch.arange(3 * 4 * 6, dtype=torch.uint8).view(3, 4, 6)
    plain = Example(image, "p", (4, 6), (0, 1), False)
    mirrored = Example(image, "p", (4, 6), (0, 6 - 1 - 4), True)  # the corner as on the flipped image
    assert torch.equal(mirrored.pixels, plain.pixels.flip(-1))


def test_class_images_are_generated_in_the_prior_generation_precision(world, tmp_path, monkeypatch):
    dtypes = []
    real = train.render
    monkeypatch.setattr(train, "render", lambda pipe, prompt, dtype, **kw: dtypes.append(dtype) or real(pipe, prompt, dtype, **kw))
    train.main(base_args(world, tmp_path / "out", "--with_prior_preservation", "--class_data_dir", str(tmp_path / "cls"),
                         "--class_prompt", "a blob", "--num_class_images", "1", "--max_train_steps", "1",
                         "--prior_generation_precision", "bf16"))
    assert dtypes == [torch.bfloat16] and len(list((tmp_path / "cls").glob("*.png"))) == 1


def test_the_output_folder_has_a_model_card_and_is_what_push_to_hub_uploads(world, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class Repo:
        repo_id = "me/sks-blob"

    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.setdefault("create", (repo_id, kw)) and Repo())
    monkeypatch.setattr(huggingface_hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw))
    out = tmp_path / "sks-blob"
    train.main(base_args(world, out, "--max_train_steps", "2", "--validation_prompt", "a sks blob", "--num_validation_images", "2",
                         "--validation_steps", "1", "--validation_inference_steps", "2", "--push_to_hub", "--hub_token", "secret"))
    card = huggingface_hub.ModelCard.load(out / "README.md")
    assert "shira" in card.data.tags and card.data.instance_prompt == "a photo of sks blob"
    text = card.text
    assert "trigger prompt: `a photo of sks blob`" in text and "mask: `rand`, density 0.05" in text
    shown = [line for line in text.splitlines() if line.startswith("![")]
    assert shown == ["![step-000002-0](validation/step-000002-0.png)", "![step-000002-1](validation/step-000002-1.png)"]
    assert all((out / line.split("(")[1].rstrip(")")).is_file() for line in shown)
    assert '"max_train_steps": 2' in text and "secret" not in text  # the arguments, never the token
    assert calls["create"] == ("sks-blob", {"exist_ok": True, "token": "secret"})
    upload = calls["upload"]
    assert upload["repo_id"] == "me/sks-blob" and upload["folder_path"] == str(out) and "checkpoint-*" in upload["ignore_patterns"]


@pytest.mark.parametrize("adapter_type", ["shira", "lora"])
def test_targets_beyond_attention_train_and_apply(world, tmp_path, adapter_type):
    """Feed-forward, proj_in/proj_out and ResNet convolutions, as kohya users train them."""
    path = train.main(base_args(world, tmp_path, "--targets", "unet:attn,ff,proj,conv", "--max_train_steps", "2",
                                "--adapter_type", adapter_type, *(["--lora_equivalent_rank", "2"] if adapter_type == "lora" else [])))
    pipe = tiny_sdxl_pipeline()
    sw = __import__("shira_diffusion").ShiraPipelineSwitcher(pipe)
    name = sw.load_adapter(path, "a")
    keys = set(sw.get_adapter(name).deltas)
    assert any(k.endswith("resnets.0.conv1") for k in keys) and any(k.endswith("ff.net.2") for k in keys)
    assert any(k.endswith("proj_in") for k in keys) and any(k.endswith("to_q") for k in keys)
    conv = pipe.unet.down_blocks[0].resnets[0].conv1.weight
    before = conv.detach().clone()
    sw.set_adapters("a")
    assert not torch.equal(conv, before)  # a 4-D weight written in place
    sw.disable_adapters()
    assert torch.equal(conv, before)


def test_bad_target_specs_are_refused_by_the_parser(world, tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(base_args(world, tmp_path, "--targets", "vae:*"))
    assert "unknown component 'vae'" in capsys.readouterr().err


def test_a_datasets_dataset_trains_from_disk_and_from_an_imagefolder(world, tmp_path):
    import datasets

    images = [Image.new("RGB", (72, 64), colour) for colour in ("red", "blue")]
    data = datasets.Dataset.from_dict({"picture": images, "caption": ["a sks blob in red", ""]}).cast_column("picture", datasets.Image())
    data.save_to_disk(str(tmp_path / "saved"))
    args = base_args(world, tmp_path / "out", "--max_train_steps", "1")
    args[args.index("--instance_data_dir"):args.index("--instance_data_dir") + 2] = ["--dataset_name", str(tmp_path / "saved"),
                                                                                      "--image_column", "picture", "--caption_column", "caption"]
    seen = []
    encode = train.encode_prompts
    train.encode_prompts = lambda models, prompts: seen.extend(prompts) or encode(models, prompts)
    try:
        SparseAdapter.load(train.main(args))
    finally:
        train.encode_prompts = encode
    assert set(seen) == {"a sks blob in red", "a photo of sks blob"}  # the empty caption takes --instance_prompt
    folder = tmp_path / "imagefolder"
    folder.mkdir()
    images[0].save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a sks blob"}\n')
    args2 = [a if a != str(tmp_path / "saved") else str(folder) for a in args]
    args2 = [a for a in args2 if a not in ("--image_column", "picture", "--caption_column", "caption")]
    args2[args2.index("--output_dir") + 1] = str(tmp_path / "out2")
    _reset()
    assert SparseAdapter.load(train.main(args2)).num_params > 0
    with pytest.raises(ValueError, match="no column 'caption'"):
        _reset()
        train.main(args2 + ["--caption_column", "caption"])
    with pytest.raises(SystemExit):
        train.parse_args(args + ["--instance_data_dir", str(world / "instance")])


def test_memory_held_counts_each_part_the_run_keeps():
    from shira_diffusion.training import SparseTraining

    model = torch.nn.Sequential(torch.nn.Linear(8, 4)).requires_grad_(False)
    sparse = SparseTraining({"unet": model}, {"unet.0": torch.tensor([0, 3, 9])})
    optimizer = torch.optim.AdamW(sparse.parameters())
    held = train.memory_held({"unet": model, "tokenizer": object()}, sparse.parameters(), optimizer)
    # the mask: an int16 column per entry and an int32 count per row; the base values: fp32 here
    assert held == {"frozen model": (32 + 4) * 4, "trainable": 12, "gradients": 12, "optimizer state": 24, "masks": 3 * 2 + 4 * 4 + 3 * 4}


def test_caption_dropout_empties_instance_captions_at_the_rate_statelessly(world, tmp_path, monkeypatch):
    prompts = ["a"] * 8 + ["class"] * 8
    drawn = [train.dropped_captions(prompts, 8, 0.5, 0, step) for step in range(200)]
    share = sum(p == "" for d in drawn for p in d[:8]) / (200 * 8)
    assert 0.45 < share < 0.55 and all(d[8:] == ["class"] * 8 for d in drawn)  # class captions are never dropped
    assert drawn[7] == train.dropped_captions(prompts, 8, 0.5, 0, 7) and train.dropped_captions(prompts, 8, 0.0, 0, 7) == prompts
    seen = []
    encode = train.encode_prompts
    monkeypatch.setattr(train, "encode_prompts", lambda models, p: seen.extend(p) or encode(models, p))
    train.main(base_args(world, tmp_path, "--max_train_steps", "1", "--caption_dropout_rate", "0.3"))
    assert "" in seen  # the empty prompt is encoded once, with the others


def test_aspect_ratio_buckets_keep_each_batch_one_size_with_its_micro_conditioning(world, tmp_path):
    from types import SimpleNamespace

    from dreambooth_data import load_examples, sdxl_buckets

    folder = tmp_path / "shapes"
    folder.mkdir()
    for i, (w, h) in enumerate([(128, 64), (130, 66), (64, 128), (64, 64), (66, 64), (126, 62)]):
        Image.new("RGB", (w, h), ["red", "blue", "green"][i % 3]).save(folder / f"{i}.png")
    buckets = sdxl_buckets(64, 32, 128, 16)
    assert (64, 64) in buckets and (48, 80) in buckets and (80, 48) in buckets
    examples = load_examples(folder, "a blob", 64, random_flip=True, seed=0, buckets=buckets)
    assert sorted(e.target for e in examples) == [(48, 80)] * 3 + [(64, 64)] * 2 + [(80, 48)]
    assert all(e.pixels.shape[1:] == e.target for e in examples)
    args = SimpleNamespace(repeats=1, train_batch_size=2, seed=0, random_flip=True, center_crop=False, cache_latents=False)
    batches = train.Batches(args, examples, [], 0, 1)
    assert batches.per_epoch == 4  # 2 + 1 + 1 batches of at most 2, one size each
    for step in range(12):
        inst, _ = batches(step)
        assert len({e.target for e in inst}) == 1
        ids = train.time_ids(inst)
        assert ids[:, 4:].tolist() == [list(inst[0].target)] * 2  # target size: the bucket
    wide = next(e for e in examples if e.original_size == (64, 128))
    assert train.time_ids([wide])[0, :2].tolist() == [64, 128]
    out = tmp_path / "out"
    args = base_args(world, out, "--enable_bucket", "--min_bucket_reso", "32", "--max_bucket_reso", "128", "--bucket_reso_steps", "16",
                     "--max_train_steps", "3")
    args[args.index("--instance_data_dir") + 1] = str(folder)
    assert SparseAdapter.load(train.main(args)).num_params > 0
    # prior preservation: missing class images are generated at the instance buckets' sizes
    classes = tmp_path / "classes"
    _reset()
    train.main(args + ["--with_prior_preservation", "--class_data_dir", str(classes), "--class_prompt", "a blob", "--num_class_images", "3",
                       "--sample_batch_size", "1", "--output_dir", str(tmp_path / "out2")])
    assert sorted(Image.open(p).size for p in classes.glob("*.png")) == [(48, 80), (64, 64), (80, 48)]  # (width, height)
    klass = load_examples(classes, "a blob", 64, buckets=buckets)
    bucketed = train.Batches(SimpleNamespace(repeats=1, train_batch_size=2, seed=0, random_flip=False, center_crop=True, cache_latents=False),
                             examples, klass, 0, 1)
    for step in range(8):
        inst, cls = bucketed(step)
        assert {e.target for e in inst + cls} == {inst[0].target} and len(cls) == 2
    with pytest.raises(ValueError, match="no class image in bucket"):
        train.Batches(SimpleNamespace(repeats=1, train_batch_size=2, seed=0, random_flip=False, center_crop=True, cache_latents=False),
                      examples, [e for e in klass if e.target == (64, 64)], 0, 1)


def test_dataloader_workers_build_the_same_batches(world, tmp_path):
    """Crops, flips and stacking in 2 worker processes: the same adapter, bit for bit, as in the loop."""
    common = ["--max_train_steps", "3", "--random_flip"]
    inline = SparseAdapter.load(train.main(base_args(world, tmp_path / "inline", *common)))
    _reset()
    workers = SparseAdapter.load(train.main(base_args(world, tmp_path / "workers", *common, "--dataloader_num_workers", "2")))
    assert all(torch.equal(d.values, workers.deltas[k].values) for k, d in inline.deltas.items())
    assert len(train.StepImages(None, 5, 8)) == 3 and len(train.StepImages(None, 8, 8)) == 0  # a resumed run starts at its step


def test_validation_reuses_the_components_set_aside_instead_of_reading_them_again(world, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel

    reads = {"text_encoder": 0, "vae": 0}
    for cls, key in ((CLIPTextModel, "text_encoder"), (AutoencoderKL, "vae")):
        real = cls.from_pretrained.__func__
        monkeypatch.setattr(cls, "from_pretrained", classmethod(lambda c, *a, _r=real, _k=key, **kw: reads.__setitem__(_k, reads[_k] + 1) or _r(c, *a, **kw)))
    train.main(base_args(world, tmp_path, "--max_train_steps", "2", "--cache_latents", "--validation_prompt", "a sks blob",
                         "--num_validation_images", "1", "--validation_steps", "1", "--validation_inference_steps", "2"))
    assert len(list((tmp_path / "validation").glob("*.png"))) == 2  # steps 1 and 2 (the final validation is step 2 again)
    assert reads == {"text_encoder": 1, "vae": 1}  # the loads for training only
