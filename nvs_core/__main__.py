"""Command line: ``python -m nvs_core {demo,convert,vivid-train,dtu-eval} ...``."""
from __future__ import annotations

import argparse
import sys

from . import convert, dtu
from .viewneti import training as viewneti_training
from .vivid import training as vivid_training
from .genvs import training as genvs_training


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nvs_core", description="ComfyUI-NVS core tools")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="VIVID novel views of a held-out procedural object, with metrics against "
                                       "the copy-source baseline (uses the bundled demo model)")
    demo.add_argument("--out", required=True, help="output folder")
    demo.add_argument("--seed", type=int, default=3, help="procedural scene seed")
    demo.add_argument("--method", choices=["vivid", "genvs", "field"], default="vivid",
                      help="which bundled demo model (genvs: models/demo/genvs_procedural.safetensors; field: fit a "
                           "RealFusion field to 24 procedural views, no SDS, and export orbit/mesh/metrics)")
    demo.set_defaults(func=_run_demo)

    convert.add_cli(sub)
    vivid_training.add_cli(sub)
    genvs_training.add_cli(sub)
    viewneti_training.add_cli(sub)
    dtu.add_cli(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


def _run_demo(args) -> int:
    if getattr(args, "method", "vivid") == "genvs":
        from .genvs.demo import run as run_genvs

        run_genvs(args.out, seed=args.seed)
        return 0
    if getattr(args, "method", "vivid") == "field":
        from .realfusion.demo import run as run_field

        run_field(args.out, seed=args.seed)
        return 0
    from .demo import run

    run(args.out, seed=args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
