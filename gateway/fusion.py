"""Fusing ensemble members' logits (NumPy only; the gateway never imports torch)."""

from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits.astype(np.float64) / temperature
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


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
    calibrated = [softmax(logits, t) for logits, t in zip(member_logits, temperatures, strict=True)]
    if method == "mean_prob":
        return np.mean(calibrated, axis=0)
    if method == "weighted":
        w = np.asarray(weights if weights is not None else [1.0] * len(calibrated), dtype=np.float64)
        return np.tensordot(w / w.sum(), np.stack(calibrated), axes=1)
    if method == "logit_mean":
        scaled = [logits / t for logits, t in zip(member_logits, temperatures, strict=True)]
        return softmax(np.mean(scaled, axis=0))
    if method == "vote":
        classes = member_logits[0].shape[-1]
        votes = sum(np.eye(classes)[p.argmax(-1)] for p in calibrated) / len(calibrated)
        tie_break = 1e-6 * np.mean(calibrated, axis=0)
        fused = votes + tie_break
        return fused / fused.sum(axis=-1, keepdims=True)
    raise ValueError(f"unknown fusion method {method!r}")
