"""Losses against values computed independently (NumPy re-derivations and a hand-worked case)."""

import numpy as np
import pytest
import torch

from training.losses import FeatureHint, dkd, hinton_kd
from training.models import build_classifier


def np_softmax(z, t):
    e = np.exp((z - z.max(axis=1, keepdims=True)) / t)
    return e / e.sum(axis=1, keepdims=True)


def np_kl(p, q):
    return float(np.mean(np.sum(p * (np.log(p) - np.log(q)), axis=1)))


def test_hinton_kd_hand_computed_golden_value():
    # Two classes, T = 2: teacher logits (2, 0) -> p = softmax(1, 0) = (0.7310586, 0.2689414);
    # student logits (0, 0) -> q = (0.5, 0.5). KL(p||q) = 0.7310586 ln(1.4621172) + 0.2689414 ln(0.5378828)
    # = 0.2777180 - 0.1667739 = 0.1109441; times T^2 = 0.4437764.
    loss = hinton_kd(torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 0.0]]), temperature=2.0)
    assert loss.item() == pytest.approx(0.4437764, abs=1e-6)


def test_hinton_kd_matches_numpy_reference():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(5, 7)) * 3, rng.normal(size=(5, 7)) * 3
    expected = np_kl(np_softmax(t, 4.0), np_softmax(s, 4.0)) * 16.0
    got = hinton_kd(torch.tensor(s), torch.tensor(t), temperature=4.0).item()
    assert got == pytest.approx(expected, rel=1e-6)
    assert hinton_kd(torch.tensor(s), torch.tensor(s), 4.0).item() == pytest.approx(0.0, abs=1e-9)


def np_dkd(s, t, y, alpha, beta, temp):
    """Decoupled KD written out from the paper's definitions, one sample at a time."""
    tckd, nckd = 0.0, 0.0
    for i in range(len(y)):
        ps, pt = np_softmax(s[i : i + 1], temp)[0], np_softmax(t[i : i + 1], temp)[0]
        bs, bt = np.array([ps[y[i]], 1 - ps[y[i]]]), np.array([pt[y[i]], 1 - pt[y[i]]])
        tckd += np.sum(bt * np.log(bt / bs))
        others = [c for c in range(s.shape[1]) if c != y[i]]
        qs = np_softmax(s[i : i + 1, others], temp)[0]
        qt = np_softmax(t[i : i + 1, others], temp)[0]
        nckd += np.sum(qt * np.log(qt / qs))
    n = len(y)
    return (alpha * tckd / n + beta * nckd / n) * temp**2


def test_dkd_matches_reference_from_the_paper_definitions():
    rng = np.random.default_rng(1)
    s, t = rng.normal(size=(6, 5)) * 2, rng.normal(size=(6, 5)) * 2
    y = rng.integers(0, 5, size=6)
    expected = np_dkd(s, t, y, alpha=1.0, beta=8.0, temp=4.0)
    got = dkd(torch.tensor(s), torch.tensor(t), torch.tensor(y), alpha=1.0, beta=8.0, temperature=4.0).item()
    assert got == pytest.approx(expected, rel=1e-5)


def test_feature_hint_captures_stages_and_trains_only_the_adapter_and_student():
    kwargs = {"small_stem": True, "mean": (0.5,) * 3, "std": (0.25,) * 3}
    student = build_classifier("resnet18", 10, **kwargs)
    teacher = build_classifier("resnet50", 10, **kwargs).eval()
    hint = FeatureHint(student, teacher, "layer3")
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)
    student(images)
    with torch.no_grad():
        teacher(images)
    loss = hint.loss()
    assert loss.item() > 0
    loss.backward()
    assert hint.adapter[0].weight.grad is not None
    assert student.backbone.layer3[0].conv1.weight.grad is not None
    assert all(p.grad is None for p in teacher.parameters())
    # ResNet18 layer3 has 256 channels, ResNet50 layer3 has 1024: the adapter bridges them.
    assert tuple(hint.adapter[0].weight.shape[:2]) == (1024, 256)
    hint.remove()
    student(images)
    assert hint._captured == {}
