"""``nijimi train-adapter`` and ``nijimi lora extract | resize | info``: the CLI side of adapters; plus the
``--lora``/``--strict``/``--lora-dir`` options ``nijimi generate`` takes (:func:`add_lora_arguments`) and the
warning for the keys of a file it left out (:func:`report_unmatched`)."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from nijimi.adapters.formats import FORMATS
from nijimi.adapters.tools import describe_adapter
from nijimi.adapters.weights import Adapter
from nijimi.pipelines.adapters import Extraction, extract_adapter_file, resize_adapter_file
from nijimi.train.adapter import EMBEDDING, AdapterTrainConfig, train_adapter
from nijimi.train.config import build_config
from nijimi.train.embedding import train_embedding
from nijimi.train.finetune import EMBEDDED, load_base
from nijimi.ui.progress import TrainingProgress
from nijimi.ui.train import add_finetune_parser, config_values, sample_images


def cmd_train_adapter(args: argparse.Namespace) -> int:
    cfg = build_config(AdapterTrainConfig, config_values(args))
    # an LCM adapter's grids are drawn as it is meant to sample: lcm at cfg 1 (sample_steps sets its steps)
    samples = functools.partial(sample_images, sampler="lcm", guidance=1.0) if cfg.type == "lcm" else sample_images
    train = train_embedding if cfg.type == EMBEDDING else train_adapter
    with TrainingProgress(args.quiet) as progress:
        train(cfg, resume=args.resume, overwrite=args.overwrite, on_step=progress.stage(f"train {cfg.type}"),
              sample_fn=None if args.no_samples else samples)
    print(cfg.out)
    return 0


def _summary(adapter: Adapter, out: str) -> str:
    kinds = ", ".join(f"{k} ×{n}" for k, n in sorted(adapter.kinds().items()))
    ranks = ", ".join(f"{r} ×{n}" for r, n in sorted(adapter.ranks().items(), key=lambda kv: str(kv[0])))
    return f"{out}: {len(adapter.modules)} modules ({kinds}; ranks {ranks})"


def cmd_lora_extract(args: argparse.Namespace) -> int:
    what = Extraction(args.rank, args.conv_rank, args.targets, not args.unet_only, args.min_diff)
    adapter = extract_adapter_file(args.base, args.tuned, args.out, what, args.format, args.overwrite)
    print(_summary(adapter, args.out))
    return 0


def cmd_lora_resize(args: argparse.Namespace) -> int:
    adapter = resize_adapter_file(args.file, args.rank, args.out, args.base, args.format, args.overwrite)
    print(_summary(adapter, args.out))
    return 0


def cmd_lora_info(args: argparse.Namespace) -> int:
    print(describe_adapter(args.file, None if args.base is None else load_base(args.base).config))
    return 0


def _add_lora_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("lora", help="LoRA files: extract one from two models, resize one, describe one")
    what = p.add_subparsers(dest="what", required=True, metavar="ACTION")
    q = what.add_parser("extract", help="a LoRA approximating the difference of a fine-tuned model and its base")
    q.add_argument("--base", required=True, help=f"the original model (file, folder or {EMBEDDED})")
    q.add_argument("--tuned", required=True, help="the fine-tuned model")
    q.add_argument("--rank", type=int, required=True, help="rank of the LoRA")
    q.add_argument("--conv-rank", type=int, help="rank for 3×3 convolutions (with --targets all)")
    q.add_argument("--targets", default="attn+ff", help="attn, attn+ff (default), all-linear or all")
    q.add_argument("--unet-only", action="store_true", help="leave the text encoder out")
    q.add_argument("--min-diff", type=float, default=0.0, help="skip layers that differ by at most this")
    q.add_argument("--format", choices=FORMATS, default="kohya")
    q.add_argument("--out", required=True, help="the LoRA file to write")
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    q.set_defaults(func=cmd_lora_extract)

    q = what.add_parser("resize", help="reduce a LoRA/LoHa/LoKr file to a lower rank (SVD)")
    q.add_argument("file", help="the adapter file")
    q.add_argument("--rank", type=int, required=True, help="the new (maximum) rank")
    q.add_argument("--out", required=True, help="the resized file to write")
    q.add_argument("--base", help="the model it is for (default: recognised among embedded, SD 1.x, SD 2.x)")
    q.add_argument("--format", choices=FORMATS, help="output format (default: the input's)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing OUT")
    q.set_defaults(func=cmd_lora_resize)

    q = what.add_parser("info", help="format, modules, ranks and metadata of an adapter file")
    q.add_argument("file", help="the adapter file (or peft folder)")
    q.add_argument("--base", help="also check how it fits this model")
    q.set_defaults(func=cmd_lora_info)


def add_adapter_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``train-adapter`` and ``lora`` to the ``nijimi`` command's sub-commands (``cli.build_parser`` calls it)."""
    add_finetune_parser(sub, "train-adapter", "train a LoRA/LoCon/LoHa/LoKr/DoRA adapter or a textual-inversion "
                        "embedding (--type embedding) on a frozen model, or (--type lcm) an LCM-LoRA distilled from it",
                        AdapterTrainConfig, cmd_train_adapter)
    _add_lora_parsers(sub)


def report_unmatched(unmatched: dict[Path, dict[str, str]], shown: int = 10) -> None:
    """Name on stderr the keys of each LoRA file that were left out (at most ``shown`` per file, then a count)."""
    for path, keys in unmatched.items():
        print(f"warning: {path}: {len(keys)} keys or modules fit no layer of this model and were left out "
              f"(--strict refuses such a file):", file=sys.stderr)
        for key, why in list(keys.items())[:shown]:
            print(f"  {key}: {why}", file=sys.stderr)
        if len(keys) > shown:
            print(f"  … and {len(keys) - shown} more (nijimi lora info {path} --base MODEL lists them all)",
                  file=sys.stderr)
