#!/usr/bin/env python
"""DreamBooth fine-tuning of SDXL (or Stable Diffusion 1.x/2.x) with a Sparse High Rank Adapter (or, for comparison, a LoRA).

    accelerate launch training/train_shira_dreambooth.py \\
        --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
        --instance_data_dir dog/ --instance_prompt "a photo of sks dog" \\
        --output_dir out/ --mask wm --lora_equivalent_rank 16 --max_train_steps 500

Writes ``out/shira_adapter.safetensors`` (``--adapter_type lora``: ``out/pytorch_lora_weights.safetensors``
in diffusers' LoRA format), loadable by ``shira_diffusion`` and the studio.

Randomness is stateless: the data order of epoch ``e`` and the noise of step ``s`` come from
generators seeded by ``(seed, e)`` and ``(seed, s)``, so a resumed run continues exactly where an
uninterrupted one would be. Checkpoints are safetensors + JSON only.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dreambooth_data import Example, load_dataset_examples, load_examples, sdxl_buckets  # noqa: E402

from shira_diffusion import MASK_KINDS, budget, calibration_scores, find_targets, make_masks  # noqa: E402
from shira_diffusion.adapter import COMPONENTS  # noqa: E402
from shira_diffusion.dtypes import DTYPES  # noqa: E402
from shira_diffusion.adapter import AdapterError  # noqa: E402
from shira_diffusion.targets import parse_targets, resolve_module  # noqa: E402
from shira_diffusion.training import SparseTraining, mask_bytes  # noqa: E402

logger = logging.getLogger("train_shira_dreambooth")
ADAPTER_FILE = "shira_adapter.safetensors"
LORA_FILE = "pytorch_lora_weights.safetensors"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="hub id or local diffusers folder of an SDXL or Stable Diffusion 1.x/2.x model, or 'demo' (the built-in demo model)")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None, help="a separate VAE (e.g. an fp16-safe one)")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="weight variant to load, e.g. fp16")
    g = p.add_argument_group("data")
    g.add_argument("--instance_data_dir", default=None, help="instance images; captions from <image>.txt or metadata.jsonl")
    g.add_argument("--dataset_name", default=None,
                   help="instead of --instance_data_dir: a datasets dataset (hub id, imagefolder folder, or save_to_disk folder)")
    g.add_argument("--dataset_split", default="train")
    g.add_argument("--image_column", default="image", help="--dataset_name: the column of images")
    g.add_argument("--caption_column", default="text", help="--dataset_name: the column of captions (rows without one use --instance_prompt)")
    g.add_argument("--instance_prompt", required=True, help="prompt for images without a caption, e.g. 'a photo of sks dog'")
    g.add_argument("--repeats", type=int, default=1, help="repeat the instance images this many times per epoch")
    g.add_argument("--resolution", type=int, default=None,
                   help="training size in pixels (default: the model's native size, 1024 for SDXL, 64 for the demo model)")
    g.add_argument("--center_crop", action="store_true", help="center crop (default: random crop)")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--enable_bucket", action="store_true",
                   help="aspect-ratio buckets: each image trains at the size of about --resolution squared nearest its shape")
    g.add_argument("--min_bucket_reso", type=int, default=256)
    g.add_argument("--max_bucket_reso", type=int, default=2048)
    g.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    g.add_argument("--with_prior_preservation", action="store_true")
    g.add_argument("--class_data_dir", default=None)
    g.add_argument("--class_prompt", default=None, help="prompt for class images without a caption file (and for generating missing ones)")
    g.add_argument("--num_class_images", type=int, default=100, help="missing class images are generated with the base model")
    g.add_argument("--prior_generation_precision", choices=["fp32", "fp16", "bf16"], default=None,
                   help="dtype the missing class images are generated in (default: the training dtype)")
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size when generating class images")
    g = p.add_argument_group("adapter")
    g.add_argument("--adapter_type", choices=["shira", "lora"], default="shira")
    g.add_argument("--mask", choices=MASK_KINDS, default="rand", help="which entries SHiRA trains")
    budget_group = g.add_mutually_exclusive_group()
    budget_group.add_argument("--density", type=float, default=None, help="fraction of each target weight (default 0.01)")
    budget_group.add_argument("--lora_equivalent_rank", type=int, default=None, help="r*(rows+cols) entries per weight")
    g.add_argument("--mask_seed", type=int, default=0)
    g.add_argument("--calibration_steps", type=int, default=8, help="batches of gradient for the grad/snip masks")
    g.add_argument("--targets", nargs="+", default=None, metavar="COMPONENT[:PATTERNS]",
                   help="what to adapt (default: unet, its attention projections): a component alone (unet, text_encoder, "
                        "text_encoder_2: attention), or with comma-separated layer groups (attn, ff, proj, conv; text encoders: "
                        "attn, mlp), suffixes, wildcards or re: regexes, e.g. unet:attn,ff  unet:*.proj_in  unet:conv  text_encoder:*")
    g.add_argument("--train_text_encoder", action="store_true", help="also adapt both text encoders")
    g.add_argument("--save_dtype", choices=DTYPES, default="fp16", help="dtype of the saved adapter values")
    g = p.add_argument_group("optimisation")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--text_encoder_lr", type=float, default=None, help="default: --learning_rate")
    g.add_argument("--lr_scheduler", default="constant", help="constant, linear, cosine, ... (diffusers.optimization)")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--optimizer", choices=["adamw", "prodigy"], default="adamw")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes AdamW8bit")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--caption_dropout_rate", type=float, default=0.0, help="fraction of instance captions replaced by an empty prompt")
    g.add_argument("--snr_gamma", type=float, default=None, help="Min-SNR loss weighting (5.0 is common)")
    g.add_argument("--noise_offset", type=float, default=0.0)
    g.add_argument("--train_batch_size", type=int, default=1)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=None)
    g.add_argument("--num_train_epochs", type=int, default=1, help="used when --max_train_steps is not given")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default=None, help="default: accelerate config")
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere and newer GPUs (faster, slightly less precise)")
    g.add_argument("--cache_latents", action="store_true", help="encode images once and free the VAE")
    g.add_argument("--dataloader_num_workers", type=int, default=0,
                   help="processes that crop, flip and stack the next steps' images while this one trains (0: in the loop)")
    g.add_argument("--num_threads", type=int, default=None,
                   help="CPU threads per process (default on a CPU: the cores this process may use, shared among the "
                        "local processes; `accelerate launch` alone would leave one)")
    g = p.add_argument_group("output")
    g.add_argument("--output_dir", required=True)
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder or 'latest'")
    g.add_argument("--validation_prompt", default=None)
    g.add_argument("--num_validation_images", type=int, default=2)
    g.add_argument("--validation_steps", type=int, default=None, help="default: only at the end")
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--report_to", default=None, help="tensorboard or wandb (validation images go there too)")
    g.add_argument("--push_to_hub", action="store_true", help="upload the output folder (adapter, model card, validation images)")
    g.add_argument("--hub_model_id", default=None, help="repository to push to (default: the output folder's name)")
    g.add_argument("--hub_token", default=None, help="default: the token huggingface_hub has stored")
    args = p.parse_args(argv)

    if args.pretrained_model_name_or_path == "demo":
        from shira_diffusion.demo.model import DEMO_DIR

        args.pretrained_model_name_or_path = str(DEMO_DIR)
    if args.density is None and args.lora_equivalent_rank is None:
        args.density = 0.01
    if args.targets is None:
        args.targets = ["unet", "text_encoder", "text_encoder_2"] if args.train_text_encoder else ["unet"]
    elif args.train_text_encoder:
        named = {spec.partition(":")[0] for spec in args.targets}
        args.targets += [c for c in ("text_encoder", "text_encoder_2") if c not in named]
    try:
        args.target_patterns = parse_targets(args.targets)  # component -> patterns, parsed once
    except AdapterError as err:
        p.error(str(err))
    if (args.instance_data_dir is None) == (args.dataset_name is None):
        p.error("give one of --instance_data_dir and --dataset_name")
    if args.with_prior_preservation and not (args.class_data_dir and args.class_prompt):
        p.error("--with_prior_preservation needs --class_data_dir and --class_prompt")
    if args.text_encoder_lr is None:
        args.text_encoder_lr = args.learning_rate
    return args


# ---- models -------------------------------------------------------------------------------------


def pipeline_class(args) -> str:
    """The model's pipeline class (its ``model_index.json``): SDXL, or Stable Diffusion 1.x/2.x
    (one text encoder, no pooled embedding or time ids); anything else is refused up front."""
    from diffusers import DiffusionPipeline

    from shira_diffusion.loading import SUPPORTED

    name = DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision).get("_class_name")
    if name not in SUPPORTED:
        raise SystemExit(f"{args.pretrained_model_name_or_path}: {name} is not supported; train an SDXL "
                         "(StableDiffusionXLPipeline) or Stable Diffusion 1.x/2.x (StableDiffusionPipeline) model")
    return name


def load_components(args) -> dict:
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    src = dict(revision=args.revision)
    name = args.pretrained_model_name_or_path
    vae_src = args.pretrained_vae_model_name_or_path
    sdxl = args.pipeline_class == "StableDiffusionXLPipeline"
    return {
        "tokenizer": AutoTokenizer.from_pretrained(name, subfolder="tokenizer", **src),
        "tokenizer_2": AutoTokenizer.from_pretrained(name, subfolder="tokenizer_2", **src) if sdxl else None,
        "text_encoder": CLIPTextModel.from_pretrained(name, subfolder="text_encoder", variant=args.variant, **src),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(name, subfolder="text_encoder_2", variant=args.variant, **src)
        if sdxl else None,
        "vae": AutoencoderKL.from_pretrained(vae_src or name, subfolder=None if vae_src else "vae", variant=None if vae_src else args.variant, **src),
        "unet": UNet2DConditionModel.from_pretrained(name, subfolder="unet", variant=args.variant, **src),
        "scheduler": DDPMScheduler.from_pretrained(name, subfolder="scheduler", **src),
    }


def encode_prompts(models: dict, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """SDXL conditioning: penultimate hidden states of both encoders, pooled output of the second.
    Stable Diffusion 1.x/2.x: the one encoder's last hidden state, nothing pooled."""
    if models["tokenizer_2"] is None:
        tok, enc = models["tokenizer"], models["text_encoder"]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        return enc(ids.to(enc.device))[0], None
    embeds, pooled = [], None
    for tok, enc in ((models["tokenizer"], models["text_encoder"]), (models["tokenizer_2"], models["text_encoder_2"])):
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = enc(ids.to(enc.device), output_hidden_states=True)
        embeds.append(out.hidden_states[-2])
        pooled = out[0]
    return torch.cat(embeds, dim=-1), pooled


def time_ids(examples: list[Example]) -> torch.Tensor:
    """SDXL's micro-conditioning per image: original size, crop corner, target size."""
    return torch.tensor([[*e.original_size, *e.crop_top_left, *e.target] for e in examples], dtype=torch.float32)


def native_resolution(models: dict) -> int:
    """The image size the UNet was made for: its latent ``sample_size`` times the VAE's downsampling."""
    vae = models["vae"]
    return int(models["unet"].config.sample_size) * 2 ** (len(vae.config.block_out_channels) - 1)


def check_resolution(args, native: int) -> None:
    if args.resolution is None:
        args.resolution = native
        logger.info("--resolution %d (the model's native size)", native)
    elif not native / 2 <= args.resolution <= native * 2:
        logger.warning("--resolution %d is far from the model's native %d px: it will learn slowly, if at all "
                       "(SDXL: 1024, the demo model: 64)", args.resolution, native)


def set_cpu_threads(args, accelerator) -> None:
    """On a CPU, use the cores this process may use (``accelerate launch`` sets OMP_NUM_THREADS=1)."""
    if accelerator.device.type != "cpu":
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = args.num_threads or max(1, cores // local)
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    logger.info("%d CPU thread(s) per process", threads)


def inference_pipeline(args, models: dict, accelerator, weight_dtype: torch.dtype, parked: dict | None = None):
    """The model's own pipeline (SDXL or SD 1.x/2.x) over the components loaded for training (as
    trained so far). Components set aside after caching (``parked`` on the host) are used as they
    are; ones freed come back from disk in the dtype training runs them in (the VAE in fp32), so
    every part agrees with the others, whatever dtype the folder was saved in."""
    import diffusers
    from diffusers import AutoencoderKL

    from shira_diffusion.loading import dtype_kwargs

    parts = {k: accelerator.unwrap_model(v) if isinstance(v, torch.nn.Module) else v
             for k, v in models.items() if v is not None and k != "scheduler"}
    parts.update({k: v.to(accelerator.device) for k, v in (parked or {}).items()})
    if "vae" not in parts:
        vae_src = args.pretrained_vae_model_name_or_path
        parts["vae"] = AutoencoderKL.from_pretrained(vae_src or args.pretrained_model_name_or_path, subfolder=None if vae_src else "vae",
                                                     variant=None if vae_src else args.variant, revision=args.revision,
                                                     **dtype_kwargs(torch.float32))
    pipe = getattr(diffusers, args.pipeline_class).from_pretrained(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                                                     **parts, **dtype_kwargs(weight_dtype))
    pipe.to(accelerator.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def render(pipe, prompt, weight_dtype: torch.dtype, **kwargs) -> list:
    """Denoise under the training autocast, decode in the VAE's own dtype (fp32: SDXL's VAE
    overflows in fp16), as PIL images."""
    device = pipe.unet.device
    with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
        latents = pipe(prompt, output_type="latent", **kwargs).images
    vae = pipe.vae
    with torch.no_grad():
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(images, output_type="pil")


def generate_class_images(args, models: dict, accelerator, weight_dtype: torch.dtype, sizes: list[tuple[int, int]] | None = None) -> None:
    """Fill --class_data_dir up to --num_class_images with base-model renders of --class_prompt,
    at ``sizes`` (height, width) in turn (the instance images' buckets), else square."""
    folder = Path(args.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    have = len([p for p in folder.iterdir() if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".webp"}])
    missing = args.num_class_images - have
    if missing <= 0 or not accelerator.is_main_process:
        accelerator.wait_for_everyone()
        return
    pipe = inference_pipeline(args, models, accelerator, weight_dtype)
    dtype = DTYPES[args.prior_generation_precision] if args.prior_generation_precision else weight_dtype
    sizes = sizes or [(args.resolution, args.resolution)]
    for start in tqdm(range(0, missing, args.sample_batch_size), desc="class images"):
        n = min(args.sample_batch_size, missing - start)
        gen = torch.Generator().manual_seed(args.seed + have + start)
        height, width = sizes[(have + start) // args.sample_batch_size % len(sizes)]
        images = render(pipe, [args.class_prompt] * n, dtype, generator=gen, height=height, width=width)
        for i, image in enumerate(images):
            image.save(folder / f"class_{have + start + i:05d}.png")
    del pipe
    accelerator.wait_for_everyone()


def log_validation(args, models: dict, accelerator, weight_dtype: torch.dtype, step: int, parked: dict | None = None) -> list:
    """--num_validation_images renders of --validation_prompt with the weights as trained now,
    saved to ``validation/step-<step>-<i>.png`` and sent to tensorboard or wandb. ``parked``
    components go back to the host afterwards."""
    pipe = inference_pipeline(args, models, accelerator, weight_dtype, parked)
    folder = Path(args.output_dir) / "validation"
    folder.mkdir(exist_ok=True)
    images = []
    for i in range(args.num_validation_images):
        image = render(pipe, args.validation_prompt, weight_dtype, num_inference_steps=args.validation_inference_steps,
                       height=args.resolution, width=args.resolution, generator=torch.Generator().manual_seed(args.seed + i))[0]
        image.save(folder / f"step-{step:06d}-{i}.png")
        images.append(image)
    for module in (parked or {}).values():
        module.to("cpu")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(im) for im in images]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(im, caption=f"{i}: {args.validation_prompt}") for i, im in enumerate(images)]}, step=step)
    return images


def write_model_card(args, summary: dict, output_dir: Path) -> Path:
    """``README.md`` next to the adapter, in the hub's model-card format: what it was trained from,
    how to trigger it, its mask and size, the arguments, and the last validation images."""
    from huggingface_hub import ModelCard, ModelCardData

    from shira_diffusion.adapter import portable_model_id

    base = portable_model_id(args.pretrained_model_name_or_path)
    kind = "SHiRA" if args.adapter_type == "shira" else "LoRA"
    data = ModelCardData(base_model=base if "/" in base else None, library_name="diffusers", license=None,
                         tags=["text-to-image", "diffusers", "shira" if kind == "SHiRA" else "lora", "dreambooth", "shira-studio"],
                         instance_prompt=args.instance_prompt)
    validation = sorted((output_dir / "validation").glob("*.png"))
    last = [p for p in validation if p.name.startswith(validation[-1].name.rsplit("-", 1)[0])] if validation else []
    shown = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool)) and "token" not in k and v is not None}
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# {kind} DreamBooth adapter for `{base}`", "",
        f"Trained with shira-studio's `training/train_shira_dreambooth.py` on `{base}` ({args.pipeline_class}).", "",
        f"- trigger prompt: `{args.instance_prompt}`",
        f"- adapter: `{Path(summary['adapter']).name}` ({summary['adapter_bytes']:,} bytes), "
        f"{summary['trainable_params']:,} trainable parameters ({100 * summary['density']:.3f}% of the targeted weights)",
        *([f"- mask: `{args.mask}`" + (f", density {args.density}" if args.density else f", LoRA-equivalent rank {args.lora_equivalent_rank}")]
          if kind == "SHiRA" else [f"- LoRA rank: equal parameter count to the SHiRA budget"]),
        f"- steps: {summary['steps']}, resolution {args.resolution} px", "",
        "Load it with `ShiraPipelineSwitcher.load_adapter(path)` (or the studio: `shira studio --adapters-dir <this folder>`).", "",
        *(["## Validation images", "", f"`{args.validation_prompt}`", "", *[f"![{p.stem}](validation/{p.name})" for p in last], ""] if last else []),
        "## Training arguments", "", "```json", json.dumps(shown, indent=2, sort_keys=True), "```", "",
    ]
    card = ModelCard("\n".join(lines))
    path = output_dir / "README.md"
    card.save(path)
    return path


def push_to_hub(args, output_dir: Path) -> str:
    """Upload the output folder (adapter, model card, validation images; not checkpoints or logs)."""
    from huggingface_hub import create_repo, upload_folder

    repo_id = create_repo(args.hub_model_id or output_dir.name, exist_ok=True, token=args.hub_token).repo_id
    upload_folder(repo_id=repo_id, folder_path=str(output_dir), commit_message="shira-studio DreamBooth adapter",
                  ignore_patterns=["checkpoint-*", "checkpoint-*/**", "logs/**", "*.tmp"], token=args.hub_token)
    return repo_id


# ---- the adapter ----------------------------------------------------------------------------------


def unused_layers_dropped(weights: dict, models: dict) -> dict:
    """SDXL conditions on text encoder 1's penultimate hidden state, so its last layer gets no
    gradient: adapting it would spend budget on entries that never train."""
    encoder = models.get("text_encoder")
    if models.get("tokenizer_2") is None or encoder is None:  # SD 1.x/2.x: the last hidden state, every layer counts
        return weights
    last = f".layers.{encoder.config.num_hidden_layers - 1}."
    kept = {k: w for k, w in weights.items() if not (k.startswith("text_encoder.") and last in k)}
    if len(kept) < len(weights):
        logger.info("text_encoder: its last layer is left out (SDXL reads the layer before it)")
    return kept


def lora_rank(weights: dict, args) -> int:
    """The LoRA rank whose parameter count is closest to the SHiRA budget."""
    if args.lora_equivalent_rank:
        return args.lora_equivalent_rank
    entries = sum(budget(w.shape, density=args.density) for w in weights.values())
    per_rank = sum(w.shape[0] + w.numel() // w.shape[0] for w in weights.values())
    return max(1, round(entries / per_rank))


def attach_lora(models: dict, weights: dict, rank: int) -> list[torch.nn.Parameter]:
    from peft import LoraConfig, inject_adapter_in_model

    params = []
    for component in sorted({k.split(".", 1)[0] for k in weights}):
        # PEFT names modules as this model lays them out (keys are canonical: text_model. kept)
        names = [resolve_module(models, k)[1] for k in weights if k.startswith(component + ".")]
        config = LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=names)
        if component == "unet":
            models[component].add_adapter(config)
        else:  # PEFT directly: transformers' add_adapter wants a newer peft than diffusers does
            inject_adapter_in_model(config, models[component])
        params += [p for n, p in models[component].named_parameters() if "lora_" in n]
    for p in params:
        p.data = p.data.float()
    return params


def save_lora(models: dict, path: Path) -> None:
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from peft.utils import get_peft_model_state_dict

    def layers(component):
        module = models.get(component)
        if module is None or not getattr(module, "peft_config", None):
            return None
        # PEFT's own key names, which diffusers reads for every layer type; its older diffusers
        # names cover attention only and a file mixing both loses the attention layers on load
        return get_peft_model_state_dict(module)

    if models.get("tokenizer_2") is None:  # Stable Diffusion 1.x/2.x: its own LoRA file layout
        StableDiffusionPipeline.save_lora_weights(str(path), unet_lora_layers=layers("unet"), text_encoder_lora_layers=layers("text_encoder"))
        return
    StableDiffusionXLPipeline.save_lora_weights(
        str(path),
        unet_lora_layers=layers("unet"),
        text_encoder_lora_layers=layers("text_encoder"),
        text_encoder_2_lora_layers=layers("text_encoder_2"),
    )


# ---- checkpoints (safetensors + JSON) -------------------------------------------------------------


def save_state(folder: Path, params: list, optimizer, lr_scheduler, step: int) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {f"param.{i}": p.detach().cpu().contiguous() for i, p in enumerate(params)}
    opt = optimizer.state_dict()
    scalars: dict = {}
    for i, state in opt["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"opt.{i}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{i}.{k}"] = v
    save_file(tensors, str(folder / "training_state.safetensors"))
    meta = {"step": step, "param_groups": opt["param_groups"], "opt_scalars": scalars, "lr_scheduler": lr_scheduler.state_dict()}
    (folder / "training_state.json").write_text(json.dumps(meta, default=list))


def load_state(folder: Path, params: list, optimizer, lr_scheduler) -> int:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "training_state.safetensors"))
    meta = json.loads((folder / "training_state.json").read_text())
    with torch.no_grad():
        for i, p in enumerate(params):
            p.copy_(tensors[f"param.{i}"])
    state: dict = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, i, k = name.split(".", 2)
            state.setdefault(int(i), {})[k] = value
    for name, value in meta["opt_scalars"].items():
        i, k = name.split(".", 1)
        state.setdefault(int(i), {})[k] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    lr_scheduler.load_state_dict(meta["lr_scheduler"])
    return int(meta["step"])


def find_checkpoint(args) -> Path | None:
    if args.resume_from_checkpoint is None:
        return None
    if args.resume_from_checkpoint != "latest":
        return Path(args.resume_from_checkpoint)
    found = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    return found[-1] if found else None


def prune_checkpoints(args) -> None:
    if not args.checkpoints_total_limit:
        return
    found = sorted(Path(args.output_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    for old in found[: max(0, len(found) - args.checkpoints_total_limit + 1)]:
        shutil.rmtree(old)


# ---- training -------------------------------------------------------------------------------------


def memory_held(models: dict, params: list, optimizer) -> dict[str, int]:
    """Bytes held for the whole run, by part (what the first step adds on top is activations):
    the frozen models, the trainable values or factors, their gradients and the optimizer state
    (Adam: two moments per parameter, allocated at the first step), and the masks."""
    frozen = sum(t.numel() * t.element_size() for m in models.values() if isinstance(m, torch.nn.Module)
                 for t in (*m.parameters(), *m.buffers()) if not t.requires_grad)
    trainable = sum(p.numel() * p.element_size() for p in params)
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it
    moments = 2 if "adam" in type(inner).__name__.lower() else 1  # fp32 moments: for 8-bit Adam an upper bound
    masks = sum(mask_bytes(mod) for m in models.values() if isinstance(m, torch.nn.Module) for mod in m.modules())
    return {"frozen model": frozen, "trainable": trainable, "gradients": trainable, "optimizer state": moments * trainable, "masks": masks}


def make_optimizer(args, groups: list[dict]):
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise SystemExit("--use_8bit_adam needs bitsandbytes: pip install bitsandbytes") from None
        return bnb.optim.AdamW8bit(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    if args.optimizer == "prodigy":
        try:
            import prodigyopt
        except ImportError:
            raise SystemExit("--optimizer prodigy needs prodigyopt: pip install prodigyopt") from None
        return prodigyopt.Prodigy(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay)
    return torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def min_snr_weights(scheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): ``min(snr, gamma) / snr`` for epsilon (and
    sample) prediction, ``min(snr, gamma) / (snr + 1)`` for v-prediction, as diffusers weights them."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, t)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / (snr + 1) if scheduler.config.prediction_type == "v_prediction" else clipped / snr


def dropped_captions(prompts: list[str], n_instance: int, rate: float, seed: int, micro_step: int) -> list[str]:
    """Instance captions replaced by "" with probability ``rate`` (drawn per step and image, stateless),
    so the adapter also learns the unconditional branch classifier-free guidance uses."""
    if not rate:
        return prompts
    rng = random.Random(f"{seed}/captions/{micro_step}")
    return [("" if i < n_instance and rng.random() < rate else p) for i, p in enumerate(prompts)]


def posterior_sample(mean: torch.Tensor, std: torch.Tensor, seed: int, micro_step: int) -> torch.Tensor:
    """A VAE posterior sample with noise of its own for every step and image (stateless: resume-exact)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + micro_step)
    return mean + std * torch.randn(mean.shape, generator=gen).to(mean)


def mask_digest(masks: dict[str, torch.Tensor]) -> int:
    """A 63-bit digest of a set of masks (keys and indices), to check that every process holds the same one."""
    import hashlib

    h = hashlib.sha256()
    for key in sorted(masks):
        h.update(key.encode())
        h.update(masks[key].detach().to("cpu", torch.int64).numpy().tobytes())
    return int.from_bytes(h.digest()[:8], "little") >> 1


def agreed_masks(accelerator, masks: dict[str, torch.Tensor]) -> int:
    """Raise unless every process chose the same masks (DDP averages gradients position by position:
    different masks would mix different entries); returns their digest."""
    digest = mask_digest(masks)
    every = accelerator.gather(torch.tensor([digest], dtype=torch.int64, device=accelerator.device)).tolist()
    if len(set(every)) != 1:
        raise RuntimeError(f"the processes chose different masks (digests {every}); the mask must not depend on the rank")
    return digest


def diffusion_loss(args, models, batch, step_seed: int) -> torch.Tensor:
    """The noise-prediction loss for one batch (prior-preservation half weighted separately)."""
    unet, scheduler = models["unet"], models["scheduler"]
    latents = batch["latents"]
    gen = torch.Generator().manual_seed(step_seed)
    noise = torch.randn(latents.shape, generator=gen).to(latents)
    if args.noise_offset:
        noise += args.noise_offset * torch.randn((latents.shape[0], latents.shape[1], 1, 1), generator=gen).to(latents)
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=gen).to(latents.device)
    noisy = scheduler.add_noise(latents, noise, t)
    if batch["embeds"] is None:
        embeds, pooled = encode_prompts(models, batch["prompts"])
    else:
        embeds, pooled = batch["embeds"], batch["pooled"]
    added = None if batch["time_ids"] is None else {"text_embeds": pooled, "time_ids": batch["time_ids"]}
    pred = unet(noisy, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(latents, noise, t)
    per_item = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if args.snr_gamma is not None:
        per_item = per_item * min_snr_weights(scheduler, t, args.snr_gamma)
    n_instance = batch["n_instance"]
    loss = per_item[:n_instance].mean()
    if n_instance < per_item.numel():
        loss = loss + args.prior_loss_weight * per_item[n_instance:].mean()
    return loss


class Batches:
    """Deterministic batches: epoch ``e`` is a permutation seeded by ``(seed, e)``; rank ``r`` of ``w``
    processes takes every ``w``-th batch. Each epoch draws every image's crop and flip from
    ``(seed, e, image)`` (unless latents are cached: then the views drawn at load are kept), so a
    resumed run sees exactly what an uninterrupted one would."""

    def __init__(self, args, instance: list[Example], klass: list[Example], rank: int, world: int):
        self.args, self.instance, self.klass, self.rank, self.world = args, instance * args.repeats, klass, rank, world
        self.redraw = (args.random_flip or not args.center_crop) and not args.cache_latents
        self._last: tuple[int, tuple[list[int], list[list[int]]]] | None = None
        sizes = {e.target for e in self.instance}
        self.bucketed = len(sizes) > 1  # a batch holds images of one size
        chunks = sum(-(-sum(e.target == s for e in self.instance) // args.train_batch_size) for s in sizes) if self.bucketed else 0
        self.per_epoch = max(1, (chunks or len(self.instance) // args.train_batch_size) // world)
        self.klass_by_size: dict[tuple[int, int], list[Example]] = {}
        for e in klass:
            self.klass_by_size.setdefault(e.target, []).append(e)
        lacking = sorted(size for size in sizes if klass and self.bucketed and size not in self.klass_by_size)
        if lacking:
            raise ValueError(f"no class image in bucket(s) {', '.join(f'{h}x{w}' for h, w in lacking)}, which hold instance images: "
                             "add class images of those shapes (or let missing ones be generated, at the buckets' sizes)")

    def _epoch(self, epoch: int) -> tuple[list[int], list[list[int]]]:
        """The epoch's order and, with buckets, its batches (cut within each bucket, a short last
        batch wrapping around its bucket, then shuffled); computed once per epoch."""
        if self._last is not None and self._last[0] == epoch:
            return self._last[1]
        order = torch.randperm(len(self.instance), generator=torch.Generator().manual_seed(self.args.seed * 7919 + epoch)).tolist()
        chunks: list[list[int]] = []
        if self.bucketed:
            bs, by_size = self.args.train_batch_size, {}
            for j in order:
                by_size.setdefault(self.instance[j].target, []).append(j)
            chunks = [[group[(k + n) % len(group)] for n in range(bs)] for group in by_size.values() for k in range(0, len(group), bs)]
            shuffle = torch.randperm(len(chunks), generator=torch.Generator().manual_seed(self.args.seed * 7919 + epoch + 1)).tolist()
            chunks = [chunks[s] for s in shuffle]
        self._last = (epoch, (order, chunks))
        return order, chunks

    def _picked(self, epoch: int, i: int) -> list[int]:
        order, chunks = self._epoch(epoch)
        if chunks:  # rank r of w takes every w-th batch
            return chunks[(i * self.world + self.rank) % len(chunks)]
        start = (i * self.world + self.rank) * self.args.train_batch_size
        return [order[(start + j) % len(order)] for j in range(self.args.train_batch_size)]

    def view(self, example: Example, kind: str, epoch: int, index: int) -> Example:
        if not self.redraw or epoch == 0:  # epoch 0: the view drawn at load
            return example
        rng = random.Random(f"{self.args.seed}/{kind}/{epoch}/{index}")  # str seeds are stable across runs
        return example.redrawn(rng, self.args.center_crop, self.args.random_flip)

    def __call__(self, micro_step: int) -> tuple[list[Example], list[Example]]:
        epoch, i = divmod(micro_step, self.per_epoch)
        bs = self.args.train_batch_size
        inst = [self.view(self.instance[j], "instance", epoch, j) for j in self._picked(epoch, i)]
        pool = self.klass_by_size[inst[0].target] if self.bucketed and self.klass else self.klass  # a batch holds one size
        klass = []
        for j in range(bs if pool else 0):
            n = micro_step * bs + j
            klass.append(self.view(pool[n % len(pool)], "class", n // len(pool), n % len(pool)))
        return inst, klass


def step_images(batches: Batches, micro_step: int) -> dict:
    """The image side of a step: its views' pixels, captions and SDXL micro-conditioning."""
    inst, cls = batches(micro_step)
    examples = inst + cls
    return {"pixels": torch.stack([e.pixels for e in examples]), "prompts": [e.prompt for e in examples],
            "time_ids": time_ids(examples), "n_instance": len(inst)}


class StepImages(torch.utils.data.Dataset):
    """Steps ``start`` .. ``stop - 1`` as :func:`step_images`, for DataLoader workers: the batch
    order is stateless, so a worker can build any step and a resumed run starts at its own."""

    def __init__(self, batches: Batches, start: int, stop: int) -> None:
        self.batches, self.start, self.stop = batches, start, stop

    def __len__(self) -> int:
        return max(0, self.stop - self.start)

    def __getitem__(self, i: int) -> dict:
        return step_images(self.batches, self.start + i)


def main(argv: list[str] | None = None) -> Path:
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration
    from diffusers.optimization import get_scheduler

    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO if accelerator.is_main_process else logging.WARNING)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    set_cpu_threads(args, accelerator)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    args.pipeline_class = pipeline_class(args)
    models = load_components(args)
    if models["text_encoder_2"] is None and "text_encoder_2" in args.target_patterns:
        args.targets = [t for t in args.targets if t.partition(":")[0] != "text_encoder_2"]  # SD 1.x/2.x has one text encoder
        args.target_patterns = parse_targets(args.targets)
        logger.info("one text encoder (%s): targets %s", args.pipeline_class, ", ".join(args.targets))
    check_resolution(args, native_resolution(models))
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    for name in ("unet", "text_encoder", "text_encoder_2", "vae"):
        if models[name] is not None:
            models[name].requires_grad_(False)
    train_text = any(c in args.target_patterns for c in ("text_encoder", "text_encoder_2"))
    # base weights live in the mixed-precision dtype (as for LoRA); trained values stay fp32
    models["vae"].to(device, dtype=torch.float32)
    for name in ("unet", "text_encoder", "text_encoder_2"):
        if models[name] is not None:
            models[name].to(device, dtype=weight_dtype)

    buckets = sdxl_buckets(args.resolution, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps) if args.enable_bucket else None
    if args.dataset_name:
        instance = load_dataset_examples(args.dataset_name, args.image_column, args.caption_column, args.instance_prompt, args.resolution,
                                         args.center_crop, args.random_flip, args.seed, args.dataset_split, buckets)
    else:
        instance = load_examples(args.instance_data_dir, args.instance_prompt, args.resolution, args.center_crop, args.random_flip, args.seed,
                                 buckets)
    if buckets:
        used = sorted({e.target for e in instance})
        logger.info("%d bucket(s) in use: %s", len(used), ", ".join(f"{h}x{w}" for h, w in used))
    klass: list[Example] = []
    if args.with_prior_preservation:
        generate_class_images(args, models, accelerator, weight_dtype, sorted({e.target for e in instance}) if buckets else None)
        klass = load_examples(args.class_data_dir, args.class_prompt, args.resolution, args.center_crop, args.random_flip, args.seed + 1,
                              buckets)
        klass = klass[: args.num_class_images]
    logger.info("%d instance image(s), %d class image(s)", len(instance), len(klass))

    # latents and prompt embeddings computed once where nothing they depend on is trained
    def posteriors_of(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The VAE posterior's mean and std, scaled to latent units."""
        vae = models["vae"]
        pixels = pixels.to(device, torch.float32)
        with torch.no_grad():
            dist = vae.encode(pixels).latent_dist
        return dist.mean * vae.config.scaling_factor, dist.std * vae.config.scaling_factor

    parked: dict[str, torch.nn.Module] = {}  # components done with for training, kept on the host for validation
    posterior_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    if args.cache_latents:
        if args.random_flip or not args.center_crop:
            logger.info("--cache_latents: each image keeps the crop and flip drawn at load")
        for e in instance + klass:
            mean, std = posteriors_of(e.pixels[None])
            posterior_cache[id(e)] = (mean[0], std[0])
        if args.validation_prompt:  # kept on the host for validation instead of re-read from disk each time
            parked["vae"] = models["vae"].to("cpu")
        models["vae"] = None
    embed_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if not train_text:
        with torch.no_grad():
            for prompt in sorted({e.prompt for e in instance + klass} | ({""} if args.caption_dropout_rate else set())):
                embeds, pooled = encode_prompts(models, [prompt])
                embed_cache[prompt] = (embeds[0], None if pooled is None else pooled[0])
        for name in ("text_encoder", "text_encoder_2"):
            if args.validation_prompt and models[name] is not None:
                parked[name] = models[name].to("cpu")
            models[name] = None  # off the device: prompts are encoded once

    batches = Batches(args, instance, klass, accelerator.process_index, accelerator.num_processes)

    def make_batch(micro_step: int, images: dict | None = None) -> dict:
        """Step ``micro_step``'s batch; ``images``: its :func:`step_images`, when a DataLoader worker built them."""
        if args.cache_latents:
            inst, cls = batches(micro_step)
            mean, std = (torch.stack(t) for t in zip(*(posterior_cache[id(e)] for e in inst + cls)))
            images = {"prompts": [e.prompt for e in inst + cls], "time_ids": time_ids(inst + cls), "n_instance": len(inst)}
        else:
            images = images or step_images(batches, micro_step)
            mean, std = posteriors_of(images["pixels"])
        latents = posterior_sample(mean, std, args.seed, micro_step)
        sdxl = models["tokenizer_2"] is not None
        prompts = dropped_captions(images["prompts"], images["n_instance"], args.caption_dropout_rate, args.seed, micro_step)
        batch = {"latents": latents, "time_ids": images["time_ids"].to(device) if sdxl else None, "n_instance": images["n_instance"]}
        if embed_cache:
            batch["embeds"] = torch.stack([embed_cache[p][0] for p in prompts])
            batch["pooled"] = torch.stack([embed_cache[p][1] for p in prompts]) if sdxl else None
        else:
            batch["embeds"] = batch["pooled"] = None
            batch["prompts"] = prompts
        return batch

    # ---- the adapter
    if args.gradient_checkpointing:  # before calibration too: its backward holds the same activations
        models["unet"].enable_gradient_checkpointing()
        for name in ("text_encoder", "text_encoder_2"):
            if train_text and models[name] is not None:
                # non-reentrant: transformers 4.x defaults to reentrant, whose recomputation gives
                # parameters outside the block's inputs (the sparse values) no gradient
                models[name].gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    adaptable = {c: models[c] for c in COMPONENTS if models.get(c) is not None}
    weights = unused_layers_dropped(find_targets(adaptable, args.target_patterns), models)
    if args.adapter_type == "shira":
        scores = None
        if args.mask in ("grad", "snip"):
            with torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32):
                scores = calibration_scores(weights, lambda s: diffusion_loss(args, models, make_batch(s), args.seed + 10**6 + s), range(args.calibration_steps))
            # each process saw its own calibration batches: sum them, so every rank picks the same mask
            if accelerator.num_processes > 1:
                for v in scores.values():  # in place: no second copy of the scores on the device
                    torch.distributed.all_reduce(v)
        masks = make_masks(weights, args.mask, density=args.density, rank=args.lora_equivalent_rank, seed=args.mask_seed, scores=scores)
        del scores
        digest = agreed_masks(accelerator, masks)
        # base values on disk until export: the run holds only the compact mask and the values
        sparse = SparseTraining(adaptable, masks, base_on_disk=True)
        del masks  # int64, 8 bytes per entry: the training keeps its own compact copy
        params = sparse.parameters()
        numel = sum(w.numel() for w in weights.values())
        logger.info("SHiRA %s mask: %s trainable values (%.3f%% of %d target weights); mask digest %016x, the same on %d process(es)",
                    args.mask, f"{sparse.num_params:,}", 100 * sparse.num_params / numel, len(weights), digest, accelerator.num_processes)
    else:
        rank = lora_rank(weights, args)
        params = attach_lora(models, weights, rank)
        logger.info("LoRA rank %d: %s trainable parameters", rank, f"{sum(p.numel() for p in params):,}")

    text_ids = {id(p) for name in ("text_encoder", "text_encoder_2") if models.get(name) is not None for p in models[name].parameters()}
    groups = [{"params": [p for p in params if id(p) not in text_ids], "lr": args.learning_rate}]
    if any(id(p) in text_ids for p in params):
        groups.append({"params": [p for p in params if id(p) in text_ids], "lr": args.text_encoder_lr})
    optimizer = make_optimizer(args, [g for g in groups if g["params"]])

    updates_per_epoch = math.ceil(batches.per_epoch / args.gradient_accumulation_steps)
    max_steps = args.max_train_steps or args.num_train_epochs * updates_per_epoch
    # accelerate steps a prepared scheduler once per process per update
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=max_steps * accelerator.num_processes,
    )
    trained = [models["unet"]] + [models[n] for n in ("text_encoder", "text_encoder_2") if train_text and models[n] is not None]
    prepared = accelerator.prepare(*trained, optimizer, lr_scheduler)
    models["unet"], optimizer, lr_scheduler = prepared[0], prepared[-2], prepared[-1]
    for module, name in zip(prepared[1:-2], [n for n in ("text_encoder", "text_encoder_2") if train_text and models[n] is not None]):
        models[name] = module
    if args.report_to and accelerator.is_main_process:
        accelerator.init_trackers("shira-dreambooth", config={k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))})

    global_step = 0
    checkpoint = find_checkpoint(args)
    if checkpoint is not None:
        global_step = load_state(checkpoint, params, optimizer, lr_scheduler)
        logger.info("resumed from %s at step %d", checkpoint, global_step)
    elif args.resume_from_checkpoint:
        logger.info("no checkpoint found in %s; starting fresh", output_dir)

    def export_adapter(path: Path) -> Path:
        unwrapped = {k: accelerator.unwrap_model(v) if isinstance(v, torch.nn.Module) else v for k, v in models.items()}
        if args.adapter_type == "lora":
            save_lora(unwrapped, path.parent)
            return path.parent / LORA_FILE
        meta = {"base_model": args.pretrained_model_name_or_path, "mask": args.mask, "mask_seed": args.mask_seed,
                "budget": {"density": args.density} if args.density else {"lora_equivalent_rank": args.lora_equivalent_rank},
                "instance_prompt": args.instance_prompt, "train_steps": global_step}
        return sparse.export(meta).save(path, dtype=DTYPES[args.save_dtype])

    def validate(step: int) -> None:
        if not args.validation_prompt or not accelerator.is_main_process:
            return
        if args.adapter_type == "shira":
            sparse.sync_weights()
        log_validation(args, models, accelerator, weight_dtype, step, parked)
        for module in trained:
            module.train()

    models["unet"].train()
    if device.type == "cuda" and accelerator.is_local_main_process:
        held = memory_held(models, params, optimizer)
        logger.info("before the first step, this process holds %.2f GiB on %s (%s); activations come on top",
                    sum(held.values()) / 2**30, device, ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in held.items()))
    bar = tqdm(total=max_steps, initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    last = time.perf_counter()
    autocast = torch.autocast(device.type, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    micro_step = global_step * args.gradient_accumulation_steps
    loaded = None
    if args.dataloader_num_workers and not args.cache_latents:  # cached latents leave nothing to load
        steps = StepImages(batches, micro_step, max_steps * args.gradient_accumulation_steps)
        loaded = iter(torch.utils.data.DataLoader(steps, batch_size=None, num_workers=args.dataloader_num_workers))
    while global_step < max_steps:
        batch = make_batch(micro_step, next(loaded) if loaded is not None else None)
        with accelerator.accumulate(*trained), autocast:
            step_seed = args.seed * 1_000_003 + micro_step * accelerator.num_processes + accelerator.process_index
            loss = diffusion_loss(args, models, batch, step_seed)
            accelerator.backward(loss)
            if accelerator.sync_gradients and args.max_grad_norm:
                accelerator.clip_grad_norm_(params, args.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        micro_step += 1
        if not accelerator.sync_gradients:
            continue
        global_step += 1
        bar.update(1)
        now = time.perf_counter()
        bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr_scheduler.get_last_lr()[0]:.2e}", step_s=f"{now - last:.2f}")
        last = now
        accelerator.log({"loss": loss.item(), "lr": lr_scheduler.get_last_lr()[0]}, step=global_step)
        if accelerator.is_main_process and args.checkpointing_steps and global_step % args.checkpointing_steps == 0 and global_step < max_steps:
            prune_checkpoints(args)
            folder = output_dir / f"checkpoint-{global_step}"
            save_state(folder, params, optimizer, lr_scheduler, global_step)
            export_adapter(folder / ADAPTER_FILE)
            logger.info("saved %s", folder)
        if args.validation_steps and global_step % args.validation_steps == 0:
            validate(global_step)
    bar.close()

    accelerator.wait_for_everyone()
    final = None
    if accelerator.is_main_process:
        final = export_adapter(output_dir / ADAPTER_FILE)
        validate(global_step)
        import resource

        peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
        summary = {
            "adapter": str(final),
            "adapter_type": args.adapter_type,
            "trainable_params": sum(p.numel() for p in params),
            "density": sum(p.numel() for p in params) / sum(w.numel() for w in weights.values()),
            "steps": global_step,
            "seconds": round(time.perf_counter() - started, 1),
            "peak_gpu_memory_bytes": peak,
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "adapter_bytes": final.stat().st_size,
        }
        (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
        write_model_card(args, summary, output_dir)
        logger.info("done: %s", json.dumps(summary))
        if args.push_to_hub:
            logger.info("pushed to https://huggingface.co/%s", push_to_hub(args, output_dir))
    accelerator.end_training()
    return final


if __name__ == "__main__":
    main()
