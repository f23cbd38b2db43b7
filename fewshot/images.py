"""Turning user images of any size and mode into the tensors an initialization expects."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import Tensor

from fewshot.config import ModelConfig


def to_array(image: Image.Image, config: ModelConfig) -> np.ndarray:
    """One image as uint8 [C, H, W] in the config's mode and size, inverted if configured.

    EXIF orientation is applied (phone photos arrive sideways otherwise); transparency is
    composited onto white; greyscale becomes RGB for colour models and colour becomes grey for
    greyscale ones. config.resize says how another aspect ratio fits the square input:
    "center_crop" scales the shorter side to the input and crops the middle (photos: nothing is
    distorted), "stretch" resizes both sides (characters: nothing is cut off).
    """
    mode = "L" if config.in_channels == 1 else "RGB"
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        # Composite transparency onto white so drawings on transparent canvases keep their strokes.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    converted = image.convert(mode)
    side = config.image_size
    if config.resize == "center_crop" and converted.width != converted.height:
        short = min(converted.width, converted.height)
        left = (converted.width - short) // 2
        top = (converted.height - short) // 2
        converted = converted.crop((left, top, left + short, top + short))
    if converted.size != (side, side):
        converted = converted.resize((side, side), Image.Resampling.LANCZOS, reducing_gap=3.0)
    array = np.asarray(converted, dtype=np.uint8)
    if config.invert:
        array = 255 - array
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def preprocess_images(images: Sequence[Image.Image], config: ModelConfig) -> Tensor:
    """A batch [B, C, H, W] of float32 in [0, 1] from PIL images of any size and mode."""
    arrays = [to_array(image, config) for image in images]
    if not arrays:
        return torch.zeros((0, config.in_channels, config.image_size, config.image_size))
    return torch.from_numpy(np.stack(arrays)).float().div_(255.0)


def decode_image(data: bytes) -> Image.Image:
    """Decode PNG/JPEG bytes into a loaded PIL image (raises PIL's errors on bad data)."""
    image = Image.open(io.BytesIO(data))
    image.load()
    return image
