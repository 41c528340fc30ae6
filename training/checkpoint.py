"""Saving and loading trained models together with what is needed to rebuild and serve them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcontract.errors import UserError
from training.models import ImageClassifier, build_classifier, build_network, conform_to_state_dict
from training.teachers import BroughtClassifier


@dataclass
class ModelSpec:
    """Everything needed to rebuild a trained classifier, export it and describe it in the manifest."""

    arch: str
    num_classes: int
    small_stem: bool
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    heads: int = 0
    members: int = 1  # > 1: a `MemberMean` of this many networks (a teacher made of several)
    pruned: bool = False  # layers narrower than the arch's: their widths come from the saved weights
    role: str = "student"
    width: float = 1.0  # channels relative to the published architecture (recipe `width`)
    temperature: float = 1.0  # fitted on the validation split after training
    metrics: dict[str, float] = field(default_factory=dict)
    # A network trained elsewhere (a teacher brought from a file): its own input size and normalisation.
    brought: bool = False
    input_size: int | None = None


def build_from_spec(spec: ModelSpec) -> ImageClassifier | BroughtClassifier:
    if spec.brought:
        return BroughtClassifier(
            build_network(spec.arch, spec.num_classes, spec.small_stem), spec.input_size, spec.mean, spec.std
        )
    return build_classifier(
        spec.arch,
        spec.num_classes,
        small_stem=spec.small_stem,
        mean=spec.mean,
        std=spec.std,
        heads=spec.heads,
        members=spec.members,
        width=spec.width,
    )


def save_model(path: Path, model: ImageClassifier, spec: ModelSpec, recipe: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state_dict": model.state_dict(), "spec": asdict(spec), "recipe": recipe}, tmp)
    tmp.replace(path)  # atomic: a crash mid-write never leaves a half-written model behind


def _load_payload(path: Path, mmap: bool = False) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"model checkpoint {path} does not exist; train it first (python -m training all)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:
        raise UserError(
            f"checkpoint {path} is corrupt or not a kdserve model ({type(exc).__name__}); delete it and retrain"
        ) from exc


def load_metadata(path: Path) -> tuple[ModelSpec, dict[str, Any]]:
    """The spec and training metadata of a saved model, without building it or reading its weights
    (memory-mapped: only the pages of the small entries are read)."""
    payload = _load_payload(path, mmap=True)
    return ModelSpec(**payload["spec"]), payload.get("recipe", {})


def load_model(path: Path) -> tuple[ImageClassifier, ModelSpec, dict[str, Any]]:
    payload = _load_payload(path)
    try:
        spec = ModelSpec(**payload["spec"])
        model = build_from_spec(spec)
        if spec.pruned:
            conform_to_state_dict(model, payload["state_dict"])
        model.load_state_dict(payload["state_dict"])
    except Exception as exc:  # any unpickling/shape error means the file is not a usable checkpoint
        raise UserError(
            f"checkpoint {path} is corrupt or not a kdserve model ({type(exc).__name__}); delete it and retrain"
        ) from exc
    model.eval()
    return model, spec, payload.get("recipe", {})
