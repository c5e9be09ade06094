import torch

from shira_diffusion import budget, find_targets, fingerprint
from shira_diffusion.targets import resolve_weight
from shira_diffusion.testing import sdxl_unet, tiny_sdxl_pipeline


def test_tiny_pipeline_generates_64px_images_deterministically(tiny_pipe):
    def render(seed):
        return tiny_pipe("a blue circle", num_inference_steps=2, generator=torch.Generator().manual_seed(seed), output_type="pt").images

    a, b = render(0), render(0)
    assert a.shape == (1, 3, 64, 64)
    assert torch.equal(a, b)
    assert not torch.equal(a, render(1))


def test_tiny_pipeline_is_reproducible_from_its_seed(tiny_pipe):
    other = tiny_sdxl_pipeline(seed=0)
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        mine, theirs = getattr(tiny_pipe, name).state_dict(), getattr(other, name).state_dict()
        assert all(torch.equal(mine[k], theirs[k]) for k in mine), name
    assert not torch.equal(tiny_sdxl_pipeline(seed=1).unet.conv_in.weight, other.unet.conv_in.weight)


def test_tiny_pipeline_has_sdxl_layout(tiny_pipe):
    assert tiny_pipe.unet.config.addition_embed_type == "text_time"
    unet = find_targets(tiny_pipe)
    assert len(unet) == 96 and all(k.startswith("unet.") for k in unet)
    text = find_targets(tiny_pipe, ["text_encoder", "text_encoder_2"])
    assert len(text) == 2 * 5 * 4
    assert {k.rsplit(".", 1)[1] for k in text} == {"q_proj", "k_proj", "v_proj", "out_proj"}


def test_full_sdxl_unet_targets_match_sdxl_base():
    unet = sdxl_unet(device="meta")
    targets = find_targets({"unet": unet})
    assert len(targets) == 560
    assert sum(budget(w.shape, rank=16) for w in targets.values()) == 23_224_320
    assert sum(p.numel() for p in unet.parameters()) == 2_567_463_684


def test_targets_by_regex_and_fingerprint(tiny_pipe):
    only_q = find_targets(tiny_pipe, {"unet": ["re:.*attn2\\.to_q"]})
    assert only_q and all(k.endswith("attn2.to_q") for k in only_q)
    targets = find_targets(tiny_pipe)
    assert fingerprint(targets) == fingerprint({k: tuple(w.shape) for k, w in targets.items()})
    assert fingerprint(targets) != fingerprint(only_q)
    key = next(iter(targets))
    assert resolve_weight({"unet": tiny_pipe.unet}, key) is targets[key]
