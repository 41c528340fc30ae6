"""Decoding untrusted image bytes into the model's uint8 input, with limits checked before decoding.

Two steps, so the route can keep the event loop free: `open_image` reads only the header (format and
size, checked against the limits before any pixel is decoded, so a decompression bomb never is), and
`prepare_images` decodes and resizes, which for large pictures takes tens to hundreds of ms and runs
in the gateway's decode threads (Pillow releases the GIL while it decodes and resamples).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError

from gateway.errors import BadImage, PayloadTooLarge, UnsupportedMediaType
from kdcontract.imageprep import prepare
from kdcontract.manifest import Preprocessing

# Our own pixel limit is checked from the header before decoding, so Pillow's bomb warning (emitted
# past its 89-Mpixel default) is noise. Filtered once for the process: `warnings.catch_warnings`
# per request would be a race between decode threads (it swaps process-global state).
warnings.simplefilter("ignore", Image.DecompressionBombWarning)

# Pillow names some formats by their container: phones write JPEGs with a second preview image (MPO).
FORMAT_FAMILY = {"MPO": "JPEG"}


def open_image(data: bytes, allowed_formats: list[str], max_pixels: int) -> Image.Image:
    """Header only: the format must be allowed and the pixel count within `max_pixels`."""
    if not data:
        raise BadImage("empty image")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise UnsupportedMediaType(f"not an image in a supported format ({', '.join(allowed_formats)})") from exc
    except Image.DecompressionBombError as exc:
        raise PayloadTooLarge(f"image has too many pixels (limit {max_pixels})") from exc
    except Exception as exc:
        raise BadImage(f"unreadable image: {type(exc).__name__}") from exc
    if FORMAT_FAMILY.get(image.format, image.format) not in allowed_formats:
        raise UnsupportedMediaType(f"image format {image.format} not allowed ({', '.join(allowed_formats)})")
    width, height = image.size
    if width * height > max_pixels:
        raise PayloadTooLarge(f"image is {width}x{height} pixels; the limit is {max_pixels} pixels")
    return image


def prepare_images(images: list[Image.Image], spec: Preprocessing) -> np.ndarray:
    """Opened images -> uint8 [N, size, size, 3], exactly as training prepared its images."""
    prepared = []
    for image in images:
        try:
            image.load()
            prepared.append(prepare(image, spec))
        except Exception as exc:  # truncated or corrupt data only shows up while decoding
            raise BadImage(f"corrupt image data: {type(exc).__name__}") from exc
        finally:
            image.close()  # its decoded pixels go now, not with the request: one image decoded at a time
    return np.stack(prepared)


def decode_image(data: bytes, spec: Preprocessing, allowed_formats: list[str], max_pixels: int) -> np.ndarray:
    """Bytes -> uint8 [size, size, 3] in one call (for callers without an event loop to protect)."""
    return prepare_images([open_image(data, allowed_formats, max_pixels)], spec)[0]
