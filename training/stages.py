"""The stages `python -m training all` plans from a recipe, and the fingerprint that decides whether a saved
stage is reused. Torch-free: the command line checks a recipe's stage references (and `--only`) with it
before the seconds that importing torch takes."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

from kdcontract.capture import capture_digest
from kdcontract.errors import UserError
from kdcontract.manifest import file_sha256
from kdcontract.names import STUDENT_KD, STUDENT_PLAIN, STUDENT_PRUNED
from training.recipe import AugmentConfig, DistillConfig, ModelConfig, Recipe


@dataclass
class Stage:
    name: str
    role: str  # teacher | student | variant | multihead
    model_cfg: ModelConfig
    seed: int
    augment: AugmentConfig
    distill: DistillConfig | None = None  # None: trained on labels alone
    heads: int = 0
    head_sample_fraction: float = 1.0
    members: int = 1  # > 1: assembled from the `teacher_member_*` stages, not trained itself


def seed_stage(kind: str, index: int, seed: int) -> str:
    """`student_kd` for the first evaluation seed, `student_kd_seed<N>` for the others."""
    return kind if index == 0 else f"{kind}_seed{seed}"


def plan_stages(recipe: Recipe) -> list[Stage]:
    """Every model `all` trains, in order (the teacher first: the others learn from it)."""
    aug = recipe.data.augment
    teacher_aug = recipe.teacher.augment or aug
    n = recipe.teacher.members
    if n == 1:
        stages = [Stage("teacher", "teacher", recipe.teacher, recipe.seed, teacher_aug)]
    else:
        member_cfg = ModelConfig(**recipe.teacher.model_dump(exclude={"members", "augment"}))
        stages = [
            Stage(f"teacher_member_{i}", "teacher_member", member_cfg, recipe.seed + i, teacher_aug) for i in range(n)
        ]
        stages.append(Stage("teacher", "teacher", recipe.teacher, recipe.seed, teacher_aug, members=n))
    for i, seed in enumerate(recipe.evaluation.seeds):
        stages.append(Stage(seed_stage(STUDENT_PLAIN, i, seed), "student", recipe.student, seed, aug))
        stages.append(Stage(seed_stage(STUDENT_KD, i, seed), "student", recipe.student, seed, aug, recipe.distill))
    for i, variant in enumerate(recipe.ensemble.variants):
        stages.append(
            Stage(
                f"variant_{i}",
                "variant",
                recipe.student,
                variant.seed,
                variant.augment or aug,
                variant.distill or recipe.distill,
            )
        )
    heads = recipe.ensemble.multihead
    if heads.heads > 0:
        stages.append(
            Stage(
                "multihead",
                "multihead",
                recipe.student,
                recipe.seed,
                aug,
                recipe.distill,
                heads=heads.heads,
                head_sample_fraction=heads.head_sample_fraction,
            )
        )
    return stages


# Settings added after TRAINING_FORMAT 3: they enter a fingerprint only when not at their default, so a
# model trained before they existed (necessarily without them) is still recognised from its settings.
_ADDED_TRAIN_SETTINGS = ("ema_decay",)
_ADDED_MODEL_SETTINGS = {"width": 1.0, "file": None, "weights": None}  # added later; at defaults: old fingerprint


def _model_settings(cfg: ModelConfig) -> dict:
    dumped = cfg.model_dump(mode="json")
    for key in _ADDED_TRAIN_SETTINGS:
        if dumped["train"][key] is None:
            del dumped["train"][key]
    for key, default in _ADDED_MODEL_SETTINGS.items():
        if key in dumped and dumped[key] == default:
            del dumped[key]
    return dumped


def distill_settings(distill) -> dict:
    """A distillation's settings as they decide the student (a cached teacher's logits are the same logits)."""
    return distill.model_dump(mode="json", exclude={"cache_teacher"})


def stage_settings(stage: Stage, recipe: Recipe) -> dict:
    return {
        "data": recipe.data.model_dump(mode="json"),
        "model": _model_settings(stage.model_cfg),
        "seed": stage.seed,
        "augment": stage.augment.model_dump(mode="json"),
        "distill": distill_settings(stage.distill) if stage.distill else None,
        "teacher": _model_settings(recipe.teacher) if stage.distill else None,
        "heads": [stage.heads, stage.head_sample_fraction],
    } | _sources(stage, recipe)


def _sources(stage: Stage, recipe: Recipe) -> dict:
    """What a stage reads besides the recipe: a capture (by its segments), a start checkpoint, a starting
    weights file and a brought teacher (by their bytes); a stage is reused only while they are the same."""
    sources = {}
    if stage.distill and recipe.distill.capture:
        sources["capture"] = capture_digest(recipe.distill.capture)
    if stage.distill and stage.distill.init:
        sources["init"] = file_sha256(Path(stage.distill.init))[:16]
    weights = stage.model_cfg.weights
    if weights is not None and Path(weights).is_file():  # a starting weights file by its bytes
        sources["weights"] = file_sha256(Path(weights))[:16]
    brought = recipe.teacher.file
    if stage.distill and brought is not None and Path(brought.path).is_file():  # the teacher's bytes, not its name
        sources["teacher_file"] = file_sha256(Path(brought.path))[:16]
    return sources


# Bumped when a change to training makes models trained by earlier code stale (2: seeded weights;
# 3: pictures prepared by `imageprep.prepare`, digits contrast-stretched to their ink's peak).
TRAINING_FORMAT = 3


def fingerprint_of(settings: object) -> str:
    """What a saved model was made from, as a short hash: a model is reused only under the same one."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def stage_fingerprint(stage: Stage, recipe: Recipe) -> str:
    return fingerprint_of({**stage_settings(stage, recipe), "format": TRAINING_FORMAT})


def check_stage_references(recipe: Recipe) -> list[Stage]:
    """The planned stages, once the recipe's references to them are known to name single-head
    students: a typo in `cascade.student` or `compression.source` fails here, before anything trains."""
    stages = plan_stages(recipe)
    students = [st.name for st in stages if not st.heads and st.role in ("student", "variant")]
    references = {"compression.source": (recipe.compression.enabled, recipe.compression.source)}
    references["cascade.student"] = (recipe.cascade.enabled, recipe.cascade.student)
    for key, (enabled, name) in references.items():
        if enabled and name not in students:
            known = ", ".join(students)
            raise UserError(f"{key} {name!r} is not a single-head student of this recipe; one of: {known}")
    return stages


def select_stages(recipe: Recipe, stages: list[Stage], only: Collection[str]) -> tuple[list[Stage], bool]:
    """The stages `only` names and those they learn from (a distilled stage: the teacher; the pruned
    student: its source too), in training order; and whether the compression stage runs."""
    names = [st.name for st in stages] + ([STUDENT_PRUNED] if recipe.compression.enabled else [])
    unknown = sorted(set(only) - set(names))
    if unknown:
        raise UserError(f"--only {', '.join(unknown)}: not a stage of this recipe; its stages: {', '.join(names)}")
    wanted = set(only)
    prune = STUDENT_PRUNED in wanted
    if prune:
        wanted.add(recipe.compression.source)
    if prune or any(st.distill is not None for st in stages if st.name in wanted):
        wanted |= {st.name for st in stages if st.role in ("teacher", "teacher_member")}
    return [st for st in stages if st.name in wanted], prune
