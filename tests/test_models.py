import pytest
import torch

from training.models import build_classifier, count_macs, count_params

NORM = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}


def test_classifier_takes_uint8_nhwc_and_normalises_inside():
    model = build_classifier("resnet18", 10, small_stem=True, **NORM).eval()
    images = torch.randint(0, 256, (3, 8, 8, 3), dtype=torch.uint8)
    with torch.no_grad():
        logits = model(images)
        # The same image as float NCHW, normalised by hand, through the bare backbone.
        manual = model.backbone(((images.permute(0, 3, 1, 2).float() / 255) - 0.5) / 0.25)
    assert logits.shape == (3, 10)
    torch.testing.assert_close(logits, manual)


def test_multihead_model_returns_one_logit_row_per_head():
    model = build_classifier("resnet18", 10, small_stem=True, heads=3, **NORM).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    assert out.shape == (2, 3, 10)
    # Three heads cost three small linear layers, not three backbones.
    single = build_classifier("resnet18", 10, small_stem=True, **NORM)
    assert count_params(model) - count_params(single) == 2 * (512 * 10 + 10)


def test_params_and_macs_match_published_resnet_figures():
    # torchvision's ImageNet ResNet18: 11.69 M parameters, 1.82 G multiply-accumulates at 224x224.
    model = build_classifier("resnet18", 1000, small_stem=False, **NORM)
    assert count_params(model) == 11_689_512
    assert count_macs(model, 224) == pytest.approx(1.814e9, rel=0.005)
    resnet50 = build_classifier("resnet50", 1000, small_stem=False, **NORM)
    assert count_params(resnet50) == 25_557_032
