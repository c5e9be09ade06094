"""The writer on one thread vs side by side on the intra-op threads, in one process.

On a CPU each weight's gathers and scatters are too small for PyTorch to split, so the writer
deals weights to ``torch.get_num_threads()`` threads. This measures what that buys on the
full-size SDXL UNet: apply, switch A->B, restore, fuse 2 / 3 and stage + first apply, with the
two writers alternating round by round on the same weights and adapters (this machine's
timings drift between processes; within one they can be compared). Every write is checked to
leave the weights bit-exact after the restore.

    python benchmarks/writer_threads.py --rank 16 --dtype fp32 --out benchmarks/results/writer_threads_r16_fp32.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from common import clock, unet_arguments  # benchmarks/ is on the path when run as a script
from shira_diffusion import ShiraEngine, SparseAdapter, find_targets
from shira_diffusion.dtypes import DTYPES
from shira_diffusion.testing import random_adapter, sdxl_unet, tiny_sdxl_unet
from shira_diffusion.writer import WeightWriter

STEPS = ("stage_and_first_apply", "apply", "switch", "restore", "fuse2", "fuse3")


def one_round(engine: ShiraEngine, path: Path) -> dict[str, float]:
    """Each step once, from the base and back to it."""
    adapter = SparseAdapter.load(path)
    out = {"stage_and_first_apply": clock(lambda: (engine.stage("a", adapter), engine.apply("a")))}
    engine.restore()
    out["apply"] = clock(lambda: engine.apply("a"))
    out["switch"] = clock(lambda: engine.apply("b"))
    engine.apply("a")
    out["restore"] = clock(engine.restore)
    out["fuse2"] = clock(lambda: engine.apply({"a": 0.5, "b": 0.75}))
    engine.restore()
    out["fuse3"] = clock(lambda: engine.apply({"a": 0.5, "b": 0.75, "c": 1.25}))
    engine.restore()
    engine.unstage("a")
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    unet_arguments(parser)
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per writer (the first is a warm-up)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    out = args.out or Path(f"benchmarks/results/writer_threads_r{args.rank}_{args.dtype}{'_reduced' if args.reduced else ''}.json")
    unet = tiny_sdxl_unet(seed=0).to(dtype) if args.reduced else sdxl_unet(dtype)
    weights = find_targets({"unet": unet})
    rank = min(args.rank, 2) if args.reduced else args.rank
    before = {k: w.detach().clone() for k, w in weights.items()} if args.reduced else None
    engine = ShiraEngine({"unet": unet})
    if args.reduced:
        engine.writer.PARALLEL_MIN_ENTRIES = 0  # the tiny UNet's writes are below the threshold
    samples: dict[str, dict[str, list[float]]] = {"one_thread": {}, "threads": {}}
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, seed in enumerate((1, 2, 3)):
            adapter = random_adapter(weights, "rand", rank=rank, seed=seed, dtype=dtype, std=1e-3)
            paths.append(adapter.save(Path(tmp) / f"{i}.safetensors"))
            del adapter
        for name, path in zip("bc", paths[1:]):
            engine.stage(name, SparseAdapter.load(path))
        for r in range(args.rounds):
            for writer, threads in (("one_thread", 1), ("threads", None)):  # None: the intra-op thread count
                engine.writer.threads = threads
                took = one_round(engine, paths[0])
                if r:
                    for step, seconds in took.items():
                        samples[writer].setdefault(step, []).append(seconds)
    if before is not None:
        assert all(torch.equal(w, before[k]) for k, w in weights.items()), "a restore left a weight changed"
    medians = {w: {s: statistics.median(v) for s, v in steps.items()} for w, steps in samples.items()}
    results = {
        "config": {**{k: v for k, v in vars(args).items() if k != "out"}, "targets": len(weights), "torch": torch.__version__,
                   "machine": platform.machine(), "cpus": os.cpu_count(), "writer_threads": min(args.threads, WeightWriter.MAX_WORKERS)},
        "seconds": medians,
        "one_thread_over_threads": {s: medians["one_thread"][s] / medians["threads"][s] for s in STEPS},
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(json.dumps(results["one_thread_over_threads"], indent=2), flush=True)
    return results


if __name__ == "__main__":
    main()
