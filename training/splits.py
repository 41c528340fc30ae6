"""Seeded, stratified train/val/test index splits, and the raw digits (NumPy and scikit-learn only).

Kept free of torch so serving-side tools (the demo client, benchmarks) pick the very same held-out
images that training evaluated on.
"""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image
from sklearn.model_selection import train_test_split

from training.recipe import DataConfig


def stratified_split(labels: np.ndarray, cfg: DataConfig, with_test: bool) -> tuple[np.ndarray, ...]:
    indices = np.arange(len(labels))
    test_idx = np.array([], dtype=int)
    if with_test:
        indices, test_idx = train_test_split(
            indices, test_size=cfg.test_fraction, stratify=labels, random_state=cfg.split_seed
        )
    val_share = cfg.val_fraction / (1 - (cfg.test_fraction if with_test else 0.0))
    train_idx, val_idx = train_test_split(
        indices, test_size=val_share, stratify=labels[indices], random_state=cfg.split_seed
    )
    return np.sort(train_idx), np.sort(val_idx), np.sort(test_idx)


@lru_cache(maxsize=1)
def digits_gray() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 8x8 grayscale (0..16 scaled to 0..255) and labels.

    Cached (parsing sklearn's CSV takes ~24 ms, and the demo and load tests ask once per image); the
    arrays are read-only because every caller shares them.
    """
    from sklearn.datasets import load_digits

    bunch = load_digits()
    gray = np.clip(np.rint(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = bunch.target.copy()
    gray.flags.writeable = labels.flags.writeable = False
    return gray, labels


def digit_as_png_image(index: int) -> Image.Image:
    """One raw 8x8 digit as a grayscale Pillow image, as a user would send it to the gateway."""
    return Image.fromarray(digits_gray()[0][index], mode="L")


def digit_png_bytes(index: int) -> bytes:
    """One raw digit as the PNG file a client would upload."""
    buf = io.BytesIO()
    digit_as_png_image(index).save(buf, format="PNG")
    return buf.getvalue()


def digits_test_indices(cfg: DataConfig) -> np.ndarray:
    """Indices (into sklearn's digits) of the held-out test split for this data config."""
    return stratified_split(digits_gray()[1], cfg, with_test=True)[2]
