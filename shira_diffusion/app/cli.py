"""``shira studio`` / ``python -m app``: start the studio."""

from __future__ import annotations

import argparse
import sys

DEMO = "demo"


def parse_args(argv: list[str] | None = None, prog: str = "python -m app") -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=prog,
        description=(
            "shira-studio: load an SDXL pipeline once, then swap SHiRA adapters in place between "
            "generations. With no flags it opens offline on the built-in demo model (a small SDXL-architecture "
            "model trained on a world of coloured shapes) with its demo adapters loaded."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model",
        default=DEMO,
        help="'demo' (the built-in demo model, no download), 'tiny' (random weights), a hub id, a local "
        "diffusers folder, or a single-file .safetensors checkpoint",
    )
    parser.add_argument(
        "--adapters-dir",
        default=None,
        help="folder scanned for SHiRA and LoRA .safetensors adapters (default with --model demo: the demo adapters in "
        "shira_diffusion/assets/adapters; pass '' for none)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind; 0.0.0.0 exposes the studio to your network")
    parser.add_argument("--port", type=int, default=7860, help="port to listen on")
    parser.add_argument("--share", action="store_true", help="create a public share link (off by default)")
    parser.add_argument("--auth", default=None, metavar="USER:PASSWORD", help="require this login")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--dtype",
        choices=["auto", "fp32", "fp16", "bf16"],
        default="auto",
        help="weight dtype (auto: fp16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument("--offload", choices=["none", "model", "sequential"], default="none",
                        help="model: one component at a time on the GPU (SDXL in ~12 GB); sequential: layer by layer (~8 GB, slower)")
    parser.add_argument("--vae", default=None, metavar="ID_OR_PATH",
                        help="a separate VAE (hub id, folder or .safetensors); for fp16 SDXL the fp16-fix VAE avoids fp32 decodes")
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet once (switching never recompiles)")
    parser.add_argument("--config", default=None, metavar="FOLDER",
                        help="with a single-file --model: a local diffusers folder holding its configs and tokenizers (offline)")
    parser.add_argument("--allow-uploads", action="store_true",
                        help="let browser users add and remove adapters (off: the library is shared by every session, so only "
                             "--adapters-dir fills it)")
    parser.add_argument("--max-upload-mb", type=int, default=512, help="largest adapter file accepted")
    parser.add_argument("--max-adapter-memory", "--max-adapters-mb", dest="max_adapters_mb", type=int, default=None, metavar="MB",
                        help="memory all loaded adapters may hold together, by the engine's accounting; an upload past it is refused "
                             "(default: no limit)")
    parser.add_argument("--max-adapters", type=int, default=None, help="most adapters the library holds (default: no limit)")
    parser.add_argument("--image-encoder", default=None, metavar="FOLDER",
                        help="a local CLIP vision model folder: the Compare and X/Y concept figures use image-embedding similarity "
                             "(default: the demo model's detectors, else a labelled pixel fallback)")
    parser.add_argument("--max-backup-mb", type=int, default=None,
                        help="host memory for exact-restore copies of LoRA-covered weights (default: no limit)")
    args = parser.parse_args(argv)
    if args.auth is not None and ":" not in args.auth:
        parser.error("--auth must look like user:password")
    return args


def _mb(value: int | None) -> int | None:
    return None if value is None else value * 2**20


def main(argv: list[str] | None = None, prog: str = "python -m app") -> None:
    args = parse_args(argv, prog)
    from . import studio as page

    options = dict(offload=args.offload, vae=args.vae, compile=args.compile, config=args.config)
    try:
        pipe, notes = page.load_pipeline(args.model, device=args.device, dtype=args.dtype, **options)
    except (OSError, ValueError) as err:
        sys.exit(f"cannot load --model {args.model!r}: {err}")
    encoder = None
    if args.image_encoder:
        from ..compare import ImageEncoder

        try:
            encoder = ImageEncoder(args.image_encoder)
        except (OSError, ValueError) as err:
            sys.exit(f"cannot load --image-encoder {args.image_encoder!r}: {err}")
    studio = page.Studio(pipe, **notes, max_bytes=_mb(args.max_upload_mb), max_adapter_bytes=_mb(args.max_adapters_mb),
                         max_backup_bytes=_mb(args.max_backup_mb), allow_uploads=args.allow_uploads,
                         max_adapters=args.max_adapters, encoder=encoder)
    adapters_dir = args.adapters_dir
    if adapters_dir is None and args.model == DEMO:
        from ..demo.model import ADAPTERS_DIR

        adapters_dir = ADAPTERS_DIR
    if adapters_dir:
        for line in studio.scan(adapters_dir):
            print(line)
    auth = tuple(args.auth.split(":", 1)) if args.auth else None
    page.build_ui(studio).launch(server_name=args.host, server_port=args.port, share=args.share, auth=auth)
