"""Checking uploaded images before anything is stored: format, byte and pixel caps, decodability.

Each image is decoded and shrunk on its own, so a request never holds more than one image at full
size: what is kept is at most `keep_side` pixels on a side.
"""

from __future__ import annotations

import io
import os
import threading
import warnings
from dataclasses import dataclass, field

from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError, _imaging

from app.core.errors import InvalidRequest, PayloadTooLarge
from app.core.storage import sha256_bytes

# Pillow allows 1 MiB per compressed text chunk and 64 MiB in all, so a 66 KB PNG of zTXt chunks
# inflated to 63 MiB of metadata. The service reads no image text: a few KiB is plenty.
TEXT_CHUNK_BYTES = 64 * 1024
TEXT_MEMORY_BYTES = 256 * 1024
PngImagePlugin.MAX_TEXT_CHUNK = TEXT_CHUNK_BYTES
PngImagePlugin.MAX_TEXT_MEMORY = TEXT_MEMORY_BYTES

# Pillow allocates pixels in blocks of 16 MiB by default. glibc serves blocks that size from
# per-thread arenas once its mmap threshold has risen, and keeps them when freed: measured, 16
# decodes of a 4096x4096 RGBA PNG on 8 threads left the process 769 MiB larger. Blocks of 64 MiB
# (the largest allowed image in one block) are above glibc's largest threshold (32 MiB), so
# they are mapped and unmapped: the same decodes leave 19 MiB behind.
_imaging.set_block_size(64 * 1024 * 1024)

# Full-size decodes at once in this process: each may take 64 MiB (4096x4096 RGBA), and more of
# them than there are cores would only share the same CPUs. Requests past it wait their turn, so
# the pixels in memory are bounded by this, not by how many uploads arrive together.
DECODE_SLOTS = threading.BoundedSemaphore(max(1, min(4, os.cpu_count() or 1)))

_SIGNATURES = {"png": (b"\x89PNG\r\n\x1a\n",), "jpeg": (b"\xff\xd8\xff",)}
# Only these decoders are ever tried: no other format's parser sees uploaded bytes.
_OPEN_FORMATS = ["PNG", "JPEG"]
# MPO (multi-picture JPEG, as many phone cameras write) is a JPEG file: PIL reads its first
# picture, like any JPEG viewer does.
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg"}
_OTHER_SIGNATURES = (
    ("GIF", b"GIF8"),
    ("BMP", b"BM"),
    ("TIFF", b"II*\x00"),
    ("TIFF", b"MM\x00*"),
    ("JPEG 2000", b"\x00\x00\x00\x0cjP  "),
    ("JPEG 2000", b"\xff\x4f\xff\x51"),
    ("ICO", b"\x00\x00\x01\x00"),
    ("PSD", b"8BPS"),
    ("QOI", b"qoif"),
)
_WORKING_MODES = ("L", "LA", "RGB", "RGBA")
_GREY_MODES = ("1", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")


@dataclass(frozen=True)
class CheckedImage:
    """An uploaded image that passed every check, with the facts recorded about it."""

    data: bytes
    sha256: str
    format: str
    width: int
    height: int
    # The pixels shrunk to the working size, kept for query images (None for support images).
    decoded: Image.Image | None = field(default=None, repr=False, compare=False)
    keep_side: int = field(default=256, repr=False, compare=False)

    def decode(self) -> Image.Image:
        """The decoded image, at most `keep_side` pixels on a side."""
        if self.decoded is not None:
            return self.decoded
        return decode_stored(self.data, self.keep_side)


def decode_stored(data: bytes, side: int) -> Image.Image:
    """A stored (already checked) image, decoded and shrunk to at most `side` pixels a side."""
    # A copy: closing the opened image drops its pixels, shrunk in place or not.
    with DECODE_SLOTS, Image.open(io.BytesIO(data), formats=_OPEN_FORMATS) as image:
        return _shrink(image, side).copy()


def _sniff(data: bytes) -> str | None:
    for fmt, signatures in _SIGNATURES.items():
        if any(data.startswith(s) for s in signatures):
            return fmt
    return None


def _other_format(data: bytes) -> str | None:
    # Told apart by signature alone: no decoder but PNG's and JPEG's ever parses uploaded bytes.
    for name, signature in _OTHER_SIGNATURES:
        if data.startswith(signature):
            return name
    if data[4:8] == b"ftyp":
        return "HEIF/AVIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _working_mode(image: Image.Image) -> str:
    if image.mode in _WORKING_MODES:
        return image.mode
    if image.mode in _GREY_MODES:
        return "L"
    return "RGBA" if "transparency" in image.info or image.mode.endswith("A") else "RGB"


def _shrink(image: Image.Image, side: int) -> Image.Image:
    """Decode `image` (JPEG at a reduced scale where it can) into at most side x side pixels."""
    # thumbnail() asks the JPEG decoder for a draft at 1/2..1/8 scale first, then reduces by an
    # integer factor and resamples: a large JPEG is never decoded at full size.
    if image.mode in _WORKING_MODES:
        image.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=2.0)
        image.load()
        return _upright(image)
    # Palette, 1-bit and 16-bit images resample badly (or not at all) in their own mode.
    image.load()
    converted = image.convert(_working_mode(image))
    converted.thumbnail((side, side), Image.Resampling.LANCZOS, reducing_gap=2.0)
    return _upright(converted)


def _upright(image: Image.Image) -> Image.Image:
    # Phone photos are stored sideways with an EXIF orientation; applied here (on the shrunk
    # pixels, cheaply), the tag is dropped so nothing downstream turns them twice.
    if image.getexif().get(0x0112, 1) == 1:
        return image
    return ImageOps.exif_transpose(image)


def _text_too_large(exc: BaseException) -> bool:
    text = str(exc)
    return "MAX_TEXT_CHUNK" in text or "MAX_TEXT_MEMORY" in text


def _metadata_problem(what: str) -> InvalidRequest:
    return InvalidRequest(
        f"{what} carries more than {TEXT_MEMORY_BYTES // 1024} KiB of text metadata (or a text "
        f"chunk over {TEXT_CHUNK_BYTES // 1024} KiB); strip its metadata and send it again",
        code="image_metadata_too_large",
    )


def _format_of(data: bytes, what: str) -> str:
    """The format ("png" or "jpeg") from the signature; other formats are named in a refusal."""
    fmt = _sniff(data)
    if fmt is None:
        other = _other_format(data)
        if other is None:
            raise InvalidRequest(
                f"{what} is not a decodable image; send a PNG or JPEG file", code="invalid_image"
            )
        raise InvalidRequest(
            f"{what} is {other}; only PNG and JPEG are accepted",
            code="unsupported_image_format",
        )
    return fmt


def _open(data: bytes, what: str, max_pixels: int) -> Image.Image:
    """Open (header only, no pixels decoded) with Pillow's PNG and JPEG readers alone."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(
            f"{what} has more than {max_pixels} pixels; downscale it", code="image_too_large"
        ) from None
    except ValueError as exc:
        if _text_too_large(exc):
            raise _metadata_problem(what) from None
        raise InvalidRequest(
            f"{what} is not a decodable image; send a PNG or JPEG file", code="invalid_image"
        ) from None
    except (UnidentifiedImageError, OSError):
        raise InvalidRequest(
            f"{what} is not a decodable image; send a PNG or JPEG file", code="invalid_image"
        ) from None


def check_image(
    data: bytes, *, what: str, max_bytes: int, max_pixels: int, keep_side: int | None = None
) -> CheckedImage:
    """Validate one PNG/JPEG; raises a problem with its own code for each way it can be wrong.

    The pixel cap is checked from the header, before any pixel data is decoded. With `keep_side`
    the pixels are kept, shrunk to at most that many on a side.
    """
    if not data:
        raise InvalidRequest(f"{what} is empty; send a PNG or JPEG file", code="invalid_image")
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"{what} is {len(data)} bytes; the limit is {max_bytes} bytes per image",
            code="file_too_large",
        )
    fmt = _format_of(data, what)
    image = _open(data, what, max_pixels)
    try:
        if _PIL_FORMATS.get(image.format or "") != fmt:
            raise InvalidRequest(
                f"{what} is {image.format or 'an unknown format'}; only PNG and JPEG are accepted",
                code="unsupported_image_format",
            )
        width, height = image.size
        if width * height > max_pixels:
            raise InvalidRequest(
                f"{what} is {width}x{height} = {width * height} pixels; "
                f"the limit is {max_pixels}, downscale it",
                code="image_too_large",
            )
        try:
            with DECODE_SLOTS:
                shrunk = _shrink(image, keep_side or 64)
        except ValueError as exc:
            if _text_too_large(exc):
                raise _metadata_problem(what) from None
            raise _undecodable(what, fmt) from None
        except (OSError, SyntaxError, Image.DecompressionBombError):
            raise _undecodable(what, fmt) from None
        # A copy of the (small) pixels alone: the opened file, its text chunks and its buffer
        # stay behind, and closing the image below drops its pixels.
        kept = shrunk.copy() if keep_side is not None else None
        shrunk.close()
    finally:
        image.close()
    if kept is not None:
        kept.info = {}
    return CheckedImage(
        data=data,
        sha256=sha256_bytes(data),
        format=fmt,
        width=width,
        height=height,
        decoded=kept,
        keep_side=keep_side or 256,
    )


def _undecodable(what: str, fmt: str) -> InvalidRequest:
    return InvalidRequest(
        f"{what} could not be decoded (truncated or corrupt {fmt.upper()}); send the file again",
        code="invalid_image",
    )
