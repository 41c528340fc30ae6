"""Which keys' feedback labels train the next student. A key is judged against the other keys, not against
the teacher alone: honest labels disagree with the teacher exactly where the teacher is wrong (the page's
"7"), so every honest key disagrees a little; a key sending wrong labels disagrees far more than the rest."""

from __future__ import annotations

import numpy as np

from training.label_trust import judge_label_keys

CLASSES = 10


def _labels(rng, teacher: np.ndarray, wrong_share: float) -> np.ndarray:
    labels = teacher.copy()
    wrong = rng.random(len(teacher)) < wrong_share
    labels[wrong] = (teacher[wrong] + rng.integers(1, CLASSES, wrong.sum())) % CLASSES
    return labels


def test_a_key_sending_wrong_labels_for_30_percent_is_excluded_and_named_honest_keys_are_kept():
    rng = np.random.default_rng(36)
    n = 600
    teacher = rng.integers(0, CLASSES, n)
    keys = np.array(["alice"] * 200 + ["bob"] * 200 + ["mallory"] * 200)
    labels = np.concatenate(
        [
            _labels(rng, teacher[:200], 0.04),  # honest: the teacher is wrong on ~4% of what they send
            _labels(rng, teacher[200:400], 0.05),
            _labels(rng, teacher[400:], 0.34),  # 30% poisoned on top of the teacher's own mistakes
        ]
    )
    verdict = judge_label_keys(keys, labels, teacher, trusted=None, margin=0.05, alpha=0.05)
    assert verdict.excluded == {"mallory": verdict.by_key["mallory"]["reason"]}
    assert "disagrees" in verdict.excluded["mallory"]
    assert verdict.by_key["alice"]["labels"] == 200 and verdict.by_key["alice"]["used"]
    kept = verdict.keep(keys)
    assert kept.sum() == 400 and not kept[400:].any()


def test_honest_keys_correcting_the_teacher_alike_are_all_kept():
    """Where the teacher misreads a style, every honest key disagrees with it on those images: no one
    is excluded for being right."""
    rng = np.random.default_rng(7)
    teacher = rng.integers(0, CLASSES, 900)
    keys = np.array(["a"] * 300 + ["b"] * 300 + ["c"] * 300)
    labels = _labels(rng, teacher, 0.15)  # the teacher is wrong on 15% of this traffic, for everyone
    verdict = judge_label_keys(keys, labels, teacher, trusted=None, margin=0.05, alpha=0.05)
    assert verdict.excluded == {}
    assert verdict.keep(keys).all()


def test_only_the_trusted_keys_train_when_a_list_is_given_and_one_key_alone_is_not_judged():
    rng = np.random.default_rng(3)
    teacher = rng.integers(0, CLASSES, 300)
    keys = np.array(["labeller"] * 100 + ["app"] * 100 + [""] * 100)  # "": labels from before keys were kept
    labels = _labels(rng, teacher, 0.05)
    verdict = judge_label_keys(keys, labels, teacher, trusted=["labeller"], margin=0.05, alpha=0.05)
    assert set(verdict.excluded) == {"app", ""} and "not a trusted" in verdict.excluded["app"]
    assert verdict.keep(keys).sum() == 100
    alone = judge_label_keys(np.array(["solo"] * 50), labels[:50], teacher[:50], trusted=None, margin=0.05, alpha=0.05)
    assert alone.excluded == {}  # nothing to compare it with: kept, and the report says so
    assert "no other key" in alone.by_key["solo"]["reason"]
