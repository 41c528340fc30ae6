"""`python -m training redistill`: a new student distilled from served traffic, exported as a new version.

The loop this closes: the gateway captures what clients send (`KDSERVE_CAPTURE_*`), feedback labels some
of it, and this command trains a student on that capture from the run's teacher: the capture replaces
the recipe's own unlabelled transfer images (a recipe's labelled split stays: it is the labels you had),
with the capture's feedback labels where there are some. By default (`redistill.start: served`) each
student starts from the served model's weights and trains `redistill.epochs` epochs: the capture
refines what served it instead of teaching a fresh network from nothing. The new student is evaluated
on the recipe's held-out test split beside the model the repository serves under the same name (or
`--against`), checked by the offline gate (`training.offline_gate`: refused, exit 2, when surely worse than
the served version by more than `redistill.max_top1_drop`, unless `--force`), then exported as a
candidate version of that name (`kdcontract.versions`): the graph is written and checked first, the
version directory appears whole, the config loads it beside the current version, and only then does the
manifest name it as the candidate. Triton (polling the repository) loads it; the name keeps answering with
its current version, and the candidate answers only as `NAME@VERSION`, which a rollout's candidate arm
names: it is promoted by passing that rollout's gates, or rejected and unloaded. When the repository's
cascade or INT8 sibling is built on that student, a candidate of each comes with it (the cascade's
threshold refitted on validation) and shares its fate.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdcontract.capture import UNLABELLED
from kdcontract.errors import UserError
from kdcontract.manifest import ModelEntry, read_manifest, write_manifest
from kdcontract.names import STUDENT_KD, TEACHER, int8_name, versioned
from kdcontract.tables import markdown_table
from kdcontract.versions import check_no_trial, on_trial
from training.checkpoint import ModelSpec, load_model, save_model
from training.data import InMemoryImages, SplitData, load_capture, load_data, validation_as_served
from training.evaluate import predict_logits
from training.export import as_numpy, cascade_entry, export_graph, int8_sibling, write_served_model
from training.label_trust import LabelVerdict, judge_label_keys
from training.offline_gate import offline_gate
from training.pipeline import evaluate_cascade, evaluate_stage, train_or_reuse
from training.recipe import Recipe, load_recipe
from training.runtime import Runtime
from training.stages import Stage
from training.teachers import run_teacher
from training.triton_repo import ServingOptions


@dataclass(frozen=True)
class RedistillJob:
    run: Path  # the trained run: its recipe, labelled split and teacher
    capture: str  # a capture directory or s3://bucket/prefix
    repo: Path  # the served repository the new version goes into
    out: Path  # where the new students' checkpoints go
    seeds: tuple[int, ...] = (0,)  # one student per seed; the first is exported
    served_as: str = STUDENT_KD  # the served name the new student becomes a version of
    against: str | None = None  # the served model compared with (default: `served_as`, else the student)
    flavor: str = "cpu"
    opts: ServingOptions = field(default_factory=ServingOptions)  # as `export` was given them
    export: bool = True
    force: bool = False  # export even when the offline gate refuses the candidate
    overrides: tuple[str, ...] = ()  # KEY=VALUE on the run's recipe (the students' schedule, say)


def _served_checkpoint(repo: Path, name: str) -> tuple[ModelEntry, Path]:
    manifest = read_manifest(repo)
    entry = manifest.models.get(name)
    if entry is None:
        raise UserError(f"{repo} serves no model {name!r}; served: {', '.join(sorted(manifest.models))}")
    source = Path(entry.source)
    if not source.is_file():
        raise UserError(f"{name} in {repo} was exported from {entry.source or '(unknown)'}, which is not here")
    return entry, source


def _stage(recipe: Recipe, seed: int) -> Stage:
    return Stage(f"student_seed{seed}", "student", recipe.student, seed, recipe.data.augment, recipe.distill)


def _numbers(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, float | int)}


def _judge_labels(recipe: Recipe, teacher, transfer: InMemoryImages) -> LabelVerdict:
    """The capture's feedback labels judged key by key against the teacher and the other keys; the labels of
    an excluded key are dropped (its images still train on the teacher's soft targets)."""
    labelled = torch.nonzero(transfer.labels != UNLABELLED).flatten()
    keys = np.asarray(transfer.label_keys)[labelled.numpy()]
    subset = InMemoryImages(transfer.images[labelled], transfer.labels[labelled])
    teacher_top1 = predict_logits(teacher, subset)[0].argmax(-1).numpy() if len(labelled) else np.array([], int)
    config = recipe.redistill
    trust = judge_label_keys(
        keys, subset.labels.numpy(), teacher_top1, config.trusted_label_keys, config.label_key_margin, config.alpha
    )
    for key, why in trust.excluded.items():
        print(f"[redistill] labels of key {key or '(unrecorded)'} not used: {why}", flush=True)
    transfer.labels[labelled[torch.from_numpy(~trust.keep(keys))]] = UNLABELLED
    return trust


def redistill(job: RedistillJob, runtime: Runtime) -> dict:
    """Train, evaluate and export; returns the report (also written to `<out>/redistill.json`)."""
    started = time.perf_counter()
    if not job.seeds:
        raise UserError("give at least one seed")
    recipe = load_recipe(str(job.run / "recipe.yaml"), list(job.overrides))
    # The capture enters every stage's fingerprint: a student is reused only for the same capture.
    recipe.distill.capture = job.capture
    against = job.against or job.served_as
    against_entry, against_source = _served_checkpoint(job.repo, against)
    if recipe.redistill.start == "served":
        recipe.distill.init = str(against_source)  # continue from what served the captured traffic
    if recipe.redistill.epochs is not None:
        recipe.student.train.epochs = recipe.redistill.epochs
    data = load_data(recipe.data, client_forms=True)
    # The run's teacher: trained there, brought as a checkpoint (model.pt either way), or a brought ONNX graph.
    teacher = run_teacher(job.run / TEACHER, data.num_classes) or load_model(job.run / TEACHER / "model.pt")[0]
    labelled, own_transfer = len(data.train), len(data.transfer) if data.transfer is not None else 0
    # The capture is the transfer set: the recipe's own unlabelled images are what traffic replaces.
    data.transfer = load_capture(job.capture, data.preprocessing, data.class_names)
    ece_bins = recipe.evaluation.ece_bins

    teacher_stage = Stage(TEACHER, "teacher", recipe.teacher, recipe.seed, recipe.data.augment)
    teacher_eval = evaluate_stage(teacher, teacher_stage, data, None, ece_bins)
    teacher_pred = teacher_eval.test_logits.argmax(-1)
    trust = _judge_labels(recipe, teacher, data.transfer)
    captured_labels = int((data.transfer.labels != UNLABELLED).sum())
    served_model, _, _ = load_model(against_source)
    served_stage = Stage(against, "student", recipe.student, recipe.seed, recipe.data.augment)
    served_eval = evaluate_stage(served_model, served_stage, data, teacher_pred, ece_bins)

    students, first = [], None
    for seed in job.seeds:
        stage = _stage(recipe, seed)
        model, seconds, reused = train_or_reuse(stage, recipe, data, teacher, job.out, runtime, {})
        evaluated = evaluate_stage(model, stage, data, teacher_pred, ece_bins)
        path = job.out / stage.name / "model.pt"
        _, spec, meta = load_model(path)
        spec.temperature, spec.metrics = evaluated.metrics["temperature"], _numbers(evaluated.metrics)
        save_model(path, model, spec, meta)
        print(
            f"[redistill] seed {seed}: test top-1 {evaluated.metrics['top1']:.2%} "
            f"({'reused' if reused else f'trained in {seconds:.1f}s'})",
            flush=True,
        )
        students.append({"seed": seed, "top1": evaluated.metrics["top1"], "seconds": seconds, "reused": reused})
        if first is None:
            first = (model, spec, evaluated, path)

    top1s = [s["top1"] for s in students]
    report = {
        "run": str(job.run),
        "capture": job.capture,
        "recipe": recipe.name,
        "labelled_images": labelled,
        "recipe_transfer_images_replaced": own_transfer,
        "captured_images": len(data.transfer),
        "captured_labelled": captured_labels,
        "labels": {"by_key": trust.by_key, "excluded": trust.excluded},
        "test_images": len(data.test),
        "teacher": {"top1": teacher_eval.metrics["top1"]},
        "served_before": {"name": against, "version": against_entry.version, "top1": served_eval.metrics["top1"]},
        "redistilled": {
            "start": f"{against} version {against_entry.version}" if recipe.distill.init else "fresh weights",
            "epochs": recipe.student.train.epochs,
            "seeds": list(job.seeds),
            "per_seed": students,
            "top1": statistics.fmean(top1s),
            "std": statistics.stdev(top1s) if len(top1s) > 1 else 0.0,
            "exported_seed": job.seeds[0],
            "exported_top1": students[0]["top1"],
        },
    }
    model, spec, evaluated, path = first
    gate = offline_gate(
        evaluated.test_logits.argmax(-1).numpy(),
        served_eval.test_logits.argmax(-1).numpy(),
        served_eval.test_labels.numpy(),
        teacher_pred.numpy(),
        recipe.redistill.max_top1_drop,
        recipe.redistill.alpha,
    )
    report["candidate"] = {"offline": {"passed": gate.passed, "reason": gate.reason, **gate.figures}}
    print(f"[redistill] offline gate: {'passed' if gate.passed else 'REFUSED'}: {gate.reason}", flush=True)
    refused = job.export and not gate.passed and not job.force
    if job.export and not refused:
        report["export"] = _export_new_version(
            job, recipe, data, model, spec, evaluated, teacher_eval, path, report["candidate"]["offline"]
        )
    report["seconds"] = round(time.perf_counter() - started, 1)
    job.out.mkdir(parents=True, exist_ok=True)
    (job.out / "redistill.json").write_text(json.dumps(report, indent=2) + "\n")
    (job.out / "redistill.md").write_text(markdown(report))
    if refused:
        raise UserError(f"the re-distilled student is not exported: {gate.reason} (--force exports it anyway)")
    return report


def _export_new_version(
    job: RedistillJob,
    recipe: Recipe,
    data: SplitData,
    model,
    spec: ModelSpec,
    evaluated,
    teacher_eval,
    path: Path,
    gate: dict,
) -> dict:
    """The student as a candidate version of `served_as`, loaded beside the current one (its INT8 sibling and
    the cascade's refitted threshold with it), the manifest rewritten last. The current version keeps every
    request until a rollout promotes the candidate (`kdcontract.versions`)."""
    opts = job.opts
    manifest = read_manifest(job.repo)
    check_no_trial(manifest.models[job.served_as])
    test = as_numpy(data.test)
    onnx_path = job.out / "onnx" / f"{job.served_as}_seed{job.seeds[0]}.onnx"
    parity, onnx_logits = export_graph(job.served_as, model, spec.image_size, onnx_path, data, test, job.flavor)
    cascade = None
    if manifest.cascade is not None and manifest.cascade.student == job.served_as:
        # The threshold fitted again on validation for the new student, as training fits it.
        student = recipe.cascade.student
        evals = {student: evaluated, TEACHER: teacher_eval}
        models = {
            student: {**evaluated.metrics, "arch": spec.arch},
            TEACHER: {**teacher_eval.metrics, "arch": recipe.teacher.arch},
        }
        teacher_pred = teacher_eval.test_logits.argmax(-1)
        measured = evaluate_cascade(recipe, evals, models, teacher_pred, recipe.evaluation.ece_bins)
        cascade = cascade_entry({"models": {"cascade": measured}}, manifest.models)
    current = manifest.models[job.served_as]
    validation = validation_as_served(recipe.data, as_numpy(data.val)[0])
    new = write_served_model(
        job.repo,
        job.served_as,
        "student",
        spec,
        onnx_path,
        job.flavor,
        opts,
        str(path),
        also_loaded=(current.version,),
        validation=validation,
    )
    updated = {job.served_as: on_trial(current, new, gate, cascade)}
    quantized = int8_name(job.served_as)
    if quantized in manifest.models and job.flavor == "cpu":
        check_no_trial(manifest.models[quantized])
        int8_path, int8 = int8_sibling(job.served_as, onnx_path, data, test, onnx_logits, spec.temperature)
        metrics = {**spec.metrics, "top1": int8["int8_top1"], "ece": int8["int8_ece"]}
        sibling = manifest.models[quantized]
        new_int8 = write_served_model(
            job.repo,
            quantized,
            "quantized",
            spec,
            int8_path,
            job.flavor,
            opts,
            str(int8_path),
            "int8",
            metrics,
            also_loaded=(sibling.version,),
            validation=validation,
        )
        updated[quantized] = on_trial(sibling, new_int8)
    manifest.models.update(updated)
    write_manifest(job.repo, manifest)
    written = {name: entry.candidate.version for name, entry in updated.items()}
    trial = ", ".join(f"{n} version {v} (current {updated[n].version})" for n, v in written.items())
    print(f"[redistill] exported as candidates beside the current versions: {trial} into {job.repo}")
    return {
        "versions": written,
        "current": {name: entry.version for name, entry in updated.items()},
        "candidate": versioned(job.served_as, written[job.served_as]),
        "onnx_vs_torch": parity["onnx_vs_torch"],
    }


def markdown(report: dict) -> str:
    r = report["redistilled"]
    rows = [[f"seed {s['seed']}", f"{s['top1']:.2%}", f"{s['seconds']:.0f}"] for s in r["per_seed"]]
    before = report["served_before"]
    lines = [
        f"# Re-distilled from {report['capture']}",
        "",
        f"Recipe `{report['recipe']}`: {report['labelled_images']} labelled images and "
        f"{report['captured_images']} captured ones ({report['captured_labelled']} with feedback labels) in place "
        f"of the recipe's {report['recipe_transfer_images_replaced']} unlabelled images. Test split: "
        f"{report['test_images']} images.",
        "",
        f"Each student started from {r['start']} and trained {r['epochs']} epochs.",
        "",
        markdown_table(["student", "test top-1", "train s"], rows),
        "",
        f"Mean {r['top1']:.2%} (std {100 * r['std']:.2f} pt); served before: {before['name']} version "
        f"{before['version']} {before['top1']:.2%}; teacher {report['teacher']['top1']:.2%}.",
    ]
    offline = report["candidate"]["offline"]
    rows = [
        [
            name,
            f"{figures['candidate']:.2%}",
            f"{figures['served']:.2%}",
            f"[{figures['interval'][0] * 100:+.2f}, {figures['interval'][1] * 100:+.2f}]",
        ]
        for name, figures in (("top-1", offline["top1"]), ("agreement with the teacher", offline["agreement"]))
    ]
    lines += [
        "",
        f"Offline gate (seed {r['exported_seed']} against the served version, paired on the test split, "
        f"alpha {offline['alpha']:g}): {'passed' if offline['passed'] else 'refused'}.",
        "",
        markdown_table(["", "candidate", "served", "difference, points"], rows),
    ]
    excluded = report["labels"]["excluded"]
    if excluded:
        lines += [
            "",
            "Feedback labels not used: "
            + "; ".join(f"key {k or '(unrecorded)'}: {why}" for k, why in excluded.items())
            + ".",
        ]
    if "export" in report:
        exported = report["export"]
        versions = ", ".join(
            f"{n} version {v} beside version {exported['current'][n]}" for n, v in exported["versions"].items()
        )
        lines += [
            "",
            f"Exported as candidates (seed {r['exported_seed']}): {versions}. The current versions answer every "
            f"request until a rollout with `{exported['candidate']}` as its candidate promotes it.",
        ]
    return "\n".join(lines) + "\n"
