"""Checking uploaded images before anything is stored: format, byte and pixel caps, decodability."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field

from PIL import Image, UnidentifiedImageError

from app.core.errors import InvalidRequest, PayloadTooLarge
from app.core.storage import sha256_bytes

_SIGNATURES = {"png": (b"\x89PNG\r\n\x1a\n",), "jpeg": (b"\xff\xd8\xff",)}
# MPO (multi-picture JPEG, as many phone cameras write) is a JPEG file: PIL reads its first
# picture, like any JPEG viewer does.
_PIL_FORMATS = {"PNG": "png", "JPEG": "jpeg", "MPO": "jpeg"}


# Images up to this size keep their decoded pixels from the check, so they are decoded once.
_KEEP_DECODED_PIXELS = 512 * 512


@dataclass(frozen=True)
class CheckedImage:
    """An uploaded image that passed every check, with the facts recorded about it."""

    data: bytes
    sha256: str
    format: str
    width: int
    height: int
    decoded: Image.Image | None = field(default=None, repr=False, compare=False)

    def decode(self) -> Image.Image:
        """The decoded PIL image."""
        if self.decoded is not None:
            return self.decoded
        image = Image.open(io.BytesIO(self.data))
        image.load()
        return image


def _sniff(data: bytes) -> str | None:
    for fmt, signatures in _SIGNATURES.items():
        if any(data.startswith(s) for s in signatures):
            return fmt
    return None


def check_image(data: bytes, *, what: str, max_bytes: int, max_pixels: int) -> CheckedImage:
    """Validate one PNG/JPEG; raises a problem with its own code for each way it can be wrong.

    The pixel cap is checked from the header, before any pixel data is decoded.
    """
    if not data:
        raise InvalidRequest(f"{what} is empty; send a PNG or JPEG file", code="invalid_image")
    if len(data) > max_bytes:
        raise PayloadTooLarge(
            f"{what} is {len(data)} bytes; the limit is {max_bytes} bytes per image",
            code="file_too_large",
        )
    fmt = _sniff(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidRequest(
            f"{what} has more than {max_pixels} pixels; downscale it", code="image_too_large"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError):
        raise InvalidRequest(
            f"{what} is not a decodable image; send a PNG or JPEG file", code="invalid_image"
        ) from None
    try:
        if fmt is None or _PIL_FORMATS.get(image.format or "") != fmt:
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
            image.load()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            raise InvalidRequest(
                f"{what} could not be decoded (truncated or corrupt {fmt.upper()}); "
                "send the file again",
                code="invalid_image",
            ) from None
    except BaseException:
        image.close()
        raise
    keep = image if width * height <= _KEEP_DECODED_PIXELS else None
    if keep is None:
        image.close()
    return CheckedImage(
        data=data, sha256=sha256_bytes(data), format=fmt, width=width, height=height, decoded=keep
    )
