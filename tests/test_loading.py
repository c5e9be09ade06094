"""Loading real pipelines: variants, offload, a separate VAE, compile, supported classes, and the
pipelines built on the same components (img2img, inpainting, ControlNet, SD 1.5)."""

import contextlib

import pytest
import torch

from shira_diffusion import ShiraPipelineSwitcher, find_targets
from shira_diffusion import loading, pipeline as switcher_module
from shira_diffusion.loading import load_pipeline, vae_memory
from shira_diffusion.testing import random_adapter, tiny_sd_pipeline, tiny_sdxl_pipeline


def image(run, **kwargs):
    return run("a red square", num_inference_steps=2, height=64, width=64, output_type="np",
               generator=torch.Generator().manual_seed(0), **kwargs).images


def unet_state(pipe):
    return {k: v.detach().clone() for k, v in pipe.unet.state_dict().items()}


def adapters_for(pipe):
    weights = find_targets(pipe)
    return (random_adapter(weights, "rand", density=0.05, seed=1, std=0.3),
            random_adapter(weights, "wm", density=0.05, seed=2, std=0.3))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A diffusers folder with full fp32 files (seed 0) and an fp16 variant of other weights (seed 1),
    one with no variant, and a separate VAE (seed 2)."""
    root = tmp_path_factory.mktemp("models")
    tiny_sdxl_pipeline(seed=0).save_pretrained(root / "both")
    tiny_sdxl_pipeline(seed=1).to(torch.float16).save_pretrained(root / "both", variant="fp16")
    tiny_sdxl_pipeline(seed=0).save_pretrained(root / "plain")
    tiny_sdxl_pipeline(seed=2).vae.save_pretrained(root / "vae")
    return root


def test_fp16_reads_the_fp16_variant_where_there_is_one_and_the_full_files_where_not(folders):
    seed1 = tiny_sdxl_pipeline(seed=1).unet.state_dict()
    seed0 = tiny_sdxl_pipeline(seed=0).unet.state_dict()
    key = "conv_in.weight"
    fp16 = load_pipeline(str(folders / "both"), device="cpu", dtype="fp16")
    assert fp16.unet.dtype == torch.float16 and torch.equal(fp16.unet.state_dict()[key], seed1[key].half())
    fp32 = load_pipeline(str(folders / "both"), device="cpu", dtype="fp32")  # fp32 never reads the fp16 files
    assert fp32.unet.dtype == torch.float32 and torch.equal(fp32.unet.state_dict()[key], seed0[key])
    fallback = load_pipeline(str(folders / "plain"), device="cpu", dtype="fp16")
    assert fallback.unet.dtype == torch.float16 and torch.equal(fallback.unet.state_dict()[key], seed0[key].half())


def test_a_separate_vae_replaces_the_pipelines_own(folders):
    want = tiny_sdxl_pipeline(seed=2).vae.state_dict()
    for model in (str(folders / "plain"), "tiny"):
        pipe = load_pipeline(model, device="cpu", dtype="fp32", vae=str(folders / "vae"))
        assert all(torch.equal(v, want[k]) for k, v in pipe.vae.state_dict().items())
    pipe = load_pipeline(str(folders / "plain"), device="cpu", dtype="fp32", vae=str(folders / "plain"))  # a pipeline folder: its vae/
    assert torch.equal(pipe.vae.state_dict()["decoder.conv_out.weight"], tiny_sdxl_pipeline(seed=0).vae.state_dict()["decoder.conv_out.weight"])
    pickled = folders / "vae.ckpt"
    pickled.write_bytes(b"\x80\x04K\x01.")
    with pytest.raises(ValueError, match="VAE files must be .safetensors"):
        load_pipeline("tiny", device="cpu", vae=str(pickled))


def test_loader_keywords_pass_through_and_bad_options_are_refused(folders, monkeypatch):
    with pytest.raises(ValueError, match="offload must be one of none, model, sequential"):
        load_pipeline("tiny", offload="gpu")
    with pytest.raises(ValueError, match="offload and device_map both place the pipeline"):
        load_pipeline("tiny", offload="model", device_map="balanced")
    with pytest.raises(ValueError, match="config= is for single-file checkpoints"):
        load_pipeline(str(folders / "plain"), config=str(folders / "plain"))
    seen = {}
    real = loading._pretrained

    def spy(cls, source, dtype, kwargs):
        seen.update(kwargs)
        return real(cls, source, dtype, kwargs)

    monkeypatch.setattr(loading, "_pretrained", spy)
    pipe = load_pipeline(str(folders / "plain"), device="cpu", dtype="fp32", local_files_only=True, low_cpu_mem_usage=True)
    assert seen == {"local_files_only": True, "low_cpu_mem_usage": True} and pipe.unet.device.type == "cpu"


def test_model_offload_keeps_adapters_exact_and_images_equal_to_no_offload():
    plain = ShiraPipelineSwitcher(load_pipeline("tiny", device="cpu", dtype="fp32"))
    offloaded = ShiraPipelineSwitcher(load_pipeline("tiny", device="cpu", dtype="fp32", offload="model"))
    assert hasattr(offloaded.pipe.unet, "_hf_hook")  # accelerate's hook: the UNet moves per call
    before = unet_state(offloaded.pipe)
    a, b = adapters_for(plain.pipe)
    for sw in (plain, offloaded):
        sw.load_adapter(a, "a")
        sw.load_adapter(b, "b")
    assert (image(offloaded) == image(plain)).all()
    for wanted in ("a", {"a": 1.0, "b": 0.5}):
        assert (image(offloaded, adapters=wanted) == image(plain, adapters=wanted)).all()
    assert not (image(offloaded, adapters="a") == image(offloaded, adapters=None)).all()
    offloaded.disable_adapters()
    assert all(torch.equal(v, before[k]) for k, v in offloaded.pipe.unet.state_dict().items())


def test_sequential_offload_either_works_or_says_why_before_touching_the_pipeline():
    """torch 2.13 with accelerate 1.15 hands a layer's weight back as a plain tensor, which its own
    next move to meta rejects: the loader probes that on a 2x2 layer and names the way out."""
    try:
        loading.check_sequential_offload("cpu")
    except ValueError as err:
        assert "sequential offload does not work with torch" in str(err) and "offload='model'" in str(err)
        with pytest.raises(ValueError, match="sequential offload does not work"):
            load_pipeline("tiny", device="cpu", dtype="fp32", offload="sequential")
        return
    plain = ShiraPipelineSwitcher(load_pipeline("tiny", device="cpu", dtype="fp32"))
    offloaded = ShiraPipelineSwitcher(load_pipeline("tiny", device="cpu", dtype="fp32", offload="sequential"))
    a, _ = adapters_for(plain.pipe)
    for sw in (plain, offloaded):
        sw.load_adapter(a, "a")
    assert (image(offloaded, adapters="a") == image(plain, adapters="a")).all()


def test_compiled_unet_follows_every_switch_without_recompiling():
    from torch._dynamo.utils import counters

    compiled = ShiraPipelineSwitcher(load_pipeline("tiny", device="cpu", dtype="fp32", compile=True))
    eager = ShiraPipelineSwitcher(load_pipeline("tiny", device="cpu", dtype="fp32"))
    assert compiled.pipe.unet._compiled_call_impl is not None  # compiled in place: the same module object
    a, b = adapters_for(eager.pipe)
    for sw in (compiled, eager):
        sw.load_adapter(a, "a")
        sw.load_adapter(b, "b")
    base = image(compiled)
    graphs = counters["stats"]["unique_graphs"]
    for wanted in ("a", {"a": 1.0, "b": 0.5}, "b"):
        out = image(compiled, adapters=wanted)
        assert abs(out - base).max() > 1e-3  # the compiled graph reads the switched weights
        assert abs(out - image(eager, adapters=wanted)).max() < 1e-4
    assert counters["stats"]["unique_graphs"] == graphs  # 0 recompiles
    assert (image(compiled, adapters=None) == base).all()


def test_vae_decodes_large_images_in_tiles_for_that_call_only(monkeypatch):
    pipe = tiny_sdxl_pipeline(seed=0)
    with vae_memory(pipe, 1024, 1024, 1):
        assert not pipe.vae.use_tiling and not pipe.vae.use_slicing
    with vae_memory(pipe, 1024, 1032, 1):
        assert pipe.vae.use_tiling and pipe.vae.use_slicing
    with vae_memory(pipe, None, None, 4):  # the default size (here 64x64): batches decode one by one
        assert not pipe.vae.use_tiling and pipe.vae.use_slicing
    assert not pipe.vae.use_tiling and not pipe.vae.use_slicing
    seen = []

    @contextlib.contextmanager
    def spy(p, height, width, images):
        seen.append((height, width, images))
        yield

    monkeypatch.setattr(switcher_module, "vae_memory", spy)
    sw = ShiraPipelineSwitcher(pipe)
    image(sw)
    sw(["a", "b"], num_inference_steps=1, height=64, width=96, num_images_per_prompt=2, output_type="latent")
    assert seen == [(64, 64, 1), (64, 96, 4)]


def test_unsupported_pipeline_classes_are_named(tmp_path):
    from diffusers import StableDiffusionXLImg2ImgPipeline

    StableDiffusionXLImg2ImgPipeline.from_pipe(tiny_sdxl_pipeline(), dtype=torch.float32).save_pretrained(tmp_path / "img2img")
    with pytest.raises(ValueError, match="StableDiffusionXLImg2ImgPipeline is not supported: load an SDXL"):
        load_pipeline(str(tmp_path / "img2img"), device="cpu")


# ---- pipelines on the same components -----------------------------------------------------------

def test_img2img_and_inpaint_run_on_the_switchers_own_weights():
    pipe = tiny_sdxl_pipeline(seed=0).to(torch.float16)  # from_pipe would cast shared components to fp32 by default
    sw = ShiraPipelineSwitcher(pipe)
    a, _ = adapters_for(pipe)
    sw.load_adapter(a.to(dtype=torch.float16), "a")
    before = unet_state(pipe)
    init = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    for kind, run, extra in (("img2img", sw.img2img, {"image": init, "strength": 0.7}),
                             ("inpaint", sw.inpaint, {"image": init, "mask_image": mask, "strength": 0.9})):
        other = sw.pipeline(kind)
        assert other.unet is pipe.unet and other.text_encoder is pipe.text_encoder and other.vae is pipe.vae
        assert type(other).__name__ == {"img2img": "StableDiffusionXLImg2ImgPipeline", "inpaint": "StableDiffusionXLInpaintPipeline"}[kind]
        assert sw.pipeline(kind) is other and pipe.unet.dtype == torch.float16
        base = image(run, adapters=None, **extra)
        adapted = image(run, adapters="a", **extra)
        assert sw.get_active_adapters() == ["a"] and abs(adapted.astype("float32") - base).max() > 1e-3
        assert (image(run, adapters=None, **extra) == base).all()
        assert all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())  # bit-exact restore
    with pytest.raises(ValueError, match="unknown pipeline kind 'upscale'"):
        sw.pipeline("upscale")


def test_a_controlnet_pipeline_shares_the_unet_and_its_adapters():
    from diffusers import ControlNetModel

    pipe = tiny_sdxl_pipeline(seed=0)
    sw = ShiraPipelineSwitcher(pipe)
    a, _ = adapters_for(pipe)
    sw.load_adapter(a, "a")
    controlnet = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32)).eval()  # /2: the tiny VAE's scale
    cn = sw.pipeline("text2img", controlnet=controlnet)
    assert type(cn).__name__ == "StableDiffusionXLControlNetPipeline" and cn.unet is pipe.unet
    hint = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    base = image(lambda *a, **k: sw.generate(cn, *a, **k), image=hint, adapters=None)
    adapted = image(lambda *a, **k: sw.generate(cn, *a, **k), image=hint, adapters="a")
    assert abs(adapted - base).max() > 1e-3 and sw.pipeline("text2img", controlnet=controlnet) is cn
    assert sw.pipeline("text2img") is pipe


def test_stable_diffusion_1_5_pipelines_switch_and_fuse_like_sdxl():
    pipe = tiny_sd_pipeline(seed=0)
    sw = ShiraPipelineSwitcher(pipe)
    targets = find_targets(pipe)
    assert targets and {k.split(".")[0] for k in targets} == {"unet"}
    assert all(k.rsplit(".", 1)[-1] in {"to_q", "to_k", "to_v", "0"} for k in targets)
    a, b = adapters_for(pipe)
    sw.load_adapter(a, "a")
    sw.load_adapter(b, "b")
    before = unet_state(pipe)
    base = image(sw)
    one, both = image(sw, adapters="a"), image(sw, adapters={"a": 1.0, "b": 0.7})
    assert abs(one - base).max() > 1e-3 and abs(both - one).max() > 1e-3
    i2i = sw.pipeline("img2img")
    assert type(i2i).__name__ == "StableDiffusionImg2ImgPipeline" and i2i.unet is pipe.unet
    grid, details = sw.compare("a red square", ["a", "b"], seeds=[0], num_inference_steps=2, height=64, width=64,
                               return_details=True)
    assert details["columns"] == ["base", "a", "b", "a+b"] and set(details["concept"]) == {"a", "b"}
    assert (details["images"][0]["base"].tobytes() != details["images"][0]["a+b"].tobytes()) and grid.width >= 4 * 64
    sw.disable_adapters()
    assert (image(sw) == base).all() and all(torch.equal(v, before[k]) for k, v in pipe.unet.state_dict().items())


def test_a_single_file_checkpoint_loads_offline_from_a_local_config_folder(tmp_path, monkeypatch):
    """The original single-file layout (written here from the tiny SD 1.5 pipeline) plus a
    diffusers folder for its configs and tokenizer: nothing is fetched."""
    from safetensors.torch import save_file

    from shira_diffusion.testing import original_checkpoint

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe = tiny_sd_pipeline(seed=0)
    pipe.save_pretrained(tmp_path / "config")
    save_file(original_checkpoint(pipe), str(tmp_path / "model.safetensors"))
    sw = ShiraPipelineSwitcher.from_single_file(str(tmp_path / "model.safetensors"), "fp32", "cpu", config=str(tmp_path / "config"))
    assert type(sw.pipe).__name__ == "StableDiffusionPipeline"
    for name in ("unet", "vae", "text_encoder"):
        want = getattr(pipe, name).state_dict()
        assert all(torch.equal(v, want[k]) for k, v in getattr(sw.pipe, name).state_dict().items()), name
    a, _ = adapters_for(sw.pipe)
    sw.load_adapter(a, "a")
    assert not (image(sw, adapters="a") == image(sw, adapters=None)).all()
