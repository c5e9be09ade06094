"""Training-step FLOPs on the full-size SDXL UNet at 1024x1024: our sparse training (each mask
kind) vs PEFT LoRA at equal trainable parameters, counted by ``torch.utils.flop_counter`` on the
meta device (deterministic, machine-independent, no weights materialised).

    python benchmarks/training_flops.py --out benchmarks/results/training_flops.json
    python benchmarks/training_flops.py --reduced     # the tiny UNet (smoke run)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from shira_diffusion import find_targets, make_masks
from shira_diffusion.testing import sdxl_unet, tiny_sdxl_unet

KINDS = ("struct", "rand")  # every unstructured kind (wm, grad, snip) costs what rand does: the dense path


def step_flops(unet, latent: int, checkpointing: bool) -> dict:
    """Forward + backward FLOPs of one denoising-loss step (batch 1), by the counter."""
    cfg = unet.config
    device = next(unet.parameters()).device
    x = torch.randn(1, cfg.in_channels, latent, latent, device=device)
    text = torch.randn(1, 77, cfg.cross_attention_dim, device=device)
    extra = {"text_embeds": torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, device=device),
             "time_ids": torch.randn(1, 6, device=device)}
    if checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    with FlopCounterMode(display=False) as counter:
        out = unet(x, torch.tensor([500], device=device), encoder_hidden_states=text, added_cond_kwargs=extra).sample
        out.float().pow(2).mean().backward()
    return {"flops": counter.get_total_flops(), "checkpointing": checkpointing}


def build(args):
    unet = tiny_sdxl_unet(seed=0) if args.reduced else sdxl_unet(torch.float32, device="meta")
    return unet.requires_grad_(False)


def ours(args, kind: str, checkpointing: bool) -> dict:
    from shira_diffusion.training import SparseTraining

    unet = build(args)
    weights = find_targets({"unet": unet})
    shapes = {k: torch.empty(w.shape, device="meta") for k, w in weights.items()}
    training = SparseTraining({"unet": unet}, make_masks(shapes, kind, rank=args.rank, seed=0))
    sliced = sum(m.shira_slices is not None for m in training.modules.values())
    return {**step_flops(unet, args.latent, checkpointing), "trainable": training.num_params, "layers_on_slices": sliced}


def peft_lora(args, checkpointing: bool) -> dict:
    from peft import LoraConfig

    unet = build(args)
    names = sorted(k.removeprefix("unet.") for k in find_targets({"unet": unet}))
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=names))
    params = [p for n, p in unet.named_parameters() if "lora_" in n]
    return {**step_flops(unet, args.latent, checkpointing), "trainable": sum(p.numel() for p in params)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank; SHiRA gets r*(rows+cols) entries per weight")
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--reduced", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/training_flops.json"))
    args = parser.parse_args(argv)
    if args.reduced:
        args.rank, args.resolution = 2, 64
    args.latent = args.resolution // 8
    results: dict = {"config": {"rank": args.rank, "resolution": args.resolution, "reduced": args.reduced, "torch": torch.__version__}}
    for checkpointing in (False, True):
        row = {"peft_lora": peft_lora(args, checkpointing)}
        for kind in KINDS:
            row[kind] = ours(args, kind, checkpointing)
            row[kind]["vs_lora"] = row[kind]["flops"] / row["peft_lora"]["flops"]
        results["checkpointing" if checkpointing else "no_checkpointing"] = row
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
