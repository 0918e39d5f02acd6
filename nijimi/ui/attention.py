"""``nijimi explain attention PROMPT [generation flags] --words red,circle --out DIR``: the CLI side of the
``attention`` explain view (:func:`nijimi.explain.attention.attention_maps`); the files are written by
:func:`nijimi.ui.explain.write_explanation`."""

from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

from nijimi.errors import ConfigError
from nijimi.explain.attention import attention_maps
from nijimi.io.files import check_output
from nijimi.pipelines.pipeline import EMBEDDED, load
from nijimi.pipelines.request import GenerationRequest
from nijimi.pipelines.runtime import WEIGHT_DTYPES
from nijimi.ui.explain import write_explanation
from nijimi.ui.progress import ProgressBar

HELP = "DAAM: where each word of the prompt went (per-word cross-attention maps over the generated image)"


def parse_words(text: str | None) -> list[str] | None:
    """``--words red,circle`` → ``["red", "circle"]``; None (every word of the prompt) when not given."""
    if text is None:
        return None
    words = [word.strip() for word in text.split(",")]
    if not all(words):
        raise ConfigError(f"--words {text!r}: an empty word; give words separated by commas, e.g. red,circle")
    return words


def add_attention_arguments(q: argparse.ArgumentParser) -> None:
    """The options of ``explain attention`` besides the generation flags (the caller adds those)."""
    q.add_argument("--words", help="comma-separated words of the prompt to map (default: every word)")
    q.add_argument("--out", required=True, help="output folder: attention.png (grid), one PNG per panel, "
                                                "attention.json (per-word mass and peak, token positions)")
    q.add_argument("--overwrite", action="store_true", help="replace existing files of the same names")
    q.add_argument("--model", help="checkpoint file or diffusers folder (default: the embedded model)")
    q.add_argument("--model-config", help="override detection: preset (sd15, sd21_v, …) or an LDM .yaml")
    q.add_argument("--dtype", choices=tuple(WEIGHT_DTYPES), default="fp32", help="U-Net and text-encoder weights")
    q.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    q.add_argument("--quiet", action="store_true", help="no progress bar")


def cmd_explain_attention(args: argparse.Namespace, request: GenerationRequest) -> int:
    """Generate ``request``'s first image with its attention maps and write the view into ``--out``."""
    words = parse_words(args.words)
    for name in ("attention.png", "attention.json"):
        check_output(check_output(args.out, folder=True) / name, args.overwrite)
    pipe = load(args.model or EMBEDDED, config=args.model_config, device=args.device, dtype=WEIGHT_DTYPES[args.dtype])
    with contextlib.closing(ProgressBar(request.steps, label="attention")) as bar:
        explanation = attention_maps(pipe, request, words,
                                     callback=None if args.quiet else lambda info: bar.update(info.i + 1))
    for path in write_explanation(explanation, Path(args.out), args.overwrite):
        print(path)
    return 0
