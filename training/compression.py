"""Structured pruning with distillation recovery: fewer channels, the same answers.

torch-pruning removes whole channels (coupled layers of a residual block together, so the network
stays a plain dense ResNet that ONNX Runtime and TensorRT run at full speed), a step at a time. After
every step the student is distilled from the teacher for a short schedule, and then for one more
epoch at a time while validation top-1 still improves (up to a cap). A step is judged against the
unpruned student on the same validation images (a paired comparison: only the images one model gets
right and the other wrong count): pruning stops at the first step whose loss is beyond the recipe's
limit with 95% confidence, and the step before it is kept. With a few hundred validation images a
point estimate is decided by one or two images, so a rule on it flips with the CPU's rounding.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch_pruning as tp
from torch.utils.data import Dataset

from training.data import SplitData
from training.evaluate import predict_logits
from training.models import ImageClassifier, count_macs, count_params
from training.recipe import AugmentConfig, CompressionConfig, DistillConfig
from training.runtime import Runtime
from training.trainer import FitJob, fit


@dataclass
class PruningResult:
    model: ImageClassifier
    steps: list[dict]  # one record per step tried, the last one possibly rejected
    kept_step: int  # 0: no step stayed within the limit, the source is returned unpruned
    seconds: float


Z_ONE_SIDED_95 = 1.645


def val_correct(model: ImageClassifier, data: SplitData) -> torch.Tensor:
    """Which validation images `model` gets right (bool [N])."""
    logits, labels = predict_logits(model, data.val)
    return logits.argmax(-1) == labels


def paired_drop(source_correct: torch.Tensor, pruned_correct: torch.Tensor) -> dict[str, float]:
    """The pruned model's top-1 loss against its source on the same images, with a one-sided 95% lower
    bound: the drop is (lost - gained) / n, and only the discordant images carry its variance."""
    n = len(source_correct)
    lost = int((source_correct & ~pruned_correct).sum())
    gained = int((~source_correct & pruned_correct).sum())
    drop = (lost - gained) / n
    stderr = math.sqrt(max(lost + gained - (lost - gained) ** 2 / n, 0.0)) / n
    return {"lost": lost, "gained": gained, "drop": drop, "drop_lower": drop - Z_ONE_SIDED_95 * stderr}


def _recover(job: FitJob, data: SplitData, runtime: Runtime, extra_epochs: int) -> tuple[torch.Tensor, int]:
    """Distil for the job's epochs, then one epoch more at a time while validation top-1 improves (at most
    `extra_epochs`); the model ends at its best epoch. Returns its validation correctness, epochs added."""
    fit(job, data, runtime)  # trains the model in place: the pruner keeps its handles on its layers
    best = val_correct(job.model.eval(), data)
    added = 0
    for extra in range(1, extra_epochs + 1):
        before = copy.deepcopy(job.model.state_dict())
        one_more = replace(
            job,
            name=f"{job.name} +{extra}",
            train=job.train.model_copy(update={"epochs": 1}),
            seed=job.seed + 1000 * extra,
            out_dir=job.out_dir.with_name(f"{job.out_dir.name}_extra{extra}"),
        )
        fit(one_more, data, runtime)
        correct = val_correct(job.model.eval(), data)
        if correct.sum() <= best.sum():
            job.model.load_state_dict(before)
            break
        best, added = correct, extra
    return best, added


def prune_with_recovery(
    source: ImageClassifier,
    teacher: ImageClassifier,
    data: SplitData,
    train_set: Dataset,
    repeat: int,
    cfg: CompressionConfig,
    distill: DistillConfig,
    augment: AugmentConfig,
    seed: int,
    out_dir: Path,
    runtime: Runtime,
) -> PruningResult:
    started = time.perf_counter()
    size = data.image_size
    model = copy.deepcopy(source).eval()
    baseline_macs, baseline_correct = count_macs(model, size), val_correct(model, data)
    baseline_top1 = baseline_correct.float().mean().item()
    fc = getattr(model.backbone, "fc", None)
    pruner = tp.pruner.BasePruner(
        model,
        torch.zeros(1, size, size, 3, dtype=torch.uint8),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=cfg.step * cfg.max_steps,
        iterative_steps=cfg.max_steps,
        ignored_layers=[fc] if fc is not None else [],  # the classes stay
        round_to=cfg.round_to,
    )
    kept, kept_step, steps = copy.deepcopy(source).eval(), 0, []
    for step in range(1, cfg.max_steps + 1):
        pruner.step()
        job = FitJob(
            name=f"prune step {step}",
            model=model,
            train=cfg.finetune,
            augment=augment,
            seed=seed + step,
            out_dir=out_dir / f"step_{step}",
            teacher=teacher,
            distill=distill,
            resume=False,
            train_set=train_set,
            repeat=repeat,
        )
        correct, extra = _recover(job, data, runtime, cfg.max_extra_epochs)
        model.eval()
        macs = count_macs(model, size)
        judged = paired_drop(baseline_correct, correct)
        record = {
            "step": step,
            "channel_share_removed": round(cfg.step * step, 3),
            "macs": macs,
            "macs_share": round(macs / baseline_macs, 4),
            "params": count_params(model),
            "val_top1": correct.float().mean().item(),
            "recovery_epochs": cfg.finetune.epochs + extra,
            "val_drop": judged["drop"],
            "val_drop_lower_95": judged["drop_lower"],
            "val_images_lost": judged["lost"],
            "val_images_gained": judged["gained"],
            # Rejected only when the validation images show a loss beyond the limit (one-sided 95%).
            "kept": judged["drop_lower"] <= cfg.max_accuracy_drop,
        }
        steps.append(record)
        if runtime.is_main:
            print(
                f"[training] prune step {step}: {record['macs_share']:.0%} of the MACs, val top-1 "
                f"{record['val_top1']:.2%} (source {baseline_top1:.2%}; {judged['lost']} images lost, "
                f"{judged['gained']} gained, drop >= {judged['drop_lower']:.2%} at 95%) after "
                f"{record['recovery_epochs']} epochs: {'kept' if record['kept'] else 'rejected'}",
                flush=True,
            )
        if not record["kept"]:
            break
        kept, kept_step = copy.deepcopy(model).eval(), step
    return PruningResult(kept, steps, kept_step, time.perf_counter() - started)
