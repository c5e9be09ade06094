"""Switching, loading, fusing, exactness, file size, inference overhead and RAM: SHiRA (this
project) side by side with diffusers LoRA (PEFT backend) and PEFT's own SHiRA, in one run.

Setting: the full-size SDXL-base UNet with random weights, the 560 default attention targets,
LoRA rank r vs SHiRA with r*(rows+cols) entries per weight (equal parameter count). Every method
runs on the same UNet, one after the other; ratios compare methods within this run.

    python benchmarks/switching.py --rank 16 --dtype fp32 --out benchmarks/results/switching_r16_fp32.json
    python benchmarks/switching.py --reduced --repeats 1      # tiny UNet: a smoke run in seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import bar_chart, clock, unet_arguments
from common import median as _median  # benchmarks/ is on the path when run as a script
from shira_diffusion import ShiraEngine, SparseAdapter, budget, find_targets
from shira_diffusion.testing import random_adapter, sdxl_unet, tiny_sdxl_unet
from shira_diffusion.dtypes import DTYPES  # noqa: E402



def median(fn, repeats: int, before=None, after=None) -> float:
    """Every timing here, ours and the peers': one untimed warm-up call, then the median of ``repeats``."""
    return _median(fn, repeats, before, after, warmup=1)


class Reference:
    """The base target weights in a safetensors file, read one weight at a time: a full in-memory
    copy would not fit next to an fp32 UNet and rank-64 adapters in 24 GB."""

    def __init__(self, weights: dict, folder: Path) -> None:
        self.path = folder / "reference.safetensors"
        save_file({k.removeprefix("unet.") + ".weight": w.detach().contiguous() for k, w in weights.items()}, str(self.path))
        with open(self.path, "rb") as f:  # out of the page cache: only the drift checks read it, and 2-4 GB of it
            os.fsync(f.fileno())  # would crowd the timed runs (only written-back pages can be dropped)
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)

    def items(self):
        from safetensors import safe_open

        with safe_open(str(self.path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def drift(unet, base: Reference) -> dict:
    """Elements of the base weights that differ from the original (PEFT wrappers' names mapped back)."""
    state = {name.replace(".base_layer", ""): value for name, value in unet.state_dict().items()}
    changed, worst = 0, 0.0
    for name, ref in base.items():
        value = state[name]
        changed += int((value != ref).sum())
        worst = max(worst, float((value.float() - ref.float()).abs().max()))
    return {"elements_changed": changed, "max_abs_error": worst}


def lora_files(weights: dict, rank: int, dtype: torch.dtype, folder: Path, seeds=(1, 2, 3)) -> list[Path]:
    """diffusers-format LoRA files (what ``save_lora_weights`` writes) with random, non-zero factors."""
    paths = []
    for seed in seeds:
        g = torch.Generator().manual_seed(seed)
        tensors = {}
        for key, w in weights.items():
            path = key.removeprefix("unet.")
            tensors[f"unet.{path}.lora.down.weight"] = (torch.randn(rank, w.shape[1], generator=g) * 0.01).to(dtype)
            tensors[f"unet.{path}.lora.up.weight"] = (torch.randn(w.shape[0], rank, generator=g) * 0.01).to(dtype)
        out = folder / f"lora_{seed}.safetensors"
        save_file(tensors, str(out))
        paths.append(out)
    return paths


def measure_floor(weights, files: list[Path], dtype, args) -> dict:
    """Sorted ``index_copy_`` of A's entries, then B's, into one flat buffer of the targets' size."""
    offsets, total = {}, 0
    for key, w in weights.items():
        offsets[key], total = total, total + w.numel()
    flat = torch.zeros(total, dtype=dtype)
    idx, val = [], []
    for path in files[:2]:
        a = SparseAdapter.load(path)
        idx.append(torch.cat([a.deltas[k].indices.long() + offsets[k] for k in a.deltas]))
        val.append(torch.cat([a.deltas[k].values for k in a.deltas]))
        del a
    return {
        "floor_one_copy_s": median(lambda: flat.index_copy_(0, idx[0], val[0]), args.repeats),
        "floor_switch_s": median(lambda: (flat.index_copy_(0, idx[0], val[0]), flat.index_copy_(0, idx[1], val[1])), args.repeats),
    }


def peak_rss_bytes(reset: bool = False) -> int:
    """The process's peak RSS (VmHWM); ``reset`` starts a new peak (Linux: /proc/self/clear_refs)."""
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def time_load_and_apply(engine: ShiraEngine, path: Path, repeats: int) -> float:
    """Median seconds from a file to its entries written (read, decode, validate, stage, apply)."""

    def load_and_apply():
        engine.stage("a", SparseAdapter.load(path))
        engine.apply("a")

    def unload():
        engine.restore()
        engine.unstage("a")

    return median(load_and_apply, repeats, after=unload)


def bench_ours(unet, weights, adapter_files: list[Path], args, base: Reference) -> dict:
    files = adapter_files
    res: dict = {"entries": SparseAdapter.load(files[0]).num_params}
    engine = ShiraEngine({"unet": unet})
    res["load_s"] = median(lambda: SparseAdapter.load(files[0]), args.repeats)
    res["load_and_apply_s"] = time_load_and_apply(engine, files[0], args.repeats)
    for i, name in enumerate("abc"):
        engine.stage(name, SparseAdapter.load(files[i]))
    loaded = engine.memory()
    res["host_bytes_per_loaded_adapter"] = loaded["a"]["host_bytes"]
    res["device_bytes_inactive"] = sum(m["device_bytes"] for m in loaded.values())
    res["apply_s"] = median(lambda: engine.apply("a"), args.repeats, after=engine.restore)
    res["restore_s"] = median(engine.restore, args.repeats, before=lambda: engine.apply("a"))
    res["switch_s"] = median(lambda: engine.apply("b"), args.repeats, before=lambda: engine.apply("a"), after=engine.restore)
    for n in (2, 3):
        scales = {k: 0.5 + 0.25 * i for i, k in enumerate("abc"[:n])}
        res[f"fuse{n}_s"] = median(lambda: engine.apply(scales), args.repeats, after=engine.restore)
    engine.apply("a")
    res["held_by_active_adapter"] = engine.memory()["a"]  # on a CPU host and device are one memory: all "host"
    res["file_bytes"] = files[0].stat().st_size
    res["inference"] = {"applied_s": forward_time(unet, args)}
    engine.restore()
    res["inference"]["base_s"] = forward_time(unet, args)
    cycles = 100 if not args.reduced else 20
    for i in range(cycles):
        engine.apply(["a", "b", {"a": 1.0, "b": 0.7}, {"a": 0.3, "b": 1.0, "c": 0.5}][i % 4])
    engine.restore()
    res["drift_after_%d_cycles" % cycles] = drift(unet, base)
    for name in "abc":
        engine.unstage(name)
    return res


def bench_lora_strength(unet, weights, args, dtype) -> dict:
    """A LoRA's strength moved 1 and 10 times in our engine: how much the peak RSS grows each way."""
    from shira_diffusion import LoraAdapter, LoraDelta

    g = torch.Generator().manual_seed(7)
    lora = LoraAdapter({k: LoraDelta((torch.randn(args.rank, w.shape[1], generator=g) * 0.01).to(dtype),
                                     (torch.randn(w.shape[0], args.rank, generator=g) * 0.01).to(dtype), 1.0, tuple(w.shape))
                        for k, w in weights.items()})
    engine = ShiraEngine({"unet": unet})
    engine.stage("lora", lora)
    engine.apply({"lora": 1.0})
    res: dict = {"held_while_active": engine.memory()["lora"]}
    for moves in (1, 10):
        before = rss_bytes()
        peak_rss_bytes(reset=True)
        start = time.perf_counter()
        for i in range(moves):
            engine.apply({"lora": 0.9 - 0.05 * i})
        res[f"move_{moves}x"] = {"seconds": time.perf_counter() - start, "peak_rss_growth_bytes": peak_rss_bytes() - before}
        engine.apply({"lora": 1.0})
    engine.restore()
    engine.unstage("lora")
    return res


def forward_time(unet, args) -> float:
    cfg = unet.config
    size = 16 if args.reduced else args.latent
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, size, size, generator=g).to(unet.dtype)
    text = torch.randn(1, 77, cfg.cross_attention_dim, generator=g).to(unet.dtype)
    extra = {"text_embeds": torch.randn(1, cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim, generator=g).to(unet.dtype),
             "time_ids": torch.randn(1, 6, generator=g).to(unet.dtype)}
    with torch.no_grad():
        run = lambda: unet(x, torch.tensor([500]), encoder_hidden_states=text, added_cond_kwargs=extra)  # noqa: E731
        run()
        return median(run, max(3, args.repeats))


def bench_diffusers_lora(unet, weights, args, dtype, folder: Path, base: Reference) -> dict:
    files = lora_files(weights, args.rank, dtype, folder)
    res: dict = {"params": sum(args.rank * (w.shape[0] + w.shape[1]) for w in weights.values()), "file_bytes": files[0].stat().st_size}

    def load(i, name):
        unet.load_lora_adapter(str(files[i]), prefix="unet", adapter_name=name)

    load(0, "warm")
    unet.delete_adapters("warm")
    res["load_s"] = median(lambda: load(0, "a"), args.repeats, after=lambda: unet.delete_adapters("a"))

    def load_and_fuse():  # timed as one call, like ours: a fresh load's first fuse, then back to the base
        load(0, "a")
        unet.fuse_lora(adapter_names=["a"])

    res["load_and_apply_s"] = median(load_and_fuse, args.repeats, after=lambda: (unet.unfuse_lora(), unet.delete_adapters("a")))
    load(0, "a")
    res["fuse_s"] = median(lambda: unet.fuse_lora(adapter_names=["a"]), args.repeats, after=unet.unfuse_lora)
    res["load_s_plus_fuse_s"] = res["load_s"] + res["fuse_s"]  # what earlier runs reported as load + apply
    unet.fuse_lora(adapter_names=["a"])
    res["unfuse_s"] = median(unet.unfuse_lora, args.repeats, before=lambda: unet.fuse_lora(adapter_names=["a"]))
    load(1, "b")
    load(2, "c")

    def a_to_b():
        unet.unfuse_lora()
        unet.fuse_lora(adapter_names=["b"])

    res["switch_s"] = median(a_to_b, args.repeats, before=lambda: unet.fuse_lora(adapter_names=["a"]), after=unet.unfuse_lora)
    res["inference"] = {"unfused_s": None}
    unet.set_adapters(["a"])
    res["inference"]["unfused_s"] = forward_time(unet, args)
    for n in (2, 3):
        names = ["a", "b", "c"][:n]
        weights_n = [0.5 + 0.25 * i for i in range(n)]

        def fuse():
            unet.set_adapters(names, weights_n)
            unet.fuse_lora(adapter_names=names)

        res[f"fuse{n}_s"] = median(fuse, args.repeats, after=unet.unfuse_lora)
    unet.set_adapters(["a"])
    for cycles in (1, 10):
        restore_state(unet, base)  # drift from these cycles alone
        for _ in range(cycles):
            unet.fuse_lora(adapter_names=["a"])
            unet.unfuse_lora()
        res[f"drift_after_{cycles}_fuse_unfuse"] = drift(unet, base)
    res["unload_s"] = clock(unet.unload_lora)
    restore_state(unet, base)
    return res


def bench_peft_shira(unet, weights, args, dtype, folder: Path, base: Reference) -> dict:
    from peft import PeftModel, ShiraConfig, get_peft_model

    names = sorted({k.removeprefix("unet.") for k in weights})
    res: dict = {}
    for seed, name in ((1, "a"), (2, "b")):
        torch.manual_seed(seed)
        model = get_peft_model(unet, ShiraConfig(r=args.rank, target_modules=names, init_weights=False))
        model.save_pretrained(str(folder / f"peft_{name}"))
        unet = model.unload()
    res["file_bytes"] = (folder / "peft_a" / "adapter_model.safetensors").stat().st_size
    res["params"] = sum(args.rank * (w.shape[0] + w.shape[1]) for w in weights.values())
    start = time.perf_counter()
    model = PeftModel.from_pretrained(unet, str(folder / "peft_a"), adapter_name="a")
    res["load_s"] = time.perf_counter() - start
    res["merge_s"] = clock(lambda: model.merge_adapter(["a"]))
    res["load_and_apply_s"] = res["load_s"] + res["merge_s"]  # a sum of one call each (a PEFT load takes 7-16 s), not a timed cycle
    res["unmerge_s"] = clock(model.unmerge_adapter)
    model.load_adapter(str(folder / "peft_b"), adapter_name="b")
    model.merge_adapter(["a"])

    def a_to_b():
        model.unmerge_adapter()
        model.merge_adapter(["b"])

    res["switch_s"] = clock(a_to_b)
    model.unmerge_adapter()
    for cycles in (1, 10):
        restore_state(model.get_base_model(), base)
        for _ in range(cycles):
            model.merge_adapter(["a"])
            model.unmerge_adapter()
        res[f"drift_after_{cycles}_merge_unmerge"] = drift(model.get_base_model(), base)
    unet = model.unload()
    restore_state(unet, base)
    return res, unet


def restore_state(unet, base: Reference) -> None:
    state = {name.replace(".base_layer", ""): value for name, value in unet.state_dict().items()}
    with torch.no_grad():
        for name, ref in base.items():
            state[name].copy_(ref)


def ratios(r: dict) -> dict:
    ours, lora, peft = r["ours"], r["diffusers_lora"], r.get("peft_shira", {})
    out = {
        "switch_vs_floor": ours["switch_s"] / ours["floor_switch_s"],
        "diffusers_switch_over_ours": lora["switch_s"] / ours["switch_s"],
        "diffusers_load_apply_over_ours": lora["load_and_apply_s"] / ours["load_and_apply_s"],
        "diffusers_fuse2_over_ours": lora["fuse2_s"] / ours["fuse2_s"],
        "diffusers_fuse3_over_ours": lora["fuse3_s"] / ours["fuse3_s"],
        "file_vs_lora": ours["file_bytes"] / lora["file_bytes"],
        "inference_applied_over_base": ours["inference"]["applied_s"] / ours["inference"]["base_s"],
        "inference_unfused_lora_over_base": lora["inference"]["unfused_s"] / ours["inference"]["base_s"],
        "host_held_over_file": ours["host_bytes_per_loaded_adapter"] / ours["file_bytes"],
        "fuse2_over_2x_apply": ours["fuse2_s"] / (2 * ours["apply_s"]),
        "fuse3_over_3x_apply": ours["fuse3_s"] / (3 * ours["apply_s"]),
        # the bar's wording: a single-adapter switch (restore + apply) of the same total entries
        "fuse2_over_2x_switch": ours["fuse2_s"] / (2 * ours["switch_s"]),
        "fuse3_over_3x_switch": ours["fuse3_s"] / (3 * ours["switch_s"]),
    }
    strength = r.get("lora_strength")
    if strength:
        out["lora_strength_10x_over_1x_peak_growth"] = (strength["move_10x"]["peak_rss_growth_bytes"]
                                                        / max(1, strength["move_1x"]["peak_rss_growth_bytes"]))
    if peft:
        out.update(
            peft_switch_over_ours=peft["switch_s"] / ours["switch_s"],
            peft_load_apply_over_ours=peft["load_and_apply_s"] / ours["load_and_apply_s"],
            peft_file_vs_lora=peft["file_bytes"] / lora["file_bytes"],
        )
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    unet_arguments(parser)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement, after one untimed warm-up")
    parser.add_argument("--latent", type=int, default=32, help="latent size for the inference timing (32 = 256 px)")
    parser.add_argument("--skip-peft", action="store_true", help="leave out PEFT SHiRA (its load takes ~20 s at r16)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    dtype = DTYPES[args.dtype]
    out = args.out or Path(f"benchmarks/results/switching_r{args.rank}_{args.dtype}{'_reduced' if args.reduced else ''}.json")
    unet = tiny_sdxl_unet(seed=0) if args.reduced else sdxl_unet(dtype)
    torch.nn.Module.to(unet, dtype)
    weights = find_targets({"unet": unet})
    if args.reduced:
        args.rank = min(args.rank, 2)
    assert all(budget(w.shape, rank=args.rank) == args.rank * sum(w.shape) for w in weights.values())
    results: dict = {"config": {**{k: v for k, v in vars(args).items() if k != "out"}, "targets": len(weights),
                                "torch": torch.__version__, "machine": platform.machine(), "cpus": os.cpu_count()}}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        files = []
        for i, seed in enumerate((1, 2, 3)):  # one adapter in memory at a time
            adapter = random_adapter(weights, "rand", rank=args.rank, seed=seed, dtype=dtype, std=1e-3)
            files.append(adapter.save(folder / f"shira_{i}.safetensors"))
            del adapter
        base = Reference(weights, folder)  # on disk: only the target weights are ever written
        results["ours"] = bench_ours(unet, weights, files, args, base)
        print("ours", json.dumps(results["ours"]), flush=True)
        results["lora_strength"] = bench_lora_strength(unet, weights, args, dtype)
        print("lora_strength", json.dumps(results["lora_strength"]), flush=True)
        results["diffusers_lora"] = bench_diffusers_lora(unet, weights, args, dtype, folder, base)
        print("diffusers_lora", json.dumps(results["diffusers_lora"]), flush=True)
        if not args.skip_peft:
            results["peft_shira"], unet = bench_peft_shira(unet, weights, args, dtype, folder, base)
            print("peft_shira", json.dumps(results["peft_shira"]), flush=True)
        # last: its GBs of concatenated indices would leave the allocator churned for whatever ran next
        results["ours"].update(measure_floor(weights, files, dtype, args))
    results["ratios"] = ratios(results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    bar_chart(
        out.with_suffix(".png"),
        f"SDXL UNet, r{args.rank} {args.dtype}: seconds (lower is better)",
        [("ours: switch A->B", results["ours"]["switch_s"]), ("diffusers LoRA: unfuse+fuse", results["diffusers_lora"]["switch_s"]),
         *([("PEFT SHiRA: unmerge+merge", results["peft_shira"]["switch_s"])] if "peft_shira" in results else []),
         ("ours: load+apply", results["ours"]["load_and_apply_s"]), ("diffusers LoRA: load+fuse", results["diffusers_lora"]["load_and_apply_s"]),
         *([("PEFT SHiRA: load+merge", results["peft_shira"]["load_and_apply_s"])] if "peft_shira" in results else [])],
    )
    print(json.dumps(results["ratios"], indent=2), flush=True)
    return results


if __name__ == "__main__":
    main()
