"""Textual-inversion embedding files: read, found by name in a folder, checked against a model, written.

An embedding is ``n`` vectors of the text encoder's width (768 for SD 1.x, 1024 for SD 2.x); a prompt uses it by the
file's stem, as A1111 does (names stored inside files are ignored, as A1111 ignores them). Layouts read:

- A1111 ``.pt``: ``{"string_to_token": {"*": 265}, "string_to_param": {"*": (n, D)}, "name", "step",
  "sd_checkpoint", "sd_checkpoint_name"}`` — through ``torch.load(weights_only=True)`` only
  (:func:`nijimi.io.files.unpickle_weights`); the oldest files, whose ``string_to_param`` is a pickled
  ``ParameterDict`` module, are refused rather than unpickled.
- kohya's and most downloaded ``.safetensors`` (and kohya's ``.pt``): ``{"emb_params": (n, D)}``.
- diffusers' ``learned_embeds.bin`` / ``.safetensors``: ``{"<token>": (D,) or (n, D)}``.

SDXL embeddings (``clip_l`` and ``clip_g``) are refused by name; so is anything else, in one line naming the file and
the key. :func:`embedding_hash` is A1111's short hash of a file. :class:`EmbeddingLibrary` is what a generation may
use: the files of an embeddings folder (searched recursively, as A1111's) and files given one by one, read only when
a prompt names them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from nijimi.errors import CheckpointError, ConfigError
from nijimi.io import safetensors
from nijimi.io.files import load_state_dict, unpickle_weights
from nijimi.io.pngmeta import file_sha256
from nijimi.text.tokenizer import ClipTokenizer
from nijimi.text.vocabulary import MAX_VECTORS, ExtraVocabulary

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors")
"""File endings read as embeddings; other files in an embeddings folder (previews, notes) are skipped."""
KOHYA_KEY = "emb_params"
_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 1280: "SDXL"}


def _tensor(path: Path, key: str, value: object) -> torch.Tensor:
    """The vectors ``(n, D)`` float32 of one entry (a 1-D tensor is one vector)."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else f"a {type(value).__name__}"
        raise CheckpointError(f"{path}: key {key!r} holds {kind}, not the embedding's float vectors")
    vectors = value.unsqueeze(0) if value.ndim == 1 else value
    if vectors.ndim != 2 or not 1 <= vectors.shape[0] <= MAX_VECTORS:
        raise CheckpointError(f"{path}: key {key!r} has shape {tuple(value.shape)}; an embedding is (vectors, width) "
                              f"with 1 to {MAX_VECTORS} vectors")
    return vectors.detach().to(torch.float32).clone()


def _vectors_of(path: Path, data: object) -> torch.Tensor:
    """The vectors of a file's content in any layout of the module docstring."""
    if not isinstance(data, Mapping):
        raise CheckpointError(f"{path}: holds a {type(data).__name__}, not an embedding")
    if "string_to_param" in data:  # A1111
        params = data["string_to_param"]
        if not isinstance(params, Mapping) or len(params) != 1:
            raise CheckpointError(f"{path}: key 'string_to_param' must map one token to its vectors, got "
                                  f"{list(params) if isinstance(params, Mapping) else type(params).__name__}")
        token, value = next(iter(params.items()))
        return _tensor(path, f"string_to_param.{token}", value)
    if "clip_l" in data or "clip_g" in data:
        raise CheckpointError(f"{path}: an SDXL embedding (keys clip_l and clip_g); nijimi runs SD 1.x and 2.x models")
    if len(data) != 1:
        raise CheckpointError(f"{path}: keys {sorted(map(str, data))[:6]} are no embedding layout (expected "
                              f"string_to_param, {KOHYA_KEY} or one token's vectors)")
    key, value = next(iter(data.items()))
    return _tensor(path, str(key), value)


def read_embedding(path: str | os.PathLike) -> torch.Tensor:
    """The vectors ``(n, width)`` float32 of an embedding file (A1111, kohya or diffusers layout; see the module
    docstring). Unreadable files and other layouts raise ``CheckpointError`` naming the file and the key."""
    path = Path(path)
    if path.suffix.lower() == ".safetensors" or not path.is_file():
        data: object = load_state_dict(path)[0]
    else:
        data = unpickle_weights(path)
    return _vectors_of(path, data)


def save_embedding(vectors: torch.Tensor, path: str | os.PathLike, half: bool = False,
                   overwrite: bool = True) -> None:
    """Write ``vectors (n, width)`` as an A1111/kohya/ComfyUI ``.safetensors`` embedding (key ``emb_params``),
    atomically; float16 with ``half``. Its name in prompts is the file's stem."""
    if vectors.ndim != 2:
        raise ConfigError(f"an embedding is (vectors, width), got shape {tuple(vectors.shape)}")
    stored = vectors.detach().to("cpu", torch.float16 if half else torch.float32)
    safetensors.save_file({KOHYA_KEY: stored}, path, overwrite=overwrite)


def embedding_hash(path: str | os.PathLike) -> str:
    """A1111's short hash of an embedding file, as its ``TI hashes`` write it: the first 12 hex digits of the whole
    file's SHA-256 (``Embedding.shorthash``; cached, :func:`~nijimi.io.pngmeta.file_sha256`)."""
    return file_sha256(path)[:12]


def _width_name(width: int) -> str:
    return f"{width} wide" + (f" ({_WIDTHS[width]})" if width in _WIDTHS else "")


class EmbeddingLibrary:
    """The embeddings a generation may name: every embedding file under ``folder`` (recursively; a missing folder is
    an error) and the ``files`` given, each by its stem; a given file wins over a folder's file of the same name.
    ``width``: the text encoder's; an embedding of another width is refused when a prompt names it."""

    def __init__(self, folder: str | os.PathLike | None = None, files: Sequence[str | os.PathLike] = (),
                 width: int | None = None) -> None:
        self.width = width
        self.files: dict[str, list[Path]] = {}
        if folder is not None:
            root = Path(folder)
            if not root.is_dir():
                raise ConfigError(f"embeddings folder {root} does not exist")
            for path in sorted(root.rglob("*")):
                if path.suffix.lower() in EMBEDDING_SUFFIXES and path.is_file() and path.stat().st_size:
                    self.files.setdefault(path.stem, []).append(path)
        for file in files:
            path = Path(file)
            if not path.is_file():
                raise ConfigError(f"embedding file {path} does not exist")
            self.files[path.stem] = [path]
        self.key = (width, *((name, str(p), p.stat().st_mtime_ns) for name in sorted(self.files)
                             for p in self.files[name]))
        """Identifies the files (and their versions) and the width, for caches of prompt encodings."""

    def path(self, name: str) -> Path:
        """The file of embedding ``name``; two files of that name raise ``ConfigError`` naming both."""
        paths = self.files[name]
        if len(paths) > 1:
            raise ConfigError(f"embedding name {name!r} is ambiguous: {[str(p) for p in paths]}; rename or move one")
        return paths[0]

    def load(self, name: str) -> torch.Tensor:
        """The vectors of embedding ``name``, checked against ``width``."""
        path = self.path(name)
        vectors = read_embedding(path)
        if self.width is not None and vectors.shape[1] != self.width:
            raise CheckpointError(f"{path}: embedding {name!r} is {_width_name(vectors.shape[1])}; this model's text "
                                  f"encoder is {_width_name(self.width)}")
        return vectors

    def vocabulary(self, tokenizer: ClipTokenizer) -> ExtraVocabulary:
        """The extra vocabulary of these embeddings for prompts tokenized by ``tokenizer``."""
        return ExtraVocabulary(tokenizer, self.files, self.load)
