"""The ``nijimi`` command: argument parsing, progress and error printing only; the work lives in the library."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from nijimi import __version__
from nijimi.errors import NijimiError


def _cmd_samplers(args: argparse.Namespace) -> int:
    from nijimi.diffusion.samplers import SAMPLERS, SPACINGS

    for name, fn in SAMPLERS.items():
        print(f"{name:14s} {(fn.__doc__ or '').strip().splitlines()[0]}")
    print(f"σ spacings (suffix): {', '.join(SPACINGS)}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    from nijimi.diffusion.explain import explain_schedules

    for path in explain_schedules(args.out, image=args.image):
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    raise NijimiError("the embedded model is not trained yet; `make train-embedded` builds it (issue: embedded model)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nijimi", description=__doc__)
    parser.add_argument("--version", action="version", version=f"nijimi {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("samplers", help="list the samplers and σ spacings")
    p.set_defaults(func=_cmd_samplers)

    p = sub.add_parser("explain", help="plots that show how the pieces behave")
    what = p.add_subparsers(dest="what", required=True, metavar="TOPIC")
    q = what.add_parser("schedules", help="ᾱ_t, log-SNR and a noising strip for linear, scaled_linear and cosine")
    q.add_argument("--image", help="image to noise (default: a generated test pattern)")
    q.add_argument("--out", required=True, help="output folder for the PNGs")
    q.set_defaults(func=_cmd_explain)

    p = sub.add_parser("demo", help="generate sample images from the embedded model")
    p.add_argument("--out", default="out", help="output folder")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NijimiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
