"""The bundled digits and their seeded splits (NumPy, Pillow and scikit-learn only; no torch).

Training evaluates on the held-out split that `split_indices` draws; the demo client, benchmarks and
load tests draw the very same images from the split the manifest records (`Manifest.split`), so a
served accuracy is always measured on images no model trained on. The digits are scikit-learn's
bundled file, read (not imported) when first asked for, so the serving side never needs it.
"""

from __future__ import annotations

import importlib.util
import io
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from kdcontract.errors import UserError
from kdcontract.manifest import DataSplit


def split_indices(labels: np.ndarray, split: DataSplit, with_test: bool) -> tuple[np.ndarray, ...]:
    """Stratified (train, val, test) index arrays; `with_test` False leaves test empty (a dataset with
    its own test set, such as CIFAR-10)."""
    from sklearn.model_selection import train_test_split

    indices = np.arange(len(labels))
    test_idx = np.array([], dtype=int)
    if with_test:
        indices, test_idx = train_test_split(
            indices, test_size=split.test_fraction, stratify=labels, random_state=split.seed
        )
    val_share = split.val_fraction / (1 - (split.test_fraction if with_test else 0.0))
    train_idx, val_idx = train_test_split(
        indices, test_size=val_share, stratify=labels[indices], random_state=split.seed
    )
    return np.sort(train_idx), np.sort(val_idx), np.sort(test_idx)


def labelled_positions(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which of these training images keep their labels (a boolean mask): a stratified `fraction` of
    each class, at least one, drawn with `seed`. The others are a few-labels recipe's unlabelled
    transfer images (`data.labelled_fraction`); the loop's client sends exactly those."""
    kept = np.zeros(len(labels), dtype=bool)
    if fraction >= 1.0:
        kept[:] = True
        return kept
    rng = np.random.default_rng(seed)
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        kept[members[: max(1, round(fraction * len(members)))]] = True
    return kept


@lru_cache(maxsize=1)
def digits_gray() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as uint8 8x8 grayscale (0..16 scaled to 0..255) and labels.

    Cached (parsing sklearn's CSV takes ~24 ms, and the demo and load tests ask once per image); the
    arrays are read-only because every caller shares them.
    """
    images, labels = _sklearn_digits()
    gray = np.clip(np.rint(images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    gray.flags.writeable = labels.flags.writeable = False
    return gray, labels


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """sklearn's bundled digits file, read directly: importing scikit-learn to parse one CSV costs
    1.6 s of every process that starts (3x that on a slower CPU); its own loader is the fallback."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    csv = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz" if spec and spec.origin else None
    if csv is not None and csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images, bunch.target.copy()


def digit_png_bytes(index: int) -> bytes:
    """One raw 8x8 digit as the PNG file a client would upload."""
    buf = io.BytesIO()
    Image.fromarray(digits_gray()[0][index], mode="L").save(buf, format="PNG")
    return buf.getvalue()


def digits_test_indices(split: DataSplit) -> np.ndarray:
    """Indices (into sklearn's digits) of the held-out test split."""
    return split_indices(digits_gray()[1], split, with_test=True)[2]


def held_out_indices(split: DataSplit | None) -> np.ndarray:
    """The held-out test digits of `split` (a manifest's, or what the gateway's `/v1/models` reports)."""
    if split is None or split.dataset != "digits":
        raise UserError("the models were not trained on the bundled digits, and this command sends held-out digits")
    return digits_test_indices(split)
