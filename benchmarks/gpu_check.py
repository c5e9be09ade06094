"""The GPU check: what this project promises on the GPUs its users run, measured in one prepared run.

Full-size SDXL-base UNet with random fp16 weights, the 560 default attention targets, nothing
downloaded. Every time is a median of several runs with CUDA synchronised before and after each.
It writes one JSON (after every section, so a failure part-way keeps what was measured):

* ``switching.r16`` / ``r64``: ours (switch A->B, load from file + first apply, fuse a pair)
  vs diffusers LoRA at equal parameter count (``fuse_lora``/``unfuse_lora``, unfused
  ``set_adapters``, ``load_lora_adapter(..., hotswap=True)``), with the device memory each
  loaded adapter holds;
* ``denoise``: one UNet step (one denoising step; text encoding is outside it) at 1024x1024, batch
  1 and 4: base vs SHiRA applied vs LoRA unfused vs LoRA fused;
* ``exactness``: on the tiny SDXL-layout UNet, on the device, in fp16 and bf16: one adapter at
  strength 1 (written with one add in the weight's dtype), a fused triple at odd strengths with
  overlapping entries, and the restore, each compared with the dense fp32-sum-cast-once reference
  computed on the CPU (values equal; restore bit-exact);
* ``training``: one training step at 1024x1024, gradient checkpointing, bf16, text encoders out of
  the picture: peak allocated memory and step time of ours (``rand`` and ``struct`` masks) vs
  PEFT LoRA at equal trainable parameters (``training_memory.py``'s worker, one process each).

    python benchmarks/gpu_check.py --out benchmarks/results/gpu_check.json     # one GPU, ~5-8 min
    python benchmarks/gpu_check.py --device cpu --reduced --out /tmp/gpu.json  # same code, tiny UNet, < 2 min
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from common import median  # benchmarks/ is on the path when run as a script
from switching import lora_files, time_load_and_apply
from training_memory import WORKER_ENV
from shira_diffusion import ShiraEngine, SparseAdapter, find_targets
from shira_diffusion.testing import random_adapter, sdxl_unet, tiny_sdxl_unet

HERE = Path(__file__).resolve().parent


def allocated(device: torch.device) -> int | None:
    """Bytes the caching allocator has handed out on ``device`` (None off CUDA: host memory is not tracked here)."""
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def delta(before: int | None, device: torch.device) -> int | None:
    now = allocated(device)
    return None if now is None or before is None else now - before


def unet_inputs(unet, batch: int, latent: int, device: torch.device):
    cfg = unet.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, latent, latent, generator=g)
    text = torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)
    pooled = torch.randn(batch, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=g)
    ids = torch.tensor([[latent * 8, latent * 8, 0, 0, latent * 8, latent * 8]] * batch, dtype=torch.float32)
    to = dict(device=device, dtype=unet.dtype)
    return x.to(**to), text.to(**to), {"text_embeds": pooled.to(**to), "time_ids": ids.to(**to)}


def step_time(unet, inputs, repeats: int) -> float:
    x, text, extra = inputs
    t = torch.tensor([500] * x.shape[0], device=x.device)

    @torch.inference_mode()
    def step():
        unet(x, t, encoder_hidden_states=text, added_cond_kwargs=extra)

    step()  # warm-up: kernels chosen, memory pooled
    return median(step, repeats)


def bench_switching(unet, weights, rank: int, folder: Path, args) -> dict:
    device, dtype = unet.device, unet.dtype
    shapes = {k: torch.empty(w.shape, device="meta") for k, w in weights.items()}
    files = []
    for seed in (1, 2):  # one adapter in memory at a time
        adapter = random_adapter(shapes, "rand", rank=rank, seed=seed, dtype=dtype, std=1e-3)
        files.append(adapter.save(folder / f"shira_r{rank}_{seed}.safetensors"))
        del adapter
    loras = lora_files(weights, rank, dtype, folder, seeds=(1, 2))
    ours: dict = {"entries": sum(rank * sum(w.shape) for w in weights.values()), "file_bytes": files[0].stat().st_size}
    engine = ShiraEngine({"unet": unet})
    ours["load_and_apply_s"] = time_load_and_apply(engine, files[0], args.repeats)
    before = allocated(device)
    for name, path in zip("ab", files):
        engine.stage(name, SparseAdapter.load(path))
    ours["device_bytes_per_loaded_adapter"] = None if before is None else delta(before, device) // 2  # not active: 0
    ours["accounting_inactive"] = engine.memory()
    ours["switch_s"] = median(lambda: engine.apply("b"), args.repeats, before=lambda: engine.apply("a"), after=engine.restore)
    ours["fuse2_s"] = median(lambda: engine.apply({"a": 1.0, "b": 0.5}), args.repeats, after=engine.restore)
    ours["last_switch_ms_reported"] = engine.last_switch_s * 1000  # the engine's own (synchronised) clock
    engine.apply({"a": 1.0, "b": 0.5})
    ours["accounting_fused_pair"] = engine.memory()
    engine.restore()
    for name in "ab":
        engine.unstage(name)

    lora: dict = {"file_bytes": loras[0].stat().st_size}

    def load(i: int, name: str, **kw):
        unet.load_lora_adapter(str(loras[i]), prefix="unet", adapter_name=name, **kw)

    def unload_lora():
        unet.unfuse_lora()
        unet.delete_adapters("a")

    load(0, "warm")
    unet.delete_adapters("warm")
    lora["load_and_apply_s"] = median(lambda: (load(0, "a"), unet.fuse_lora(adapter_names=["a"])), args.repeats, after=unload_lora)
    before = allocated(device)
    load(0, "a")
    load(1, "b")
    lora["device_bytes_per_loaded_adapter"] = None if before is None else delta(before, device) // 2

    def fuse(names, scales=None):
        unet.set_adapters(names, scales)
        unet.fuse_lora(adapter_names=names)

    lora["switch_fused_s"] = median(lambda: (unet.unfuse_lora(), fuse(["b"])), args.repeats, before=lambda: fuse(["a"]), after=unet.unfuse_lora)
    lora["switch_unfused_s"] = median(lambda: unet.set_adapters(["b"]), args.repeats, before=lambda: unet.set_adapters(["a"]))
    lora["fuse2_s"] = median(lambda: fuse(["a", "b"], [1.0, 0.5]), args.repeats, after=unet.unfuse_lora)
    unet.unload_lora()
    try:  # hotswap: a new file's factors copied into the loaded adapter's tensors
        unet.enable_lora_hotswap(target_rank=rank)
        load(0, "a")
        order = iter([1, 0] * args.repeats)  # B's factors into "a", then A's back, ...
        lora["hotswap_s"] = median(lambda: load(next(order), "a", hotswap=True), args.repeats)
    except Exception as err:  # noqa: BLE001  (an older diffusers, a setting it refuses: recorded, not fatal)
        lora["hotswap_error"] = f"{type(err).__name__}: {err}"[:500]
    unet.unload_lora()
    ratios = {
        "diffusers_switch_fused_over_ours": lora["switch_fused_s"] / ours["switch_s"],
        "diffusers_load_apply_over_ours": lora["load_and_apply_s"] / ours["load_and_apply_s"],
        "diffusers_fuse2_over_ours": lora["fuse2_s"] / ours["fuse2_s"],
        "fuse2_over_2x_switch": ours["fuse2_s"] / (2 * ours["switch_s"]),
    }
    if "hotswap_s" in lora:
        ratios["diffusers_hotswap_over_ours_switch"] = lora["hotswap_s"] / ours["switch_s"]
    return {"ours": ours, "diffusers_lora": lora, "ratios": ratios, "shira_file": files[0].name}


def bench_denoise(unet, weights, folder: Path, args) -> dict:
    device, dtype = unet.device, unet.dtype
    latent = 8 if args.reduced else args.resolution // 8
    rank = 16 if not args.reduced else 2
    shapes = {k: torch.empty(w.shape, device="meta") for k, w in weights.items()}
    shira = random_adapter(shapes, "rand", rank=rank, seed=1, dtype=dtype, std=1e-3)
    lora = lora_files(weights, rank, dtype, folder, seeds=(7,))[0]
    out: dict = {"resolution": latent * 8, "rank": rank}
    engine = ShiraEngine({"unet": unet})
    engine.stage("a", shira)
    for batch in (1, 4):
        inputs = unet_inputs(unet, batch, latent, device)
        row = {"base_s": step_time(unet, inputs, args.repeats)}
        engine.apply("a")
        row["shira_applied_s"] = step_time(unet, inputs, args.repeats)
        engine.restore()
        unet.load_lora_adapter(str(lora), prefix="unet", adapter_name="l")
        row["lora_unfused_s"] = step_time(unet, inputs, args.repeats)
        unet.fuse_lora(adapter_names=["l"])
        row["lora_fused_s"] = step_time(unet, inputs, args.repeats)
        unet.unload_lora()
        row["shira_over_base"] = row["shira_applied_s"] / row["base_s"]
        row["lora_unfused_over_base"] = row["lora_unfused_s"] / row["base_s"]
        out[f"batch_{batch}"] = row
        del inputs
    engine.unstage("a")
    return out


def check_exactness(device: torch.device) -> dict:
    """What the engine writes on ``device`` against :func:`reference_weights` on the CPU."""
    from shira_diffusion.testing import reference_weights

    out = {}
    for name, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        unet = tiny_sdxl_unet(seed=0).to(dtype)
        base = {f"unet.{k.removesuffix('.weight')}": v.clone() for k, v in unet.state_dict().items() if k.endswith(".weight")}
        weights = find_targets({"unet": unet})
        adapters = {f"a{i}": random_adapter(weights, "rand", density=0.3, seed=i + 1, dtype=dtype, std=0.5) for i in range(3)}
        torch.nn.Module.to(unet, device=device)
        engine = ShiraEngine({"unet": unet})
        for key, adapter in adapters.items():
            engine.stage(key, adapter)
        row = {}
        for label, scales in (("single", {"a0": 1.0}), ("fused", {"a0": 0.7, "a1": -1.3, "a2": 0.05})):
            engine.apply(scales)
            want = reference_weights(base, adapters, scales)
            live = {f"unet.{k.removesuffix('.weight')}": v.cpu() for k, v in unet.state_dict().items() if k.endswith(".weight")}
            row[label] = all(torch.equal(live[k], want.get(k, base[k])) for k in live)
        engine.restore()
        row["restore_bit_exact"] = all(torch.equal(v.cpu().view(torch.int16), base[f"unet.{k.removesuffix('.weight')}"].view(torch.int16))
                                       for k, v in unet.state_dict().items() if k.endswith(".weight"))
        out[name] = row
    return out


def bench_training(args) -> dict:
    """``training_memory.py``'s worker, one process per configuration: each peak is its own."""
    runs = {}
    for method, mask in (("ours", "rand"), ("ours", "struct"), ("peft_lora", "rand")):
        cmd = [sys.executable, str(HERE / "training_memory.py"), "--worker", "--method", method, "--mask", mask, "--precision", "bf16",
               "--ckpt", "1", "--rank", "16", "--resolution", str(args.resolution), "--batch", "1", "--steps", "2",
               "--device", args.device, *(["--reduced"] if args.reduced else [])]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=WORKER_ENV)
        key = method if method != "ours" else f"ours_{mask}"
        runs[key] = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else {"error": done.stderr[-1500:]}
    lora = runs["peft_lora"]
    for key in ("ours_rand", "ours_struct"):
        if "error" not in runs[key] and "error" not in lora:
            runs[key]["peak_vs_lora"] = runs[key]["peak_bytes"] / lora["peak_bytes"]
            runs[key]["step_time_vs_lora"] = runs[key]["step_s"] / lora["step_s"]
    return runs


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reduced", action="store_true", help="tiny SDXL-layout UNet in fp32 (the smoke run)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--resolution", type=int, default=1024)
    parser.add_argument("--sections", nargs="+", default=["exactness", "switching", "denoise", "training"],
                        choices=["exactness", "switching", "denoise", "training"])
    parser.add_argument("--out", type=Path, default=HERE / "results" / "gpu_check.json")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    started = time.perf_counter()
    results: dict = {"config": {**{k: str(v) for k, v in vars(args).items() if k != "out"}, "torch": torch.__version__,
                                "machine": platform.machine(),
                                "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}}

    def save() -> None:
        results["elapsed_s"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2))

    def section(name: str, fn) -> None:
        t = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as err:  # noqa: BLE001  (one section failing must not lose the others)
            results[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
        results[name + "_s"] = time.perf_counter() - t
        save()
        print(name, json.dumps(results[name])[:400], flush=True)

    if "exactness" in args.sections:
        section("exactness", lambda: check_exactness(device))
    dtype = torch.float32 if args.reduced else torch.float16
    unet = tiny_sdxl_unet(seed=0) if args.reduced else sdxl_unet(dtype, device=device)
    torch.nn.Module.to(unet, device=device, dtype=dtype)
    weights = find_targets({"unet": unet})
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        if "switching" in args.sections:
            for rank in args.ranks:
                section(f"switching_r{rank}", lambda: bench_switching(unet, weights, min(rank, 2) if args.reduced else rank, folder, args))
        if "denoise" in args.sections:
            section("denoise", lambda: bench_denoise(unet, weights, folder, args))
    del unet, weights
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if "training" in args.sections:
        section("training", lambda: bench_training(args))
    save()
    return results


if __name__ == "__main__":
    main()
