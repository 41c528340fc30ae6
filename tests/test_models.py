import pytest
import torch

from training.checkpoint import ModelSpec, load_model, save_model
from training.models import Heads, build_classifier, count_macs, count_params

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


@pytest.mark.parametrize("arch", ["mobilenet_v3_small", "efficientnet_b0", "timm:resnet18"])
def test_a_student_that_is_no_resnet_gets_its_heads_on_its_last_classifier_layer_and_saves_and_loads(arch, tmp_path):
    """The multi-head model of a recipe whose student is a MobileNet, an EfficientNet or a timm model (a
    ResNet's trunk is `MultiHeadResNet`'s): K heads where its classifier answered, exported and served alike."""
    model = build_classifier(arch, 10, small_stem=True, heads=3, **NORM).eval()
    single = build_classifier(arch, 10, small_stem=True, **NORM)
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    with torch.no_grad():
        out = model(images)
    assert out.shape == (2, 3, 10)
    (heads,) = [m for m in model.modules() if isinstance(m, Heads)]
    features = heads.heads[0].in_features
    assert count_params(model) - count_params(single) == 2 * (features * 10 + 10)  # two more heads, nothing else
    spec = ModelSpec(arch=arch, num_classes=10, small_stem=True, image_size=16, heads=3, class_names=list("0123456789"),
                     **NORM)  # fmt: skip
    save_model(tmp_path / "model.pt", model, spec, {})
    loaded, _, _ = load_model(tmp_path / "model.pt")
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(images), out)


def test_params_and_macs_match_published_resnet_figures():
    # torchvision's ImageNet ResNet18: 11.69 M parameters, 1.82 G multiply-accumulates at 224x224.
    model = build_classifier("resnet18", 1000, small_stem=False, **NORM)
    assert count_params(model) == 11_689_512
    assert count_macs(model, 224) == pytest.approx(1.814e9, rel=0.005)
    resnet50 = build_classifier("resnet50", 1000, small_stem=False, **NORM)
    assert count_params(resnet50) == 25_557_032


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_a_narrow_resnet_has_a_quarter_of_the_channels_and_starts_each_block_as_identity(arch, tmp_path):
    full = build_classifier(arch, 10, small_stem=True, **NORM)
    narrow = build_classifier(arch, 10, small_stem=True, width=0.25, **NORM)
    # Every layer's channels x 0.25: compute and (conv) parameters shrink ~16x.
    assert count_macs(narrow, 8) == pytest.approx(count_macs(full, 8) / 16, rel=0.05)
    blocks = [m for m in narrow.backbone.modules() if hasattr(m, "downsample")]
    assert blocks and all(not (b.bn3 if hasattr(b, "bn3") else b.bn2).weight.any() for b in blocks)
    assert narrow.backbone.layer4[-1].conv1.in_channels == full.backbone.layer4[-1].conv1.in_channels // 4
    # Saved and loaded through the spec, as export and serving rebuild it.
    from training.checkpoint import ModelSpec, load_model, save_model

    spec = ModelSpec(arch, 10, True, 8, NORM["mean"], NORM["std"], [str(i) for i in range(10)], width=0.25)
    save_model(tmp_path / "model.pt", narrow, spec, {})
    loaded, loaded_spec, _ = load_model(tmp_path / "model.pt")
    images = torch.randint(0, 256, (2, 8, 8, 3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), narrow.eval()(images))
    assert loaded_spec.width == 0.25
