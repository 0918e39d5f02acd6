"""``nijimi explain forward | trajectory | attention | adapters``: run an explain view (:mod:`nijimi.explain`) and
write what it returns with :func:`write_explanation` — each panel as ``DIR/<panel.name>.png``, the panels' grid as
``DIR/<view>.png`` and its ``info`` as ``DIR/<view>.json``, every file atomically and none replacing an existing file
without ``--overwrite`` (all are checked before the first is written). The prompt views take ``generate``'s
generation flags, from the request (``cli.build_parser`` passes its :func:`add_request_arguments` and
``request_from_args``, so this module needs nothing of ``nijimi.cli``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
from collections.abc import Callable
from pathlib import Path

from nijimi.embedded import EMBEDDED
from nijimi.errors import ConfigError
from nijimi.explain.adapter_effects import adapter_effects
from nijimi.explain.attention import attention_maps
from nijimi.explain.forward import DEFAULT_TIMESTEPS, forward_process
from nijimi.explain.panels import Explanation, grid
from nijimi.explain.trajectory import trajectory
from nijimi.io.files import atomic_write, check_output
from nijimi.pipelines.images import open_image
from nijimi.pipelines.pipeline import Pipeline, load
from nijimi.pipelines.request import GenerationRequest
from nijimi.pipelines.runtime import WEIGHT_DTYPES
from nijimi.ui.progress import ProgressBar

PROMPT_VIEWS: dict[str, tuple[Callable[[Pipeline, GenerationRequest], Explanation], str]] = {
    "trajectory": (trajectory, "x_t and the prediction x̂₀ after every sampling step, decoded"),
    "adapters": (adapter_effects, "where the request's LoRAs act: weight and activation change per U-Net block"),
}
"""The prompt views this module adds: name → (view, help); ``attention`` (:func:`_add_attention`) also takes words."""
ATTENTION_HELP = "DAAM: where each word of the prompt went (per-word cross-attention maps over the generated image)"


def explanation_files(explanation: Explanation, out: Path) -> list[Path]:
    """Where :func:`write_explanation` puts the panels, the grid and the info."""
    return [*(out / f"{p.name}.png" for p in explanation.panels), out / f"{explanation.view}.png",
            out / f"{explanation.view}.json"]


def write_explanation(explanation: Explanation, out: str | Path, overwrite: bool = False) -> list[Path]:
    """Write the view's panels, grid (``info["columns"]`` per row, else about a square) and info into the folder
    ``out``; returns the paths written. Existing files are refused before anything is written unless
    ``overwrite``."""
    folder = check_output(out, folder=True)
    paths = [check_output(path, overwrite) for path in explanation_files(explanation, folder)]
    if len(set(paths)) != len(paths):
        raise ConfigError(f"view {explanation.view}: two of its files would share a name ({[p.name for p in paths]})")
    folder.mkdir(parents=True, exist_ok=True)
    columns = explanation.info.get("columns") or math.ceil(math.sqrt(len(explanation.panels)))
    images = [p.image for p in explanation.panels] + [grid(explanation.panels, columns)]
    for path, image in zip(paths, images, strict=False):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        with atomic_write(path, "wb", overwrite=overwrite) as file:
            file.write(buffer.getvalue())
    with atomic_write(paths[-1], "w", overwrite=overwrite) as file:
        json.dump(explanation.info, file, ensure_ascii=False, indent=1)
    return paths


def _timesteps(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None


def parse_words(text: str | None) -> list[str] | None:
    """``--words red,circle`` → ``["red", "circle"]``; None (every word of the prompt) when not given."""
    if text is None:
        return None
    words = [word.strip() for word in text.split(",")]
    if not all(words):
        raise ConfigError(f"--words {text!r}: an empty word; give words separated by commas, e.g. red,circle")
    return words


def _load(args: argparse.Namespace) -> Pipeline:
    return load(args.model or EMBEDDED, config=args.model_config, device=args.device,
                dtype=WEIGHT_DTYPES[args.dtype])


def _check_out(args: argparse.Namespace, view: str) -> None:
    """Refuse the view's grid and info files before any work (the panels are checked once their names are known)."""
    for name in (f"{view}.png", f"{view}.json"):
        check_output(check_output(args.out, folder=True) / name, args.overwrite)


def _finish(explanation: Explanation, args: argparse.Namespace) -> int:
    for path in write_explanation(explanation, args.out, args.overwrite):
        print(path)
    return 0


def _cmd_forward(args: argparse.Namespace) -> int:
    _check_out(args, "forward")
    image = open_image(args.image)
    return _finish(forward_process(_load(args), image, args.timesteps, seed=args.seed), args)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: a PNG per panel, the grid and the "
                   "numbers as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace existing files of the same names")
    p.add_argument("--model", help="checkpoint file or diffusers folder (default: the embedded model)")
    p.add_argument("--model-config", help="override detection: preset (sd15, sd21_v, …) or an LDM .yaml")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=tuple(WEIGHT_DTYPES), default="fp32", help="U-Net and text-encoder weights")


def add_explain_parsers(what: argparse._SubParsersAction, add_request_arguments: Callable[[argparse.ArgumentParser],
                        None], request_from_args: Callable[[argparse.Namespace], GenerationRequest]) -> None:
    """Add ``forward`` and the prompt views to ``nijimi explain``'s topics; the prompt views take the generation
    flags ``add_request_arguments`` adds and ``request_from_args`` reads."""
    about = ("an image encoded by the model's VAE, noised by q(x_t|x0) under the model's, the linear and the cosine "
             "schedules, decoded; with ᾱ_t and SNR plots")
    p = what.add_parser("forward", help=about, description=about)
    p.add_argument("image", help="the image to noise (scaled down to the model's native size when larger)")
    p.add_argument("--timesteps", type=_timesteps, metavar="T,T,…",
                   help=f"timesteps to show (default {','.join(map(str, DEFAULT_TIMESTEPS))})")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise (default 0)")
    _common(p)
    p.set_defaults(func=_cmd_forward)
    for name, (view, help) in PROMPT_VIEWS.items():
        p = what.add_parser(name, help=help + " (takes generate's flags)", description=help)
        add_request_arguments(p)
        _common(p)

        def run(args: argparse.Namespace, view=view, name=name) -> int:
            request = request_from_args(args)
            _check_out(args, name)
            return _finish(view(_load(args), request), args)

        p.set_defaults(func=run)
    _add_attention(what, add_request_arguments, request_from_args)


def _add_attention(what: argparse._SubParsersAction, add_request_arguments: Callable[[argparse.ArgumentParser],
                   None], request_from_args: Callable[[argparse.Namespace], GenerationRequest]) -> None:
    """``explain attention``: a prompt view with ``--words`` and a progress bar (``--quiet`` hides it)."""
    p = what.add_parser("attention", help=ATTENTION_HELP, description=ATTENTION_HELP)
    add_request_arguments(p)
    _common(p)
    p.add_argument("--words", help="comma-separated words of the prompt to map (default: every word)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    def run(args: argparse.Namespace) -> int:
        request = request_from_args(args)
        words = parse_words(args.words)
        _check_out(args, "attention")
        pipe = _load(args)
        with contextlib.closing(ProgressBar(request.steps, label="attention")) as bar:
            explanation = attention_maps(pipe, request, words,
                                         callback=None if args.quiet else lambda info: bar.update(info.i + 1))
        return _finish(explanation, args)

    p.set_defaults(func=run)
