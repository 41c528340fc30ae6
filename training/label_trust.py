"""Which keys' feedback labels train a re-distilled student.

Feedback labels arrive with the API key that sent them (the capture keeps it; only the key that made a
request may label it). A key is judged against the other keys, not against the teacher alone: honest
labels disagree with the teacher exactly where the teacher is wrong, so every honest key disagrees a little
(and those corrections are what the loop is for), while a key sending wrong labels disagrees far more than
the rest. A key is excluded when its rate of disagreement with the teacher is surely above the other keys'
pooled rate by more than `margin` (confidence sequences from `kdcontract.sequential`, at `alpha` split over
the keys). With `trusted` given, only those keys' labels train at all. An excluded key's images still
train on the teacher's soft targets; only its hard labels are dropped.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdcontract.sequential import proportion_cs


@dataclass(frozen=True)
class LabelVerdict:
    by_key: dict[str, dict]  # per key: labels, disagreements with the teacher, rate, interval, used, reason
    excluded: dict[str, str]  # key -> why its labels were not used

    def keep(self, keys: np.ndarray) -> np.ndarray:
        """Per labelled image: whether its label trains."""
        return np.array([key not in self.excluded for key in keys], dtype=bool)


def judge_label_keys(
    keys: np.ndarray, labels: np.ndarray, teacher: np.ndarray, trusted: list[str] | None, margin: float, alpha: float
) -> LabelVerdict:
    """`keys`, `labels`, `teacher`: per labelled image, the key that sent its label, the label, and the
    teacher's top-1 on it."""
    disagree = labels != teacher
    names = sorted(set(keys.tolist()))
    share = alpha / max(len(names), 1)
    by_key, excluded = {}, {}
    for key in names:
        mine = keys == key
        count, wrong = int(mine.sum()), int(disagree[mine].sum())
        low, high = (float(x) for x in proportion_cs(wrong, count, share / 2))
        figures = {"labels": count, "disagree_with_teacher": wrong, "rate": wrong / count, "interval": [low, high]}
        others = ~mine
        if trusted is not None and key not in trusted:
            used, reason = False, f"not a trusted label key ({', '.join(trusted) or 'none'})"
        elif not others.any():
            used, reason = True, "no other key to compare with: kept"
        else:
            other_count, other_wrong = int(others.sum()), int(disagree[others].sum())
            _, other_high = (float(x) for x in proportion_cs(other_wrong, other_count, share / 2))
            figures["others_rate"] = other_wrong / other_count
            used = low <= other_high + margin
            reason = (
                f"disagrees with the teacher on {wrong / count:.0%} of its {count} labels (surely above {low:.0%}), "
                f"the other keys on {other_wrong / other_count:.0%} (surely below {other_high:.0%})"
                + ("" if used else f": more than {margin:.0%} apart")
            )
        by_key[key] = {**figures, "used": used, "reason": reason}
        if not used:
            excluded[key] = reason
    return LabelVerdict(by_key, excluded)
