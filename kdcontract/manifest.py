"""The schema of `model_repository/manifest.json`: the one contract between training and serving.

Imports pydantic only (no torch): training writes the manifest and the gateway and load tools read it
with this one definition.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.json"
# 2: preprocessing carries the resize method and, for digits, how a picture is framed (polarity, ink box).
# 3: the confidence cascade (student first, the teacher below a threshold).
# 4: the data split (serving-side tools draw the held-out images from it instead of reading the recipe).
# 5: a model's candidate version, served beside its current one until a rollout promotes or rejects it.
SCHEMA_VERSION = 5
READABLE_SCHEMAS = (4, 5)  # a 4 is a 5 without candidates: read as it is

Role = Literal["teacher", "student", "variant", "multihead", "quantized", "ensemble", "fusion"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class TensorSpec(_Strict):
    name: str
    dtype: Literal["UINT8", "FP32", "FP16"]
    shape: list[int] = Field(description="without the batch axis")


class DigitFraming(_Strict):
    """How a picture of a digit becomes the representation the digits were made in.

    scikit-learn's digits come from NIST's normalisation: light ink on black, the digit's height
    filling the box, ink counted over 4x4 blocks of a 32x32 bitmap (an area reduction). A client's
    picture is brought there: grey; inverted when its border is light (dark ink on paper); stretched
    from the background level to the ink's peak; and, when larger than the model's input, its ink's
    bounding box scaled so the longer side fills the input, centred, by area averaging.
    """

    ink: Literal["light"] = Field("light", description="the model expects light ink on a dark background")
    invert_when_border_above: float = Field(
        127.0, ge=0, le=255, description="median grey of the picture's border above this: dark ink, inverted"
    )
    ink_threshold: float = Field(
        0.25, gt=0, lt=1, description="share of the ink's peak (above the background) that counts for the ink's box"
    )
    fit: Literal["longer-side"] = Field("longer-side", description="the ink box's longer side fills the input")


class DataSplit(_Strict):
    """How the dataset was split into train / validation / test (stratified, seeded): what a client
    needs to draw the held-out images no model trained on."""

    dataset: Literal["digits", "cifar10", "imagefolder"]
    val_fraction: float = Field(gt=0, lt=0.5)
    test_fraction: float = Field(gt=0, lt=0.5, description="datasets with their own test set ignore it")
    seed: int = 0


class Preprocessing(_Strict):
    """How a picture becomes the model's input; training and the gateway both apply exactly this
    through `kdcontract.imageprep.prepare`."""

    image_size: int
    resize: Literal["area"] = Field(
        "area", description="area averaging when shrinking (what the digits were made with), bilinear when enlarging"
    )
    color: Literal["RGB"] = "RGB"
    layout: Literal["NHWC"] = "NHWC"
    # Scaling to [0, 1] and these mean/std are applied inside the exported graph.
    mean: list[float]
    std: list[float]
    digit: DigitFraming | None = Field(None, description="digits only: polarity and framing")


class Cascade(_Strict):
    """The student answers; an image whose calibrated student confidence is below `threshold` goes to
    the teacher. The threshold was fitted on the validation split (see `metrics`)."""

    student: str
    teacher: str
    threshold: float = Field(ge=0, le=1.001)
    metrics: dict[str, float] = Field(default_factory=dict, description="held-out test split")


class DriftReference(_Strict):
    """A model version's answers on the validation split, which its served answers are compared with
    (`kdcontract.drift`)."""

    images: int = Field(ge=1, description="validation images the reference was measured on")
    unsure_below: float = Field(ge=0, le=1, description="calibrated top-1 confidence: below it an answer is unsure")
    unsure_rate: float = Field(ge=0, le=1, description="share of validation images answered below `unsure_below`")
    class_shares: list[float] = Field(description="share of validation images predicted as each class")


class CandidateVersion(_Strict):
    """A newer version of a model, loaded by Triton beside the current one, answering only where a rollout
    (or a caller naming `NAME@VERSION`) sends it, until its gates promote it to current or reject it."""

    version: int = Field(ge=1)
    temperature: float = Field(1.0, gt=0)
    metrics: dict[str, float] = Field(default_factory=dict, description="held-out test split")
    files: dict[str, str] = Field(default_factory=dict, description="its version directory's files -> sha256")
    source: str = Field("", description="checkpoint it was exported from")
    offline_gate: dict = Field(default_factory=dict, description="the paired comparison it passed before export")
    cascade: Cascade | None = Field(None, description="the cascade refitted for it: taken up when it is promoted")
    drift_reference: DriftReference | None = None


class ModelEntry(_Strict):
    name: str
    role: Role
    arch: str
    version: int = Field(ge=1, description="the current version: what the name answers")
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
    drift_reference: DriftReference | None = Field(None, description="its answers on validation, for drift")
    candidate: CandidateVersion | None = Field(None, description="a newer version on trial beside the current one")

    def loaded_versions(self) -> list[int]:
        """What Triton must load: the current version and the candidate's."""
        return sorted({self.version, *([self.candidate.version] if self.candidate else [])})

    def as_version(self, version: int) -> ModelEntry | None:
        """This model as one of its versions (weights and calibration together), None when not loaded."""
        if version == self.version:
            return self
        c = self.candidate
        if c is None or version != c.version:
            return None
        update = {"version": c.version, "temperature": c.temperature, "metrics": c.metrics, "files": c.files}
        return self.model_copy(
            update={**update, "source": c.source, "drift_reference": c.drift_reference, "candidate": None}
        )


class Manifest(_Strict):
    schema_version: int = SCHEMA_VERSION
    flavor: Literal["cpu", "gpu"]
    recipe: str
    dataset: str
    split: DataSplit | None = Field(None, description="None: weights trained on no dataset (timing repositories)")
    preprocessing: Preprocessing
    models: dict[str, ModelEntry]
    cascade: Cascade | None = None

    def by_role(self, role: Role) -> list[ModelEntry]:
        return [m for m in self.models.values() if m.role == role]


class SchemaMismatch(ValueError):
    """The manifest was written by another version of kdserve; re-export the repository."""


def file_sha256(path: Path) -> str:
    """A file's sha256 as the manifest records it (`files`), read in 1 MiB chunks: a teacher's weights may be
    gigabytes. Training's stage fingerprints use its first 16 characters."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest(repo: Path) -> Manifest:
    raw = json.loads((Path(repo) / MANIFEST_NAME).read_text())
    found = raw.get("schema_version") if isinstance(raw, dict) else None
    if found not in READABLE_SCHEMAS:
        raise SchemaMismatch(
            f"{Path(repo) / MANIFEST_NAME} has schema version {found}, this kdserve reads {SCHEMA_VERSION}: "
            "re-export it (python -m training export)"
        )
    return Manifest.model_validate({**raw, "schema_version": SCHEMA_VERSION})


def write_manifest(repo: Path, manifest: Manifest) -> None:
    path = Path(repo) / MANIFEST_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    tmp.replace(path)
