"""Decoding untrusted image bytes into the model's uint8 input, with limits checked before decoding."""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from gateway.errors import BadImage, PayloadTooLarge, UnsupportedMediaType
from training.imageprep import to_model_input


def decode_image(data: bytes, size: int, allowed_formats: list[str], max_pixels: int) -> np.ndarray:
    """Bytes -> uint8 [size, size, 3], exactly as training prepared its images.

    Pillow's `open` reads only the header, so the format and the pixel count are checked before
    any pixel is decoded (a decompression bomb never gets decoded).
    """
    if not data:
        raise BadImage("empty image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType(f"not an image in a supported format ({', '.join(allowed_formats)})") from exc
    except (Image.DecompressionBombWarning, Image.DecompressionBombError) as exc:
        raise PayloadTooLarge(f"image has too many pixels (limit {max_pixels})") from exc
    except Exception as exc:
        raise BadImage(f"unreadable image: {type(exc).__name__}") from exc
    if image.format not in allowed_formats:
        raise UnsupportedMediaType(f"image format {image.format} not allowed ({', '.join(allowed_formats)})")
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
    try:
        image.load()
        return to_model_input(image, size)
    except Exception as exc:  # truncated or corrupt data only shows up while decoding
        raise BadImage(f"corrupt image data: {type(exc).__name__}") from exc
