"""SDXL-architecture models built offline, for tests, benchmarks and the no-download demo.

``tiny_sdxl_pipeline`` is a complete ``StableDiffusionXLPipeline`` (two CLIP text encoders, a
tokenizer over a vocabulary written here, a UNet with ``text_time`` conditioning, a VAE) small
enough to generate 64x64 images on a CPU in seconds. ``sdxl_unet`` is the full-size SDXL-base UNet
with random weights: real shapes and layer counts for timing and memory, no download.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

# The SDXL 1.0 base UNet configuration (diffusers format).
SDXL_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}


def sdxl_unet(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int = 0):
    """The full-size SDXL-base UNet with random weights, built in seconds.

    Modules are created on the meta device (skipping diffusers' slow default init), then
    materialised and filled with small normal noise. ``device="meta"`` returns it unmaterialised,
    which is enough to count layers and shapes.
    """
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(SDXL_UNET_CONFIG)
    # nn.Module.to: diffusers' own .to() warns about fp32-only modules, which SDXL's UNet has none of
    torch.nn.Module.to(unet, dtype)
    if str(device) == "meta":
        return unet
    unet = unet.to_empty(device=device)
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0.0, 0.02, generator=g)
    unet.eval().requires_grad_(False)
    return unet


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 style byte -> printable character map that CLIP's byte-level BPE expects."""
    keep = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def byte_bpe_tokenizer(merges: list[tuple[str, str]], max_length: int):
    """A CLIP tokenizer whose vocabulary is every byte (alone and word-final) plus one token per merge."""
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {}
    for suffix in ("", "</w>"):
        for ch in _bytes_to_unicode().values():
            vocab[ch + suffix] = len(vocab)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def tiny_clip_tokenizer(max_length: int = 77):
    return byte_bpe_tokenizer([("t", "h"), ("th", "e</w>"), ("i", "n"), ("o", "n</w>")], max_length)


def _tiny_unet(seed: int, **layout):
    """Two blocks of 32/64 channels, frozen; ``layout`` adds the family's conditioning."""
    from diffusers import UNet2DConditionModel

    with _seeded(seed):
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=2,
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4),
            norm_num_groups=1,
            **layout,
        )
    return unet.eval().requires_grad_(False)


def tiny_sdxl_unet(seed: int = 0):
    """A tiny UNet2DConditionModel with SDXL's layout (``text_time`` conditioning, 2 blocks)."""
    return _tiny_unet(
        seed,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
        cross_attention_dim=64,  # 32 + 32 from the two text encoders
    )


def tiny_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """The modules of :func:`tiny_sdxl_pipeline`, seeded so that equal seeds give equal weights."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = tiny_clip_tokenizer()
    unet = tiny_sdxl_unet(seed)
    with _seeded(seed):
        vae = AutoencoderKL(
            block_out_channels=[32, 64],
            in_channels=3,
            out_channels=3,
            down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
            up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
            latent_channels=4,
            norm_num_groups=1,
            sample_size=64,
        )
        text_config = CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=32,
            intermediate_size=37,
            layer_norm_eps=1e-05,
            num_attention_heads=4,
            num_hidden_layers=5,
            vocab_size=len(tokenizer),
            hidden_act="gelu",
            projection_dim=32,
        )
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        timestep_spacing="leading",
        steps_offset=1,
    )
    for module in (vae, text_encoder, text_encoder_2):
        module.eval().requires_grad_(False)
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tiny_clip_tokenizer(),
        "scheduler": scheduler,
    }


def tiny_sdxl_pipeline(seed: int = 0):
    """A tiny random-weight ``StableDiffusionXLPipeline``; 64x64 output, fully offline."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**tiny_sdxl_components(seed), add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd_pipeline(seed: int = 0):
    """A tiny random-weight ``StableDiffusionPipeline`` (the Stable Diffusion 1.5 layout: one CLIP
    text encoder, no added conditioning); 64x64 output, fully offline."""
    from diffusers import StableDiffusionPipeline

    parts = tiny_sdxl_components(seed)
    unet = _tiny_unet(seed + 1, cross_attention_dim=32)  # one 32-wide text encoder
    pipe = StableDiffusionPipeline(unet=unet, vae=parts["vae"], text_encoder=parts["text_encoder"],
                                   tokenizer=parts["tokenizer"], scheduler=parts["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


# diffusers -> original (ldm) names inside a VAE block (the UNet's are the kohya reader's)
_VAE_RESNET = [("conv_shortcut.", "nin_shortcut.")]
_VAE_ATTN = [("group_norm.", "norm."), ("to_q.", "q."), ("to_k.", "k."), ("to_v.", "v."), ("to_out.0.", "proj_out.")]


def _renamed(state: dict, prefixes: dict[str, str], inner, top: str) -> dict:
    out = {}
    for key, value in state.items():
        hit = max((p for p in prefixes if key.startswith(p)), key=len)
        rest = key[len(hit):]
        for a, b in inner(hit):
            if rest.startswith(a):
                rest = b + rest[len(a):]
                break
        out[top + prefixes[hit] + rest] = value
    return out


def _unet_to_ldm(unet) -> dict:
    from .kohya import ldm_name, ldm_unet_prefixes

    prefixes = ldm_unet_prefixes(unet.config)
    return {"model.diffusion_model." + ldm_name(k, prefixes): v for k, v in unet.state_dict().items()}


def _vae_to_ldm(vae) -> dict:
    n, lpb = len(vae.config.block_out_channels), vae.config.layers_per_block
    prefix = {f"{side}.{name}.": f"{side}.{name}." for side in ("encoder", "decoder") for name in ("conv_in", "conv_out")}
    prefix.update({"encoder.conv_norm_out.": "encoder.norm_out.", "decoder.conv_norm_out.": "decoder.norm_out.",
                   "quant_conv.": "quant_conv.", "post_quant_conv.": "post_quant_conv."})
    for side in ("encoder", "decoder"):
        prefix[f"{side}.mid_block.attentions.0."] = f"{side}.mid.attn_1."
        prefix.update({f"{side}.mid_block.resnets.{j}.": f"{side}.mid.block_{j + 1}." for j in range(2)})
    for i in range(n):
        prefix.update({f"encoder.down_blocks.{i}.resnets.{j}.": f"encoder.down.{i}.block.{j}." for j in range(lpb)})
        prefix.update({f"decoder.up_blocks.{i}.resnets.{j}.": f"decoder.up.{n - 1 - i}.block.{j}." for j in range(lpb + 1)})
        if i < n - 1:
            prefix[f"encoder.down_blocks.{i}.downsamplers.0."] = f"encoder.down.{i}.downsample."
            prefix[f"decoder.up_blocks.{i}.upsamplers.0."] = f"decoder.up.{n - 1 - i}.upsample."
    out = _renamed(vae.state_dict(), prefix, lambda hit: _VAE_RESNET if "resnets" in hit else _VAE_ATTN if "attentions" in hit else [],
                   "first_stage_model.")
    return {k: v[:, :, None, None] if ".attn_1." in k and v.dim() == 2 else v for k, v in out.items()}  # ldm: 1x1 convolutions


def original_checkpoint(pipe) -> dict[str, torch.Tensor]:
    """A Stable Diffusion 1.x pipeline's weights in the original single-file layout
    (``model.diffusion_model.``, ``first_stage_model.``, ``cond_stage_model.transformer.``), so
    tests can write the kind of checkpoint ``from_single_file`` reads, for any block count."""
    sd = {**_unet_to_ldm(pipe.unet), **_vae_to_ldm(pipe.vae)}
    # the original checkpoints keep CLIP's text_model. level (transformers 5 dropped it inside CLIPTextModel)
    sd.update({"cond_stage_model.transformer." + (k if k.startswith("text_model.") else "text_model." + k): v
               for k, v in pipe.text_encoder.state_dict().items()})
    return {k: v.contiguous() for k, v in sd.items()}


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_adapter(
    weights: dict[str, torch.Tensor],
    kind: str = "rand",
    *,
    density: float | None = None,
    rank: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    std: float = 1e-2,
):
    """A SparseAdapter with random values on a ``kind`` mask of each weight (no training)."""
    from .adapter import SparseAdapter, SparseDelta
    from .masks import make_masks

    if density is None and rank is None:
        density = 0.02
    masks = make_masks(weights, kind, density=density, rank=rank, seed=seed)
    g = torch.Generator().manual_seed(seed)
    deltas = {
        key: SparseDelta(idx, (torch.randn(idx.numel(), generator=g) * std).to(dtype), tuple(weights[key].shape))
        for key, idx in masks.items()
    }
    return SparseAdapter(deltas, {"mask": kind, "seed": seed})


def reference_weights(base: dict[str, torch.Tensor], adapters: dict, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """What the engine must write for ``scales``, computed densely and independently of it.

    ``base + sum(scale * delta)`` summed in fp32 in adapter-name order at the union of indices,
    cast once; only weights some adapter touches are returned.
    """
    out = {}
    for key in {k for name in scales for k in adapters[name].deltas}:
        w = base[key]
        flat = w.reshape(-1)
        total = torch.zeros(flat.numel(), dtype=torch.float32)
        touched = torch.zeros(flat.numel(), dtype=torch.bool)
        for name, scale in sorted(scales.items()):
            d = adapters[name].deltas.get(key)
            if d is not None:
                total[d.indices.long()] += d.values.float() * scale
                touched[d.indices.long()] = True
        expect = flat.clone()
        expect[touched] = (flat.float() + total)[touched].to(w.dtype)
        out[key] = expect.view(w.shape)
    return out


KOHYA_TINY_LAYERS = (  # (kohya prefix, rows, cols) of weights the tiny pipeline has, in all three components
    ("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q", 64, 64),
    ("lora_unet_up_blocks_0_attentions_1_transformer_blocks_1_attn2_to_k", 64, 64),
    ("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", 32, 32),
    ("lora_te1_text_model_encoder_layers_0_self_attn_out_proj", 32, 32),
    ("lora_te2_text_model_encoder_layers_1_self_attn_v_proj", 32, 32),
    ("lora_te2_text_model_encoder_layers_1_self_attn_out_proj", 32, 32),
)  # diffusers infers the text-encoder key style from the out_proj entries real kohya files have


def kohya_lora_file(path, seed: int = 0, rank: int = 4, alpha: float = 2.0, std: float = 0.1, layers=KOHYA_TINY_LAYERS):
    """A kohya/A1111-style LoRA file (``lora_unet_*``, ``lora_te1_*``, ``lora_te2_*`` with ``alpha``) for the tiny pipeline."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, rows, cols in layers:
        tensors[f"{prefix}.lora_down.weight"] = torch.randn(rank, cols, generator=g) * std
        tensors[f"{prefix}.lora_up.weight"] = torch.randn(rows, rank, generator=g) * std
        tensors[f"{prefix}.alpha"] = torch.tensor(float(alpha))
    save_file(tensors, str(path))
    return path
