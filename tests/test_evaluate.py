import numpy as np
import pytest
import torch

from kdcontract import fusion
from training.evaluate import expected_calibration_error, fit_temperature, top_k_accuracy
from training.models import MemberMean, calibrated_mean, fuse_heads


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
    fused = calibrated_mean([a, b], [1.0, 2.0])
    expected = (torch.softmax(a, 1) + torch.softmax(b / 2, 1)) / 2
    torch.testing.assert_close(fused, expected)
    assert top_k_accuracy(torch.tensor([[0.1, 0.5, 0.4]]), torch.tensor([2]), 1) == 0.0
    assert top_k_accuracy(torch.tensor([[0.1, 0.5, 0.4]]), torch.tensor([2]), 2) == 1.0


def test_graph_fusion_is_the_served_fusion_for_members_heads_and_the_member_mean():
    # Training's torch ops (exported graphs, validation, the multi-head metric) and kdcontract's numpy
    # rule (the gateway, Triton's fusion step) are one rule: same numbers on the same logits.
    gen = torch.Generator().manual_seed(3)
    members = [torch.randn(64, 10, generator=gen) * 4 for _ in range(3)]
    temperatures = [0.7, 1.0, 2.3]
    served = fusion.calibrated_mean([m.numpy() for m in members], temperatures)
    np.testing.assert_allclose(calibrated_mean(members, temperatures).numpy(), served, rtol=1e-5, atol=1e-7)

    heads = torch.stack(members, dim=1)  # [N, K, C]
    np.testing.assert_allclose(fuse_heads(heads, 1.7).numpy(), fusion.fuse_heads(heads.numpy(), 1.7), atol=1e-6)
    np.testing.assert_array_equal(fusion.top1(heads.numpy()), fuse_heads(heads).argmax(-1).numpy())

    # A teacher made of members returns the log of the rule's probabilities (T = 1): scaled copies of one
    # input stand in for members that disagree.
    scales = [1.0, -0.5, 2.0]
    teacher = MemberMean([ScaledCopy(k) for k in scales])
    x = members[0]
    expected = fusion.calibrated_mean([(k * x).numpy() for k in scales], [1.0] * 3)
    np.testing.assert_allclose(teacher(x).exp().numpy(), expected, rtol=1e-5, atol=1e-7)


class ScaledCopy(torch.nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x
