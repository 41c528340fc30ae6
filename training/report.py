"""`results.json` and `results.md` for a training run."""

from __future__ import annotations

from pathlib import Path

from kdcontract.names import STUDENT_KD, STUDENT_PLAIN, STUDENT_PRUNED, TEACHER
from kdcontract.tables import markdown_table, percent, write_results


def _count(value: int) -> str:
    return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{value / 1e3:.1f} k"


def compression_markdown(compression: dict, models: dict) -> list[str]:
    """The pruning steps, each with what it was judged by, and what was kept (or that nothing was)."""
    lines = [
        "",
        f"## Compression: {compression['source']} pruned with KD recovery",
        "",
        "Each step is judged against the source on the same validation images: kept unless the drop's "
        "one-sided 95% lower bound is beyond the limit.",
        "",
        "| step | channels removed | MACs (share of source) | params | recovery epochs | val top-1 | "
        "images lost / gained | drop (95% lower bound) | kept |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for st in compression["steps"]:
        lines.append(
            f"| {st['step']} | {st['channel_share_removed']:.0%} | {_count(st['macs'])} ({st['macs_share']:.0%}) | "
            f"{_count(st['params'])} | {st['recovery_epochs']} | {percent(st['val_top1'])} | "
            f"{st['val_images_lost']} / {st['val_images_gained']} | {percent(st['val_drop'])} "
            f"({percent(st['val_drop_lower_95'])}) | {'yes' if st['kept'] else 'no'} |"
        )
    pruned = models.get(STUDENT_PRUNED)
    if pruned is None:
        lines += ["", "**No step was kept: nothing is pruned, and no `student_pruned` is exported.**"]
    else:
        lines += [
            "",
            f"Kept step {compression['kept_step']}: student_pruned has {pruned['macs_share_of_source']:.0%} of "
            f"{compression['source']}'s MACs; test top-1 {percent(pruned['top1'])} vs "
            f"{percent(models[compression['source']]['top1'])}.",
        ]
    return lines


def pruning_runs_markdown(runs: list[tuple[int | None, dict]]) -> str:
    """One row per run: the pruning seed, the step kept, the pruned student's share of its source's MACs
    and its test top-1 beside the source's (the same test images)."""
    rows = []
    for seed, results in runs:
        compression, models = results["compression"], results["models"]
        source = models[compression["source"]]
        pruned = models.get(STUDENT_PRUNED)
        rows.append(
            [
                "source's" if seed is None else seed,
                compression["kept_step"],
                f"{pruned['macs_share_of_source']:.0%}" if pruned else "— (nothing kept)",
                percent(pruned["top1"]) if pruned else "—",
                percent(source["top1"]),
                f"{100 * (source['top1'] - pruned['top1']):+.2f}" if pruned else "—",
                f"{results['stage_seconds'][STUDENT_PRUNED]:.0f}",
            ]
        )
    header = ["pruning seed", "steps kept", "MACs of the source", "test top-1", "source test top-1", "drop (points)"]
    return (
        f"# Pruning of `{runs[0][1]['compression']['source']}` over seeds (`make pruning-seeds`)\n\n"
        "Each run prunes the same trained KD student with another seed for its recovery training, judged by the\n"
        "paired validation rule (docs: Training, Compression); test top-1 on the same 270 held-out images.\n\n"
        + markdown_table([*header, "seconds"], rows)
        + "\n"
    )


def results_markdown(results: dict) -> str:
    lines = [
        f"# Training results: recipe `{results['recipe']}`",
        "",
        f"Dataset: {results['dataset']} (train/val/test = "
        f"{results['split_sizes']['train']}/{results['split_sizes']['val']}/{results['split_sizes']['test']}"
        + (f", plus {results['split_sizes']['transfer']} unlabelled" if results["split_sizes"].get("transfer") else "")
        + "), "
        f"input {results['image_size']}x{results['image_size']}. Device: {results['device']}, "
        f"{results['threads']} threads, {results['world_size']} process(es). Time to train and evaluate everything: "
        f"{results.get('training_seconds', results['seconds']):.0f} s (this invocation: {results['seconds']:.0f} s; "
        "stages marked reused were trained by an earlier invocation with the same settings).",
        "",
        "All metrics on the held-out test split. ECE after temperature scaling fitted on the validation split "
        "(uncalibrated in brackets). Agreement: share of test images where the model's top-1 equals the teacher's.",
        "",
        "| model | arch | top-1 | top-5 | ECE (raw) | T | teacher agreement | params | MACs/image |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, m in results["models"].items():
        raw = f" ({percent(m['ece_uncalibrated'])})" if "ece_uncalibrated" in m else ""
        temperature = f"{m['temperature']:.2f}" if "temperature" in m else "—"
        lines.append(
            f"| {name} | {m['arch']} | {percent(m['top1'])} | {percent(m['top5'])} | {percent(m['ece'])}{raw} | "
            f"{temperature} | {percent(m.get('teacher_agreement'))} | {_count(m['params'])} | {_count(m['macs'])} |"
        )
    if "ensemble" in results["models"]:
        ens = results["models"]["ensemble"]
        lines += [
            "",
            f"Ensemble = mean of calibrated probabilities of {', '.join(ens['members'])}. Test: fused "
            f"{percent(ens['top1'])}, best member {percent(ens['best_member_top1'])}. Validation: fused "
            f"{percent(ens.get('val_top1'))}, best member {percent(ens.get('best_member_val_top1'))}.",
        ]
    lines += seed_study_markdown(results)
    cascade = results["models"].get("cascade")
    if cascade is not None:
        student, teacher = cascade["members"]
        lines += [
            "",
            "## Confidence cascade",
            "",
            f"{student} answers; below a calibrated confidence of {cascade['threshold']:.3f} (fitted on validation to "
            f"keep top-1 within the recipe's margin of the teacher's) {teacher} does. Test: top-1 "
            f"{percent(cascade['top1'])} ({student} {percent(results['models'][student]['top1'])}, {teacher} "
            f"{percent(results['models'][teacher]['top1'])}), {cascade['escalation_rate']:.1%} of images escalated "
            f"(validation {cascade['val_escalation_rate']:.1%}); MACs per image on average "
            f"{_count(cascade['macs'])}.",
        ]
    if results.get("compression") is not None:
        lines += compression_markdown(results["compression"], results["models"])
    lines += ["", "## Time per stage", "", "| stage | seconds |", "|---|---:|"]
    for stage, seconds in results["stage_seconds"].items():
        reused = " (reused)" if stage in results.get("reused_stages", []) else ""
        lines.append(f"| {stage}{reused} | {seconds:.1f} |")
    return "\n".join(lines) + "\n"


def seed_study_markdown(results: dict) -> list[str]:
    """Plain vs. distilled students over the seeds; empty when the run trained only some of them."""
    study = results["seed_study"]
    if STUDENT_PLAIN not in study or STUDENT_KD not in study:
        return []
    lines = [
        "",
        f"## Distillation vs. plain training over seeds {study['seeds']}",
        "",
        "| student | top-1 per seed | mean | std |",
        "|---|---|---:|---:|",
    ]
    for kind in (STUDENT_PLAIN, STUDENT_KD):
        s = study[kind]
        lines.append(
            f"| {kind} | {', '.join(percent(v) for v in s['top1'])} | {percent(s['mean'])} | {100 * s['std']:.2f} pt |"
        )
    gain = study[STUDENT_KD]["mean"] - study[STUDENT_PLAIN]["mean"]
    spread = max(study[STUDENT_KD]["std"], study[STUDENT_PLAIN]["std"])
    teacher_lead = results["models"][TEACHER]["top1"] - study[STUDENT_PLAIN]["mean"]  # KD students imply one
    lines += [
        "",
        f"KD gain (mean): {100 * gain:+.2f} points; twice the larger seed spread: {200 * spread:.2f} points; "
        f"the teacher leads the plain student by {100 * teacher_lead:+.2f} points. "
        + (
            "Distillation pays here: the gain exceeds 1 point and twice the spread."
            if gain > max(0.01, 2 * spread)
            else "No gain beyond 1 point and twice the seed spread here."
        ),
    ]
    return lines


def write_reports(results: dict, out: Path) -> None:
    write_results(out, results, results_markdown(results))
