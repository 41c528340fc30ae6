"""`python -m training all`: teacher, plain and distilled students, ensemble, evaluation, reports.

Each stage writes `<out>/<stage>/model.pt`. A stage whose model exists and was trained from the same
settings is reused, so re-running after an interruption (or re-running the demo) only does what is
missing; changed settings retrain that stage.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml
from torch import nn
from torch.utils.data import ConcatDataset, Dataset

from kdcontract.errors import UserError
from kdcontract.manifest import file_sha256
from kdcontract.names import STUDENT_KD, STUDENT_PLAIN, STUDENT_PRUNED
from training.checkpoint import ModelSpec, load_metadata, load_model, save_model
from training.compression import prune_with_recovery
from training.data import InMemoryImages, SplitData, load_capture, load_data, load_transfer_folder
from training.evaluate import (
    cascade_answers,
    classification_metrics,
    expected_calibration_error,
    fit_cascade_threshold,
    fit_temperature,
    predict_logits,
    top_k_accuracy,
)
from training.models import (
    ImageClassifier,
    build_classifier,
    calibrated_mean,
    count_macs,
    count_params,
    fuse_heads,
    member_mean,
)
from training.onnx_front import graph_macs, graph_params
from training.recipe import Recipe, dump_recipe
from training.report import write_reports
from training.runtime import Runtime
from training.stages import (
    TRAINING_FORMAT,
    Stage,
    check_stage_references,
    distill_settings,
    fingerprint_of,
    seed_stage,
    select_stages,
    stage_fingerprint,
    stage_settings,
)
from training.teachers import (
    BROUGHT,
    ONNX_TEACHER,
    OnnxTeacher,
    check_class_names,
    load_teacher,
    start_from_weights,
)
from training.trainer import FitJob, fit


def init_model(stage: Stage, data: SplitData) -> ImageClassifier:
    """A freshly initialised model for `stage`, its weights drawn from the stage's seed.

    torch seeds its default generator randomly at start-up, so without this a seed would fix the
    data order and augmentation but not the initial weights, and no run could be repeated.
    """
    cfg = stage.model_cfg
    torch.manual_seed(stage.seed)
    if stage.distill and stage.distill.init:
        return _start_from(Path(stage.distill.init), stage, data)
    model = build_classifier(
        cfg.arch,
        data.num_classes,
        small_stem=cfg.small_stem,
        mean=data.mean,
        std=data.std,
        heads=stage.heads,
        width=cfg.width,
    )
    if cfg.weights is not None:
        if stage.heads or cfg.width != 1.0:  # another network than the one the weights were published for
            print(f"[training] {stage.name}: starts from random weights (weights are for one {cfg.arch})", flush=True)
        else:
            fresh = start_from_weights(model.backbone, cfg.weights, cfg.arch)
            print(
                f"[training] {stage.name}: starts from {cfg.weights}; fresh: {', '.join(fresh) or 'none'}", flush=True
            )
    return model


def _start_from(path: Path, stage: Stage, data: SplitData) -> ImageClassifier:
    """The checkpoint a distilling stage continues from, when it is the stage's network for these data."""
    model, spec, _ = load_model(path)
    cfg = stage.model_cfg
    wanted = (cfg.arch, cfg.small_stem, cfg.width, data.num_classes, data.image_size)
    found = (spec.arch, spec.small_stem, spec.width, spec.num_classes, spec.image_size)
    if wanted != found or stage.heads:
        raise UserError(
            f"{path} is {found[0]} (small stem {found[1]}, width {found[2]}, {found[3]} classes, {found[4]} px); "
            f"{stage.name} is {wanted[0]} (small stem {wanted[1]}, width {wanted[2]}, {wanted[3]} classes, "
            f"{wanted[4]} px): start it from fresh weights (redistill: --set redistill.start=fresh)"
        )
    return model


def stage_training_set(stage: Stage, data: SplitData) -> tuple[Dataset, int]:
    """What one epoch of `stage` iterates over, and how many passes over it make that epoch.

    With unlabelled transfer images, a distilling stage learns from the labelled and the transfer
    images together; a stage trained on labels alone repeats its (smaller) labelled set to about as
    many images, so both take the same number of steps and the comparison is about the teacher's
    targets, not the length of the schedule.
    """
    if data.transfer is None:
        return data.train, 1
    if stage.distill is not None:
        if isinstance(data.train, InMemoryImages):
            return data.train.concat(data.transfer), 1
        return ConcatDataset([data.train, data.transfer]), 1
    return data.train, max(1, round((len(data.train) + len(data.transfer)) / len(data.train)))


def with_transfer_folder(data: SplitData, recipe: Recipe) -> SplitData:
    """`distill.transfer`'s unlabelled images and `distill.capture`'s captured ones, added to the data's
    own transfer images (if any)."""
    extra = []
    if recipe.distill.transfer is not None:
        extra.append(load_transfer_folder(recipe.distill.transfer, data.preprocessing))
    if recipe.distill.capture is not None:
        extra.append(load_capture(recipe.distill.capture, data.preprocessing, data.class_names))
    for images in extra:
        data.transfer = images if data.transfer is None else data.transfer.concat(images)
    return data


def bring_teacher(recipe: Recipe, data: SplitData, out: Path, runtime: Runtime) -> nn.Module:
    """The teacher from `teacher.file` (training/teachers.py), checked against the dataset and kept in the run:
    a checkpoint as `teacher/model.pt` (like a trained teacher: evaluated, exported, served, re-distilled
    from), an ONNX model as `teacher/model.onnx` beside `teacher/brought.json` (evaluated, distilled from and
    served behind kdserve's input: `training.onnx_front`)."""
    brought = recipe.teacher.file
    path = Path(brought.path)
    check_class_names(brought.class_names, data.class_names, path)
    mean, std = tuple(brought.mean), tuple(brought.std)
    # A brought network keeps its published stem; kdserve's small-image stem only when the recipe says so (a
    # teacher kdserve trained, brought back as a checkpoint): the recipe's default is for networks trained here.
    small_stem = recipe.teacher.small_stem and "small_stem" in recipe.teacher.model_fields_set
    teacher = load_teacher(path, recipe.teacher.arch, data.num_classes, brought.image_size, mean, std, small_stem)
    if runtime.is_main:
        folder = out / "teacher"
        folder.mkdir(parents=True, exist_ok=True)
        digest = file_sha256(path)
        if isinstance(teacher, OnnxTeacher):
            shutil.copyfile(path, folder / ONNX_TEACHER)
            record = {"file": str(path), "sha256": digest, "mean": mean, "std": std, "image_size": brought.image_size}
            (folder / BROUGHT).write_text(json.dumps(record))
            (folder / "model.pt").unlink(missing_ok=True)
        else:
            spec = ModelSpec(
                arch=recipe.teacher.arch,
                num_classes=data.num_classes,
                small_stem=small_stem,
                image_size=data.image_size,
                mean=mean,
                std=std,
                class_names=data.class_names,
                role="teacher",
                brought=True,
                input_size=brought.image_size,
            )
            save_model(folder / "model.pt", teacher, spec, {"fingerprint": digest[:16], "file": str(path)})
            (folder / BROUGHT).unlink(missing_ok=True)
    _barrier(runtime)
    print(f"[training] teacher: brought from {path} ({type(teacher).__name__})", flush=True)
    return teacher


def teacher_fingerprint(out: Path) -> str | None:
    """What the run's teacher was made from: its checkpoint's fingerprint, or a brought ONNX graph's hash."""
    if (out / "teacher" / BROUGHT).is_file():
        return json.loads((out / "teacher" / BROUGHT).read_text())["sha256"][:16]
    return load_metadata(out / "teacher" / "model.pt")[1].get("fingerprint")


def _assemble_teacher(
    stage: Stage, trained: dict[str, tuple[Stage, ImageClassifier]], out: Path, runtime: Runtime
) -> tuple[ImageClassifier, float]:
    """The teacher as one model of its trained members (`MemberMean`); their stages carry the time."""
    names = [f"teacher_member_{i}" for i in range(stage.members)]
    teacher = member_mean([trained[n][1] for n in names])
    metas = [load_metadata(out / n / "model.pt")[1] for n in names]
    if runtime.is_main:
        spec, _ = load_metadata(out / names[0] / "model.pt")
        spec.members, spec.role = stage.members, "teacher"
        fingerprint = fingerprint_of([m["fingerprint"] for m in metas])
        save_model(out / "teacher" / "model.pt", teacher, spec, {"fingerprint": fingerprint, "members": names})
    _barrier(runtime)
    return teacher, 0.0


def _prune_or_reuse(
    recipe: Recipe, data: SplitData, trained: dict[str, tuple[Stage, ImageClassifier]], out: Path, runtime: Runtime
) -> tuple[Stage, ImageClassifier, float, bool, dict]:
    """The compression stage: the source student pruned with KD recovery, or the saved one when it was
    made from the same source, teacher and settings. Returns the pruning record too."""
    cfg = recipe.compression  # its source was checked before training (check_stage_references)
    source_stage, source = trained[cfg.source]
    seed = source_stage.seed if cfg.seed is None else cfg.seed
    stage = Stage(STUDENT_PRUNED, "student", source_stage.model_cfg, seed, source_stage.augment, recipe.distill)
    spec = load_metadata(out / cfg.source / "model.pt")[0]
    fingerprint = _compression_fingerprint(recipe, out)
    path = out / STUDENT_PRUNED / "model.pt"
    _barrier(runtime)
    if path.exists():
        model, _, meta = load_model(path)
        if meta.get("fingerprint") == fingerprint:
            return stage, model, float(meta.get("seconds", 0.0)), True, meta["pruning"]
    train_set, repeat = stage_training_set(stage, data)
    result = prune_with_recovery(
        source,
        trained["teacher"][1],
        data,
        train_set,
        repeat,
        cfg,
        recipe.distill,
        stage.augment,
        stage.seed,
        out / STUDENT_PRUNED,
        runtime,
    )
    record = {"source": cfg.source, "kept_step": result.kept_step, "steps": result.steps}
    if runtime.is_main:
        spec.pruned, spec.role = True, "student"
        meta = {"fingerprint": fingerprint, "stage": STUDENT_PRUNED, "seconds": result.seconds, "pruning": record}
        save_model(path, result.model, spec, meta)
    _barrier(runtime)
    return stage, result.model, result.seconds, False, record


def _compression_fingerprint(recipe: Recipe, out: Path) -> str:
    """The pruned student's settings: its own, and the fingerprints of the saved source and teacher."""
    cfg = recipe.compression
    settings = {
        # Unset, the seed is the source's and already in its fingerprint (and runs pruned before the
        # setting existed keep theirs).
        "compression": cfg.model_dump(mode="json", exclude={"seed"} if cfg.seed is None else None),
        "distill": distill_settings(recipe.distill),
        "source": load_metadata(out / cfg.source / "model.pt")[1].get("fingerprint"),
        "teacher": teacher_fingerprint(out),
        "format": TRAINING_FORMAT,
    }
    return fingerprint_of(settings)


def _saved_fingerprint(path: Path) -> str | None:
    return load_metadata(path)[1].get("fingerprint") if path.is_file() else None


def plan_status(recipe: Recipe, out: Path) -> dict[str, bool]:
    """Every stage `all` would run in `out`, and whether it is trained already (saved from the same
    settings, or a copy of a stage that is): what `all` would reuse, without loading any data."""
    trained: dict[str, bool] = {}
    done: set[str] = set()
    for stage in check_stage_references(recipe):
        if stage.members > 1:
            trained[stage.name] = all(trained[f"teacher_member_{i}"] for i in range(stage.members))
            continue
        if stage.role == "teacher" and recipe.teacher.file is not None:
            trained[stage.name] = True  # brought from its file: nothing to train
            continue
        fingerprint = stage_fingerprint(stage, recipe)
        trained[stage.name] = fingerprint in done or _saved_fingerprint(out / stage.name / "model.pt") == fingerprint
        if trained[stage.name]:
            done.add(fingerprint)
    if recipe.compression.enabled:
        sources_trained = trained["teacher"] and trained[recipe.compression.source]
        trained[STUDENT_PRUNED] = sources_trained and (
            _saved_fingerprint(out / STUDENT_PRUNED / "model.pt") == _compression_fingerprint(recipe, out)
        )
    return trained


def _barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def train_or_reuse(
    stage: Stage,
    recipe: Recipe,
    data: SplitData,
    teacher: ImageClassifier | None,
    out: Path,
    runtime: Runtime,
    done: dict[str, str],
) -> tuple[ImageClassifier, float, bool]:
    """Train a stage, or reuse a model trained from identical settings (this run or an earlier one).

    `done` maps settings fingerprints to the stage that holds them: an ensemble variant with the same
    seed and settings as a KD seed run is that run, so it is copied instead of trained again.
    """
    model_path = out / stage.name / "model.pt"
    fingerprint = stage_fingerprint(stage, recipe)
    _barrier(runtime)
    if model_path.exists():
        model, _, meta = load_model(model_path)
        if meta.get("fingerprint") == fingerprint:
            done.setdefault(fingerprint, stage.name)
            # Report the time it took when it was trained (copies of another stage took none).
            return model, 0.0 if "same_as" in meta else float(meta.get("seconds", 0.0)), True
    if fingerprint in done:
        source = out / done[fingerprint] / "model.pt"
        model, spec, meta = load_model(source)
        if runtime.is_main:
            spec.role = stage.role
            save_model(model_path, model, spec, {**meta, "stage": stage.name, "same_as": done[fingerprint]})
        _barrier(runtime)
        return model, 0.0, True
    cfg = stage.model_cfg
    model = init_model(stage, data)
    train_set, repeat = stage_training_set(stage, data)
    job = FitJob(
        name=stage.name,
        model=model,
        train=cfg.train,
        augment=stage.augment,
        seed=stage.seed,
        out_dir=out / stage.name,
        teacher=teacher if stage.distill else None,
        distill=stage.distill,
        head_sample_fraction=stage.head_sample_fraction,
        fingerprint=fingerprint,
        train_set=train_set,
        repeat=repeat,
    )
    if runtime.is_main:
        # The stage's resolved settings, next to its checkpoint, so the run can be reproduced from it.
        (out / stage.name).mkdir(parents=True, exist_ok=True)
        (out / stage.name / "config.yaml").write_text(yaml.safe_dump(stage_settings(stage, recipe), sort_keys=False))
    result = fit(job, data, runtime)
    if runtime.is_main:
        spec = ModelSpec(
            arch=cfg.arch,
            num_classes=data.num_classes,
            small_stem=cfg.small_stem,
            width=cfg.width,
            image_size=data.image_size,
            mean=data.mean,
            std=data.std,
            class_names=data.class_names,
            heads=stage.heads,
            role=stage.role,
        )
        save_model(
            model_path,
            result.model,
            spec,
            {
                "fingerprint": fingerprint,
                "stage": stage.name,
                "recipe": recipe.name,
                "seconds": result.seconds,
                "batch_size": result.batch_size,
                "accumulate_steps": result.accumulate_steps,
            },
        )
    done[fingerprint] = stage.name
    _barrier(runtime)
    return result.model, result.seconds, False


@dataclass
class StageEval:
    metrics: dict
    test_logits: torch.Tensor
    test_labels: torch.Tensor
    val_logits: torch.Tensor
    val_labels: torch.Tensor


def evaluate_stage(
    model: ImageClassifier, stage: Stage, data: SplitData, teacher_pred: torch.Tensor | None, ece_bins: int
) -> StageEval:
    """Fit the temperature on val, then measure on test (val top-1 is reported too)."""
    val_logits, val_labels = predict_logits(model, data.val)
    test_logits, test_labels = predict_logits(model, data.test)
    if stage.heads:
        # One temperature shared by all heads; the heads are fused like independent members.
        k = val_logits.shape[1]
        temperature = fit_temperature(val_logits.flatten(0, 1), val_labels.repeat_interleave(k))
        probs, raw = fuse_heads(test_logits, temperature), fuse_heads(test_logits)
        val_probs = fuse_heads(val_logits, temperature)
    else:
        temperature = fit_temperature(val_logits, val_labels)
        probs = torch.softmax(test_logits / temperature, dim=-1)
        raw = torch.softmax(test_logits, dim=-1)
        val_probs = torch.softmax(val_logits / temperature, dim=-1)
    metrics = classification_metrics(probs, test_labels, teacher_pred, ece_bins)
    metrics["val_top1"] = top_k_accuracy(val_probs, val_labels, 1)
    metrics["ece_uncalibrated"] = expected_calibration_error(raw, test_labels, ece_bins)
    metrics["temperature"] = temperature
    if isinstance(model, OnnxTeacher):  # ONNX Runtime runs it: counted from its graph
        metrics["params"], metrics["macs"] = graph_params(model.graph), graph_macs(model.graph, data.image_size)
    else:
        metrics["params"], metrics["macs"] = count_params(model), count_macs(model, data.image_size)
    return StageEval(metrics, test_logits, test_labels, val_logits, val_labels)


def _calibrated(stage_eval: StageEval, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    return (stage_eval.val_logits / temperature).softmax(-1), (stage_eval.test_logits / temperature).softmax(-1)


def evaluate_cascade(
    recipe: Recipe, evals: dict[str, StageEval], models: dict[str, dict], teacher_pred: torch.Tensor, ece_bins: int
) -> dict:
    """Fit the cascade's threshold on validation, then measure it on test like any model."""
    cfg = recipe.cascade  # its student was checked before training (check_stage_references)
    student_val, student_test = _calibrated(evals[cfg.student], models[cfg.student]["temperature"])
    teacher_val, teacher_test = _calibrated(evals["teacher"], models["teacher"]["temperature"])
    threshold = fit_cascade_threshold(student_val, teacher_val, evals["teacher"].val_labels, cfg.max_accuracy_drop)
    val_answers, val_escalated = cascade_answers(student_val, teacher_val, threshold)
    answers, escalated = cascade_answers(student_test, teacher_test, threshold)
    metrics = classification_metrics(answers, evals["teacher"].test_labels, teacher_pred, ece_bins)
    rate = escalated.float().mean().item()
    metrics.update(
        val_top1=top_k_accuracy(val_answers, evals["teacher"].val_labels, 1),
        threshold=threshold,
        escalation_rate=rate,
        val_escalation_rate=val_escalated.float().mean().item(),
        arch=f"{models[cfg.student]['arch']} -> {models['teacher']['arch']}",
        role="cascade",
        members=[cfg.student, "teacher"],
        params=models[cfg.student]["params"] + models["teacher"]["params"],
        # Per image on average: the student always, the teacher for the escalated share.
        macs=round(models[cfg.student]["macs"] + rate * models["teacher"]["macs"]),
    )
    return metrics


def _spread(values: list[float]) -> dict:
    return {
        "top1": values,
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
    }


def run_all(recipe: Recipe, out: Path, runtime: Runtime, only: Collection[str] | None = None) -> dict | None:
    """Train and evaluate everything, or with `only` those stages (and what they learn from): what is
    not trained is left out of the evaluation and the reports. Returns the results (main process only)."""
    started = time.perf_counter()
    stages = check_stage_references(recipe)
    prune = recipe.compression.enabled
    if only is not None:
        stages, prune = select_stages(recipe, stages, only)
    data = with_transfer_folder(load_data(recipe.data, client_forms=True), recipe)
    out.mkdir(parents=True, exist_ok=True)
    if runtime.is_main:
        dump_recipe(recipe, out / "recipe.yaml")

    stage_seconds: dict[str, float] = {}
    reused: list[str] = []
    trained: dict[str, tuple[Stage, ImageClassifier]] = {}
    teacher: ImageClassifier | None = None
    done: dict[str, str] = {}
    for stage in stages:
        if stage.role == "teacher" and recipe.teacher.file is not None:
            model, seconds, was_reused = bring_teacher(recipe, data, out, runtime), 0.0, True
        elif stage.members > 1:
            model, seconds = _assemble_teacher(stage, trained, out, runtime)
            was_reused = all(f"teacher_member_{i}" in reused for i in range(stage.members))
        else:
            model, seconds, was_reused = train_or_reuse(stage, recipe, data, teacher, out, runtime, done)
        stage_seconds[stage.name] = round(seconds, 1)
        if was_reused:
            reused.append(stage.name)
        if stage.role == "teacher":
            teacher = model
        trained[stage.name] = (stage, model)
        if runtime.is_main:
            print(
                f"[training] {stage.name}: {'reused' if was_reused else f'trained in {seconds:.1f}s'}",
                flush=True,
            )
    compression = None
    if prune:
        stage, model, seconds, was_reused, compression = _prune_or_reuse(recipe, data, trained, out, runtime)
        stage_seconds[stage.name] = round(seconds, 1)
        if was_reused:
            reused.append(stage.name)
        if compression["kept_step"] > 0:
            trained[stage.name] = (stage, model)
        if runtime.is_main:
            print(f"[training] {stage.name}: {'reused' if was_reused else f'pruned in {seconds:.1f}s'}", flush=True)
            if compression["kept_step"] == 0:
                # Loud, not silent: serving the unpruned source under the pruned name would claim a saving.
                first = compression["steps"][0]
                print(
                    f"[training] WARNING: compression kept no step: the first already lost "
                    f"{first['val_drop']:.2%} of validation top-1 (at least {first['val_drop_lower_95']:.2%} at 95%, "
                    f"limit {recipe.compression.max_accuracy_drop:.2%}); no {STUDENT_PRUNED} is trained or exported",
                    flush=True,
                )
    if not runtime.is_main:
        return None

    eval_start = time.perf_counter()
    ece_bins = recipe.evaluation.ece_bins
    models: dict[str, dict] = {}
    teacher_eval = teacher_pred = None  # a run of plain students alone (`only`) has no teacher
    if "teacher" in trained:
        teacher_stage, teacher_model = trained["teacher"]
        teacher_eval = evaluate_stage(teacher_model, teacher_stage, data, None, ece_bins)
        teacher_pred = teacher_eval.test_logits.argmax(-1)
    evals: dict[str, StageEval] = {}
    for name, (stage, model) in trained.items():
        evals[name] = teacher_eval if name == "teacher" else evaluate_stage(model, stage, data, teacher_pred, ece_bins)
        metrics = models[name] = evals[name].metrics
        metrics["arch"] = stage.model_cfg.arch
        metrics["role"] = stage.role
        # Keep the fitted temperature and test metrics with the weights: export and serving read them
        # (rewritten only when they changed, so a reused stage's checkpoint stays untouched).
        numbers = {k: v for k, v in metrics.items() if isinstance(v, float | int)}
        if isinstance(model, OnnxTeacher):  # no checkpoint: its calibration and figures go beside the graph
            brought = json.loads((out / name / BROUGHT).read_text())
            (out / name / BROUGHT).write_text(
                json.dumps({**brought, "temperature": metrics["temperature"], "metrics": numbers})
            )
            continue
        _, spec, meta = load_model(out / name / "model.pt")
        if spec.temperature != metrics["temperature"] or spec.metrics != numbers:
            spec.temperature, spec.metrics = metrics["temperature"], numbers
            save_model(out / name / "model.pt", model, spec, meta)

    members = [n for n in models if n.startswith("variant_")]
    if members:
        temperatures = [models[n]["temperature"] for n in members]
        fused = calibrated_mean([evals[n].test_logits for n in members], temperatures)
        ensemble = classification_metrics(fused, evals[members[0]].test_labels, teacher_pred, ece_bins)
        val_fused = calibrated_mean([evals[n].val_logits for n in members], temperatures)
        ensemble.update(
            val_top1=top_k_accuracy(val_fused, evals[members[0]].val_labels, 1),
            best_member_val_top1=max(models[n]["val_top1"] for n in members),
            arch=f"{len(members)} x {recipe.student.arch}",
            role="ensemble",
            members=members,
            params=sum(models[n]["params"] for n in members),
            macs=sum(models[n]["macs"] for n in members),
            best_member_top1=max(models[n]["top1"] for n in members),
        )
        models["ensemble"] = ensemble

    if recipe.cascade.enabled and {recipe.cascade.student, "teacher"} <= set(evals):
        models["cascade"] = evaluate_cascade(recipe, evals, models, teacher_pred, ece_bins)

    seeds = recipe.evaluation.seeds
    seed_names = {kind: [seed_stage(kind, i, s) for i, s in enumerate(seeds)] for kind in (STUDENT_PLAIN, STUDENT_KD)}
    seed_study = {"seeds": seeds}
    for kind, names in seed_names.items():
        if all(n in models for n in names):
            seed_study[kind] = _spread([models[n]["top1"] for n in names])
    stage_seconds["evaluation"] = round(time.perf_counter() - eval_start, 1)

    results = {
        "recipe": recipe.name,
        "dataset": data.description,
        "split_sizes": {
            "train": len(data.train),
            "transfer": len(data.transfer) if data.transfer is not None else 0,
            "val": len(data.val),
            "test": len(data.test),
        },
        "image_size": data.image_size,
        "device": str(runtime.device),
        "world_size": runtime.world_size,
        "threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - started, 1),
        # What training everything takes from scratch: the recorded time of every stage + evaluation.
        "training_seconds": round(sum(stage_seconds.values()), 1),
        "stage_seconds": stage_seconds,
        "reused_stages": reused,
        "models": models,
        "seed_study": seed_study,
    }
    if compression is not None:
        if STUDENT_PRUNED in models:
            pruned = models[STUDENT_PRUNED]
            pruned["macs_share_of_source"] = pruned["macs"] / models[compression["source"]]["macs"]
        results["compression"] = compression
    write_reports(results, out)
    return results
