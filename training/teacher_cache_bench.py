"""`python -m training teacher-cache`: a KD student's epochs with and without the teacher's logits cached.

The run's teacher (the digits recipe's: a ResNet50) distilled into the recipe's student twice, from the same
seed and for the same epochs, with augmentation off (each image the same every epoch, so the teacher's
logits can be cached): once running the teacher on every batch, once through `trainer.TeacherCache`
(`distill.cache_teacher`). Writes the epoch times, the cache's hits and misses and both students' test top-1
(the cached logits are the same logits: the students should match within noise) with the CPU.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from kdcontract.machine import cpu_description
from kdcontract.tables import markdown_table
from training.checkpoint import load_model
from training.data import load_data
from training.pipeline import evaluate_stage, train_or_reuse
from training.recipe import AugmentConfig, load_recipe
from training.runtime import Runtime
from training.stages import Stage


def run_bench(run: Path, out: Path, epochs: int, runtime: Runtime) -> dict:
    recipe = load_recipe(str(run / "recipe.yaml"), [f"student.train.epochs={epochs}"])
    data = load_data(recipe.data)  # no client-form pictures: nothing that changes an image between epochs
    teacher, teacher_spec, _ = load_model(run / "teacher" / "model.pt")
    teacher_stage = Stage("teacher", "teacher", recipe.teacher, recipe.seed, AugmentConfig())
    teacher_pred = evaluate_stage(teacher, teacher_stage, data, None, recipe.evaluation.ece_bins).test_logits.argmax(-1)
    results = {"cpu": cpu_description(), "run": str(run), "teacher": teacher_spec.arch, "student": recipe.student.arch}
    results["epochs"], results["train_images"] = epochs, len(data.train) + (len(data.transfer or []))
    for cached in (False, True):
        distill = recipe.distill.model_copy(update={"cache_teacher": cached})
        stage = Stage("student_kd", "student", recipe.student, 0, AugmentConfig(), distill)
        folder = out / ("cached" if cached else "uncached")
        model, seconds, _ = train_or_reuse(stage, recipe, data, teacher, folder, runtime, {})
        epochs_run = [json.loads(line) for line in (folder / "student_kd" / "metrics.jsonl").read_text().splitlines()]
        metrics = evaluate_stage(model, stage, data, teacher_pred, recipe.evaluation.ece_bins).metrics
        results["cached" if cached else "uncached"] = {
            "epoch_seconds": [e["seconds"] for e in epochs_run],
            "teacher_cache": epochs_run[-1].get("teacher_cache"),
            "top1": metrics["top1"],
            "teacher_agreement": metrics["teacher_agreement"],
            "seconds": round(seconds, 1),
        }
    out.mkdir(parents=True, exist_ok=True)
    (out / "teacher_cache.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "teacher_cache.md").write_text(markdown(results))
    return results


def markdown(r: dict) -> str:
    rows = []
    for name in ("uncached", "cached"):
        x = r[name]
        later = x["epoch_seconds"][1:] or x["epoch_seconds"]
        cache = x["teacher_cache"]
        rows.append(
            [
                name,
                f"{x['epoch_seconds'][0]:.1f}",
                f"{statistics.median(later):.1f}",
                f"{x['top1']:.2%}",
                f"{x['teacher_agreement']:.2%}",
                f"{cache['hits']} / {cache['misses']}" if cache else "—",
            ]
        )
    first, rest = r["uncached"]["epoch_seconds"][1:], r["cached"]["epoch_seconds"][1:]
    speedup = statistics.median(first) / statistics.median(rest) if first and rest else float("nan")
    return (
        "\n".join(
            [
                "# Cached teacher logits",
                "",
                f"CPU: {r['cpu']}. A {r['student']} student distilled from the run's {r['teacher']} teacher for "
                f"{r['epochs']} epochs on {r['train_images']} images (augmentation off), from the same seed, with the "
                "teacher run on every batch and with its logits cached per image (`distill.cache_teacher`).",
                "",
                markdown_table(
                    [
                        "teacher",
                        "epoch 1 s",
                        "later epochs s (median)",
                        "test top-1",
                        "agreement",
                        "cache hits / misses",
                    ],
                    rows,
                ),
                "",
                f"Later epochs {speedup:.2f}x faster with the cache; the first epoch runs the teacher on every image "
                "either way.",
            ]
        )
        + "\n"
    )
