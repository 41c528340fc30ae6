"""Structured pruning with distillation recovery: fewer channels, the same answers.

torch-pruning removes whole channels (coupled layers of a residual block together, so the network
stays a plain dense ResNet that ONNX Runtime and TensorRT run at full speed), a step at a time. After
every step the student is distilled from the teacher for a short schedule; pruning stops at the first
step whose validation top-1 falls more than the recipe's limit below the unpruned student, and the
step before it is kept.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch_pruning as tp
from torch.utils.data import Dataset

from training.data import SplitData
from training.evaluate import predict_logits, top_k_accuracy
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


def val_top1(model: ImageClassifier, data: SplitData) -> float:
    logits, labels = predict_logits(model, data.val)
    return top_k_accuracy(logits, labels, 1)


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
    baseline_macs, baseline_top1 = count_macs(model, size), val_top1(model, data)
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
        fit(job, data, runtime)  # trains `model` in place: the pruner keeps its handles on its layers
        model.eval()
        macs = count_macs(model, size)
        record = {
            "step": step,
            "channel_share_removed": round(cfg.step * step, 3),
            "macs": macs,
            "macs_share": round(macs / baseline_macs, 4),
            "params": count_params(model),
            "val_top1": val_top1(model, data),
        }
        record["val_drop"] = baseline_top1 - record["val_top1"]
        record["kept"] = record["val_drop"] <= cfg.max_accuracy_drop
        steps.append(record)
        if runtime.is_main:
            print(
                f"[training] prune step {step}: {record['macs_share']:.0%} of the MACs, "
                f"val top-1 {record['val_top1']:.2%} (source {baseline_top1:.2%})",
                flush=True,
            )
        if not record["kept"]:
            break
        kept, kept_step = copy.deepcopy(model).eval(), step
    return PruningResult(kept, steps, kept_step, time.perf_counter() - started)
