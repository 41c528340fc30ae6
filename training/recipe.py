"""Training recipes: YAML data (loaded with `safe_load`) validated into typed settings.

A recipe is named (`digits` -> `training/recipes/digits.yaml`) or given as a path. CLI overrides
use dotted keys (`student.train.epochs=3`). Unknown keys are an error that names them, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from kdcontract.errors import UserError
from kdcontract.manifest import DataSplit
from kdcontract.names import STUDENT_KD

RECIPES_DIR = Path(__file__).parent / "recipes"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AugmentConfig(_Strict):
    """Batched tensor augmentation applied to uint8 NHWC images (on the training device)."""

    crop_padding: int = Field(0, ge=0, description="random translation by up to this many pixels")
    hflip: bool = Field(False, description="random horizontal flip (wrong for digits, right for CIFAR)")
    cutout: int = Field(0, ge=0, description="side of a random square zeroed per image (0 = off)")
    client_forms: int = Field(
        0,
        ge=0,
        description="digits: pictures of each training image rendered as clients send them (random size, "
        "resampling, encoding, polarity, placement, blur) and prepared as the gateway prepares them; 0 = off",
    )
    client_form_share: float = Field(
        0.5, ge=0, le=1, description="share of each training batch taken from those pictures instead of the digit"
    )


class DataConfig(_Strict):
    dataset: Literal["digits", "cifar10", "imagefolder"] = "digits"
    root: str | None = Field(None, description="dataset folder for cifar10 / imagefolder")
    download: bool = Field(False, description="cifar10 only: download when the folder lacks it")
    image_size: int = Field(16, ge=8, le=1024)
    val_fraction: float = Field(0.15, gt=0, lt=0.5)
    test_fraction: float = Field(0.15, gt=0, lt=0.5, description="ignored by cifar10 (own test set)")
    split_seed: int = 0
    labelled_fraction: float = Field(
        1.0,
        gt=0,
        le=1,
        description="share of the training split that keeps its labels (stratified); the rest becomes "
        "unlabelled transfer images that only distilling stages learn from (the teacher's soft targets)",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader workers for datasets decoded lazily")
    augment: AugmentConfig = AugmentConfig()

    @property
    def split(self) -> DataSplit:
        return DataSplit(
            dataset=self.dataset,
            val_fraction=self.val_fraction,
            test_fraction=self.test_fraction,
            seed=self.split_seed,
        )

    @model_validator(mode="after")
    def _client_forms_need_digits(self) -> DataConfig:
        if self.augment.client_forms and self.dataset != "digits":
            raise ValueError(
                "data.augment.client_forms renders digits as clients send them, digits only: "
                f"set data.augment.client_forms=0 for {self.dataset}"
            )
        if self.labelled_fraction < 1 and self.dataset == "imagefolder":
            raise ValueError(
                "data.labelled_fraction drops labels of an in-memory dataset (digits, cifar10); for an image "
                "folder, put the unlabelled images in a folder of their own and name it as distill.transfer"
            )
        return self


class TrainConfig(_Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    nesterov: bool = True
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: float = Field(1.0, ge=0)
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    accumulate_steps: int = Field(
        1, ge=1, description="micro-batches of batch_size per optimizer step (effective batch = their product)"
    )
    clip_grad_norm: float | None = Field(None, gt=0, description="clip the global gradient norm to this")
    find_batch_size: Literal["auto", "on", "off"] = Field(
        "auto",
        description="before training, halve the micro-batch (doubling accumulate_steps, so the effective batch "
        "stays) until a training step fits in device memory; auto = on CUDA only",
    )
    # "auto": bf16 autocast on CUDA GPUs that support it, fp32 on the CPU (see runtime.resolve_precision).
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    ema_decay: float | None = Field(
        None,
        gt=0,
        lt=1,
        description="keep an exponential moving average of the weights (and BatchNorm statistics) with this "
        "decay per optimizer step; validation, checkpoints and the saved model use the average",
    )


ARCH_PATTERN = r"^(timm:)?[A-Za-z][A-Za-z0-9_.]*$"


class ModelConfig(_Strict):
    arch: str = Field(
        pattern=ARCH_PATTERN,
        description="resnet18 / resnet34 / resnet50 (kdserve's, with the small stem), any torchvision "
        "classification model (mobilenet_v3_small, efficientnet_b0, ...) or timm:NAME; an unknown name is "
        "refused with the closest ones when the model is built",
    )
    small_stem: bool = Field(
        True,
        description="3x3 stride-1 stem without max-pool, for small images; a teacher brought from a checkpoint "
        "keeps its published stem unless this is set explicitly (a teacher kdserve trained, brought back)",
    )
    weights: str | None = Field(
        None,
        description="what the network starts from instead of random weights: a local state_dict (.pt, .pth, "
        ".safetensors) for this architecture, or torchvision:NAME (torchvision's published weights, e.g. "
        "torchvision:IMAGENET1K_V2, fetched into its cache the first time: opt-in, needs the network). Every "
        "tensor whose name and shape fit is loaded; a head for another number of classes and a stem of another "
        "shape start fresh and are named",
    )
    width: float = Field(
        1.0,
        gt=0,
        le=4,
        description="channels of every layer relative to the published architecture (0.25: a quarter); "
        "the tests train narrow models where what they check is plumbing, not accuracy",
    )
    train: TrainConfig = TrainConfig()


IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the normalisation of torchvision's and timm's ImageNet weights
IMAGENET_STD = (0.229, 0.224, 0.225)


class TeacherFileConfig(_Strict):
    """A teacher brought from a file (training/teachers.py) instead of trained: a checkpoint for `teacher.arch`
    (.pt, .pth, .safetensors) or an ONNX model (.onnx, `teacher.arch` unused)."""

    path: str
    image_size: int | None = Field(
        None, ge=1, description="the input size it was trained at (images are resized to it); None: the dataset's"
    )
    mean: list[float] = Field(default_factory=lambda: list(IMAGENET_MEAN), min_length=3, max_length=3)
    std: list[float] = Field(default_factory=lambda: list(IMAGENET_STD), min_length=3, max_length=3)
    class_names: list[str] | None = Field(None, description="its classes, in its output's order; checked")


class TeacherConfig(ModelConfig):
    file: TeacherFileConfig | None = Field(
        None, description="a trained teacher from a file: not trained here (its train settings are unused)"
    )
    augment: AugmentConfig | None = Field(
        None, description="the teacher's own augmentation (None: data.augment); students keep data.augment"
    )
    members: int = Field(
        1,
        ge=1,
        le=16,
        description="networks in the teacher, each trained on the labels with its own seed; served and "
        "distilled as one model (the log of their mean probability)",
    )


class FeatureDistillConfig(_Strict):
    """FitNets-style hint: a 1x1 adapter maps a student stage onto the teacher's same stage."""

    enabled: bool = False
    stage: Literal["layer1", "layer2", "layer3", "layer4"] = "layer3"
    weight: float = Field(1.0, ge=0)


class DistillConfig(_Strict):
    loss: Literal["hinton", "dkd"] = "hinton"
    temperature: float = Field(4.0, gt=0)
    # Weight of the soft (teacher) term; the hard-label cross-entropy gets 1 - alpha.
    alpha: float = Field(0.9, ge=0, le=1)
    dkd_alpha: float = Field(1.0, ge=0, description="DKD: weight of target-class KD")
    dkd_beta: float = Field(8.0, ge=0, description="DKD: weight of non-target-class KD")
    feature: FeatureDistillConfig = FeatureDistillConfig()
    transfer: str | None = Field(
        None,
        description="a folder of unlabelled images (any depth) that distilling stages also learn from "
        "through the teacher's soft targets, prepared like the dataset's images",
    )
    temperature_end: float | None = Field(
        None, gt=0, description="anneal the temperature linearly to this by the last step (None: constant)"
    )
    capture: str | None = Field(
        None,
        description="a capture directory the gateway wrote (KDSERVE_CAPTURE_DIR): its images join the transfer "
        "images, with the labels feedback gave them; files that are not whole segments are skipped and named",
    )
    init: str | None = Field(
        None,
        description="a student checkpoint (model.pt) that distilling stages start from instead of fresh weights "
        "(redistill sets it to the served student's); it must have the student's architecture",
    )
    cache_teacher: bool = Field(
        False,
        description="keep the teacher's logits per distinct image (keyed by its pixels) and reuse them: a big "
        "teacher's cost is paid once per image when augmentation leaves the images as they are (crop_padding 0, "
        "no cutout or flip; client-form pictures are fixed images too); the student learns the same, so it is "
        "not part of a stage's fingerprint",
    )


class VariantConfig(_Strict):
    """One ensemble member: a distilled ResNet18 made different by its seed and augmentation."""

    seed: int
    augment: AugmentConfig | None = None
    distill: DistillConfig | None = None


class MultiHeadConfig(_Strict):
    heads: int = Field(3, ge=0, description="0 disables the shared-backbone model")
    # Each head sees a random subset of every batch (a bootstrap), which keeps the heads diverse.
    head_sample_fraction: float = Field(0.8, gt=0, le=1)


class EnsembleConfig(_Strict):
    variants: list[VariantConfig] = []
    multihead: MultiHeadConfig = MultiHeadConfig()


class CascadeConfig(_Strict):
    """The student answers; when its calibrated confidence is below a threshold, the teacher does."""

    enabled: bool = True
    student: str = Field(STUDENT_KD, description="the stage that answers first")
    max_accuracy_drop: float = Field(
        0.005, ge=0, lt=1, description="the threshold is fitted on validation to keep top-1 this close to the teacher's"
    )


class CompressionConfig(_Strict):
    """Structured channel pruning of a trained student, a step at a time, each step followed by a
    short distillation from the teacher; stops before validation top-1 falls too far."""

    enabled: bool = False
    source: str = Field(STUDENT_KD, description="the stage to prune")
    step: float = Field(0.1, gt=0, lt=1, description="share of every prunable layer's channels removed per step")
    max_steps: int = Field(8, ge=1)
    max_accuracy_drop: float = Field(
        0.01,
        ge=0,
        lt=1,
        description="stop when validation top-1 is this far below the source's (one-sided 95% lower bound of "
        "the paired drop); keep the step before",
    )
    max_extra_epochs: int = Field(
        3, ge=0, description="after each step's finetune: more epochs, one at a time, while validation improves"
    )
    seed: int | None = Field(None, description="seed of the recovery training (None: the source stage's seed)")
    round_to: int = Field(8, ge=1, description="channel counts stay multiples of this (vector units like them)")
    finetune: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=2, optimizer="adamw", lr=1e-3, weight_decay=0.05, warmup_epochs=0),
        description="the distillation after each step",
    )

    @model_validator(mode="after")
    def _leaves_channels(self) -> CompressionConfig:
        if self.step * self.max_steps >= 1:
            raise ValueError(
                f"compression: step {self.step} x max_steps {self.max_steps} would remove every channel; keep it < 1"
            )
        return self


class RedistillConfig(_Strict):
    """`python -m training redistill`: how the new student is made from a capture."""

    # "served": the model that served the captured traffic is the start, so the capture's soft targets
    # refine what it learnt instead of relearning it. On the few-labels digits 4 epochs from the served
    # plain student reached 95.31% (3 seeds), 16 from fresh weights 94.07%, in a quarter of the time.
    start: Literal["served", "fresh"] = "served"
    epochs: int | None = Field(None, ge=1, description="the new student's epochs (None: student.train.epochs)")
    # The offline gate (training/offline_gate.py): refused when surely worse than the served version by more.
    max_top1_drop: float = Field(
        0.02, ge=0, le=1, description="refuse the export when test top-1 is surely this much below the served"
    )
    alpha: float = Field(
        0.05, gt=0, lt=0.5, description="error rate of the offline gate's intervals and of the label keys' judgement"
    )
    # Which keys' feedback labels train (training/label_trust.py): a key disagreeing with the teacher surely
    # more than the other keys by `label_key_margin` is excluded; with a list, only those keys' labels train.
    trusted_label_keys: list[str] | None = Field(None, description="API key ids whose labels train (None: all)")
    label_key_margin: float = Field(0.05, ge=0, le=1, description="exclude a key this far above the others")


class EvalConfig(_Strict):
    # The plain and KD students are trained once per seed so the KD gain is reported with spread.
    seeds: list[int] = Field(default_factory=lambda: [0])
    ece_bins: int = Field(15, ge=2)


class Recipe(_Strict):
    name: str
    seed: int = 0
    data: DataConfig = DataConfig()
    teacher: TeacherConfig
    student: ModelConfig
    distill: DistillConfig = DistillConfig()
    ensemble: EnsembleConfig = EnsembleConfig()
    cascade: CascadeConfig = CascadeConfig()
    compression: CompressionConfig = CompressionConfig()
    redistill: RedistillConfig = RedistillConfig()
    evaluation: EvalConfig = EvalConfig()

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if not self.evaluation.seeds:
            raise ValueError("evaluation.seeds must name at least one seed")
        hinted = [self.distill, *(v.distill for v in self.ensemble.variants if v.distill)]
        own = self.teacher.augment
        if own is not None and own.client_forms > self.data.augment.client_forms:
            raise ValueError(
                "teacher.augment.client_forms draws from the pictures data.augment.client_forms renders: "
                f"set data.augment.client_forms >= {own.client_forms}"
            )
        if self.teacher.members > 1 and any(d.feature.enabled for d in hinted):
            raise ValueError("distill.feature hints one teacher network's stage; set teacher.members=1 to use it")
        return self


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise UserError(f"override {dotted!r}: {key!r} is not a section")
        node = child
    node[keys[-1]] = value


def parse_overrides(pairs: list[str]) -> list[tuple[str, Any]]:
    """`key.sub=value` pairs; values are parsed as YAML scalars (3 -> int, true -> bool, [1,2] -> list)."""
    parsed = []
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UserError(f"override {pair!r} must look like section.key=value")
        parsed.append((key.strip(), yaml.safe_load(raw)))
    return parsed


def _format_validation_error(source: str, err: ValidationError) -> str:
    problems = []
    for item in err.errors():
        where = ".".join(str(p) for p in item["loc"]) or "<top>"
        if item["type"] == "extra_forbidden":
            problems.append(f"unknown key {where!r}")
        else:
            problems.append(f"{where}: {item['msg']}")
    return f"recipe {source}: " + "; ".join(problems)


def resolve_recipe_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"} or candidate.exists():
        if not candidate.is_file():
            raise UserError(f"recipe file {candidate} does not exist")
        return candidate
    named = RECIPES_DIR / f"{name_or_path}.yaml"
    if not named.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise UserError(f"unknown recipe {name_or_path!r}; known recipes: {known} (or pass a .yaml path)")
    return named


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> Recipe:
    path = resolve_recipe_path(name_or_path)
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"recipe {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(tree, dict):
        raise UserError(f"recipe {path} must be a mapping of sections, got {type(tree).__name__}")
    for key, value in parse_overrides(overrides or []):
        _set_dotted(tree, key, value)
    try:
        return Recipe.model_validate(tree)
    except ValidationError as exc:
        raise UserError(_format_validation_error(str(path), exc)) from exc


def dump_recipe(recipe: Recipe, path: Path) -> None:
    """Write the resolved recipe (defaults filled in) beside a run, so it can be reproduced."""
    path.write_text(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False))
