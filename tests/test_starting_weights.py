"""A network that starts from weights instead of random ones (`weights:` in a recipe's teacher or student): a
local state_dict, or torchvision's published weights by name from torchvision's cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from kdcontract.errors import UserError
from training.models import build_network
from training.recipe import load_recipe
from training.stages import plan_stages, stage_fingerprint
from training.teachers import start_from_weights


def published(arch: str, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state_dict as an ImageNet checkpoint is laid out (1000 classes, the published stem), written to `path`."""
    torch.manual_seed(seed)
    state = torchvision.models.get_model(arch, weights=None, num_classes=1000).state_dict()
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return state


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_a_student_starts_from_a_local_file_with_a_fresh_head_for_its_classes(tmp_path, suffix):
    state = published("mobilenet_v3_small", tmp_path / f"mobilenet{suffix}")
    net = build_network("mobilenet_v3_small", 10, small_stem=False)
    fresh = start_from_weights(net, str(tmp_path / f"mobilenet{suffix}"), "mobilenet_v3_small")
    assert fresh == ["classifier.3.weight", "classifier.3.bias"]
    loaded = net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items() if k not in fresh)
    assert loaded["classifier.3.weight"].shape == (10, 1024)


def test_a_small_stem_starts_fresh_and_is_named_with_the_head(tmp_path):
    published("resnet18", tmp_path / "resnet18.pth")
    net = build_network("resnet18", 10, small_stem=True)
    assert start_from_weights(net, str(tmp_path / "resnet18.pth"), "resnet18") == [
        "conv1.weight",
        "fc.weight",
        "fc.bias",
    ]


def test_weights_of_another_network_are_refused_in_one_line(tmp_path):
    published("resnet18", tmp_path / "resnet18.pth")
    net = build_network("mobilenet_v3_small", 10, small_stem=False)
    with pytest.raises(UserError, match=r"do not fit mobilenet_v3_small: \d+ of its tensors find no match \(features"):
        start_from_weights(net, str(tmp_path / "resnet18.pth"), "mobilenet_v3_small")


def test_torchvisions_imagenet_weights_by_name_come_from_its_cache(tmp_path, monkeypatch):
    """`teacher.weights: torchvision:IMAGENET1K_V2` (the GPU recipe's ImageNet teacher): torchvision reads its
    cache before it fetches anything, so a machine that has the file needs no network (this test's file is a
    stand-in with the published layout)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet50_Weights.IMAGENET1K_V2.url
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    state = published("resnet50", tmp_path / "hub" / "checkpoints" / url.rsplit("/", 1)[1])
    recipe = load_recipe("cifar10", ["teacher.weights=torchvision:IMAGENET1K_V2"])
    net = build_network(recipe.teacher.arch, 10, small_stem=recipe.teacher.small_stem)
    fresh = start_from_weights(net, recipe.teacher.weights, recipe.teacher.arch)
    assert fresh == ["conv1.weight", "fc.weight", "fc.bias"]  # the recipe's 3x3 stem for 32 px images
    assert torch.equal(net.state_dict()["layer4.2.conv3.weight"], state["layer4.2.conv3.weight"])
    with pytest.raises(UserError, match=r"resnet50 has no such weights \(it has IMAGENET1K_V1, IMAGENET1K_V2\)"):
        start_from_weights(net, "torchvision:IMAGENET_V9", "resnet50")
    with pytest.raises(UserError, match="torchvision publishes weights for its own models, not timm:resnet50"):
        start_from_weights(net, "torchvision:IMAGENET1K_V2", "timm:resnet50")


def test_a_stage_is_retrained_when_its_weights_file_changes_and_reused_while_it_does_not(tmp_path):
    path = tmp_path / "start.pth"

    def fingerprints() -> dict[str, str]:
        recipe = load_recipe("digits", [f"student.weights={path}"])
        return {s.name: stage_fingerprint(s, recipe) for s in plan_stages(recipe)}

    published("resnet18", path, seed=0)
    first = fingerprints()
    assert fingerprints() == first
    published("resnet18", path, seed=1)
    changed = fingerprints()
    assert changed["student_plain"] != first["student_plain"] and changed["teacher"] == first["teacher"]
