"""Does switching adapters make ``torch.compile`` recompile? Ours writes weights in place, so every
tensor keeps its identity, shape and dtype and the compiled UNet should be reused as is.

Compiles the (reduced by default) SDXL-layout UNet once, then switches among 3 adapters 10 times,
running the compiled UNet after each switch, and counts what dynamo compiled in the process:
for our engine, for diffusers LoRA fused (fuse_lora / unfuse_lora) and for diffusers LoRA
unfused (set_adapters, the adapter layers stay in the graph).

    python benchmarks/compile_switching.py --out benchmarks/results/compile_switching.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from shira_diffusion import ShiraEngine, find_targets
from shira_diffusion.testing import random_adapter, sdxl_unet, tiny_sdxl_unet


def inputs(unet, latent: int):
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
    return (torch.randn(1, cfg.in_channels, latent, latent, generator=g), torch.tensor([500]),
            torch.randn(1, 77, cfg.cross_attention_dim, generator=g),
            {"text_embeds": torch.randn(1, pooled, generator=g), "time_ids": torch.randn(1, 6, generator=g)})


def compiles() -> int:
    from torch._dynamo.utils import counters

    return sum(counters["stats"].get(k, 0) for k in ("unique_graphs",))


def run_switches(compiled, x, switch, switches: int) -> dict:
    with torch.no_grad():
        start = time.perf_counter()
        compiled(x[0], x[1], encoder_hidden_states=x[2], added_cond_kwargs=x[3])
        first = time.perf_counter() - start
        before = compiles()
        start = time.perf_counter()
        for i in range(switches):
            switch(i)
            compiled(x[0], x[1], encoder_hidden_states=x[2], added_cond_kwargs=x[3])
        return {"first_call_s": first, "graphs_compiled_during_switching": compiles() - before,
                "switch_and_forward_s": (time.perf_counter() - start) / switches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="the full-size SDXL UNet (slow to compile on a CPU)")
    parser.add_argument("--switches", type=int, default=10)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/compile_switching.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    results = {"config": {k: str(v) for k, v in vars(args).items()}}
    latent = 16 if args.full else 8

    # ours
    unet = sdxl_unet() if args.full else tiny_sdxl_unet(seed=0)
    weights = find_targets({"unet": unet})
    engine = ShiraEngine({"unet": unet})
    for i in range(3):
        engine.stage(f"a{i}", random_adapter(weights, rank=2, seed=i + 1, std=0.1))
    torch._dynamo.reset()
    compiled = torch.compile(unet)
    results["ours"] = run_switches(compiled, inputs(unet, latent), lambda i: engine.apply(f"a{i % 3}"), args.switches)
    print("ours", results["ours"], flush=True)

    # diffusers LoRA, fused and unfused
    from peft import LoraConfig

    for mode in ("fused", "unfused"):
        unet = sdxl_unet() if args.full else tiny_sdxl_unet(seed=0)
        names = sorted(k.removeprefix("unet.") for k in find_targets({"unet": unet}))
        for i in range(3):
            unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian", target_modules=names), adapter_name=f"l{i}")
        unet.set_adapters(["l0"])

        def switch(i, unet=unet, mode=mode):
            if mode == "fused":
                unet.unfuse_lora()
                unet.set_adapters([f"l{i % 3}"])
                unet.fuse_lora(adapter_names=[f"l{i % 3}"])
            else:
                unet.set_adapters([f"l{i % 3}"])

        if mode == "fused":
            unet.fuse_lora(adapter_names=["l0"])
        torch._dynamo.reset()
        compiled = torch.compile(unet)
        results[f"diffusers_lora_{mode}"] = run_switches(compiled, inputs(unet, latent), switch, args.switches)
        print(mode, results[f"diffusers_lora_{mode}"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
