"""Load on ``shira serve`` (local Ray Serve, demo model, loopback): the same bounded load against
the same replica count, with and without same-set batching (exact, the default: short batches
padded so batching never changes a pixel; and not exact), and with and without adapter-set
affinity (multiplexed routing vs Serve's default routing), side by side in one run.

Each configuration gets ``--requests`` requests (a Zipf-like mix over 6 adapter sets, from
``--concurrency`` client threads), stopped after ``--max-seconds`` whatever is left; reported:
requests per second, p50/p95 latency, and the share of requests served by a replica that
already had the set staged (from the response headers).

    python benchmarks/serve_load.py --out benchmarks/results/serve_load.json
    python benchmarks/serve_load.py --requests 40 --replicas 2   # smoke run
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shira_diffusion.testing import free_port  # noqa: E402

SETS = [{}, {"sks-shira-rand": 1.0}, {"bluefire-shira-rand": 1.0}, {"sks-shira-rand": 1.0, "bluefire-shira-rand": 0.7},
        {"paintings-shira-wm": 1.0}, {"sks-lora": 1.0, "paintings-lora": 0.5}]
PROMPT = "a sks shape on a gray background, in the center, in bluefire style"


def post(url: str, body: dict) -> tuple[float, dict]:
    start = time.perf_counter()
    req = urllib.request.Request(url + "/generate", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        r.read()
        return time.perf_counter() - start, r.headers


def run_load(url: str, load: list[dict], concurrency: int, max_seconds: float) -> dict:
    deadline = time.perf_counter() + max_seconds
    results = []

    def one(body):
        if time.perf_counter() > deadline:
            return None
        return post(url, body)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for r in pool.map(one, load) if r is not None]
    wall = time.perf_counter() - start
    latencies = sorted(r[0] for r in results)
    return {"requests": len(results), "seconds": wall, "requests_per_s": len(results) / wall,
            "p50_s": statistics.median(latencies), "p95_s": latencies[max(0, int(0.95 * len(latencies)) - 1)],
            "staged_share": sum(h.get("X-Shira-Staged") == "1" for _, h in results) / len(results),
            "retried": sum(h.get("X-Shira-Attempts") == "2" for _, h in results)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=4)
    parser.add_argument("--max-seconds", type=float, default=300, help="each configuration stops after this")
    parser.add_argument("--max-adapter-mb", type=float, default=1.5,
                        help="each replica's adapter budget: about three of the demo adapters, so a replica cannot hold every set")
    parser.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = parser.parse_args(argv)

    import ray
    from ray import serve

    from shira_diffusion.serve import build_app

    rng = random.Random(0)
    weights = [1 / (i + 1) for i in range(len(SETS))]
    load = [{"prompt": PROMPT, "seed": rng.randrange(1000), "steps": args.steps, "adapters": SETS[rng.choices(range(len(SETS)), weights)[0]]}
            for _ in range(args.requests)]
    configs = {  # "exact": short batches padded to the batch size, so batching never changes a pixel (the default)
        "batching+affinity": {"max_batch_size": args.max_batch_size, "affinity": True},
        "batching (not exact)+affinity": {"max_batch_size": args.max_batch_size, "affinity": True, "exact_batches": False},
        "no batching+affinity": {"max_batch_size": 1, "affinity": True},
        "batching, no affinity": {"max_batch_size": args.max_batch_size, "affinity": False},
    }
    ray.init(num_cpus=max(4, 2 * args.replicas), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    out = {"replicas": args.replicas, "requests": args.requests, "concurrency": args.concurrency, "steps": args.steps, "sets": len(SETS),
           "max_adapter_mb_per_replica": args.max_adapter_mb, "configs": {}}
    try:
        for name, config in configs.items():
            serve.run(build_app({"replicas": args.replicas, "num_cpus": 1, "threads": 1, "max_sets_per_replica": 3,
                                 "batch_wait_ms": 30, "max_adapter_mb": args.max_adapter_mb, **config}), name="shira", route_prefix="/")
            for body in load[:6]:  # warm up: every replica's first call pays for lazy initialisation
                post(url, body)
            out["configs"][name] = run_load(url, load, args.concurrency, args.max_seconds)
            print(name, json.dumps(out["configs"][name]), flush=True)
            serve.delete("shira")
    finally:
        serve.shutdown()
        ray.shutdown()
    c = out["configs"]
    out["batching_speedup"] = c["batching+affinity"]["requests_per_s"] / c["no batching+affinity"]["requests_per_s"]
    out["inexact_batching_speedup"] = c["batching (not exact)+affinity"]["requests_per_s"] / c["no batching+affinity"]["requests_per_s"]
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
