"""One-pixel-output convolutions on the taps that meet the image: the same numbers, and nothing left patched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from training.conv_shortcut import one_pixel_convs_cropped
from training.models import build_classifier

# (in, out, kernel, stride, padding, groups, image side): the last stage of a ResNet at 8x8, its
# strided entry, a 1x1 projection, a grouped convolution, and one whose output is not one pixel.
CASES = [
    (16, 24, 3, 1, 1, 1, 1),
    (16, 24, 3, 2, 1, 1, 2),
    (16, 24, 1, 2, 0, 1, 2),
    (16, 24, 3, 1, 1, 4, 1),
    (16, 24, 5, 1, 2, 1, 3),
    (16, 24, 3, 1, 1, 1, 4),
]


def _forward_backward(conv: nn.Conv2d, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    conv.zero_grad()
    x = x.detach().requires_grad_()
    out = conv(x)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), x.grad, conv.weight.grad.clone()


@pytest.mark.parametrize("case", CASES)
def test_cropped_convolution_gives_the_same_output_and_gradients(case: tuple[int, ...]) -> None:
    cin, cout, kernel, stride, padding, groups, side = case
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, kernel, stride, padding, groups=groups, bias=True)
    x = torch.randn(5, cin, side, side)
    plain = _forward_backward(conv, x)
    with one_pixel_convs_cropped():
        cropped = _forward_backward(conv, x)
    for a, b in zip(plain, cropped, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _weight_cropped(out: torch.Tensor) -> bool:
    """Whether the convolution that made `out` read its weight through a slice (the shortcut)."""
    return any(fn is not None and "Slice" in type(fn).__name__ for fn, _ in out.grad_fn.next_functions)


def test_the_shortcut_applies_inside_the_block_only() -> None:
    one_pixel, larger = nn.Conv2d(8, 8, 3, padding=1), torch.randn(2, 8, 4, 4)
    x = torch.randn(2, 8, 1, 1)
    assert not _weight_cropped(one_pixel(x))
    with one_pixel_convs_cropped():
        with one_pixel_convs_cropped():  # nested, as compression's fits may be
            assert _weight_cropped(one_pixel(x))
        assert _weight_cropped(one_pixel(x)), "the outer block still crops"
        assert not _weight_cropped(one_pixel(larger)), "outputs larger than one pixel take the plain path"
    assert not _weight_cropped(one_pixel(x)), "the class is restored when the outer block ends"


def test_a_student_at_8x8_gets_the_same_logits_and_gradients() -> None:
    torch.manual_seed(0)
    model = build_classifier("resnet18", 10, small_stem=True, mean=(0.5,) * 3, std=(0.25,) * 3)
    images = torch.randint(0, 256, (4, 8, 8, 3), dtype=torch.uint8)

    def step() -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        logits = model(images)
        logits.logsumexp(1).sum().backward()
        return logits.detach(), [p.grad.clone() for p in model.parameters()]

    model.eval()  # BatchNorm from running statistics: both passes see the same normalisation
    plain_logits, plain_grads = step()
    with one_pixel_convs_cropped():
        cropped_logits, cropped_grads = step()
    torch.testing.assert_close(cropped_logits, plain_logits, rtol=1e-4, atol=1e-4)
    for a, b in zip(cropped_grads, plain_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
