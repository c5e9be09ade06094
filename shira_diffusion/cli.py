"""``shira``: inspect, convert, compare and bake SHiRA adapters from the shell.

Every bad input (a file that is not what it should be, a mismatch with the model) is one line on
stderr and exit status 2; nothing is written when that happens.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .adapter import FORMAT_VERSION, AdapterError, SparseAdapter
from .interop import load_any

DTYPE_NAMES = ("fp32", "fp16", "bf16")


def _pipeline(model: str, device: str | None = None, dtype: str = "auto"):
    from .pipeline import load_pipeline

    try:
        return load_pipeline(model, device=device, dtype=dtype)
    except (OSError, ValueError) as err:
        raise AdapterError(f"cannot load model {model!r}: {err}") from None


# ---- commands -------------------------------------------------------------------------------------


def cmd_inspect(args) -> None:
    path = Path(args.file)
    adapter = load_any(path, _pipeline(args.model) if args.model else None)
    size = path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.iterdir())
    meta = adapter.metadata
    lines = [
        f"file:        {path} ({size:,} bytes)",
        f"format:      {'PEFT SHiRA folder' if path.is_dir() else f'SHiRA safetensors, version {FORMAT_VERSION}'}",
        f"base model:  {meta.get('base_model')}",
        f"fingerprint: {meta.get('fingerprint') or '-'}",
        f"mask:        {meta.get('mask')}",
        f"params:      {adapter.num_params:,} in {len(adapter.deltas)} weights (density {adapter.density:.4%})",
        f"dtype:       {str(adapter.dtype).replace('torch.', '')}",
    ]
    for component, (weights, nnz, numel) in adapter.by_component().items():
        lines.append(f"  {component:15s} {weights:4d} weights {nnz:>14,} params  density {nnz / numel:.4%}")
    print("\n".join(lines))


def cmd_convert(args) -> None:
    import torch

    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    out = Path(args.output)
    if args.kind == "peft2shira":
        pipe = _pipeline(args.model) if args.model else None
        adapter = load_any(args.input, pipe, component=args.component)
        if not Path(args.input).is_dir():
            raise AdapterError(f"{args.input}: peft2shira reads a PEFT SHiRA folder")
        print(f"wrote {adapter.save(out, dtype=dtype)} ({adapter.num_params:,} params)")
    elif args.kind == "shira2peft":
        adapter = SparseAdapter.load(args.input)
        if dtype is not None:
            adapter = adapter.to(dtype=dtype)
        print(f"wrote {adapter.to_peft(out, component=args.component)}")
    else:
        from .interop import lora_to_shira, read_lora

        if not args.model:
            raise AdapterError("lora2shira needs --model (the SDXL pipeline the LoRA was made for) to read the file")
        if (args.density is None) == (args.lora_equivalent_rank is None):
            raise AdapterError("lora2shira needs exactly one of --density or --lora_equivalent_rank")
        lora = read_lora(args.input, _pipeline(args.model))
        adapter, energy = lora_to_shira(lora, density=args.density, rank=args.lora_equivalent_rank)
        adapter.metadata["base_model"] = args.model
        adapter.save(out, dtype=dtype)
        print(f"wrote {out} ({adapter.num_params:,} params from a {lora.num_params:,}-param LoRA)")
        for component, value in sorted(energy.items()):
            print(f"  retained energy {component}: {value:.4f}")


def cmd_diff(args) -> None:
    from .metrics import interference

    a, b = SparseAdapter.load(args.a), SparseAdapter.load(args.b)
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


# ---- parser ---------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shira", description="Inspect, convert, compare and bake SHiRA adapters.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("inspect", help="show an adapter's format, base, mask, density, params, size and dtype")
    p.add_argument("file", help="a SHiRA .safetensors file or a PEFT SHiRA folder")
    p.add_argument("--model", default=None, help="pipeline giving weight shapes, for PEFT folders whose shapes cannot be inferred")
    p.set_defaults(run=cmd_inspect)

    p = sub.add_parser("convert", help="convert between SHiRA, PEFT SHiRA and LoRA", formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="peft2shira: PEFT SHiRA folder -> SHiRA file\n"
                                   "shira2peft: SHiRA file -> PEFT SHiRA folder (one component)\n"
                                   "lora2shira: LoRA file -> SHiRA file keeping each weight's top-k delta entries")
    p.add_argument("kind", choices=["peft2shira", "shira2peft", "lora2shira"])
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--component", default="unet", choices=["unet", "text_encoder", "text_encoder_2"], help="PEFT side's component")
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
    return parser


def main(argv: list[str] | None = None) -> int:
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
