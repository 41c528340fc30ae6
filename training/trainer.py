"""The training loop: one model, optionally distilled from a frozen teacher.

Covers SGD/AdamW with linear warm-up and cosine decay, mixed precision, channels_last, gradient
accumulation and norm clipping, a batch-size finder for CUDA out-of-memory, a temperature schedule,
a moving average of the weights, unlabelled images (label -1: taught by the teacher alone), seeded
randomness, per-epoch checkpoints with resume, JSONL metrics and DDP.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils.data import Dataset
from tqdm import tqdm

from kdcontract.errors import UserError
from training.augment import augment_batch
from training.conv_shortcut import one_pixel_convs_cropped
from training.data import UNLABELLED, SplitData, holds_unlabelled, iterate_batches
from training.evaluate import predict_logits, top_k_accuracy
from training.losses import FeatureHint, logit_distillation
from training.models import ImageClassifier, fuse_heads
from training.recipe import AugmentConfig, DistillConfig, TrainConfig
from training.runtime import Runtime, autocast, resolve_precision


@dataclass
class FitJob:
    """What to train and how; `teacher` turns the job into distillation."""

    name: str
    model: ImageClassifier
    train: TrainConfig
    augment: AugmentConfig
    seed: int
    out_dir: Path
    teacher: ImageClassifier | None = None
    distill: DistillConfig | None = None
    head_sample_fraction: float = 1.0  # multi-head models: share of each batch each head learns from
    resume: bool = True
    # What an epoch iterates over (None: data.train), `repeat` times: labelled-only stages of a
    # few-labels recipe repeat their small set so every stage takes as many steps as the KD student.
    train_set: Dataset | None = None
    repeat: int = 1
    # The settings this run trains under: a checkpoint written under others is never resumed (it
    # would hand back the old run's weights under the new settings).
    fingerprint: str = ""


@dataclass
class FitResult:
    model: ImageClassifier
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    batch_size: int = 0  # the micro-batch the run used (the batch-size finder may have halved it)
    accumulate_steps: int = 1


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    # Decay on weights only: decaying BN scales and biases hurts accuracy for no regularisation gain.
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if param.ndim > 1 else no_decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    groups = _param_groups(model, cfg.weight_decay)
    # The fused kernels update every parameter in one pass: on a 2-core CPU AdamW's step took 131 ms
    # per step for a ResNet50 (14% of a training step) and 34 ms fused; SGD's 48 -> 13 ms for a ResNet18.
    fused = all(p.device.type in ("cpu", "cuda") for p in model.parameters())
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    nesterov = cfg.nesterov and cfg.momentum > 0
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=nesterov, fused=fused)


def warmup_cosine(total_steps: int, warmup_steps: int):
    """Multiplier for the base LR: linear warm-up from ~0, then cosine decay to 0."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _objective(
    logits: torch.Tensor,
    target: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    job: FitJob,
    distill: DistillConfig | None,
    all_labelled: bool = False,
) -> torch.Tensor:
    """The loss of one micro-batch. `all_labelled` (known for the whole training set before the run)
    skips looking at the labels for -1: that look is a host synchronisation every step on a GPU."""
    smoothing = job.train.label_smoothing
    labelled = None if all_labelled else target != UNLABELLED
    # Unlabelled images (a transfer set) carry no hard term; a batch of them alone has none at all.
    if labelled is None or labelled.all():
        ce, has_labels = F.cross_entropy(logits, target, label_smoothing=smoothing), True
    elif labelled.any():
        ce, has_labels = F.cross_entropy(logits[labelled], target[labelled], label_smoothing=smoothing), True
    else:
        ce, has_labels = logits.new_zeros(()), False
    if teacher_logits is None or distill is None:
        return ce
    # DKD splits target from non-target classes: an unlabelled image's target is the teacher's guess.
    kd_target = target if labelled is None else torch.where(labelled, target, teacher_logits.argmax(1))
    soft = logit_distillation(logits, teacher_logits, kd_target, distill)
    return distill.alpha * soft + (1.0 - distill.alpha) * ce if has_labels else soft


def _multihead_objective(
    logits: torch.Tensor,
    target: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    job: FitJob,
    distill: DistillConfig | None,
    generator: torch.Generator,
    all_labelled: bool = False,
) -> torch.Tensor:
    """Mean of the per-head objectives, each head on its own random share of the batch."""
    losses = []
    for head in range(logits.shape[1]):
        keep = torch.rand(len(target), generator=generator) < job.head_sample_fraction
        keep = keep.to(logits.device)
        if not keep.any():
            continue
        t_logits = teacher_logits[keep] if teacher_logits is not None else None
        losses.append(_objective(logits[keep, head], target[keep], t_logits, job, distill, all_labelled))
    return torch.stack(losses).mean()


def _save_state(
    path: Path,
    fingerprint: str,
    model: nn.Module,
    ema: AveragedModel | None,
    hint,
    optimizer,
    scheduler,
    scaler,
    epoch: int,
    history,
    generator,
) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "fingerprint": fingerprint,
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "hint": hint.state_dict() if hint is not None else None,  # the FitNets adapter learns too
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "epoch": epoch,
            "history": history,
            "generator": generator.get_state(),
        },
        tmp,
    )
    tmp.replace(path)


def _load_state(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UserError(
            f"training checkpoint {path} is corrupt ({type(exc).__name__}); delete it to start this stage afresh"
        ) from exc


def temperature_at(distill: DistillConfig, step: int, total_steps: int) -> float:
    """The distillation temperature at optimizer step `step`: constant, or linear to `temperature_end`."""
    if distill.temperature_end is None:
        return distill.temperature
    progress = min(1.0, step / max(1, total_steps - 1))
    return distill.temperature + (distill.temperature_end - distill.temperature) * progress


def _probe_step(model: nn.Module, teacher: nn.Module | None, images: torch.Tensor, precision: str) -> None:
    """One forward and backward pass at this batch size, to see whether it fits in device memory."""
    with autocast(precision, images.device):
        if teacher is not None:
            with torch.no_grad():
                teacher(images)
        model(images).float().sum().backward()
    model.zero_grad(set_to_none=True)


def find_batch_size(
    model: nn.Module,
    teacher: nn.Module | None,
    sample: torch.Tensor,
    precision: str,
    batch_size: int,
    accumulate_steps: int,
    log=print,
) -> tuple[int, int]:
    """The largest micro-batch <= batch_size (halving) whose training step fits; accumulation doubles
    with every halving so the effective batch, and with it the recipe's learning rate, stays right."""
    # The probe's forward passes move BatchNorm statistics; put them back so a probe changes nothing.
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    while True:
        try:
            _probe_step(model, teacher, sample[:batch_size], precision)
            model.load_state_dict(saved)
            return batch_size, accumulate_steps
        except torch.OutOfMemoryError:
            model.zero_grad(set_to_none=True)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if batch_size == 1:
                raise UserError("a training step of one image does not fit in device memory") from None
            log(f"out of memory at micro-batch {batch_size}; trying {batch_size // 2} x {accumulate_steps * 2}")
            batch_size, accumulate_steps = batch_size // 2, accumulate_steps * 2


class TeacherCache:
    """The teacher's logits per distinct image, keyed by a hash of its pixels: an image the teacher has seen is
    never run through it again. Exact (a hit is the same input, so the same logits); worth it when the images
    repeat from epoch to epoch, i.e. when augmentation leaves them as they are."""

    def __init__(self, teacher: nn.Module) -> None:
        self.teacher, self.saved = teacher, {}
        self.hits = self.misses = 0

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        keys = [hashlib.blake2b(row.tobytes(), digest_size=16).digest() for row in images.cpu().numpy()]
        missing = [i for i, key in enumerate(keys) if key not in self.saved]
        if missing:
            fresh = self.teacher(images[missing]).float().cpu()
            for i, logits in zip(missing, fresh, strict=True):
                self.saved[keys[i]] = logits
        self.hits += len(keys) - len(missing)
        self.misses += len(missing)
        return torch.stack([self.saved[key] for key in keys]).to(images.device)


def fit(job: FitJob, data: SplitData, runtime: Runtime) -> FitResult:
    """Train `job.model` (in place) and return it, the moving average's if the job keeps one."""
    # On a CPU, convolutions with a one-pixel output (a ResNet's last stage at 8x8) are computed on
    # the taps that meet the image: the same numbers, 2.7x faster student steps (conv_shortcut.py).
    with one_pixel_convs_cropped() if runtime.device.type == "cpu" else nullcontext():
        return _fit(job, data, runtime)


def _fit(job: FitJob, data: SplitData, runtime: Runtime) -> FitResult:
    torch.manual_seed(job.seed)
    generator = torch.Generator().manual_seed(job.seed)
    device = runtime.device
    precision = resolve_precision(job.train.precision, device)
    train_set = job.train_set if job.train_set is not None else data.train
    all_labelled = not holds_unlabelled(train_set)
    # channels_last on every device: oneDNN's CPU convolutions are never slower in it (ResNet18/50 at
    # 8x8: 1.02x at batch 64, 1.1-1.2x at 128-256), and the NHWC input already arrives in that layout.
    model = job.model.to(device).to(memory_format=torch.channels_last)

    hint: FeatureHint | None = None
    teacher = job.teacher
    if teacher is not None:
        teacher = teacher.to(device).to(memory_format=torch.channels_last).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
        if job.distill and job.distill.feature.enabled:
            hint = FeatureHint(model, teacher, job.distill.feature.stage).to(device)
    # Not with a feature hint: it reads the teacher's inner features, which only running it produces.
    caching = teacher is not None and job.distill is not None and job.distill.cache_teacher and hint is None
    cache = TeacherCache(teacher) if caching else None

    batch, accumulate = job.train.batch_size, job.train.accumulate_steps
    finder = job.train.find_batch_size
    if finder == "on" or (finder == "auto" and device.type == "cuda"):
        sample, _ = next(iterate_batches(train_set, batch, repeat=-(-batch // max(1, len(train_set)))))
        batch, accumulate = find_batch_size(
            model, teacher, sample.to(device), precision, batch, accumulate,
            log=lambda msg: runtime.is_main and print(f"[training] {job.name}: {msg}", flush=True),
        )  # fmt: skip
        if hint is not None:
            hint.loss()  # drop the features the probe's forward captured

    trainable: nn.Module = nn.ModuleList([model, hint]) if hint else model
    optimizer = build_optimizer(trainable, job.train)
    micro_batches = math.ceil(math.ceil(len(train_set) * job.repeat / runtime.world_size) / batch)
    steps_per_epoch = math.ceil(micro_batches / accumulate)
    total = steps_per_epoch * job.train.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(total, int(job.train.warmup_epochs * steps_per_epoch))
    )
    scaler = torch.amp.GradScaler(enabled=precision == "fp16" and device.type == "cuda")
    # The average of the weights over the last ~1/(1-decay) steps: with few labels the weights at the
    # last step vary a lot from seed to seed, their average much less. BatchNorm statistics are averaged
    # too (use_buffers), so the averaged model is evaluated with statistics that match its weights.
    ema = None
    if job.train.ema_decay is not None:
        ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(job.train.ema_decay), use_buffers=True)
    ddp_model = DistributedDataParallel(model) if runtime.distributed else model

    job.out_dir.mkdir(parents=True, exist_ok=True)
    state_path, metrics_path = job.out_dir / "checkpoint.pt", job.out_dir / "metrics.jsonl"
    history: list[dict] = []
    start_epoch = 0
    state = _load_state(state_path) if job.resume and state_path.exists() else None
    if state is not None and state.get("fingerprint") != job.fingerprint:
        if runtime.is_main:
            print(f"[training] {job.name}: checkpoint from other settings; training afresh", flush=True)
        state = None
    if state is not None:
        model.load_state_dict(state["model"])
        if ema is not None and state.get("ema") is not None:
            ema.load_state_dict(state["ema"])
        if hint is not None and state.get("hint") is not None:
            hint.load_state_dict(state["hint"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        generator.set_state(state["generator"])
        start_epoch, history = state["epoch"], state["history"]
    elif runtime.is_main:
        metrics_path.unlink(missing_ok=True)

    def optimizer_step() -> torch.Tensor | None:
        grad_norm = None
        if job.train.clip_grad_norm is not None:
            scaler.unscale_(optimizer)
            grad_norm = nn.utils.clip_grad_norm_(trainable.parameters(), job.train.clip_grad_norm)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(model)
        return grad_norm

    started = time.perf_counter()
    show_progress = runtime.is_main and sys.stderr.isatty()
    for epoch in range(start_epoch, job.train.epochs):
        model.train()
        epoch_start = time.perf_counter()
        # Summed on the device and read once an epoch (a read per step is a GPU synchronisation).
        seen = 0
        loss_sum, labelled_seen, correct = (torch.zeros((), dtype=torch.float64, device=device) for _ in range(3))
        grad_norms: list[torch.Tensor] = []
        batches = iterate_batches(
            train_set,
            batch,
            shuffle=True,
            generator=generator,
            rank=runtime.rank,
            world_size=runtime.world_size,
            repeat=job.repeat,
            num_workers=data.num_workers,
            client_form_share=job.augment.client_form_share if job.augment.client_forms else 0.0,
        )
        bar = tqdm(
            batches,
            total=micro_batches,
            desc=f"{job.name} {epoch + 1}/{job.train.epochs}",
            leave=False,
            disable=not show_progress,
        )
        optimizer.zero_grad(set_to_none=True)
        for micro, (images, target) in enumerate(bar, start=1):
            images = augment_batch(images, job.augment, generator).to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            distill = job.distill
            if distill is not None and distill.temperature_end is not None:
                t = temperature_at(distill, scheduler.last_epoch, total)
                distill = distill.model_copy(update={"temperature": t})
            with autocast(precision, device):
                teacher_logits = None
                if teacher is not None:
                    with torch.no_grad():
                        teacher_logits = (cache or teacher)(images).float()
                logits = ddp_model(images).float()
                if logits.ndim == 3:
                    loss = _multihead_objective(logits, target, teacher_logits, job, distill, generator, all_labelled)
                    logits = fuse_heads(logits.detach())  # judged as served: the heads' mean probability
                else:
                    loss = _objective(logits, target, teacher_logits, job, distill, all_labelled)
                if hint is not None:
                    loss = loss + job.distill.feature.weight * hint.loss()
            scaler.scale(loss / accumulate).backward()
            if micro % accumulate == 0 or micro == micro_batches:
                if hint is not None and runtime.distributed:
                    # The hint adapter lives outside the DDP wrapper; average its gradients by hand.
                    for param in hint.parameters():
                        if param.grad is not None:
                            dist.all_reduce(param.grad)
                            param.grad /= runtime.world_size
                norm = optimizer_step()
                if norm is not None:
                    grad_norms.append(norm)
            seen += len(target)
            loss_sum += loss.detach() * len(target)
            labelled = target != UNLABELLED
            labelled_seen += labelled.sum()
            correct += ((logits.argmax(1) == target) & labelled).sum()
            if show_progress:
                bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}")

        epoch_seconds = time.perf_counter() - epoch_start
        record = {
            "epoch": epoch + 1,
            "train_loss": round(loss_sum.item() / max(seen, 1), 5),
            "train_top1": round(correct.item() / max(labelled_seen.item(), 1), 5),
            "lr": optimizer.param_groups[0]["lr"],
            "seconds": round(epoch_seconds, 3),
            "images_per_s": round(seen * runtime.world_size / epoch_seconds, 1),
            "batch_size": batch,
            "accumulate_steps": accumulate,
        }
        if job.distill is not None and job.distill.temperature_end is not None:
            record["temperature"] = round(temperature_at(job.distill, scheduler.last_epoch - 1, total), 4)
        if grad_norms:
            record["grad_norm_max"] = round(torch.stack(grad_norms).max().item(), 4)  # before clipping
        if cache is not None:  # since training began: the first epoch misses, the later ones hit
            record["teacher_cache"] = {"hits": cache.hits, "misses": cache.misses}
        if runtime.is_main:
            val_logits, val_labels = predict_logits(ema.module if ema is not None else model, data.val, device)
            if val_logits.ndim == 3:  # multi-head: judge the fused heads
                val_logits = fuse_heads(val_logits)
            record["val_top1"] = round(top_k_accuracy(val_logits, val_labels, 1), 5)
            history.append(record)
            with metrics_path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            _save_state(
                state_path,
                job.fingerprint,
                model,
                ema,
                hint,
                optimizer,
                scheduler,
                scaler,
                epoch + 1,
                history,
                generator,
            )

    if hint is not None:
        hint.remove()
    if ema is not None:
        model = ema.module
    model = model.to("cpu").to(memory_format=torch.contiguous_format).eval()
    return FitResult(
        model=model,
        history=history,
        seconds=time.perf_counter() - started,
        batch_size=batch,
        accumulate_steps=accumulate,
    )
