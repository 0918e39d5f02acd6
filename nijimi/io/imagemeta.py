"""Generation metadata of PNG, JPEG and WebP images: PNG text chunks, and the EXIF fields A1111 and ComfyUI write.

- A1111 (``save_image_with_geninfo`` in ``modules/images.py``) stores its infotext in JPEG and WebP files as the
  EXIF UserComment (tag 0x9286 of the Exif IFD), made by piexif's ``UserComment.dump(text, encoding="unicode")``: the
  8-byte character code ``b"UNICODE\\0"`` then the text in UTF-16 big-endian (piexif's ``helper.py``); ``ASCII``
  and ``JIS`` codes exist too. A UTF-16 text with a byte-order mark, or whose zero bytes sit at the odd positions (a
  little-endian writer), is read in that order. Like A1111, a UserComment is preferred to a PNG ``parameters`` chunk.
- A JPEG COM comment (PIL's ``info["comment"]``) is read as the infotext when there is no UserComment.
- ComfyUI's WebP writer (``SaveAnimatedWEBP`` in ``comfy_extras/nodes_images.py``) stores ``prompt:{json}`` as IFD0
  tag 0x0110 (Model) and ``workflow:{json}`` from tag 0x010F (Make) downwards.

Only Pillow is used. EXIF that Pillow reports as corrupt, and a UserComment that is not text in its declared code,
raise ImageError naming the file.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from nijimi.errors import ImageError
from nijimi.io.image_file import read_image
from nijimi.io.pngmeta import PARAMETERS_KEY, metadata_from_text

EXIF_IFD = 0x8769
USER_COMMENT = 0x9286
_COMFY_TAGS = range(0x0100, 0x0111)
"""IFD0 tags ComfyUI fills with ``key:json`` (0x0110 down to the number of extra PNG-info entries)."""
_CODES = {b"UNICODE\0": "utf_16", b"ASCII\0\0\0": "ascii", b"JIS\0\0\0\0\0": "shift_jis", b"\0" * 8: "utf_8"}


def _utf16_order(body: bytes) -> str:
    """piexif writes big-endian; a byte-order mark, or zero bytes at odd positions (ASCII text little-endian), say
    otherwise."""
    if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        return "utf_16"
    return "utf_16_le" if body[1::2].count(0) > body[0::2].count(0) else "utf_16_be"


def decode_user_comment(data: bytes, source: str) -> str:
    """An EXIF UserComment's text: its 8-byte character code (``UNICODE``, ``ASCII``, ``JIS``, or 8 zero bytes for
    undefined, read as UTF-8) and the text; a comment without a known code is read as UTF-8. Text that does not
    decode raises ImageError."""
    code, body = data[:8], data[8:]
    encoding = _CODES.get(code)
    if encoding is None:
        encoding, body = "utf_8", data
    elif encoding == "utf_16":
        encoding = _utf16_order(body)
    try:
        return body.decode(encoding).rstrip("\0")
    except UnicodeDecodeError as e:
        name = code.rstrip(b"\0").decode("ascii", "replace") or "undefined"
        raise ImageError(f"{source}: EXIF UserComment is not {name} text ({encoding}): {e.reason} at byte "
                         f"{e.start + len(data) - len(body)}") from None


def _exif_text(image: Image.Image, source: str) -> dict[str, str]:
    """The metadata entries of the image's EXIF: ``parameters`` from the UserComment, ComfyUI's ``prompt`` and
    ``workflow`` from IFD0."""
    if "exif" not in image.info:
        return {}
    exif = image.getexif()
    comment = exif.get_ifd(EXIF_IFD).get(USER_COMMENT)
    text = {}
    for tag in _COMFY_TAGS:
        key, _, value = str(exif.get(tag, "")).partition(":")
        if key in ("prompt", "workflow") and value:
            text[key] = value
    if isinstance(comment, bytes | str):
        raw = comment if isinstance(comment, bytes) else comment.encode("utf-8")
        if parameters := decode_user_comment(raw, source):
            text[PARAMETERS_KEY] = parameters
    return text


def read_image_metadata(path: str | os.PathLike) -> dict[str, object]:
    """Generation metadata of a PNG, JPEG or WebP image, in the shape of
    :func:`~nijimi.io.pngmeta.metadata_from_text`, plus ``"format"`` (Pillow's name: ``"PNG"``, ``"JPEG"``,
    ``"WEBP"``)."""
    source = os.fspath(path)
    with _exif_warnings(source):
        image = read_image(Path(path))  # special files, bombs and huge text chunks are refused here, naming the file
    return image_metadata(image, source)


def image_metadata(image: Image.Image, source: str) -> dict[str, object]:
    """:func:`read_image_metadata` of an image already decoded (``source`` names it in errors)."""
    with _exif_warnings(source):
        text = _text(image, source)
    return {**metadata_from_text(text), "format": image.format}


@contextlib.contextmanager
def _exif_warnings(source: str) -> Iterator[None]:
    """Pillow's warnings about corrupt EXIF data, raised as ImageError naming ``source``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    corrupt = [str(w.message).strip() for w in caught if "EXIF" in str(w.message)]
    if corrupt:
        raise ImageError(f"{source}: EXIF data is corrupt ({corrupt[0]})")


def _text(image: Image.Image, source: str) -> dict[str, str]:
    text = dict(getattr(image, "text", None) or {}) if image.format == "PNG" else {}
    comment = image.info.get("comment") if image.format == "JPEG" else None
    if isinstance(comment, bytes):
        text.setdefault(PARAMETERS_KEY, comment.decode("utf-8", "replace"))
    try:
        text.update(_exif_text(image, source))
    except (OSError, SyntaxError, ValueError) as e:
        raise ImageError(f"{source}: cannot read the image's EXIF data: {e}") from e
    return text
