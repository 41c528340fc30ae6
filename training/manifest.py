"""The schema of `model_repository/manifest.json`: the one contract between training and serving.

Imports pydantic only (no torch), so the gateway reads the manifest with this same definition.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1

Role = Literal["teacher", "student", "variant", "multihead", "quantized", "ensemble", "fusion"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TensorSpec(_Strict):
    name: str
    dtype: Literal["UINT8", "FP32", "FP16"]
    shape: list[int] = Field(description="without the batch axis")


class Preprocessing(_Strict):
    """How a picture becomes the model's input; the gateway applies exactly this."""

    image_size: int
    resize: str = "pillow-bilinear"
    color: Literal["RGB"] = "RGB"
    layout: Literal["NHWC"] = "NHWC"
    # Scaling to [0, 1] and these mean/std are applied inside the exported graph.
    mean: list[float]
    std: list[float]


class ModelEntry(_Strict):
    name: str
    role: Role
    arch: str
    version: int = Field(ge=1, description="the newest version directory")
    backend: str
    precision: Literal["fp32", "fp16", "int8"] = "fp32"
    input: TensorSpec
    output: TensorSpec
    heads: int = 0
    class_names: list[str]
    temperature: float = Field(1.0, gt=0)
    metrics: dict[str, float] = Field(default_factory=dict, description="held-out test split")
    members: list[str] = Field(default_factory=list, description="ensemble models: what they fuse")
    files: dict[str, str] = Field(default_factory=dict, description="path in the repository -> sha256")
    source: str = Field("", description="checkpoint the model was exported from")


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    flavor: Literal["cpu", "gpu"]
    recipe: str
    dataset: str
    preprocessing: Preprocessing
    models: dict[str, ModelEntry]

    def by_role(self, role: Role) -> list[ModelEntry]:
        return [m for m in self.models.values() if m.role == role]


def read_manifest(repo: Path) -> Manifest:
    return Manifest.model_validate_json((Path(repo) / MANIFEST_NAME).read_text())


def write_manifest(repo: Path, manifest: Manifest) -> None:
    path = Path(repo) / MANIFEST_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(path)
