"""Train the demo model (``shira_diffusion/assets/demo``) from scratch on rendered demo-world images.

Two stages on the CPU, deterministic for a seed:

1. the VAE learns to reconstruct every kind of render (plain shapes, both styles, the subject
   shape), as a general-purpose image codec would have;
2. the UNet and both text encoders learn captions -> images on plain shapes, and on the two
   style looks under plain descriptive words (", with a glowing outline", ", with a striped
   fill"), as a large model knows what glowing outlines and stripes are before anyone trains a
   style adapter. They never see the trigger words (", in bluefire style") or the subject shape:
   those are what the demo adapters teach. Captions are dropped 10 % of the time to zero
   embeddings, which is what the SDXL pipeline feeds the unconditional branch.

    python training/train_demo_base.py --output_dir shira_diffusion/assets/demo          # ~39 min on 2 cores
    python training/train_demo_base.py --output_dir /tmp/d --vae_steps 5 --unet_steps 5   # smoke run
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]
from shira_diffusion.demo import world  # noqa: E402
from shira_diffusion.demo.model import demo_components, recorded_config  # noqa: E402
from train_shira_dreambooth import encode_prompts  # noqa: E402  (the conditioning adapters train on)

TIME_IDS = (world.SIZE, world.SIZE, 0, 0, world.SIZE, world.SIZE)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", type=Path, required=True, help="where the diffusers folder is written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", type=int, default=8, help="jittered renders per (shape, colour, background, position)")
    p.add_argument("--vae_steps", type=int, default=2000)
    p.add_argument("--codec_scenes", type=float, default=1.0, help="codec-only renders (styles, subject) per base scene in the VAE's data")
    p.add_argument("--vae_batch", type=int, default=16)
    p.add_argument("--described", type=float, default=0.5, help="styled scenes with descriptive captions per plain scene in the UNet's data")
    p.add_argument("--unet_steps", type=int, default=1700)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the UNet and text encoder weights saved")
    p.add_argument("--caption_dropout", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--save_dtype", choices=["fp16", "fp32"], default="fp16", help="fp16 halves the files; loading in fp32 is exact")
    return p.parse_args(argv)


def base_scenes(variants: int, seed: int) -> list[world.Scene]:
    """Every plain (shape, colour, background, position), each with ``variants`` jittered renders."""
    rng = random.Random(seed)
    scenes = []
    for shape, colour, bg, pos in itertools.product(world.SHAPES, world.COLOURS, world.BACKGROUNDS, world.POSITIONS):
        for _ in range(variants):
            s = world.random_scene(rng, shapes=(shape,), colours=(colour,))
            scenes.append(world.Scene(shape, colour, bg, pos, None, s.radius, s.offset))
    return scenes


def codec_scenes(n: int, seed: int) -> list[world.Scene]:
    """Extra renders only the VAE sees: both styles (two thirds of them) and the subject shape."""
    rng = random.Random(seed)
    shapes = (*world.SHAPES, world.SUBJECT_SHAPE)
    return [world.random_scene(rng, shapes=shapes, style=rng.choice((None, *world.STYLES))) for _ in range(n)]


def described_scenes(n: int, seed: int) -> list[world.Scene]:
    """Plain shapes in either style, for captions that describe the look instead of naming the trigger."""
    rng = random.Random(seed)
    return [world.random_scene(rng, style=world.STYLES[i % len(world.STYLES)]) for i in range(n)]


def to_tensor(scenes) -> torch.Tensor:
    arr = np.stack([np.asarray(world.render(s)) for s in scenes])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def cosine_lr(step: int, total: int, warmup: int = 100) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def train_vae(vae, images: torch.Tensor, args) -> None:
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(args.seed)
    bar = tqdm(range(args.vae_steps), desc="vae")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = 2e-3 * cosine_lr(step, args.vae_steps, 50)
        x = images[torch.randint(0, len(images), (args.vae_batch,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-6 * post.kl().mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    vae.eval().requires_grad_(False)


def deterministic_encoder(vae) -> None:
    """Make the encoder return its posterior mean (std ~3e-7): the UNet learns on means, and
    DreamBooth scripts encode with ``latent_dist.sample()``, which would otherwise hand adapters
    latents the base never saw (the posterior std here is ~0.4)."""
    half = vae.config.latent_channels
    with torch.no_grad():
        vae.quant_conv.weight[half:] = 0.0
        vae.quant_conv.bias[half:] = -30.0


def codec_check(vae, scenes: list[world.Scene]) -> dict[str, float]:
    """Share of held-out reconstructions on which the detectors still read each attribute right:
    a style the VAE cannot reproduce is a style no adapter can learn."""
    from PIL import Image

    from shira_diffusion.demo.detect import read_many

    with torch.no_grad():
        rec = vae.decode(vae.encode(to_tensor(scenes)).latent_dist.mean).sample
    images = [Image.fromarray(((r.permute(1, 2, 0).clamp(-1, 1) + 1) * 127.5).round().byte().numpy()) for r in rec]
    readings = read_many(images)
    checks = {"colour": lambda r, s: r.colour == s.colour, "shape": lambda r, s: r.shape == s.shape}
    checks.update({style: (lambda r, s, style=style: getattr(r, style) == (s.style == style)) for style in world.STYLES})
    return {k: sum(bool(f(r, s)) for r, s in zip(readings, scenes)) / len(scenes) for k, f in checks.items()}


def train_unet(models, latents: torch.Tensor, captions: list[str], args) -> dict:
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    unet, te1, te2 = models["unet"], models["text_encoder"], models["text_encoder_2"]
    scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    trained = [unet, te1, te2]
    ema = [copy.deepcopy(m).requires_grad_(False) for m in trained]
    for m in trained:
        m.train().requires_grad_(True)
    params = [p for m in trained for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed + 1)
    time_ids = torch.tensor([TIME_IDS] * args.batch, dtype=torch.float32)
    losses = []
    bar = tqdm(range(args.unet_steps), desc="unet + text encoders")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = args.lr * cosine_lr(step, args.unet_steps)
        idx = torch.randint(0, len(latents), (args.batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, 1000, (args.batch,), generator=gen)
        embeds, pooled = encode_prompts(models, [captions[i] for i in idx.tolist()])
        keep = (torch.rand(args.batch, generator=gen) >= args.caption_dropout).float()
        embeds, pooled = embeds * keep[:, None, None], pooled * keep[:, None]
        pred = unet(scheduler.add_noise(x0, noise, t), t, encoder_hidden_states=embeds,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        snr = compute_snr(scheduler, t)
        weight = torch.clamp(snr, max=5.0) / snr
        loss = (F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)) * weight).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        decay = min(args.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for m, e in zip(trained, ema):
                for p, q in zip(m.parameters(), e.parameters()):
                    q.lerp_(p, 1 - decay)
        losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses[-50:]) / len(losses[-50:]):.4f}")
    for name, e in zip(("unet", "text_encoder", "text_encoder_2"), ema):
        models[name] = e.eval()
    return {"loss_first_100": sum(losses[:100]) / max(1, len(losses[:100])), "loss_last_100": sum(losses[-100:]) / max(1, len(losses[-100:]))}


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    start = time.perf_counter()
    models = demo_components(args.seed)
    plain = base_scenes(args.variants, args.seed)
    scenes = plain + described_scenes(round(args.described * len(plain)), args.seed + 5)
    n_codec = round(args.codec_scenes * len(plain))
    print(f"rendering {len(plain)} plain + {len(scenes) - len(plain)} described base scenes + {n_codec} codec-only scenes")
    images = to_tensor(scenes)
    train_vae(models["vae"], torch.cat([images[: len(plain)], to_tensor(codec_scenes(n_codec, args.seed + 7))]), args)
    deterministic_encoder(models["vae"])
    fidelity = codec_check(models["vae"], codec_scenes(150, args.seed + 11))
    print("vae: attributes read right on held-out reconstructions: " + ", ".join(f"{k} {v:.0%}" for k, v in fidelity.items()), flush=True)
    with torch.no_grad():
        mean = torch.cat([models["vae"].encode(images[i : i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
    scale = float(1.0 / mean.std())
    models["vae"].register_to_config(scaling_factor=scale)
    stats = train_unet(models, mean * scale, [world.caption(s, described=True) for s in scenes], args)

    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline(**models, add_watermarker=False)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    pipe.to(torch.float16 if args.save_dtype == "fp16" else torch.float32).save_pretrained(args.output_dir, safe_serialization=True)
    summary = {"seconds": round(time.perf_counter() - start, 1), "scaling_factor": scale, "vae_codec_check": fidelity, "images": len(scenes), **stats,
               "args": recorded_config(args)}
    (args.output_dir / "training_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
