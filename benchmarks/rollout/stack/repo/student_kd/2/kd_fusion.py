"""Fusing members' logits into probabilities (NumPy only): the one fusion rule of kdserve.

Training validates ensembles and multi-head models with it, the gateway fuses with it, and the export
ships this file beside the Triton Python-backend `model.py` (as `kd_fusion.py`), whose fusion step runs
where kdserve is not installed (NVIDIA's container). So it imports nothing but NumPy.
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

FusionMethod = Literal["mean_prob", "weighted", "logit_mean", "vote"]
METHODS = get_args(FusionMethod)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def calibrated_mean(member_logits: list[np.ndarray], temperatures: list[float]) -> np.ndarray:
    """Mean of temperature-calibrated softmax probabilities: kdserve's fusion rule (`mean_prob`)."""
    return np.mean([softmax(z, t) for z, t in zip(member_logits, temperatures, strict=True)], axis=0)


def fuse(
    member_logits: list[np.ndarray],
    temperatures: list[float],
    method: str = "mean_prob",
    weights: list[float] | None = None,
) -> np.ndarray:
    """Members' logits [N, C] each -> probabilities [N, C].

    mean_prob: mean of temperature-calibrated probabilities (the default, as in training's report);
    weighted: the same with per-member weights; logit_mean: softmax of the mean logit;
    vote: share of members voting for each class (ties keep the calibrated mean's order via a tiny term).
    """
    if not member_logits:
        raise ValueError("nothing to fuse")
    if method == "mean_prob":
        return calibrated_mean(member_logits, temperatures)
    calibrated = [softmax(logits, t) for logits, t in zip(member_logits, temperatures, strict=True)]
    if method == "weighted":
        w = np.asarray(weights if weights is not None else [1.0] * len(calibrated), dtype=np.float64)
        return np.tensordot(w / w.sum(), np.stack(calibrated), axes=1)
    if method == "logit_mean":
        scaled = [
            np.asarray(logits, dtype=np.float64) / t for logits, t in zip(member_logits, temperatures, strict=True)
        ]
        return softmax(np.mean(scaled, axis=0))
    if method == "vote":
        classes = member_logits[0].shape[-1]
        votes = sum(np.eye(classes)[p.argmax(-1)] for p in calibrated) / len(calibrated)
        tie_break = 1e-6 * np.mean(calibrated, axis=0)
        fused = votes + tie_break
        return fused / fused.sum(axis=-1, keepdims=True)
    raise ValueError(f"unknown fusion method {method!r}; choose one of: {', '.join(METHODS)}")


def fuse_heads(logits: np.ndarray, temperature: float) -> np.ndarray:
    """A K-head model's logits [N, K, C] -> probabilities [N, C]: its heads fused like ensemble members."""
    return calibrated_mean(list(np.moveaxis(np.asarray(logits), 1, 0)), [temperature] * logits.shape[1])


def top1(outputs: np.ndarray) -> np.ndarray:
    """Predicted class of logits or probabilities [N, C], or of multi-head logits [N, K, C] fused."""
    return (fuse_heads(outputs, 1.0) if outputs.ndim == 3 else outputs).argmax(-1)
