import pytest
import torch

from training.evaluate import expected_calibration_error, fit_temperature, fuse_probabilities, top_k_accuracy


def test_ece_hand_computed():
    # Bin (0.6, 0.667]: two predictions at 0.65 confidence, one right -> |0.5 - 0.65| * 2/4.
    # Bin (0.933, 1.0]: two at 0.95, both right -> |1.0 - 0.95| * 2/4. ECE = 0.075 + 0.025.
    probs = torch.tensor([[0.65, 0.35], [0.65, 0.35], [0.95, 0.05], [0.05, 0.95]])
    labels = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probs, labels, bins=15) == pytest.approx(0.1, abs=1e-6)


def test_temperature_scaling_recovers_the_temperature_that_generated_the_labels():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(20000, 5, generator=gen) * 3
    labels = torch.multinomial(torch.softmax(logits / 2.5, dim=1), 1, generator=gen).squeeze(1)
    assert fit_temperature(logits, labels) == pytest.approx(2.5, rel=0.05)


def test_fusion_is_the_mean_of_calibrated_probabilities():
    a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 4.0]])
    fused = fuse_probabilities([a, b], [1.0, 2.0])
    expected = (torch.softmax(a, 1) + torch.softmax(b / 2, 1)) / 2
    torch.testing.assert_close(fused, expected)
    assert top_k_accuracy(torch.tensor([[0.1, 0.5, 0.4]]), torch.tensor([2]), 1) == 0.0
    assert top_k_accuracy(torch.tensor([[0.1, 0.5, 0.4]]), torch.tensor([2]), 2) == 1.0
