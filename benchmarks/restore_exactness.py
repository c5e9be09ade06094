"""Soak test of the engine's exactness: N random apply/switch/fuse/restore cycles per dtype, with
the writer on one thread and on its threaded CPU path.

After every cycle the adapted weights must equal a reference computed from scratch (base +
sum of scaled deltas in fp32 at the union, cast once), and after the final restore every
parameter must be bit-identical (``torch.equal``) to the untouched model. Writes JSON.

    python benchmarks/restore_exactness.py --cycles 10000 --out benchmarks/results/restore_exactness.json
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

from shira_diffusion import ShiraEngine, find_targets
from shira_diffusion.testing import random_adapter, reference_weights, tiny_sdxl_unet
from shira_diffusion.dtypes import DTYPES  # noqa: E402



def soak(dtype: torch.dtype, cycles: int, adapters_n: int, density: float, seed: int, check_every: int, writers: int = 1) -> dict:
    """``writers`` > 1: every write takes the writer's threaded CPU path (the tiny UNet's writes
    are below the size where it would on its own)."""
    unet = tiny_sdxl_unet(seed=0)
    torch.nn.Module.to(unet, dtype)
    weights = find_targets({"unet": unet})
    base_state = {k: v.clone() for k, v in unet.state_dict().items()}
    base = {k: w.detach().clone() for k, w in weights.items()}
    names = [f"a{i}" for i in range(adapters_n)]
    adapters = {n: random_adapter(weights, "rand", density=density, seed=seed + i, dtype=dtype, std=0.5) for i, n in enumerate(names)}
    engine = ShiraEngine({"unet": unet})
    engine.writer.threads = writers
    if writers > 1:
        engine.writer.PARALLEL_MIN_ENTRIES = 0
    for n, a in adapters.items():
        engine.stage(n, a)
    rng = random.Random(seed)
    mismatches = checks = 0
    start = time.perf_counter()
    for cycle in range(cycles):
        if rng.random() < 0.2:
            engine.restore()
        else:
            chosen = rng.sample(names, rng.randint(1, len(names)))
            engine.apply({n: rng.choice([1.0, 0.5, -1.0, round(rng.uniform(-2, 2), 3)]) for n in chosen})
        if cycle % check_every == 0:
            checks += 1
            want = reference_weights(base, adapters, engine.active)
            for key, w in weights.items():
                if not torch.equal(w, want.get(key, base[key])):
                    mismatches += 1
    engine.restore()
    final = unet.state_dict()
    differing = [k for k in final if not torch.equal(final[k], base_state[k])]
    return {
        "cycles": cycles,
        "checks": checks,
        "mismatched_weights_during": mismatches,
        "tensors_differing_after_restore": len(differing),
        "bit_exact": mismatches == 0 and not differing,
        "seconds": round(time.perf_counter() - start, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cycles", type=int, default=10_000, help="random operations per dtype")
    parser.add_argument("--dtypes", nargs="+", choices=DTYPES, default=list(DTYPES))
    parser.add_argument("--adapters", type=int, default=4, help="adapters staged at once")
    parser.add_argument("--density", type=float, default=0.2, help="mask density (high, to force overlaps)")
    parser.add_argument("--check-every", type=int, default=100, help="compare against the reference every N cycles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2], help="writer threads to soak (1: one thread; N: the threaded path)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/restore_exactness.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    results = {}
    for writers in args.writers:
        for name in args.dtypes:
            key = name if writers == 1 else f"{name}, {writers} writer threads"
            results[key] = soak(DTYPES[name], args.cycles, args.adapters, args.density, args.seed, args.check_every, writers)
            print(key, results[key], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"config": {**vars(args), "out": str(args.out)}, "results": results}, indent=2))
    if not all(r["bit_exact"] for r in results.values()):
        raise SystemExit("NOT bit-exact: see the JSON")


if __name__ == "__main__":
    main()
