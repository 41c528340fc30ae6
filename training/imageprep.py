"""Image preparation shared by training and serving (Pillow only, no torch).

Training and the gateway must turn a picture into the model's input in exactly the same way, or
accuracy measured offline is not the accuracy served. Both call `to_model_input`.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageOps

# Bilinear with Pillow's antialiasing filter: the one resize used in training and in serving.
RESIZE_FILTER = Image.Resampling.BILINEAR
RESIZE_NAME = "pillow-bilinear"


def to_model_input(image: Image.Image, size: int) -> np.ndarray:
    """Any Pillow image -> uint8 array [size, size, 3]: EXIF orientation applied, RGB, resized."""
    image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        # Palette and alpha images go through RGBA so transparency becomes black, not garbage.
        image = image.convert("RGBA").convert("RGB") if image.mode in {"P", "PA", "LA"} else image.convert("RGB")
    if image.size != (size, size):
        image = image.resize((size, size), RESIZE_FILTER)
    return np.asarray(image, dtype=np.uint8)
