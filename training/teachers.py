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

import json
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from kdcontract.errors import UserError
from training.models import build_network
from training.onnx_front import behind_uint8_input
from training.onnx_tools import INPUT_NAME, OUTPUT_NAME
from training.recipe import IMAGENET_MEAN, IMAGENET_STD

SHOWN_KEYS = 3  # checkpoint keys named in an error
ONNX_TEACHER = "model.onnx"  # a brought ONNX teacher's copy in the run's teacher folder
BROUGHT = "brought.json"  # beside it: where it came from, its normalisation, calibration and figures


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


TORCHVISION_WEIGHTS = "torchvision:"  # `weights: torchvision:IMAGENET1K_V2`: torchvision's published weights


def starting_state(source: str, arch: str) -> dict[str, torch.Tensor]:
    """The weights a network starts from: a local file (`read_state`), or torchvision's published weights by
    name, which torchvision fetches into its cache (`$TORCH_HOME`) the first time: the one download kdserve
    makes, and only when a recipe names it."""
    if not source.startswith(TORCHVISION_WEIGHTS):
        return read_state(Path(source))
    name = source.removeprefix(TORCHVISION_WEIGHTS)
    try:
        published = torchvision.models.get_model_weights(arch)
    except ValueError as exc:
        raise UserError(f"weights {source}: torchvision publishes weights for its own models, not {arch}") from exc
    if name not in published.__members__:
        raise UserError(f"weights {source}: {arch} has no such weights (it has {', '.join(w.name for w in published)})")
    weights = published[name]
    try:
        return weights.get_state_dict(progress=False)
    except OSError as exc:  # URLError and every failed download or cache write
        raise UserError(
            f"weights {source}: torchvision could not fetch {weights.url} ({exc}); on a machine without the "
            "network, copy the file and name its path instead"
        ) from exc


def start_from_weights(net: nn.Module, source: str, arch: str) -> list[str]:
    """`source`'s weights into `net` wherever a name and shape fit; the rest stays as initialised and is returned:
    a head for another number of classes, a stem of another shape (`small_stem`). A file that fits little
    else is refused in one line naming what does not fit."""
    state, own = starting_state(source, arch), net.state_dict()
    fits = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    fresh = [k for k in own if k not in fits and not k.endswith("num_batches_tracked")]
    fresh_values = sum(own[k].numel() for k in fresh)
    if not fits or fresh_values > MAX_FRESH_SHARE * sum(v.numel() for v in own.values()):
        raise UserError(
            f"weights {source} do not fit {arch}: {len(fresh)} of its tensors find no match ({_first(fresh)}); "
            f"{len(fits)} fit"
        )
    net.load_state_dict({**own, **fits})
    return fresh


MAX_FRESH_SHARE = 0.1  # more than this share of a network's values without weights: the file is for another network


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

    The brought graph is put behind kdserve's input first (`training.onnx_front.behind_uint8_input`: resized to
    the size it takes, scaled and normalised with the declared mean and std, in its own layout), and that one
    graph is what the student is distilled from and what export serves (`graph`)."""

    def __init__(
        self,
        path: Path,
        num_classes: int,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        image_size: int | None = None,
    ):
        super().__init__()
        import onnx

        from kdcontract.ort_session import open_session

        if not path.is_file():
            raise UserError(f"teacher file {path} does not exist")
        try:
            brought = onnx.load(str(path))
        except Exception as exc:
            raise UserError(f"{path} is not an ONNX model ({type(exc).__name__})") from exc
        try:
            self.graph = behind_uint8_input(brought, num_classes, mean, std, image_size)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from exc
        self.session = open_session(self.graph.SerializeToString())
        self.path = path

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        feed = images.to(torch.uint8).contiguous().cpu().numpy()
        logits = self.session.run([OUTPUT_NAME], {INPUT_NAME: feed})[0]
        return torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)).to(images.device)


def load_teacher(
    path: Path,
    arch: str | None,
    num_classes: int,
    image_size: int | None,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
    small_stem: bool = False,
) -> nn.Module:
    """A teacher from `path`: ONNX (`.onnx`), or a checkpoint for `arch` (with kdserve's small-image stem when
    `small_stem`: a teacher kdserve trained, brought back); uint8 NHWC in, logits out."""
    path = Path(path)
    if path.suffix == ".onnx":
        return OnnxTeacher(path, num_classes, mean, std, image_size).eval()
    if arch is None:
        raise UserError(f"{path}: a checkpoint needs teacher.arch (a torchvision model name or timm:NAME)")
    net = build_network(arch, num_classes, small_stem)
    load_weights(net, read_state(path), path, arch, num_classes)
    return BroughtClassifier(net, image_size, mean, std).eval()


def run_teacher(folder: Path, num_classes: int) -> nn.Module | None:
    """A run's brought ONNX teacher (None when the run's teacher is a checkpoint, `model.pt`)."""
    if not (folder / BROUGHT).is_file():
        return None
    brought = json.loads((folder / BROUGHT).read_text())
    mean, std, size = tuple(brought["mean"]), tuple(brought["std"]), brought.get("image_size")
    return OnnxTeacher(folder / ONNX_TEACHER, num_classes, mean, std, size).eval()


def check_class_names(declared: list[str] | None, dataset: list[str], path: Path) -> None:
    if declared is not None and declared != dataset:
        raise UserError(f"{path} was trained on classes {declared[:10]}, the dataset has {dataset[:10]}")
