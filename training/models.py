"""Model registry: torchvision ResNets with a small-image stem, and the shared-backbone K-head model.

Every model is wrapped in `ImageClassifier`, which takes uint8 NHWC images and does the scaling and
normalisation inside the graph. Training and the exported ONNX see the same function, so there is
one less place for train/serve skew and 4x less data on the wire.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from kdcontract.errors import UserError

TIMM_PREFIX = "timm:"

ARCHS: dict[str, Callable[..., torchvision.models.ResNet]] = {
    "resnet18": torchvision.models.resnet18,
    "resnet34": torchvision.models.resnet34,
    "resnet50": torchvision.models.resnet50,
}


def torchvision_archs() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _timm():
    import timm  # on first use: importing it costs every training process a second, and most never need it

    return timm


def check_arch(arch: str, where: str) -> None:
    """`arch` names a network kdserve can build, or a one-line error naming the recipe key and the closest names."""
    if arch.startswith(TIMM_PREFIX):
        name, known = arch.removeprefix(TIMM_PREFIX), _timm().list_models()
        if name not in known:
            raise UserError(f"{where}: timm knows no model {name!r}; closest: {', '.join(_closest(name, known))}")
        return
    known = torchvision_archs()  # kdserve's ResNets are torchvision's, with a small-image stem
    if arch not in known:
        hint = _closest(arch, known + [f"{TIMM_PREFIX}{m}" for m in _timm().list_models()])
        raise UserError(
            f"{where}: unknown architecture {arch!r} (neither torchvision nor timm:NAME); closest: {', '.join(hint)}"
        )


def build_backbone(arch: str, num_classes: int) -> nn.Module:
    """A classification network with fresh weights: a torchvision model by name, or `timm:NAME`."""
    check_arch(arch, "architecture")
    if arch.startswith(TIMM_PREFIX):
        return _timm().create_model(arch.removeprefix(TIMM_PREFIX), pretrained=False, num_classes=num_classes)
    return torchvision.models.get_model(arch, weights=None, num_classes=num_classes)


def _closest(name: str, known: list[str]) -> list[str]:
    return difflib.get_close_matches(name, known, n=3, cutoff=0.4) or known[:3]


def build_network(arch: str, num_classes: int, small_stem: bool, width: float = 1.0) -> nn.Module:
    """A randomly initialised network: kdserve's ResNets, or any torchvision classification model or timm
    model (`timm:NAME`) by name (`build_backbone`), its first convolution made stride 1 with `small_stem`
    (the small-image stem of the others: an 8-32 px input would otherwise be halved before anything is seen)."""
    if arch in ARCHS:
        return build_resnet(arch, num_classes, small_stem, width)
    if width != 1.0:
        raise UserError(f"width {width:g}: only the ResNets ({', '.join(sorted(ARCHS))}) take a width")
    net = build_backbone(arch, num_classes)
    if small_stem:
        first = next(m for m in net.modules() if isinstance(m, nn.Conv2d))
        first.stride = (1, 1)
    for norm in net.modules():
        # torchvision's MobileNetV3 and EfficientNet set BatchNorm momentum 0.01 (tuned for ImageNet's step counts):
        # after the few hundred steps of a schedule here, the running statistics would still be near their
        # initial values and every evaluation (eval mode) at chance (measured: 0% after 4 epochs on 64 px digits).
        if isinstance(norm, nn.modules.batchnorm._BatchNorm):
            norm.momentum = 0.1
    return net


def build_resnet(arch: str, num_classes: int, small_stem: bool, width: float = 1.0) -> torchvision.models.ResNet:
    """A randomly initialised torchvision ResNet (weights are never fetched from a hub).

    `width` scales every layer's channels (0.25: a quarter); 1.0 is the architecture as published.
    """
    if arch not in ARCHS:
        raise UserError(f"unknown arch {arch!r}; known: {', '.join(sorted(ARCHS))}")
    # zero_init_residual: each block starts as identity, so deep nets train stably from scratch on
    # small data (Goyal et al., 2017); it matters most for ResNet50 with few epochs.
    net = ARCHS[arch](weights=None, num_classes=num_classes, zero_init_residual=True)
    if small_stem:
        # For 8-32 px inputs the 7x7/2 stem and max-pool would throw away most of the image.
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    if width != 1.0:
        _scale_channels(net, width)
    return net


def scaled_channels(channels: int, width: float) -> int:
    return max(1, round(channels * width))


def _scale_channels(net: torchvision.models.ResNet, width: float) -> None:
    """Every convolution, batch norm and the classifier's input rebuilt with `width` times the channels
    (the image's 3 stay), initialised as torchvision initialises a ResNet. Each tensor's channel count
    goes through the same function of its published count, so residual sums keep matching shapes."""
    for name, module in list(net.named_modules()):
        replacement: nn.Module
        if isinstance(module, nn.Conv2d):
            inputs = module.in_channels if module.in_channels == 3 else scaled_channels(module.in_channels, width)
            replacement = nn.Conv2d(
                inputs,
                scaled_channels(module.out_channels, width),
                module.kernel_size,
                module.stride,
                module.padding,
                bias=False,
            )
            nn.init.kaiming_normal_(replacement.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, nn.BatchNorm2d):
            replacement = nn.BatchNorm2d(scaled_channels(module.num_features, width))
            # zero_init_residual, kept: a block's last batch norm starts at zero, as the original's did.
            if not module.weight.detach().any():
                nn.init.zeros_(replacement.weight)
        elif isinstance(module, nn.Linear):
            replacement = nn.Linear(scaled_channels(module.in_features, width), module.out_features)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(net.get_submodule(parent_name) if parent_name else net, child, replacement)


class MultiHeadResNet(nn.Module):
    """One ResNet trunk, K linear heads: an ensemble for the price of ~one model.

    Returns logits [N, K, C]; the server fuses the heads like independent members.
    """

    def __init__(self, arch: str, num_classes: int, small_stem: bool, heads: int, width: float = 1.0):
        super().__init__()
        trunk = build_resnet(arch, num_classes, small_stem, width)
        features = trunk.fc.in_features
        trunk.fc = nn.Identity()
        self.trunk = trunk
        self.heads = nn.ModuleList(nn.Linear(features, num_classes) for _ in range(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.trunk(x)
        return torch.stack([head(pooled) for head in self.heads], dim=1)


class Heads(nn.Module):
    """K linear heads on the same features: logits [N, K, C]."""

    def __init__(self, features: int, num_classes: int, heads: int):
        super().__init__()
        self.heads = nn.ModuleList(nn.Linear(features, num_classes) for _ in range(heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([head(x) for head in self.heads], dim=1)


def with_heads(net: nn.Module, num_classes: int, heads: int) -> nn.Module:
    """Any classification network (MobileNet, EfficientNet, a timm model) with its last classifier layer, the
    last linear layer answering `num_classes`, replaced by K heads: the multi-head model for students that
    are not ResNets (whose trunk keeps `MultiHeadResNet`'s layout)."""
    last = [name for name, m in net.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not last:
        raise UserError(f"{type(net).__name__} has no linear layer answering {num_classes} classes to put heads on")
    parent, _, attr = last[-1].rpartition(".")
    features = net.get_submodule(last[-1]).in_features
    setattr(net.get_submodule(parent) if parent else net, attr, Heads(features, num_classes, heads))
    return net


def calibrated_mean(member_logits: list[torch.Tensor], temperatures: list[float]) -> torch.Tensor:
    """kdserve's fusion rule (`kdcontract.fusion.calibrated_mean`) in torch ops, for what is trained or
    exported as a graph: the mean of the members' temperature-calibrated probabilities. Tests hold the
    two equal."""
    probs = [(logits.float() / t).softmax(-1) for logits, t in zip(member_logits, temperatures, strict=True)]
    return torch.stack(probs).mean(dim=0)


def fuse_heads(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """A K-head model's logits [N, K, C] -> probabilities [N, C], its heads fused like ensemble members
    (as serving fuses them)."""
    return calibrated_mean(list(logits.unbind(dim=1)), [temperature] * logits.shape[1])


class MemberMean(nn.Module):
    """N networks as one: the log of their mean probability (a valid logit vector for softmax).

    A teacher trained on few labels gains most from being several networks; as one module it is
    distilled, calibrated, exported and served like a single model.
    """

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        probs = calibrated_mean([member(x) for member in self.members], [1.0] * len(self.members))
        return probs.clamp_min(1e-12).log()


class ImageClassifier(nn.Module):
    """uint8 [N, H, W, 3] -> logits. Scaling to [0, 1] and mean/std normalisation are in the graph."""

    def __init__(self, backbone: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # NHWC -> NCHW view: the permuted tensor is already channels_last in memory, no copy.
        x = images.permute(0, 3, 1, 2).float().div(255.0)
        return self.backbone((x - self.mean) / self.std)


def build_classifier(
    arch: str,
    num_classes: int,
    *,
    small_stem: bool,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    heads: int = 0,
    members: int = 1,
    width: float = 1.0,
) -> ImageClassifier:
    backbone: nn.Module
    if heads > 0 and arch in ARCHS:
        backbone = MultiHeadResNet(arch, num_classes, small_stem, heads, width)
    elif heads > 0:
        backbone = with_heads(build_network(arch, num_classes, small_stem, width), num_classes, heads)
    elif members > 1:
        backbone = MemberMean([build_network(arch, num_classes, small_stem, width) for _ in range(members)])
    else:
        backbone = build_network(arch, num_classes, small_stem, width)
    return ImageClassifier(backbone, mean, std)


def member_mean(models: list[ImageClassifier]) -> ImageClassifier:
    """Trained classifiers (same normalisation) as one `MemberMean` classifier."""
    first = models[0]
    return ImageClassifier(
        MemberMean([m.backbone for m in models]),
        tuple(first.mean.flatten().tolist()),
        tuple(first.std.flatten().tolist()),
    ).eval()


def conform_to_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """Resize the convolutions, batch norms and linear layers of `model` to the shapes in `state`.

    A channel-pruned network is the same architecture with fewer channels per layer, so it is rebuilt
    from its spec and then given its layers' saved widths; its weights load as usual (no pickled modules).
    """
    for name, module in list(model.named_modules()):
        weight = state.get(f"{name}.weight")
        if weight is None:
            continue
        if isinstance(module, nn.Conv2d) and tuple(weight.shape) != tuple(module.weight.shape):
            replacement: nn.Module = nn.Conv2d(
                weight.shape[1] * module.groups,
                weight.shape[0],
                module.kernel_size,
                module.stride,
                module.padding,
                module.dilation,
                module.groups,
                bias=module.bias is not None,
            )
        elif isinstance(module, nn.BatchNorm2d) and weight.shape[0] != module.num_features:
            replacement = nn.BatchNorm2d(weight.shape[0], module.eps, module.momentum)
        elif isinstance(module, nn.Linear) and tuple(weight.shape) != tuple(module.weight.shape):
            replacement = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        else:
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)
    return model


def stage_module(model: ImageClassifier, stage: str) -> nn.Module:
    """The residual stage named `stage` (layer1..layer4) of a classifier, for feature hooks."""
    trunk = getattr(model.backbone, "trunk", model.backbone)  # MultiHeadResNet keeps stages on its trunk
    return getattr(trunk, stage)


def stage_channels(model: ImageClassifier, stage: str) -> int:
    block = stage_module(model, stage)[-1]
    last_bn = block.bn3 if hasattr(block, "bn3") else block.bn2
    return last_bn.num_features


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, image_size: int) -> int:
    """Multiply-accumulates of one forward pass on one image (convolutions and linear layers)."""
    total = 0

    def conv_hook(module: nn.Conv2d, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        kernel = module.kernel_size[0] * module.kernel_size[1] * (module.in_channels // module.groups)
        total += output.numel() * kernel

    def linear_hook(module: nn.Linear, _inputs, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * module.in_features

    handles = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(conv_hook))
        elif isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, image_size, image_size, 3, dtype=torch.uint8))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return total
