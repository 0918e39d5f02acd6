"""The ``nijimi`` command: argument parsing, progress and error printing only; the work lives in the library.
Errors (the library's and the command line's) are one ``error: …`` line, exit 2; ``torchrun`` ranks end here."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

from nijimi import __version__
from nijimi.diffusion.explain import explain_schedules
from nijimi.diffusion.samplers import SAMPLERS, SPACINGS
from nijimi.errors import NijimiError
from nijimi.io.checkpoint import convert
from nijimi.ui.adapters import add_adapter_parsers
from nijimi.ui.control import add_control_parsers
from nijimi.ui.demo import run_demo
from nijimi.ui.eval import add_eval_parsers
from nijimi.ui.generate import add_generate_arguments, add_output_arguments, cmd_generate, cmd_info, cmd_reproduce
from nijimi.ui.train import add_train_parsers


def _cmd_samplers(args: argparse.Namespace) -> int:
    for name, fn in SAMPLERS.items():
        print(f"{name:14s} {(fn.__doc__ or '').strip().splitlines()[0]}")
    print(f"σ spacings (suffix): {', '.join(SPACINGS)}")
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    for path in explain_schedules(args.out, image=args.image):
        print(path)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    for path in run_demo(args.out):
        print(path)
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    report = convert(args.src, args.dst, to=args.to, half=args.half, config=args.model_config)
    print(report.summary())
    print(args.dst)
    return 0


def _add_generation_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="text to image (img2img with --init, inpainting with --mask)")
    add_generate_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("reproduce", help="regenerate an image from the recipe in its PNG metadata")
    p.add_argument("image", help="a PNG written by nijimi")
    p.add_argument("--model", help="use this model file instead of the one recorded")
    add_output_arguments(p)
    p.set_defaults(func=cmd_reproduce)

    p = sub.add_parser("info", help="print the generation metadata of a PNG (nijimi, A1111, ComfyUI)")
    p.add_argument("image")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="convert a model between single-file and diffusers-folder layouts")
    p.add_argument("src", help="checkpoint file or diffusers folder")
    p.add_argument("dst", help="output .safetensors file or folder")
    p.add_argument("--to", choices=("single", "diffusers"), help="output layout (default: from DST's name)")
    p.add_argument("--half", action="store_true", help="store float16")
    p.add_argument("--model-config", help="override detection: preset name or LDM .yaml")
    p.set_defaults(func=_cmd_convert)


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one ``error: …`` line (exit 2), like the library's errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}\n")


DESCRIPTION = "nijimi (滲み): latent diffusion (Stable Diffusion) from scratch, fast on an ordinary CPU."


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nijimi", description=DESCRIPTION)
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

    _add_generation_parsers(sub)
    add_train_parsers(sub)
    add_control_parsers(sub)
    add_adapter_parsers(sub)
    add_eval_parsers(sub)

    p = sub.add_parser("demo", help="generate sample images from the embedded model")
    p.add_argument("--out", default="out", help="output folder")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # a flag's parser may raise NijimiError too (e.g. --control)
        code = args.func(args)
    except NijimiError as exc:
        print(f"error: {exc}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        code = 130
    finish_distributed(code)
    return code


def finish_distributed(code: int) -> None:
    """End a ``torchrun`` process whose work is done: leave the process group and exit at once with ``code``.

    After gloo's teardown one of its C++ static destructors intermittently calls ``std::terminate`` at interpreter
    exit (SIGABRT, "terminate called without an active exception"), which torchrun reports as a failed rank though
    every output was written; ``os._exit`` skips those destructors. Does nothing outside a process group.
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return
    if code == 0:
        torch.distributed.barrier()  # no rank leaves while another still writes
    torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
