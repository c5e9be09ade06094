"""``shira``: inspect, convert, compare and bake SHiRA adapters from the shell.

Every bad input (a file that is not what it should be, a mismatch with the model) is one line on
stderr and exit status 2; nothing is written when that happens.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from .adapter import BIAS, COMPONENTS, FORMAT_VERSION, AdapterError, SparseAdapter
from .dtypes import DTYPES, dtype_name
from .interop import file_kind, load_any, write_peft_folders
from .lora import LoraAdapter
from .targets import pipeline_components, resolve_weight

DTYPE_NAMES = tuple(DTYPES)


def _pipeline(model: str, device: str | None = None, dtype: str = "auto"):
    from .loading import load_pipeline

    try:
        return load_pipeline(model, device=device, dtype=dtype)
    except (OSError, ValueError) as err:
        raise AdapterError(f"cannot load model {model!r}: {err}") from None


# ---- commands -------------------------------------------------------------------------------------


def _size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _sparse(path: str, command: str) -> SparseAdapter:
    """A SHiRA file for commands that only read those, with a hint for the other kinds."""
    kind = file_kind(path)
    if kind in ("other", "kohya"):
        raise AdapterError(f"{path}: not a SHiRA adapter (a LoRA file?); {command} reads SHiRA files; "
                           "`shira convert lora2shira` turns a LoRA into one")
    if kind == "peft":
        raise AdapterError(f"{path}: a PEFT folder; {command} reads SHiRA files; `shira convert peft2shira` turns it into one")
    return SparseAdapter.load(path)


def cmd_inspect(args) -> None:
    path = Path(args.file)
    if not args.model and file_kind(path) == "kohya":
        print("\n".join(_kohya_header_lines(path)))  # names and training metadata need no model
        return
    adapter = load_any(path, _pipeline(args.model) if args.model else None)
    lines = [f"file:        {path} ({_size(path):,} bytes)"]
    if isinstance(adapter, LoraAdapter):
        ranks = f" (rank {'/'.join(map(str, adapter.ranks))})" if adapter.ranks else ""
        lines += [
            f"format:      {'kohya/LyCORIS' if adapter.metadata.get('format') == 'kohya' else 'LoRA'} safetensors, read for {args.model}",
            f"kinds:       {', '.join(f'{k} {n}' for k, n in adapter.kinds.items())} (weights)",
            f"params:      {adapter.num_params:,} in {len(adapter.deltas)} deltas{ranks}; "
            f"changes {sum(d.nnz for d in adapter.deltas.values()):,} entries",
            f"dtype:       {dtype_name(adapter.dtype)}",
        ]
        for component in adapter.components:
            deltas = [d for k, d in adapter.deltas.items() if k.startswith(component + ".")]
            lines.append(f"  {component:15s} {len(deltas):4d} deltas  {sum(d.num_params for d in deltas):>14,} params")
        lines += _training_lines(adapter.metadata.get("training") or {})
    else:
        meta = adapter.metadata
        lines += [
            f"format:      {'PEFT SHiRA folder' if path.is_dir() else f'SHiRA safetensors, version {FORMAT_VERSION}'}",
            f"base model:  {meta.get('base_model')}",
            f"fingerprint: {meta.get('fingerprint') or '-'}",
            f"mask:        {meta.get('mask')}",
            f"params:      {adapter.num_params:,} in {len(adapter.deltas)} weights (density {adapter.density:.4%})",
            f"dtype:       {dtype_name(adapter.dtype)}",
        ]
        for component, (weights, nnz, numel) in adapter.by_component().items():
            lines.append(f"  {component:15s} {weights:4d} weights {nnz:>14,} params  density {nnz / numel:.4%}")
    print("\n".join(lines))


def _kohya_header_lines(path: Path) -> list[str]:
    from safetensors import safe_open

    from .kohya import PREFIXES, describe, training_metadata

    with safe_open(str(path), framework="pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        header = f.metadata() or {}
    params = sum(math.prod(s) for k, s in shapes.items() if not k.endswith(".alpha"))
    components = sorted({PREFIXES[p] for k in shapes for p in PREFIXES if k.startswith(p)})
    return [
        f"file:        {path} ({_size(path):,} bytes)",
        "format:      kohya/LyCORIS safetensors (pass --model to check it against a pipeline)",
        f"kinds:       {', '.join(f'{k} {n}' for k, n in describe(shapes).items())} (modules)",
        f"params:      {params:,} in {len(shapes)} tensors, for {', '.join(components)}",
        *_training_lines(training_metadata(header)),
    ]


def _training_lines(training: dict) -> list[str]:
    if not training:
        return ["training:    no training metadata in the file"]
    lines = ["training:"]
    for field in ("title", "output_name", "base_model", "network", "dim", "alpha", "resolution", "images", "epochs", "steps", "comment"):
        if field in training:
            lines.append(f"  {field:13s} {training[field]}")
    if training.get("tags"):
        lines.append("  tags          " + ", ".join(f"{t} ({n})" for t, n in training["tags"].items()))
    if training.get("trigger"):
        lines.append(f"  trigger       {training['trigger']!r} (suggested prompt: \"{training['trigger']}, ...\")")
    return lines


def cmd_convert(args) -> None:
    dtype = DTYPES.get(args.dtype)
    out = Path(args.output)
    kind = file_kind(args.input)
    if args.kind == "peft2shira":
        if kind != "peft":
            raise AdapterError(f"{args.input}: peft2shira reads a PEFT SHiRA folder" + (", this is a SHiRA file already" if kind == "shira" else ""))
        pipe = _pipeline(args.model) if args.model else None
        adapter = load_any(args.input, pipe, component=args.component or "unet")
        print(f"wrote {adapter.save(out, dtype=dtype)} ({adapter.num_params:,} params in {', '.join(adapter.components)})")
    elif args.kind == "shira2peft":
        adapter = _sparse(args.input, "shira2peft")
        if dtype is not None:
            adapter = adapter.to(dtype=dtype)
        if args.component and args.component not in adapter.components:
            raise AdapterError(f"{args.input}: has no {args.component!r} weights (it has {', '.join(adapter.components)})")
        written = write_peft_folders(adapter, out, [args.component] if args.component else None)
        for component, folder in written.items():
            print(f"wrote {folder} ({component})")
        for component in (c for c in adapter.components if c not in written):
            n = sum(1 for k in adapter.deltas if k.startswith(component + "."))
            print(f"not written: {component} ({n} weights); a PEFT folder holds one model, omit --component to write every one")
    else:
        from .interop import lora_to_shira, read_lora

        if kind in ("shira", "peft"):
            what = "already a SHiRA adapter" if kind == "shira" else "a PEFT SHiRA folder (`shira convert peft2shira` reads it)"
            raise AdapterError(f"{args.input}: {what}; lora2shira reads LoRA files")
        if not args.model:
            raise AdapterError("lora2shira needs --model (the SDXL pipeline the LoRA was made for) to read the file")
        if (args.density is None) == (args.lora_equivalent_rank is None):
            raise AdapterError("lora2shira needs exactly one of --density or --lora_equivalent_rank")
        pipe = _pipeline(args.model)
        lora = read_lora(args.input, pipe)
        components = pipeline_components(pipe)
        weights = {k: resolve_weight(components, k).detach() for k, d in lora.deltas.items() if d.needs_base}
        adapter, energy = lora_to_shira(lora, density=args.density, rank=args.lora_equivalent_rank, weights=weights)
        adapter.metadata["base_model"] = args.model
        adapter.save(out, dtype=dtype)
        kinds = ", ".join(f"{k} {n}" for k, n in lora.kinds.items())
        print(f"wrote {out} ({adapter.num_params:,} params from a {lora.num_params:,}-param adapter: {kinds})")
        for component, value in sorted(energy.items()):
            print(f"  retained energy {component}: {value:.4f}")
        if skipped := [k for k in lora.deltas if k.endswith(BIAS)]:
            print(f"  not converted: {len(skipped)} bias deltas (SHiRA adapts weights), e.g. {skipped[0]}")


def cmd_diff(args) -> None:
    from .metrics import interference

    a, b = _sparse(args.a, "diff"), _sparse(args.b, "diff")
    result = interference(a, b)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    agg = result["aggregate"]
    print(f"weights: {agg['weights_shared']} shared, {agg['weights_only_a']} only in A, {agg['weights_only_b']} only in B")
    print(f"{'component':15s} {'weights':>7s} {'overlap':>9s} {'AWOM':>10s} {'AWOR':>8s}")
    for component, m in result["by_component"].items():
        print(f"{component:15s} {m['weights_shared']:7d} {m['overlap']:9.4%} {m['awom']:10.4g} {m['awor']:8.4f}")
    print(f"{'all':15s} {agg['weights_shared']:7d} {agg['overlap']:9.4%} {agg['awom']:10.4g} {agg['awor']:8.4f}")


def _adapter_spec(text: str) -> tuple[str, float]:
    path, sep, scale = text.rpartition(":")
    if sep and path and not Path(text).exists():
        try:
            return path, float(scale)
        except ValueError:
            pass
    return text, 1.0


def cmd_merge(args) -> None:
    from .engine import ShiraEngine

    specs = [_adapter_spec(a) for a in args.adapter]
    pipe = _pipeline(args.model, device=args.device, dtype=args.dtype)
    engine = ShiraEngine(pipe)
    scales = {}
    for i, (path, scale) in enumerate(specs):
        name = f"{i}:{Path(path).stem}"
        engine.stage(name, load_any(path, pipe))
        scales[name] = scale
    engine.apply(scales)
    out = Path(args.out)
    pipe.save_pretrained(str(out), safe_serialization=True)
    print(f"wrote {out} with {', '.join(f'{Path(p).name} x{s:g}' for p, s in specs)} baked in")


def cmd_serve(args) -> None:
    try:
        import ray
        from ray import serve
    except ImportError:
        raise AdapterError("shira serve needs Ray Serve: pip install 'shira-studio[serve]' (or 'ray[serve]')") from None
    from .serve import build_app

    options = {k: v for k, v in vars(args).items() if k not in ("run", "command", "host", "port") and v is not None}
    ray.init(ignore_reinit_error=True)
    serve.start(http_options={"host": args.host, "port": args.port})
    serve.run(build_app(options), name="shira", route_prefix="/")
    print(f"serving on http://{args.host}:{args.port}/ (POST /generate, GET /adapters); Ctrl+C stops")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()


# ---- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shira", description="Inspect, convert, compare and bake SHiRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show an adapter's format, base, mask, density, params, size and dtype")
    p.add_argument("file", help="a SHiRA .safetensors file, a PEFT SHiRA folder, or a LoRA-family file (kohya/LyCORIS: "
                   "its kinds and training metadata, with a suggested trigger prompt)")
    p.add_argument("--model", default=None, help="pipeline to read the file against: needed for diffusers-format LoRA files and "
                   "PEFT folders whose shapes cannot be inferred; checks a kohya file's names and shapes")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("convert", help="convert between SHiRA, PEFT SHiRA and LoRA", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="peft2shira: PEFT SHiRA folder -> SHiRA file\n"
                                   "shira2peft: SHiRA file -> PEFT SHiRA folder (one component)\n"
                                   "lora2shira: LoRA-family file (LoRA, LoCon, LoHa, LoKr, DoRA, full diff) -> SHiRA file\n"
                                   "            keeping each weight's top-k delta entries")
    p.add_argument("kind", choices=["peft2shira", "shira2peft", "lora2shira"])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--component", default=None, choices=COMPONENTS,
                   help="shira2peft: write only this component (default: every one; several go to OUTPUT/<component>/); "
                        "peft2shira: the component a single PEFT folder adapts (default unet; a folder of per-component folders needs none)")
    p.add_argument("--model", default=None, help="pipeline (hub id, folder, single file, 'demo'): needed by lora2shira, "
                   "and by peft2shira when shapes cannot be inferred")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--density", type=float, default=None, help="lora2shira: fraction of each weight kept")
    budget.add_argument("--lora_equivalent_rank", type=int, default=None, help="lora2shira: keep r*(rows+cols) per weight")
    p.add_argument("--dtype", choices=DTYPE_NAMES, default=None, help="dtype of the written values (default: as read)")
    p.set_defaults(run=cmd_convert)

    p = sub.add_parser("diff", help="how much two SHiRA adapters interfere (overlap, AWOM, AWOR)")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--json", action="store_true", help="print per-weight metrics as JSON")
    p.set_defaults(run=cmd_diff)

    p = sub.add_parser("merge", help="bake adapters into a pipeline and save it (save_pretrained)")
    p.add_argument("--model", required=True, help="hub id, diffusers folder, single .safetensors file or 'demo'")
    p.add_argument("--adapter", action="append", required=True, metavar="PATH[:SCALE]", help="SHiRA, PEFT SHiRA or LoRA; repeatable")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", choices=("auto", *DTYPE_NAMES), default="auto")
    p.set_defaults(run=cmd_merge)

    sub.add_parser("studio", add_help=False, help="open the studio (the web app); `shira studio --help` lists its flags")

    p = sub.add_parser("serve", help="serve generations over HTTP on Ray Serve: replicas, adapter-set affinity, batching "
                                     "(pip install 'shira-studio[serve]')",
                       description="POST /generate (JSON) -> PNG; GET /adapters. Each replica loads the model once; requests for an "
                                   "adapter set go to a replica that already staged it; requests with the same set and settings "
                                   "that arrive together share one pipeline call.")
    p.add_argument("--model", default="demo", help="'demo', 'tiny', a hub id, a diffusers folder or a single .safetensors file")
    p.add_argument("--adapters-dir", default=None, help="folder of adapters every replica can read, or a hub repository hf://owner/repo "
                   "(default with --model demo: the demo adapters)")
    p.add_argument("--replicas", type=int, default=1, help="model replicas")
    p.add_argument("--num-gpus", type=float, default=0, help="GPUs per replica (0 on a CPU machine)")
    p.add_argument("--num-cpus", type=float, default=1, help="CPUs Ray reserves per replica")
    p.add_argument("--threads", type=int, default=None, help="torch threads per replica (default: torch's)")
    p.add_argument("--dtype", choices=("auto", *DTYPE_NAMES), default="auto")
    p.add_argument("--device", default=None)
    p.add_argument("--offload", choices=["none", "model", "sequential"], default="none")
    p.add_argument("--max-adapter-memory", dest="max_adapter_mb", type=float, default=None, metavar="MB",
                   help="memory each replica's staged adapters may hold (least recently used ones are unloaded)")
    p.add_argument("--max-batch-size", type=int, default=4, help="requests batched into one pipeline call")
    p.add_argument("--batch-wait-ms", type=float, default=50, help="how long a request waits for others to batch with")
    p.add_argument("--max-sets-per-replica", type=int, default=8, help="adapter sets a replica is routed (Ray Serve multiplexing, LRU)")
    p.add_argument("--no-affinity", dest="affinity", action="store_false", help="route without adapter-set affinity (for comparison)")
    p.add_argument("--no-exact-batches", dest="exact_batches", action="store_false",
                   help="run short batches as they are (faster at low load; a batched image may then differ from the same "
                        "request alone by rounding, as kernels block by batch size)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the service to your network")
    p.add_argument("--port", type=int, default=8000)
    p.set_defaults(run=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["studio"]:  # the studio has its own flags (those of `python -m app`)
        from .app.cli import main as studio

        studio(argv[1:], prog="shira studio")
        return 0
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (AdapterError, ValueError, KeyError, OSError) as err:
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"shira: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
