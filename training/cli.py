"""Command line: `python -m training <command>`. User errors end as one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from kdcontract.errors import UserError
from kdcontract.names import STUDENT_KD

if TYPE_CHECKING:  # imported where used: a command that fails early never pays for torch
    from training.triton_repo import ServingOptions


def _cmd_all(args: argparse.Namespace) -> None:
    from training.recipe import load_recipe
    from training.stages import check_stage_references, select_stages

    # The recipe, its stage references and `--only` first: a typo is refused before the seconds that
    # importing torch takes (run_all checks them again, for callers other than this command).
    recipe = load_recipe(args.recipe, args.overrides)
    stages = check_stage_references(recipe)
    if args.only:
        select_stages(recipe, stages, args.only)

    import torch

    from training.models import check_arch

    check_arch(recipe.teacher.arch, "teacher.arch")
    check_arch(recipe.student.arch, "student.arch")
    from training.pipeline import run_all
    from training.report import results_markdown
    from training.runtime import init_runtime, shutdown_runtime

    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/{recipe.name}")
    runtime = init_runtime()
    try:
        results = run_all(recipe, out, runtime, args.only)
    finally:
        shutdown_runtime(runtime)
    if results is not None:  # the main process
        print(results_markdown(results))
        if args.export:
            _export(out, Path(args.export), args)


def _cmd_plan(args: argparse.Namespace) -> None:
    from training.pipeline import plan_status
    from training.recipe import load_recipe

    status = plan_status(load_recipe(args.recipe, args.overrides), Path(args.out or f"runs/{args.recipe}"))
    for stage, trained in status.items():
        print(f"{stage:<24} {'trained (reused)' if trained else 'to train'}")
    if args.exit_code and not all(status.values()):
        raise SystemExit(1)


def _cmd_check_data(args: argparse.Namespace) -> None:
    """Load and split the recipe's data (and transfer folder) as training will: bad files, empty class
    folders and missing roots fail here, on a CPU, before any GPU time is spent."""
    import json

    from training.data import load_data
    from training.pipeline import with_transfer_folder
    from training.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    if recipe.data.dataset == "imagefolder" and recipe.data.root and Path(recipe.data.root).is_dir():
        from training.data import folder_report

        report = folder_report(Path(recipe.data.root))
        print(json.dumps({"folder": recipe.data.root, **report}, indent=2))
        if report["unreadable"]:
            raise UserError(
                f"{report['unreadable']} file(s) under {recipe.data.root} are not readable images "
                f"(first: {', '.join(report['unreadable_files'])}); remove or fix them"
            )
    data = with_transfer_folder(load_data(recipe.data), recipe)
    summary = {
        "recipe": recipe.name,
        "dataset": data.description,
        "classes": data.num_classes,
        "image_size": data.image_size,
        "images": {
            "train": len(data.train),
            "val": len(data.val),
            "test": len(data.test),
            "unlabelled": len(data.transfer) if data.transfer is not None else 0,
        },
        "mean": [round(v, 4) for v in data.mean],
        "std": [round(v, 4) for v in data.std],
    }
    text = json.dumps(summary, indent=2)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "data_summary.json").write_text(text + "\n")
    print(text)


def _cmd_export(args: argparse.Namespace) -> None:
    _export(Path(args.run), Path(args.repo), args)


def _serving_options(args: argparse.Namespace) -> ServingOptions:
    from training.triton_repo import ServingOptions

    return ServingOptions(instances=args.instances, intra_op_threads=args.intra_op_threads)


def _export(run: Path, repo: Path, args: argparse.Namespace) -> None:
    from training.export import export_run

    export_run(run, repo, args.flavor, _serving_options(args), promote=args.promote)
    print(f"[export] wrote {repo}; report in {run / 'export_report.md'}")
    _cmd_check_repo(argparse.Namespace(repo=repo))


def _cmd_redistill(args: argparse.Namespace) -> None:
    import torch

    from training.redistill import RedistillJob, markdown, redistill
    from training.runtime import init_runtime, shutdown_runtime

    if args.threads:
        torch.set_num_threads(args.threads)
    job = RedistillJob(
        run=Path(args.run),
        capture=args.capture,
        repo=Path(args.repo),
        out=Path(args.out or Path(args.run) / "redistill"),
        seeds=tuple(args.seeds),
        served_as=args.served_as,
        against=args.against,
        flavor=args.flavor,
        opts=_serving_options(args),
        export=not args.no_export,
        force=args.force,
        overrides=tuple(args.overrides),
    )
    runtime = init_runtime()
    try:
        report = redistill(job, runtime)
    finally:
        shutdown_runtime(runtime)
    print(markdown(report))
    if job.export:
        _cmd_check_repo(argparse.Namespace(repo=args.repo))


def _cmd_versions(args: argparse.Namespace) -> None:
    from kdcontract.manifest import read_manifest
    from kdcontract.versions import promote, reject, split_versioned

    repo = Path(args.repo)
    if args.action == "list":
        for name, entry in read_manifest(repo).models.items():
            trial = f", candidate version {entry.candidate.version} on trial" if entry.candidate else ""
            print(f"{name}: current version {entry.version}{trial}")
        return
    if not args.model:
        raise UserError(f"versions {args.action} needs the candidate as NAME@VERSION")
    name, version = split_versioned(args.model)
    done = (promote if args.action == "promote" else reject)(repo, name, version)
    print(f"[versions] {args.action}: {'; '.join(done)}")


def _cmd_teacher_cache(args: argparse.Namespace) -> None:
    from training.runtime import init_runtime, shutdown_runtime
    from training.teacher_cache_bench import markdown, run_bench

    runtime = init_runtime()
    try:
        results = run_bench(Path(args.run), Path(args.out), args.epochs, runtime)
    finally:
        shutdown_runtime(runtime)
    print(markdown(results))


def _cmd_bring_back(args: argparse.Namespace) -> None:
    from training.bring_back import write_recipes, write_teacher_files

    out = Path(args.out)
    files = write_teacher_files(Path(args.run), out)
    for recipe in write_recipes(Path(args.run), out, files):
        print(f"[bring-back] {recipe}")


def _cmd_check_repo(args: argparse.Namespace) -> None:
    from training.check_repo import check_repository

    problems = check_repository(Path(args.repo))
    if problems:
        raise UserError(f"{args.repo} has {len(problems)} problem(s): " + "; ".join(problems))
    print(f"[check-repo] {args.repo}: every config matches its graph and every file its manifest hash")


def _cmd_timing_repo(args: argparse.Namespace) -> None:
    from training.timing_repo import write_timing_repo

    written = write_timing_repo(Path(args.repo), args.image_size)
    print(f"[timing-repo] {args.repo}: {'written' if written else 'up to date'}")


def _cmd_pruning_report(args: argparse.Namespace) -> None:
    from training.recipe import load_recipe
    from training.report import pruning_runs_markdown

    runs = [Path(r) for r in args.runs]
    missing = [str(r) for r in runs if not (r / "results.json").is_file()]
    if missing:
        raise UserError(f"no results.json in {', '.join(missing)}; train them first (python -m training all)")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    seeds = [load_recipe(str(r / "recipe.yaml")).compression.seed for r in runs]
    out.write_text(
        pruning_runs_markdown(
            [(s, json.loads((r / "results.json").read_text())) for s, r in zip(seeds, runs, strict=True)]
        )
    )
    print(out.read_text())


def add_serving_args(parser: argparse.ArgumentParser) -> None:
    """How an exported repository serves: the options of every command that exports."""
    parser.add_argument(
        "--flavor",
        choices=["cpu", "gpu"],
        default="cpu",
        help="cpu: Python backend + ONNX Runtime; gpu: onnxruntime_onnx with TensorRT FP16",
    )
    parser.add_argument("--instances", type=int, default=1, help="Triton instances per model")
    parser.add_argument("--intra-op-threads", type=int, default=2, help="ONNX Runtime threads per instance (cpu)")


def add_promote_arg(parser: argparse.ArgumentParser) -> None:
    """The one choice of the commands that export a whole run (redistill always writes a candidate)."""
    parser.add_argument(
        "--promote",
        action="store_true",
        help="where the repository already serves a student, make its new graph the current version at once "
        "(without it: a candidate beside the served version, which a rollout promotes; training/placement.py)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("all", help="train and evaluate teacher, students and ensemble; write results")
    run.add_argument("--recipe", default="digits", help="recipe name (training/recipes/) or path to a YAML file")
    run.add_argument("--out", help="run directory (default runs/<recipe name>)")
    run.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe value, e.g. --set student.train.epochs=3 (repeatable)",
    )
    run.add_argument(
        "--only",
        nargs="+",
        metavar="STAGE",
        help="train (or reuse) these stages and what they learn from, evaluate and report those alone "
        "(`make demo` serves the plain student this way before the teacher is trained)",
    )
    run.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    run.add_argument(
        "--export",
        metavar="REPO",
        help="then export the run into this Triton model repository, as `export` does (one process: torch "
        "and the data are loaded once)",
    )
    add_serving_args(run)
    add_promote_arg(run)
    run.set_defaults(func=_cmd_all)

    plan = commands.add_parser("plan", help="which stages `all` would train and which it would reuse")
    plan.add_argument("--recipe", default="digits", help="recipe name (training/recipes/) or path to a YAML file")
    plan.add_argument("--out", help="run directory (default runs/<recipe name>)")
    plan.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--exit-code", action="store_true", help="exit 1 when a stage is still to train (for scripts)")
    plan.set_defaults(func=_cmd_plan)

    check_data = commands.add_parser("check-data", help="load and split the recipe's data; print a summary")
    check_data.add_argument("--recipe", default="digits", help="recipe name (training/recipes/) or path to a YAML file")
    check_data.add_argument("--out", help="also write <out>/data_summary.json")
    check_data.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    check_data.set_defaults(func=_cmd_check_data)

    export = commands.add_parser("export", help="export a trained run into a Triton model repository")
    export.add_argument("--run", default="runs/digits", help="run directory written by `all`")
    export.add_argument("--repo", default="model_repository", help="Triton model repository to write")
    add_serving_args(export)
    add_promote_arg(export)
    export.set_defaults(func=_cmd_export)

    again = commands.add_parser(
        "redistill",
        help="distil a new student from captured traffic and the run's teacher; export it as a new version",
    )
    again.add_argument("--run", required=True, help="the trained run (its recipe, labelled split and teacher)")
    again.add_argument("--capture", required=True, help="capture directory or s3://bucket/prefix (KDSERVE_CAPTURE_*)")
    again.add_argument("--repo", required=True, help="the served repository the new version is exported into")
    again.add_argument("--out", help="where the new students go (default <run>/redistill)")
    again.add_argument("--seeds", type=int, nargs="+", default=[0], help="one student per seed; the first is exported")
    again.add_argument("--served-as", default=STUDENT_KD, help="served name the new student becomes a version of")
    again.add_argument("--against", help="served model it is compared with (default: the --served-as one)")
    add_serving_args(again)
    again.add_argument("--no-export", action="store_true", help="train and evaluate only")
    again.add_argument("--force", action="store_true", help="export even when the offline gate refuses the new student")
    again.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a value of the run's recipe for the new students, e.g. --set student.train.epochs=20",
    )
    again.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's choice)")
    again.set_defaults(func=_cmd_redistill)

    versions = commands.add_parser(
        "versions",
        help="a served model's current and candidate versions; end a candidate's trial by hand "
        "(the rollout controller does it when its gates decide)",
    )
    versions.add_argument("action", choices=["list", "promote", "reject"])
    versions.add_argument("model", nargs="?", help="the candidate, as NAME@VERSION (e.g. student_kd@2)")
    versions.add_argument("--repo", default="model_repository")
    versions.set_defaults(func=_cmd_versions)

    cache = commands.add_parser(
        "teacher-cache", help="a KD student's epoch time with and without the teacher's logits cached (make bench)"
    )
    cache.add_argument("--run", default="runs/digits", help="a trained run: its recipe and teacher")
    cache.add_argument("--out", default="runs/teacher-cache", help="where the students and the report go")
    cache.add_argument("--epochs", type=int, default=3)
    cache.set_defaults(func=_cmd_teacher_cache)

    back = commands.add_parser(
        "bring-back",
        help="a run's teacher written as a state_dict and a float NCHW ONNX graph, with a recipe per form and "
        "student that brings it back (make byo)",
    )
    back.add_argument("--run", default="runs/digits", help="a trained run: its recipe and teacher")
    back.add_argument("--out", default="runs/byo", help="where the files and recipes go")
    back.set_defaults(func=_cmd_bring_back)

    check = commands.add_parser("check-repo", help="check a repository's configs, graphs and hashes")
    check.add_argument("repo", nargs="?", default="model_repository")
    check.set_defaults(func=_cmd_check_repo)

    timing = commands.add_parser(
        "timing-repo", help="untrained ResNet18/ResNet50 at 224x224 in a repository, for the bench"
    )
    timing.add_argument("--repo", default="runs/timing-224", help="Triton model repository to write")
    timing.add_argument("--image-size", type=int, default=224)
    timing.set_defaults(func=_cmd_timing_repo)

    pruning = commands.add_parser(
        "pruning-report", help="the pruned student of several runs (e.g. pruning seeds) side by side"
    )
    pruning.add_argument("--runs", nargs="+", required=True, help="run directories with results.json")
    pruning.add_argument("--out", required=True, help="markdown file to write")
    pruning.set_defaults(func=_cmd_pruning_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; re-run the same command to resume from the last checkpoint", file=sys.stderr)
        return 130
    return 0
