"""AWOM and AWOR for a pair of adapters on the full-size SDXL UNet's attention weights: our
factor-based computation (sparse product for AWOR, Lanczos on the factors for AWOM) against the
exact dense SVD it replaced, on the same weights, in one run.

The whole pair is timed with ours; the exact method is timed on ``--samples`` weights drawn with a
fixed seed (all of them would take minutes) and extrapolated by the weights' share of its cost,
and the largest relative AWOM error over those samples is reported. Only shapes come from the
UNet (built on the meta device); the adapters are random ``rand`` masks with random values.

    python benchmarks/interference.py --out benchmarks/results/interference.json
    python benchmarks/interference.py --reduced       # the tiny UNet (smoke run)
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import clock  # noqa: E402

from shira_diffusion import find_targets, interference  # noqa: E402
from shira_diffusion.metrics import weight_interference  # noqa: E402
from shira_diffusion.testing import random_adapter, sdxl_unet, tiny_sdxl_unet  # noqa: E402


def exact(a, b) -> tuple[float, float]:
    """The method this replaced: both deltas dense, the product dense, a full SVD; ``(awom, awor)``."""
    p = a.to_dense(torch.float32).reshape(a.shape[0], -1).T @ b.to_dense(torch.float32).reshape(b.shape[0], -1)
    return float(torch.linalg.matrix_norm(p, ord=2)), 1.0 - int(torch.count_nonzero(p)) / p.numel()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rank", type=int, default=16, help="LoRA-equivalent rank of each adapter's masks")
    parser.add_argument("--kind", default="rand", help="mask kind of both adapters")
    parser.add_argument("--samples", type=int, default=20, help="weights the exact SVD is run on")
    parser.add_argument("--reduced", action="store_true", help="the tiny UNet (smoke run)")
    parser.add_argument("--out", default="benchmarks/results/interference.json")
    args = parser.parse_args(argv)

    unet = tiny_sdxl_unet(seed=0) if args.reduced else sdxl_unet(torch.float32, device="meta")
    weights = find_targets({"unet": unet})
    a = random_adapter(weights, args.kind, rank=args.rank, seed=1)
    b = random_adapter(weights, args.kind, rank=args.rank, seed=2)
    start = time.perf_counter()
    ours = interference(a, b)
    ours_s = time.perf_counter() - start

    keys = sorted(ours["per_weight"])
    sample = sorted(random.Random(0).sample(keys, min(args.samples, len(keys))))
    rows, exact_s, ours_sample_s = [], 0.0, 0.0
    for key in sample:
        got = {}
        ours_sample_s += clock(lambda: got.update(weight_interference(a.deltas[key], b.deltas[key])))
        want = [None, None]
        exact_s += clock(lambda: want.__setitem__(slice(None), exact(a.deltas[key], b.deltas[key])))
        rows.append({"weight": key, "shape": list(a.deltas[key].shape), "awom": got["awom"], "awom_exact": want[0],
                     "awom_rel_error": abs(got["awom"] - want[0]) / want[0] if want[0] else 0.0,
                     "awor": got["awor"], "awor_exact": want[1]})
    exact_total_est = exact_s / ours_sample_s * ours_s if ours_sample_s else None  # the samples' cost ratio, over all weights
    result = {
        "unet": "tiny" if args.reduced else "sdxl (full size, meta device for shapes)",
        "weights": len(keys), "rank": args.rank, "kind": args.kind, "threads": torch.get_num_threads(),
        "ours_total_s": ours_s,
        "samples": len(sample), "ours_on_samples_s": ours_sample_s, "exact_on_samples_s": exact_s,
        "exact_over_ours_on_samples": exact_s / ours_sample_s if ours_sample_s else None,
        "exact_total_estimated_s": exact_total_est,
        "max_awom_rel_error": max((r["awom_rel_error"] for r in rows), default=0.0),
        # an entry of dW1^T dW2 that cancels to exactly 0.0 in one fp32 summation order may not in another
        "max_awor_abs_error": max((abs(r["awor"] - r["awor_exact"]) for r in rows), default=0.0),
        "aggregate": ours["aggregate"],
        "per_sample": rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{len(keys)} weights: ours {ours_s:.1f} s; exact SVD {exact_s / ours_sample_s:.1f}x slower on {len(sample)} samples "
          f"(~{exact_total_est:.0f} s for all); max AWOM error {result['max_awom_rel_error']:.2e}; "
          f"max AWOR error {result['max_awor_abs_error']:.2e}")
    return result


if __name__ == "__main__":
    main()
