"""The demo model: a full ``StableDiffusionXLPipeline`` at small sizes, for the demo world.

Same architecture as SDXL (two CLIP text encoders, ``text_time`` UNet conditioning, AutoencoderKL,
Euler scheduler), shrunk so that it trains on two CPU cores and renders 64x64 in about a second.
The trained weights live in ``shira_diffusion/assets/demo`` (package data) as an ordinary diffusers folder.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import torch

from .world import vocabulary

ROOT = Path(__file__).resolve().parents[2]  # the checkout, when run from one
ASSETS = Path(__file__).resolve().parents[1] / "assets"  # package data: in a checkout and in an installed wheel
DEMO_DIR = ASSETS / "demo"
ADAPTERS_DIR = ASSETS / "adapters"
REBUILD = "python training/build_demo_world.py"


def recorded_config(args) -> dict[str, str]:
    """A script's arguments as its JSON records them: paths inside the checkout relative to it,
    so a shipped record names no machine's folders."""
    def text(value):
        if isinstance(value, Path) and value.resolve().is_relative_to(ROOT):
            return str(value.resolve().relative_to(ROOT))
        return str(value)

    return {k: text(v) for k, v in vars(args).items()}

TEXT_DIM = 64
UNET = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(64, 96, 128),
    layers_per_block=1,
    transformer_layers_per_block=(1, 1, 1),
    attention_head_dim=(2, 4, 4),
    cross_attention_dim=2 * TEXT_DIM,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=16,
    projection_class_embeddings_input_dim=6 * 16 + TEXT_DIM,
    norm_num_groups=16,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(16, 32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=8,
    sample_size=64,
)
SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", timestep_spacing="leading", steps_offset=1)


def world_tokenizer(max_length: int = 32):
    """A CLIP tokenizer (byte-level BPE, as SDXL's) whose merges spell every demo-world word as one token.

    Unknown words (a new trigger word, say) still tokenize, byte by byte.
    """
    from ..testing import byte_bpe_tokenizer

    words = vocabulary()
    for attempt in range(1000):  # BPE applies merges by rank: find an order in which no word's merges cut another's
        order = list(words)
        random.Random(attempt).shuffle(order)
        merges = []
        for word in order:
            pieces = list(word[:-1]) + [word[-1] + "</w>"]
            while len(pieces) > 1:
                if (pieces[0], pieces[1]) not in merges:
                    merges.append((pieces[0], pieces[1]))
                pieces = [pieces[0] + pieces[1], *pieces[2:]]
        if all(_bpe(word, merges) == word + "</w>" for word in words):
            break
    return byte_bpe_tokenizer(merges, max_length)


def _bpe(word: str, merges: list[tuple[str, str]]) -> str:
    ranks = {pair: i for i, pair in enumerate(merges)}
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), len(ranks)), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, i = min(pairs)
        if rank == len(ranks):
            break
        pieces[i : i + 2] = [pieces[i] + pieces[i + 1]]
    return " ".join(pieces)


def demo_components(seed: int = 0) -> dict[str, Any]:
    """Freshly initialised demo components (what ``training/train_demo_base.py`` starts from)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = world_tokenizer()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_config = CLIPTextConfig(
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            num_attention_heads=4,
            num_hidden_layers=3,
            max_position_embeddings=tokenizer.model_max_length,
            vocab_size=len(tokenizer),
            projection_dim=TEXT_DIM,
            hidden_act="gelu",
        )
        components = {
            "unet": UNet2DConditionModel(**UNET),
            "vae": AutoencoderKL(**VAE),
            "text_encoder": CLIPTextModel(text_config),
            "text_encoder_2": CLIPTextModelWithProjection(text_config),
        }
    return {**components, "tokenizer": tokenizer, "tokenizer_2": world_tokenizer(), "scheduler": EulerDiscreteScheduler(**SCHEDULER)}


def load_demo_pipeline(torch_dtype: torch.dtype = torch.float32):
    """The trained demo pipeline from the package's ``assets/demo`` (offline)."""
    from diffusers import StableDiffusionXLPipeline

    from ..loading import dtype_kwargs

    if not (DEMO_DIR / "model_index.json").is_file():
        raise FileNotFoundError(f"the demo model is missing from {DEMO_DIR}; rebuild it with `{REBUILD}`")
    pipe = StableDiffusionXLPipeline.from_pretrained(str(DEMO_DIR), local_files_only=True, add_watermarker=False, **dtype_kwargs(torch_dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe
