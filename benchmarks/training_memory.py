"""Training memory and step time: our sparse training vs PEFT LoRA vs PEFT SHiRA at equal
trainable parameters, on the SDXL UNet, as diffusers' DreamBooth script trains it.

Each configuration runs in its own process, so peak RSS (CPU) or ``max_memory_allocated`` (CUDA)
belongs to that configuration alone. "overhead" is the peak minus the memory held once the frozen
model is loaded: what training itself costs. Precision settings:

* ``bf16`` / ``fp16``: frozen base weights in bf16/fp16, trainable parameters fp32, autocast
  (diffusers' ``--mixed_precision``; LoRA parameters are upcast to fp32 as diffusers does);
* ``fp32``: everything fp32.

Workers run with a fixed glibc mmap threshold (``MALLOC_MMAP_THRESHOLD_``), so a CPU peak RSS is
live memory rather than whatever the allocator happened to keep.

    python benchmarks/training_memory.py --precisions bf16 fp32 --checkpointing both --steps 3
    python benchmarks/training_memory.py --reduced --steps 2        # tiny UNet smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from shira_diffusion.dtypes import DTYPES

METHODS = ("ours", "peft_lora", "peft_shira")
# glibc raises its mmap threshold as large blocks are freed, after which freed memory stays in the
# process: the same run's peak RSS then came out 7.1 or 11.3 GiB by chance. A fixed threshold
# returns every large block at once, so the peak is the memory the configuration really held.
WORKER_ENV = {**os.environ, "MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", "65536")}


def peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.memory_allocated()
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def worker(args) -> dict:
    from shira_diffusion import find_targets, make_masks
    from shira_diffusion.testing import sdxl_unet, tiny_sdxl_unet

    torch.set_num_threads(args.threads)
    device, weight_dtype = args.device, DTYPES[args.precision]
    unet = tiny_sdxl_unet(seed=0) if args.reduced else sdxl_unet(weight_dtype)  # built in its dtype: no fp32 peak
    torch.nn.Module.to(unet, device=device, dtype=weight_dtype)
    unet.requires_grad_(False)
    targets = find_targets({"unet": unet})
    names = sorted(k.removeprefix("unet.") for k in targets)
    rank = min(args.rank, 2) if args.reduced else args.rank
    loaded = current_bytes(device)

    if args.method == "ours":
        from shira_diffusion.training import SparseTraining

        # as the trainer runs it: the base values wait on disk until export
        training = SparseTraining({"unet": unet}, make_masks(targets, args.mask, rank=rank, seed=0), base_on_disk=True)
        params = training.parameters()
    elif args.method == "peft_lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights="gaussian", target_modules=names))
        params = [p for n, p in unet.named_parameters() if "lora_" in n]
        for p in params:
            p.data = p.data.float()  # diffusers' cast_training_params
    else:
        from peft import ShiraConfig, get_peft_model

        unet = get_peft_model(unet, ShiraConfig(r=rank, target_modules=names, init_weights=False))
        params = [p for n, p in unet.named_parameters() if "shira_" in n]
        for p in params:
            p.data = p.data.float()
    if args.checkpointing:
        (unet.get_base_model() if hasattr(unet, "get_base_model") else unet).enable_gradient_checkpointing()
    unet.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    cfg = (unet.get_base_model() if hasattr(unet, "get_base_model") else unet).config
    latent = 8 if args.reduced else args.resolution // 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, cfg.in_channels, latent, latent, generator=g).to(device)
    text = torch.randn(args.batch, 77, cfg.cross_attention_dim, generator=g).to(device)
    extra = {"text_embeds": torch.randn(args.batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=g).to(device),
             "time_ids": torch.randn(args.batch, 6, generator=g).to(device)}
    autocast = torch.autocast(device, dtype=weight_dtype, enabled=weight_dtype != torch.float32)
    times = []
    for _ in range(args.steps + 1):
        start = time.perf_counter()
        with autocast:
            out = unet(x, torch.tensor([500] * args.batch, device=device), encoder_hidden_states=text, added_cond_kwargs=extra).sample
        loss = out.float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = peak_bytes(device)
    return {
        "method": args.method, "precision": args.precision, "checkpointing": args.checkpointing,
        "trainable_params": sum(p.numel() for p in params),
        "loaded_model_bytes": loaded, "peak_bytes": peak, "overhead_bytes": peak - loaded,
        "step_s": statistics.median(times[1:]), "first_step_s": times[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--precisions", nargs="+", choices=DTYPES, default=["bf16", "fp32"])
    parser.add_argument("--checkpointing", choices=["on", "off", "both"], default="both")
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank; SHiRA gets r*(rows+cols) per weight")
    parser.add_argument("--mask", default="rand")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reduced", action="store_true", help="tiny SDXL-layout UNet (smoke runs)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=DTYPES, help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.checkpointing = bool(args.ckpt)
        print(json.dumps(worker(args)))
        return
    out = args.out or Path(f"benchmarks/results/training_memory_{args.device}{'_reduced' if args.reduced else ''}.json")
    ckpts = {"on": [1], "off": [0], "both": [0, 1]}[args.checkpointing]
    runs = []
    for precision in args.precisions:
        for ckpt in ckpts:
            for method in args.methods:
                cmd = [sys.executable, __file__, "--worker", "--method", method, "--precision", precision, "--ckpt", str(ckpt),
                       "--rank", str(args.rank), "--mask", args.mask, "--resolution", str(args.resolution), "--batch", str(args.batch),
                       "--steps", str(args.steps), "--threads", str(args.threads), "--device", args.device, *(["--reduced"] if args.reduced else [])]
                done = subprocess.run(cmd, capture_output=True, text=True, env=WORKER_ENV)
                if done.returncode != 0:
                    runs.append({"method": method, "precision": precision, "checkpointing": bool(ckpt), "error": done.stderr[-2000:]})
                else:
                    runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(json.dumps(runs[-1])[:300], flush=True)
    summary = []
    for precision in args.precisions:
        for ckpt in ckpts:
            row = {r["method"]: r for r in runs if r["precision"] == precision and r["checkpointing"] == bool(ckpt) and "error" not in r}
            if "ours" in row and "peft_lora" in row:
                ours, lora = row["ours"], row["peft_lora"]
                summary.append({"precision": precision, "checkpointing": bool(ckpt),
                                "peak_vs_lora": ours["peak_bytes"] / lora["peak_bytes"],
                                "overhead_vs_lora": ours["overhead_bytes"] / lora["overhead_bytes"],
                                "step_time_vs_lora": ours["step_s"] / lora["step_s"],
                                **({"peak_vs_peft_shira": ours["peak_bytes"] / row["peft_shira"]["peak_bytes"]} if "peft_shira" in row else {})})
    config = {k: v for k, v in vars(args).items() if k not in ("out", "worker", "method", "precision", "ckpt")}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": config, "runs": runs, "summary": summary}, indent=2))
    from common import bar_chart  # benchmarks/ is on the path when run as a script

    bars = [(f"{r['method']} {r['precision']}{' ckpt' if r['checkpointing'] else ''}", r["overhead_bytes"] / 2**30) for r in runs if "error" not in r]
    bar_chart(out.with_suffix(".png"), "training overhead (peak minus loaded model), GiB", bars, unit="GiB")
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
