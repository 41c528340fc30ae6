"""Teachers (and student starting points) brought from a file: the model a team already has.

Three forms, named in the recipe (`teacher.file`):
- a PyTorch checkpoint (`.pt`/`.pth`: a `state_dict`, or a dict holding one under `state_dict` / `model`;
  or `.safetensors`) for a named architecture: any torchvision classification model (`resnet50`,
  `mobilenet_v3_large`, ...) or a timm model (`timm:NAME`). The architecture is built with fresh weights
  and the file's weights are loaded into it: nothing is fetched from a hub;
- an ONNX model, run with ONNX Runtime: a teacher from TensorFlow, JAX or anything that exports ONNX.
  Soft targets need only its logits.

Each is wrapped to take what every kdserve model takes, uint8 [N, H, W, 3] images as the gateway prepares
them, and to give logits [N, classes]: the images are resized to the size the teacher was trained at and
normalised with its mean and std (declared in the recipe; ImageNet's by default, the convention of
torchvision's and timm's weights). A graph that takes uint8 NHWC (kdserve's own exports) is fed the images
as they are.

Every mismatch a user will hit is one line (`UserError`, exit 2): an unknown architecture (with the
closest names), missing or unexpected checkpoint keys (the first few named), a head with another number of
classes, an ONNX output that is not [N, classes], declared class names that differ from the dataset's.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from kdcontract.errors import UserError

TIMM_PREFIX = "timm:"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHOWN_KEYS = 3  # checkpoint keys named in an error
ONNX_TEACHER = "model.onnx"  # a brought ONNX teacher's copy in the run's teacher folder
BROUGHT = "brought.json"  # beside it: where it came from, its normalisation, calibration and figures


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


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The weights in `path`: a state_dict saved by torch (`weights_only`: nothing is unpickled but tensors)
    or a `.safetensors` file; a dict wrapping one under `state_dict` or `model` is unwrapped."""
    if not path.is_file():
        raise UserError(f"teacher file {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(f"{path} is not a PyTorch state_dict ({type(exc).__name__}: {exc})"[:300]) from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(payload, dict) and isinstance(payload.get(wrapper), dict):
            payload = payload[wrapper]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise UserError(f"{path} holds no state_dict (a mapping of names to tensors)")
    return payload


def load_weights(net: nn.Module, state: dict[str, torch.Tensor], path: Path, arch: str, num_classes: int) -> None:
    """`state` into `net`, or one line saying what does not fit."""
    own = net.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        parts = [
            f"{len(k)} {what} ({_first(k)})" for what, k in (("missing", missing), ("unexpected", unexpected)) if k
        ]
        raise UserError(f"{path} does not fit {arch}: {'; '.join(parts)}")
    wrong = [k for k in own if own[k].shape != state[k].shape]
    if wrong:
        head = [k for k in wrong if own[k].shape[:1] == (num_classes,) and state[k].ndim >= 1]
        if head and len(head) == len(wrong):
            raise UserError(
                f"{path}: its head has {state[head[0]].shape[0]} classes ({head[0]}), the dataset has {num_classes}"
            )
        shapes = ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in wrong[:SHOWN_KEYS])
        raise UserError(f"{path} does not fit {arch}: shapes differ: {shapes}")
    net.load_state_dict(state)


def _first(keys: list[str]) -> str:
    return ", ".join(keys[:SHOWN_KEYS]) + (", ..." if len(keys) > SHOWN_KEYS else "")


class BroughtClassifier(nn.Module):
    """uint8 [N, H, W, 3] -> logits of a network trained elsewhere: resized to its input size, scaled to
    [0, 1] and normalised with its mean and std, inside the graph (so its ONNX export takes what every
    kdserve model takes)."""

    def __init__(self, backbone: nn.Module, image_size: int | None, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.backbone, self.image_size = backbone, image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div(255.0)
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        return self.backbone((x - self.mean) / self.std)


class OnnxTeacher(nn.Module):
    """An ONNX classifier run with ONNX Runtime, as a frozen teacher: uint8 [N, H, W, 3] -> logits [N, C].

    Its input is read from the graph: uint8 NHWC (kdserve's own exports, fed as they are, resized when the
    size differs) or float NCHW (resized, scaled to [0, 1] and normalised with the declared mean and std)."""

    def __init__(self, path: Path, num_classes: int, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        from kdcontract.ort_session import open_session

        if not path.is_file():
            raise UserError(f"teacher file {path} does not exist")
        try:
            self.session = open_session(path)
        except Exception as exc:
            raise UserError(f"{path} is not an ONNX model ONNX Runtime can run ({type(exc).__name__})") from exc
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input_name, self.output_name = inp.name, out.name
        shape = list(inp.shape)
        self.uint8 = inp.type == "tensor(uint8)"
        if len(shape) != 4 or (self.uint8 and shape[3] != 3) or (not self.uint8 and shape[1] != 3):
            layout = "uint8 [N, H, W, 3]" if self.uint8 else "float [N, 3, H, W]"
            raise UserError(f"{path}: input {inp.name} is {inp.type} {shape}; a teacher takes {layout}")
        side = shape[1] if self.uint8 else shape[2]
        self.image_size = side if isinstance(side, int) else None
        if len(out.shape) != 2 or (isinstance(out.shape[1], int) and out.shape[1] != num_classes):
            raise UserError(f"{path}: output {out.name} is {list(out.shape)}, not [N, {num_classes}] logits")
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.path = path

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float()
        if self.image_size is not None and x.shape[-1] != self.image_size:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True)
        if self.uint8:
            feed = x.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
        else:
            feed = ((x / 255.0 - self.mean) / self.std).contiguous().cpu().numpy().astype(np.float32)
        logits = self.session.run([self.output_name], {self.input_name: feed})[0]
        return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)).to(images.device)


def load_teacher(
    path: Path,
    arch: str | None,
    num_classes: int,
    image_size: int | None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> nn.Module:
    """A teacher from `path`: ONNX (`.onnx`), or a checkpoint for `arch`; uint8 NHWC in, logits out."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxTeacher(path, num_classes, mean, std).eval()
    if arch is None:
        raise UserError(f"{path}: a checkpoint needs teacher.arch (a torchvision model name or timm:NAME)")
    net = build_backbone(arch, num_classes)
    load_weights(net, read_state(path), path, arch, num_classes)
    return BroughtClassifier(net, image_size, mean, std).eval()


def run_teacher(folder: Path, num_classes: int) -> nn.Module | None:
    """A run's brought ONNX teacher (None when the run's teacher is a checkpoint, `model.pt`)."""
    if not (folder / BROUGHT).is_file():
        return None
    brought = json.loads((folder / BROUGHT).read_text())
    return OnnxTeacher(folder / ONNX_TEACHER, num_classes, tuple(brought["mean"]), tuple(brought["std"])).eval()


def check_class_names(declared: list[str] | None, dataset: list[str], path: Path) -> None:
    if declared is not None and declared != dataset:
        raise UserError(f"{path} was trained on classes {declared[:10]}, the dataset has {dataset[:10]}")
