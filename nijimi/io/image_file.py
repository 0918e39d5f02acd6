"""The one way nijimi opens an image file a user names (init images, masks, control images, training images, PNGs
for ``info`` and ``reproduce``): a regular file (:func:`~nijimi.io.files.regular_file`), of at most
:func:`max_image_pixels` pixels, checked from its header before a pixel is decoded, with PIL's own refusals
(decompression bombs, PNG text chunks over ``MAX_TEXT_CHUNK`` / ``MAX_TEXT_MEMORY``) turned into one error naming
the file.

The pixel limit is derived from memory: an image of ``P`` pixels costs about :data:`BYTES_PER_PIXEL` bytes per pixel
on its way to a tensor (decoded RGBA, an RGB copy, a float32 array, a resized copy), so the limit is the machine's
memory over that, and never above PIL's own ``Image.MAX_IMAGE_PIXELS`` (89.5 M pixels, 9459² — far beyond any
size Stable Diffusion draws at). PIL's global is left as it is.
"""

from __future__ import annotations

import os
import warnings

from PIL import Image, UnidentifiedImageError

from nijimi.errors import ImageError, NijimiError
from nijimi.io.files import regular_file
from nijimi.io.limits import machine_memory

BYTES_PER_PIXEL = 64
"""Memory one pixel of an input image may take while it is read, converted and resized."""


def max_image_pixels(memory: int | None = None) -> int:
    """Most pixels (width × height) an input image may have: ``memory`` (default: the machine's) over
    :data:`BYTES_PER_PIXEL`, at most PIL's ``Image.MAX_IMAGE_PIXELS``."""
    memory = machine_memory() if memory is None else memory
    pil_limit = Image.MAX_IMAGE_PIXELS or memory
    return min(memory // BYTES_PER_PIXEL, pil_limit)


def _open(path: str | os.PathLike, what: str, error: type[NijimiError], load: bool) -> Image.Image:
    path = regular_file(path, what, error, missing=f"{what} file not found")
    limit = max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                width, height = image.size
                if width * height > limit:
                    raise error(f"{path}: {what} of {width}×{height} pixels is over the limit of {limit} pixels "
                                "(decompression bomb?)")
                if load:
                    image.load()
                return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise error(f"{path}: {what} refused: {e}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise error(f"{path}: cannot read {what}: {e}") from None


def read_image(path: str | os.PathLike, what: str = "image", error: type[NijimiError] = ImageError) -> Image.Image:
    """The image at ``path``, decoded (its file closed; text chunks in ``.text`` for PNGs). A missing, special,
    unreadable, too large or bomb-like file, or one whose text chunks are too large, raises ``error``
    ``"<path>: …"`` naming it and what is wrong."""
    return _open(path, what, error, load=True)


def image_size(path: str | os.PathLike, what: str = "image", error: type[NijimiError] = ImageError) -> tuple[int, int]:
    """(width, height) of the image at ``path`` from its header alone, with the checks of :func:`read_image`."""
    return _open(path, what, error, load=False).size
