"""The offline gate a re-distilled student passes before it is exported: a paired comparison with the
served version on the run's held-out split.

Both answer the same test images, so only the images where exactly one of them is right carry information
(`kdcontract.sequential.paired_difference_cs`, the interval the online top-1 gate uses for the shadow's
pairs). The candidate is refused when its top-1 is surely worse than the served version's by more than
`max_drop` (the interval's upper end below `-max_drop`): a clear regression (poisoned labels, a bug, a
capture of the wrong traffic) never ships, while a difference of an image or two decides nothing and is
left to the online gates, on the traffic the candidate is meant for. Agreement with the teacher is stated
with its interval too, but does not refuse: the held-out labels are the truth, and a student that learnt
from honest labels where the teacher is wrong agrees with the teacher less and is better.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcontract.sequential import paired_difference_cs


@dataclass(frozen=True)
class OfflineVerdict:
    passed: bool
    reason: str
    figures: dict


def paired(candidate_right: np.ndarray, served_right: np.ndarray, alpha: float) -> dict:
    """Rates of both, the difference (candidate - served) and its interval, from paired outcomes."""
    wins = int((candidate_right & ~served_right).sum())
    losses = int((~candidate_right & served_right).sum())
    images = len(candidate_right)
    low, high = paired_difference_cs(wins, losses, images, alpha)
    return {
        "candidate": float(candidate_right.mean()),
        "served": float(served_right.mean()),
        "difference": (wins - losses) / images,
        "interval": [low, high],
        "only_candidate_right": wins,
        "only_served_right": losses,
        "images": images,
    }


def offline_gate(
    candidate: np.ndarray, served: np.ndarray, labels: np.ndarray, teacher: np.ndarray, max_drop: float, alpha: float
) -> OfflineVerdict:
    """`candidate`, `served`, `teacher`: each model's top-1 class per held-out image; `labels`: the truth."""
    top1 = paired(candidate == labels, served == labels, alpha / 2)
    agreement = paired(candidate == teacher, served == teacher, alpha / 2)
    figures = {"top1": top1, "agreement": agreement, "max_drop": max_drop, "alpha": alpha}
    low, high = top1["interval"]
    stated = (
        f"top-1 {top1['candidate']:.2%} against the served {top1['served']:.2%} on {top1['images']} held-out "
        f"images, difference in [{low * 100:+.2f}, {high * 100:+.2f}] points"
    )
    if high < -max_drop:
        return OfflineVerdict(False, f"{stated}: surely worse by more than {max_drop * 100:g} points", figures)
    return OfflineVerdict(True, f"{stated}: not surely worse by more than {max_drop * 100:g} points", figures)
