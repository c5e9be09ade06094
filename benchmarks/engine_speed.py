"""Switch speed, load speed and file size of SHiRA adapters on the full-size SDXL UNet.

Measures, in one run on the same weights:

* ``index_copy``: one sorted ``index_copy_`` of all of adapter A's entries into a flat buffer
  as large as all target weights together: the floor any in-place method is held to;
* ``naive``: gather the originals, write ``orig + delta``, restore by writing them back;
* ``engine``: :class:`shira_diffusion.ShiraEngine` apply A, restore, switch A->B, fuse A+B;
* ``load``: :meth:`SparseAdapter.load` of A from a warm page cache;
* file size of A against a LoRA file with the same parameter count and dtype.

Random weights and random masks at a LoRA-r-equivalent budget on the default UNet targets
(about 23.2M entries at r=16). Reports medians and ratios; writes JSON.

    python benchmarks/engine_speed.py --threads 2 --out benchmarks/results/engine_speed.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from common import median  # benchmarks/ is on the path when run as a script
from shira_diffusion import ShiraEngine, SparseAdapter, budget, find_targets
from shira_diffusion.testing import random_adapter, sdxl_unet, tiny_sdxl_unet
from shira_diffusion.dtypes import DTYPES  # noqa: E402



def lora_file_bytes(weights, rank: int, dtype: torch.dtype, path: Path) -> int:
    tensors = {}
    for key, w in weights.items():
        rows, cols = w.shape[0], w.numel() // w.shape[0]
        tensors[f"{key}.lora_A.weight"] = torch.zeros(rank, cols, dtype=dtype)
        tensors[f"{key}.lora_B.weight"] = torch.zeros(rows, rank, dtype=dtype)
    save_file(tensors, str(path))
    return path.stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--rank", type=int, default=16, help="LoRA-equivalent rank of the budget (default 16)")
    parser.add_argument("--dtype", choices=DTYPES, default="fp32", help="weight dtype (default fp32)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--reduced", action="store_true", help="tiny SDXL-layout UNet instead of the full one (smoke runs)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/engine_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    results: dict = {"config": {**vars(args), "out": str(args.out), "torch": torch.__version__, "machine": platform.machine()}}

    t0 = time.perf_counter()
    unet = tiny_sdxl_unet(seed=0) if args.reduced else sdxl_unet(dtype)
    torch.nn.Module.to(unet, dtype)
    if args.reduced:
        args.rank = min(args.rank, 2)
    weights = find_targets({"unet": unet})
    results["config"]["build_unet_s"] = round(time.perf_counter() - t0, 2)
    a = random_adapter(weights, rank=args.rank, seed=1, dtype=dtype, std=1e-3)
    b = random_adapter(weights, rank=args.rank, seed=2, dtype=dtype, std=1e-3)
    assert a.num_params == sum(budget(w.shape, rank=args.rank) for w in weights.values())
    results["config"].update(target_weights=len(weights), entries=a.num_params)
    print(f"{len(weights)} target weights, {a.num_params:,} entries per adapter", flush=True)

    # floor: one sorted index_copy_ of all of A's entries into one flat buffer
    offsets, start = {}, 0
    for key, w in weights.items():
        offsets[key] = start
        start += w.numel()
    flat_buffer = torch.zeros(start, dtype=dtype)
    flat_idx = torch.cat([a.deltas[k].indices.long() + offsets[k] for k in a.deltas])
    flat_val = torch.cat([a.deltas[k].values for k in a.deltas]).to(dtype)
    t_copy = median(lambda: flat_buffer.index_copy_(0, flat_idx, flat_val), args.repeats)
    del flat_buffer, flat_idx, flat_val

    # naive: gather originals at apply time, write, restore by writing them back
    saved = {}

    def naive_apply(adapter):
        for key, d in adapter.deltas.items():
            flat = weights[key].view(-1)
            idx = d.indices.long()
            orig = flat[idx]
            saved[key] = (idx, orig)
            flat[idx] = (orig.float() + d.values.float()).to(dtype)

    def naive_restore():
        for key, (idx, orig) in saved.items():
            weights[key].view(-1)[idx] = orig
        saved.clear()

    def naive_switch():
        naive_restore()
        naive_apply(b)

    with torch.no_grad():
        naive = {
            "apply_s": median(lambda: naive_apply(a), args.repeats, after=naive_restore),
            "restore_s": median(naive_restore, args.repeats, before=lambda: naive_apply(a)),
            "switch_s": median(naive_switch, args.repeats, before=lambda: naive_apply(a), after=naive_restore),
        }
    print("naive", naive, flush=True)

    engine = ShiraEngine({"unet": unet})
    t0 = time.perf_counter()
    engine.stage("a", a)
    engine.stage("b", b)
    stage_s = (time.perf_counter() - t0) / 2

    def per_step(sets) -> list:
        samples = []
        for _ in range(args.repeats):
            for s in sets:
                engine.apply(s)
                samples.append((s, engine.last_switch_s))
        return samples

    samples = per_step(["a", None])
    apply_s = statistics.median(t for s, t in samples if s == "a")
    restore_s = statistics.median(t for s, t in samples if s is None)
    samples = per_step(["a", "b"])
    switch_s = statistics.median(t for _, t in samples)
    engine.apply(None)
    engine.apply({"a": 1.0, "b": 1.0})
    fuse_first_s = engine.last_switch_s
    samples = per_step([{"a": 1.0, "b": 1.0}, None])
    fuse_s = statistics.median(t for s, t in samples if s is not None)
    engine.apply(None)
    rescale = []
    for i in range(args.repeats):  # new scales for the same pair: the union layout is reused
        engine.apply({"a": 0.5 + 0.01 * i, "b": 0.8})
        rescale.append(engine.last_switch_s)
        engine.apply(None)
    eng = {"stage_s": stage_s, "apply_s": apply_s, "restore_s": restore_s, "switch_s": switch_s,
           "fuse_first_s": fuse_first_s, "fuse_cached_s": fuse_s, "fuse_new_scales_s": statistics.median(rescale)}
    print("engine", eng, flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        sizes = {}
        for name, save_dtype in (("fp16", torch.float16), ("fp32", torch.float32)):
            path = a.save(Path(tmp) / f"a_{name}.safetensors", dtype=save_dtype)
            lora = lora_file_bytes(weights, args.rank, save_dtype, Path(tmp) / f"lora_{name}.safetensors")
            sizes[name] = {"shira_bytes": path.stat().st_size, "lora_bytes": lora,
                           "ratio_vs_lora": path.stat().st_size / lora}
            SparseAdapter.load(path)  # warm the page cache
            sizes[name]["load_s"] = median(lambda: SparseAdapter.load(path), args.repeats)
    load_s = sizes["fp16"]["load_s"]
    print("file", sizes, flush=True)

    results.update(
        index_copy_s=t_copy,
        naive=naive,
        engine=eng,
        load_s=load_s,
        file=sizes,
        ratios={
            "engine_apply_vs_index_copy": apply_s / t_copy,
            "engine_restore_vs_index_copy": restore_s / t_copy,
            "engine_switch_vs_two_index_copy": switch_s / (2 * t_copy),
            "naive_apply_vs_engine": naive["apply_s"] / apply_s,
            "naive_switch_vs_engine": naive["switch_s"] / switch_s,
            "load_vs_engine_apply": load_s / apply_s,
            "load_vs_stage_plus_apply": load_s / (stage_s + apply_s),
            "file_fp16_vs_lora": sizes["fp16"]["ratio_vs_lora"],
            "file_fp32_vs_lora": sizes["fp32"]["ratio_vs_lora"],
        },
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["ratios"], indent=2), flush=True)


if __name__ == "__main__":
    main()
