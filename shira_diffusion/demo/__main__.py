"""``python -m shira_diffusion.demo instances``: instance images for training on the demo model.

    python -m shira_diffusion.demo instances sks data/sks          # the 5 images the shipped sks adapters learnt from
    python -m shira_diffusion.demo instances --caption "a sks shape on a gray background, in the center" data/mine

Each image comes with its caption in ``NNN.txt``, which ``train_shira_dreambooth.py`` reads.
"""

from __future__ import annotations

import argparse
import random
import sys
from dataclasses import replace

from . import world


def instance_scenes(concept: str | None, caption: str | None, n: int, seed: int) -> list[world.Scene]:
    if caption is None:
        return world.CONCEPTS[concept].instance_scenes(n, seed)
    scene = world.parse_caption(caption)
    rng = random.Random(f"caption/{caption}/{seed}")
    jittered = (world.random_scene(rng) for _ in range(n))  # the size and offset variation of a photo set
    return [replace(scene, radius=j.radius, offset=j.offset) for j in jittered]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shira_diffusion.demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("instances", help="render instance images with caption files")
    p.add_argument("concept", nargs="?", choices=list(world.CONCEPTS),
                   help="a demo concept: its varied instance set (a style's images show every shape and several colours)")
    p.add_argument("out", help="folder to write (replaced if it exists)")
    p.add_argument("--caption", default=None, help="instead of a concept: renders of this caption, varied in size and offset")
    p.add_argument("-n", type=int, default=5, help="how many images")
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if (args.concept is None) == (args.caption is None):
        parser.error("give a concept or --caption (one of them)")
    try:
        scenes = instance_scenes(args.concept, args.caption, args.n, args.seed)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    world.write_scenes(args.out, scenes)
    print(f"wrote {len(scenes)} images with captions to {args.out}; train with --instance_prompt {world.caption(scenes[0])!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
