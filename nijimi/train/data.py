"""User training data: a folder of captioned images, read into model-sized tensors.

A data folder is either
  * images with ``.txt`` sidecar captions (``cat.png`` + ``cat.txt``; subfolders are searched too), or
  * images listed in ``captions.jsonl``, one ``{"file": "cat.png", "caption": "a cat"}`` per line (``"mask"`` optional);
    ``nijimi.train.shapes.write_shapes_dataset`` writes this form.
A ``.jsonl`` file may also be given directly; its paths are relative to its folder.

Each image is resized so its shorter side is the model size and then center-cropped to a square, and becomes a
(3, S, S) tensor in [-1, 1]. An optional mask marks the pixels to learn (1) and to ignore (0) for a masked loss: a
``<name>.mask.png`` next to the image, or else the image's alpha channel (transparent pixels are composited on white).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps

from nijimi.errors import ConfigError, DataError
from nijimi.io.image_file import image_size, read_image
from nijimi.io.limits import parse_json

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTIONS_FILE = "captions.jsonl"
MASK_SUFFIX = ".mask.png"


@dataclass(frozen=True)
class Record:
    """One training example on disk: an image, its caption and an optional mask file."""

    image: Path
    caption: str
    mask: Path | None = None


class Sample(NamedTuple):
    """One example ready for training: ``image`` (3, S, S) float32 in [-1, 1], ``mask`` (1, S, S) in [0, 1] or None.

    A tuple, so ``image, caption = sample[:2]`` reads it like a ``ShapesDataset`` item."""

    image: torch.Tensor
    caption: str
    mask: torch.Tensor | None


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.lower().endswith(MASK_SUFFIX)


def _mask_beside(image: Path) -> Path | None:
    mask = image.with_name(image.stem + MASK_SUFFIX)
    return mask if mask.is_file() else None


def _jsonl_record(folder: Path, source: Path, number: int, line: str) -> Record:
    where = f"{source}, line {number}"
    entry = parse_json(line, where, DataError)
    if not (isinstance(entry, dict) and isinstance(entry.get("file"), str) and isinstance(entry.get("caption"), str)):
        raise DataError(f'{where}: expected {{"file": "<image>", "caption": "<text>"}}, got {line[:80]!r}')
    image = folder / entry["file"]
    if not image.is_file():
        raise DataError(f"{where}: image file {image} not found")
    mask = entry.get("mask")
    if mask is not None and not (folder / str(mask)).is_file():
        raise DataError(f"{where}: mask file {folder / str(mask)} not found")
    return Record(image, entry["caption"].strip(), folder / mask if mask is not None else _mask_beside(image))


def _read_jsonl(source: Path) -> list[Record]:
    try:
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read caption file {source}: {exc}") from exc
    return [_jsonl_record(source.parent, source, n, line) for n, line in enumerate(lines, 1) if line.strip()]


def _read_sidecars(folder: Path) -> list[Record]:
    images = sorted(p for p in folder.rglob("*") if _is_image(p))
    if not images:
        raise DataError(f"data folder {folder} is empty: no {CAPTIONS_FILE} and no {', '.join(IMAGE_SUFFIXES)} images")
    missing = [p for p in images if not p.with_suffix(".txt").is_file()]
    if len(missing) == len(images):
        raise DataError(f"no captions in data folder {folder}: expected {CAPTIONS_FILE} or a .txt beside each image, "
                        f"e.g. {missing[0].with_suffix('.txt')}")
    if missing:
        raise DataError(f"image {missing[0]} has no caption: caption file {missing[0].with_suffix('.txt')} is missing"
                        f" ({len(missing)} of {len(images)} images lack one)")
    records = []
    for image in images:
        try:
            caption = image.with_suffix(".txt").read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise DataError(f"cannot read caption file {image.with_suffix('.txt')}: {exc}") from exc
        records.append(Record(image, caption, _mask_beside(image)))
    return records


def read_records(root: str | Path) -> list[Record]:
    """The examples of a data folder (or ``.jsonl`` caption file), in a fixed order; each image's header is checked."""
    root = Path(root)
    if root.suffix == ".jsonl":
        if not root.is_file():
            raise DataError(f"caption file {root} is missing")
        records = _read_jsonl(root)
    elif not root.is_dir():
        raise DataError(f"data folder {root} does not exist")
    elif (root / CAPTIONS_FILE).is_file():
        records = _read_jsonl(root / CAPTIONS_FILE)
    else:
        records = _read_sidecars(root)
    if not records:
        raise DataError(f"data folder {root} is empty: its caption file lists no images")
    for record in records:
        image_size(record.image, "training image", DataError)
    return records


def _fit(image: Image.Image, size: int, resample: Image.Resampling) -> Image.Image:
    """Resize so the shorter side is ``size`` and center-crop to ``size``×``size`` (unchanged if already that)."""
    w, h = image.size
    if (w, h) == (size, size):
        return image
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((nw, nh), resample)
    left, top = (nw - size) // 2, (nh - size) // 2
    return image.crop((left, top, left + size, top + size))


def _open(path: Path) -> Image.Image:
    """The image at ``path``, loaded and turned upright by its EXIF orientation."""
    return ImageOps.exif_transpose(read_image(path, "training image", DataError))


def load_example(record: Record, size: int) -> Sample:
    """Read, resize and crop one record's image (and mask) → ``Sample`` of side ``size``."""
    image = _open(record.image)
    alpha = None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        alpha = rgba.getchannel("A")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    rgb = np.asarray(_fit(image.convert("RGB"), size, Image.Resampling.LANCZOS))
    tensor = torch.from_numpy(rgb.copy()).permute(2, 0, 1).float().div_(127.5).sub_(1.0)
    mask_image = _open(record.mask).convert("L") if record.mask is not None else alpha
    if mask_image is None:
        return Sample(tensor, record.caption, None)
    if mask_image.size != image.size:
        raise DataError(f"mask {record.mask} is {mask_image.size[0]}×{mask_image.size[1]} but image {record.image} is "
                        f"{image.size[0]}×{image.size[1]}")
    mask = np.asarray(_fit(mask_image, size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    return Sample(tensor, record.caption, torch.from_numpy(mask.copy())[None])


class ImageFolder:
    """Captioned images from a data folder as model-sized ``Sample``s: ``dataset[i]`` is the i-th record in the
    folder's fixed order (the trainer decides the order of training, :func:`nijimi.train.trainer.batch_indices`)."""

    def __init__(self, root: str | Path, size: int) -> None:
        if size < 8:
            raise ConfigError(f"image size must be at least 8 pixels, got {size}")
        self.root, self.size = Path(root), size
        self.records = read_records(root)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> Sample:
        return load_example(self.records[index], self.size)


def collate(
    samples: Sequence[Sample | tuple[torch.Tensor, str]],
) -> tuple[torch.Tensor, list[str], torch.Tensor | None]:
    """Stack samples → images (B, 3, S, S), captions, masks (B, 1, S, S) or None when no sample has one.

    Takes ``Sample``s or ``(image, caption)`` pairs (``ShapesDataset`` items). A sample without a mask in a batch
    with masks gets an all-ones mask (learn every pixel).
    """
    if not samples:
        raise ConfigError("cannot collate an empty batch")
    images = torch.stack([s[0] for s in samples])
    captions = [s[1] for s in samples]
    masks = [s[2] if len(s) > 2 else None for s in samples]
    if all(m is None for m in masks):
        return images, captions, None
    return images, captions, torch.stack([torch.ones_like(images[0, :1]) if m is None else m for m in masks])
