"""`python -m training export`: a trained run -> a Triton model repository, with parity gates.

For every served model: ONNX export, parity against PyTorch on the held-out test images (export
is refused past the tolerance), an FP16 sibling whose agreement with fp32 gates GPU FP16 serving,
and INT8 siblings (the KD student, the pruned student, the fused ensemble) with their accuracy and
speed-up measured. Results go to
`<run>/export_report.{json,md}`; the repository gets configs, versions, labels and the manifest.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import torch
from tritonclient.grpc import model_config_pb2 as pb

import kdcontract.fusion
import kdcontract.ort_session
from kdcontract.drift import reference_from
from kdcontract.errors import UserError
from kdcontract.fusion import top1
from kdcontract.manifest import (
    MANIFEST_NAME,
    Cascade,
    DriftReference,
    Manifest,
    ModelEntry,
    TensorSpec,
    read_manifest,
    write_manifest,
)
from kdcontract.names import (
    ENSEMBLE,
    FUSED_ENSEMBLE,
    FUSION_STEP,
    INT8_SOURCES,
    INT8_SUFFIX,
    MULTIHEAD,
    SCHEDULER_ENSEMBLE,
    STUDENT_KD,
    STUDENT_PLAIN,
    STUDENT_PRUNED,
    TEACHER,
    VARIANT_PREFIX,
    int8_name,
)
from kdcontract.ort_session import open_session
from kdcontract.pareto import pareto_rows, write_pareto
from training.checkpoint import ModelSpec, load_model
from training.data import SplitData, iterate_batches, load_data, validation_as_served
from training.evaluate import FusedEnsemble, expected_calibration_error, predict_logits
from training.offline_gate import offline_gate
from training.onnx_front import with_input_size
from training.onnx_tools import (
    INPUT_NAME,
    OUTPUT_NAME,
    convert_fp16,
    export_onnx,
    graph_key,
    latency_ms,
    parity,
    quantize_int8,
    require_parity,
    run_logits,
)
from training.placement import NewVersion, place
from training.recipe import load_recipe
from training.teachers import BROUGHT, run_teacher
from training.triton_repo import (
    BACKEND_DIR,
    ServingOptions,
    ensemble_config,
    fusion_config,
    model_config,
    write_model,
)

FP32_MAX_ABS_DIFF = 1e-3  # ONNX Runtime vs PyTorch on the CPU, logits of magnitude ~10
FP32_MIN_AGREEMENT = 0.999
FP16_MIN_AGREEMENT = 0.99  # the gate for serving FP16 (TensorRT) on a GPU
# Two Triton-side ensembles of the variants (the gateway's alias `ensemble_triton` picks the first):
# the members and their fusion exported as one graph (one Triton call, one ONNX Runtime run; one
# TensorRT engine on GPUs), and Triton's ensemble scheduler calling each member and then a fusion step.
# The bench measures them side by side.
PROBABILITIES = "probabilities"
PARETO_REPEATS = 100
PARETO_NOTE = (
    "Every served model on the held-out test split. In-process: ONNX Runtime, one image, 2 threads, median of "
    "100 runs at export. The cascade's cost is the student's plus the teacher's for the share it escalated. "
    "Served latency (through the gateway) is filled in by `make bench` (benchmarks/pareto.md). "
    "Frontier: no other model is both faster and more accurate."
)
# The Python-backend model and the kdcontract modules it runs with, shipped beside it (see its docstring).
BACKEND_FILES = {
    "model.py": BACKEND_DIR / "model.py",
    "kd_fusion.py": Path(kdcontract.fusion.__file__),
    "kd_ort_session.py": Path(kdcontract.ort_session.__file__),
}


def _served_models(run: Path, results: dict) -> list[str]:
    """The served models the run trained (a run of some stages, `training all --only`, serves those)."""
    trained = results["models"]
    names = [n for n in (TEACHER, STUDENT_KD, STUDENT_PLAIN) if n in trained]
    names += sorted(n for n in trained if n.startswith(VARIANT_PREFIX))
    names += [n for n in (MULTIHEAD, STUDENT_PRUNED) if n in trained]
    if not names:
        raise UserError(f"run {run} trained none of the served models; run `python -m training all --out {run}`")
    if results.get("compression", {}).get("kept_step") == 0:
        print(f"[export] WARNING: compression kept no pruning step; {STUDENT_PRUNED} is not exported", flush=True)
    missing = [n for n in names if not (run / n / "model.pt").exists() and not (run / n / BROUGHT).exists()]
    if missing:
        raise UserError(f"run {run} lacks trained models {missing}; run `python -m training all --out {run}` first")
    return names


def as_numpy(dataset) -> tuple[np.ndarray, np.ndarray]:
    images, labels = zip(*iterate_batches(dataset, 512), strict=True)
    return torch.cat(images).numpy(), torch.cat(labels).numpy()


def _tensors(spec: ModelSpec) -> tuple[TensorSpec, TensorSpec]:
    size = spec.image_size
    out_shape = [spec.heads, spec.num_classes] if spec.heads else [spec.num_classes]
    return TensorSpec(name=INPUT_NAME, dtype="UINT8", shape=[size, size, 3]), TensorSpec(
        name=OUTPUT_NAME, dtype="FP32", shape=out_shape
    )


def _accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((top1(logits) == labels).mean())


def served_config(name: str, spec: ModelSpec, flavor: str, opts: ServingOptions) -> pb.ModelConfig:
    """The Triton config a model of `spec` is served with (before its version policy is set)."""
    inp, out = _tensors(spec)
    return model_config(name, inp, out, flavor, opts)


def write_served_model(
    repo: Path,
    name: str,
    role: str,
    spec: ModelSpec,
    onnx_path: Path,
    flavor: str,
    opts: ServingOptions,
    source: str,
    precision: str = "fp32",
    metrics: dict | None = None,
    also_loaded: tuple[int, ...] = (),
    validation: np.ndarray | None = None,
) -> ModelEntry:
    """A new version of `name` (loaded alone, or beside `also_loaded`: the version a candidate is tried against),
    with the drift reference of its graph's answers on the `validation` images when given."""
    inp, out = _tensors(spec)
    files = {"model.onnx": onnx_path}
    if flavor == "cpu":
        files.update(BACKEND_FILES)
    config = served_config(name, spec, flavor, opts)
    version, hashes = write_model(repo, name, config, files, spec.class_names, opts.keep_versions, also_loaded)
    return ModelEntry(
        name=name,
        role=role,
        arch=spec.arch,
        version=version,
        backend="python+onnxruntime" if flavor == "cpu" else "onnxruntime_onnx+tensorrt_fp16",
        precision=precision,
        input=inp,
        output=out,
        heads=spec.heads,
        class_names=spec.class_names,
        temperature=spec.temperature,
        metrics=metrics if metrics is not None else spec.metrics,
        files=hashes,
        source=source,
        drift_reference=drift_reference(onnx_path, validation, spec.temperature) if validation is not None else None,
    )


def _brought_onnx_graph(folder: Path, data: SplitData, out: Path) -> tuple[ModelSpec, str]:
    """A teacher brought as ONNX, served as the graph it was distilled from: the brought graph behind kdserve's
    uint8 NHWC input (`training.onnx_front`), its weights untouched, written to `out`; its spec and source."""
    brought = json.loads((folder / BROUGHT).read_text())
    teacher = run_teacher(folder, data.num_classes)
    onnx.save(with_input_size(teacher.graph, data.image_size), str(out))
    spec = ModelSpec(
        arch=f"onnx:{Path(brought['file']).name}",
        num_classes=data.num_classes,
        small_stem=False,
        image_size=data.image_size,
        mean=tuple(brought["mean"]),
        std=tuple(brought["std"]),
        class_names=data.class_names,
        role="teacher",
        temperature=brought.get("temperature", 1.0),
        metrics=brought.get("metrics", {}),
    )
    return spec, brought["file"]


def drift_reference(onnx_path: Path, validation: np.ndarray, temperature: float) -> DriftReference | None:
    """What the exported graph answers on the validation images, calibrated as served (`kdcontract.drift`);
    None for a multi-head graph (its heads are fused in the gateway)."""
    logits = run_logits(open_session(onnx_path), validation)
    return reference_from(kdcontract.fusion.softmax(logits, temperature)) if logits.ndim == 2 else None


def int8_sibling(
    name: str,
    fp32_onnx: Path,
    data: SplitData,
    test: tuple[np.ndarray, np.ndarray],
    fp32_logits: np.ndarray,
    temperature: float | None,
) -> tuple[Path, dict]:
    """The INT8 graph of `fp32_onnx` and its report; `temperature` None: the graph outputs probabilities."""
    train_images, _ = as_numpy(data.train)
    # Calibrate on a fixed, seeded sample of training images (never the test split).
    pick = np.random.default_rng(0).choice(len(train_images), size=min(512, len(train_images)), replace=False)
    int8_path = fp32_onnx.with_name(f"{name}_int8.onnx")
    quantize_int8(fp32_onnx, int8_path, train_images[np.sort(pick)])
    images, labels = test
    fp32_sess, int8_sess = open_session(fp32_onnx), open_session(int8_path)
    int8_logits = run_logits(int8_sess, images)
    speed = {}
    for batch in (1, 32):
        sample = images[:batch]
        fp32_ms, int8_ms = latency_ms(fp32_sess, sample), latency_ms(int8_sess, sample)
        speed[f"batch_{batch}"] = {
            "fp32_ms": fp32_ms["p50"],
            "int8_ms": int8_ms["p50"],
            "speedup": fp32_ms["p50"] / int8_ms["p50"],
        }
    outputs = torch.from_numpy(int8_logits)
    probs = outputs if temperature is None else torch.softmax(outputs / temperature, dim=-1)
    report = {
        "fp32_top1": _accuracy(fp32_logits, labels),
        "int8_top1": _accuracy(int8_logits, labels),
        "int8_ece": expected_calibration_error(probs, torch.from_numpy(labels)),
        "agreement_with_fp32": parity(fp32_logits, int8_logits).top1_agreement,
        "latency_p50": speed,
        "onnx_bytes": int8_path.stat().st_size,
        "latency_ms_batch1": latency_ms(int8_sess, images[:1], repeats=PARETO_REPEATS)["p50"],
    }
    report["top1_drop_points"] = 100 * (report["fp32_top1"] - report["int8_top1"])
    return int8_path, report


def export_graph(
    name: str,
    model: torch.nn.Module,
    image_size: int,
    onnx_path: Path,
    data: SplitData,
    test: tuple[np.ndarray, np.ndarray],
    flavor: str,
    output_name: str = OUTPUT_NAME,
    constants: tuple = (),
) -> tuple[dict, np.ndarray]:
    """Export one graph (or keep the one exported from the same weights before) and gate it: ONNX vs
    PyTorch on the test images, and FP16 vs fp32 for GPU serving.

    Returns the parity report and the ONNX outputs on the test images.
    """
    kept = export_onnx(model, image_size, onnx_path, output_name, graph_key(model, image_size, output_name, constants))
    torch_out = predict_logits(model, data.test)[0].numpy()
    onnx_session = open_session(onnx_path)
    onnx_out = run_logits(onnx_session, test[0])
    fp32 = parity(torch_out, onnx_out)
    require_parity(name, fp32, FP32_MAX_ABS_DIFF, FP32_MIN_AGREEMENT)
    fp16_path = onnx_path.with_name(f"{onnx_path.stem}_fp16.onnx")
    convert_fp16(onnx_path, fp16_path)
    fp16 = parity(onnx_out, run_logits(open_session(fp16_path), test[0]))
    if flavor == "gpu" and fp16.top1_agreement < FP16_MIN_AGREEMENT:
        raise UserError(
            f"{name}: FP16 agrees with fp32 on {fp16.top1_agreement:.2%} of test images "
            f"(< {FP16_MIN_AGREEMENT:.0%}); not safe to serve in FP16"
        )
    print(
        f"[export] {name}: max |diff| {fp32.max_abs_diff:.1e}, agreement {fp32.top1_agreement:.2%}, "
        f"fp16 agreement {fp16.top1_agreement:.2%}{' (graph kept: same weights)' if kept else ''}",
        flush=True,
    )
    report = {
        "graph_kept": kept,
        "onnx_vs_torch": fp32.as_dict(),
        "fp16_vs_fp32": fp16.as_dict(),
        "onnx_bytes": onnx_path.stat().st_size,
        # In-process cost of one image, for the accuracy-cost report.
        "latency_ms_batch1": latency_ms(onnx_session, test[0][:1], repeats=PARETO_REPEATS)["p50"],
    }
    return report, onnx_out


def export_run(
    run: Path, repo: Path, flavor: str = "cpu", opts: ServingOptions | None = None, promote: bool = False
) -> dict:
    """The run's served models into `repo`: where it already serves one, the new graph is kept, tried as a
    candidate or made current by `training.placement` (`promote`: a student's new graph current at once)."""
    opts = opts or ServingOptions()
    results_path = run / "results.json"
    if not results_path.exists():
        raise UserError(f"{results_path} not found; train first: python -m training all --out {run}")
    results = json.loads(results_path.read_text())
    recipe = load_recipe(str(run / "recipe.yaml"))
    data = load_data(recipe.data)
    test = as_numpy(data.test)
    validation = validation_as_served(recipe.data, as_numpy(data.val)[0])  # each version's drift reference
    onnx_dir = run / "onnx"
    onnx_dir.mkdir(parents=True, exist_ok=True)
    repo.mkdir(parents=True, exist_ok=True)
    served = read_manifest(repo) if (repo / MANIFEST_NAME).is_file() else None
    entries: dict[str, ModelEntry] = {}
    report: dict = {"flavor": flavor, "run": str(run), "test_images": len(test[0]), "models": {}}
    tried: set[str] = set()  # the names this export put a candidate beside

    def judge(name: str, graph: Path) -> dict:
        """The offline gate of `training redistill`, for an exported student that would be a candidate: paired
        with the served version on the held-out split; refused (UserError) when surely worse."""
        version = served.models[name].version
        answers = {
            "candidate": top1(run_logits(open_session(graph), test[0])),
            "served": top1(run_logits(open_session(repo / name / str(version) / "model.onnx"), test[0])),
            "teacher": top1(run_logits(open_session(onnx_dir / f"{TEACHER}.onnx"), test[0])),
        }
        gate = recipe.redistill
        verdict = offline_gate(
            answers["candidate"], answers["served"], test[1], answers["teacher"], gate.max_top1_drop, gate.alpha
        )
        print(
            f"[export] {name}: offline gate {'passed' if verdict.passed else 'REFUSED'}: {verdict.reason}", flush=True
        )
        if not verdict.passed:
            raise UserError(
                f"{name} is not exported as a candidate: {verdict.reason} (export --promote serves it at once)"
            )
        return {"passed": True, "reason": verdict.reason, **verdict.figures}

    def export(name: str, role: str, spec: ModelSpec, graph: Path, source: str, **fields) -> None:
        def write(also_loaded: tuple[int, ...]) -> ModelEntry:
            return write_served_model(
                repo, name, role, spec, graph, flavor, opts, source, also_loaded=also_loaded, validation=validation,
                **fields,
            )  # fmt: skip

        before = served.models.get(name) if served is not None else None
        version = NewVersion(graph, served_config(name, spec, flavor, opts), spec.class_names)
        # The student's own graph is judged; its INT8 sibling follows it. Without the run's teacher graph (a run
        # of plain students) there is no agreement to state, and the online gates judge alone.
        gated = not name.endswith(INT8_SUFFIX) and TEACHER in entries
        entries[name] = place(
            repo, name, before, version, write, promote, (lambda: judge(name, graph)) if gated else None
        )
        if entries[name].candidate is not None and (before is None or before.candidate != entries[name].candidate):
            tried.add(name)

    for name in _served_models(run, results):
        if (run / name / BROUGHT).exists():  # a brought ONNX teacher
            spec, source = _brought_onnx_graph(run / name, data, onnx_dir / f"{name}.onnx")
            export(name, "teacher", spec, onnx_dir / f"{name}.onnx", source)
            report["models"][name] = {"version": entries[name].version, "brought": True}
            continue
        model, spec, _ = load_model(run / name / "model.pt")
        onnx_path = onnx_dir / f"{name}.onnx"
        report["models"][name], onnx_logits = export_graph(name, model, spec.image_size, onnx_path, data, test, flavor)
        role = spec.role if name not in (STUDENT_KD, STUDENT_PLAIN) else "student"
        export(name, role, spec, onnx_path, str(run / name / "model.pt"))
        report["models"][name]["version"] = entries[name].version

        if name in INT8_SOURCES and flavor == "cpu":
            int8_path, int8 = int8_sibling(name, onnx_path, data, test, onnx_logits, spec.temperature)
            quantized = int8_name(name)
            metrics = {**spec.metrics, "top1": int8["int8_top1"], "ece": int8["int8_ece"]}
            export(quantized, "quantized", spec, int8_path, str(int8_path), precision="int8", metrics=metrics)
            report["models"][quantized] = int8
            _print_int8(quantized, int8)

    members = [n for n in entries if n.startswith(VARIANT_PREFIX)]
    if members:
        # Both apply the fusion of training's report, so its test metrics are theirs.
        measured = results["models"].get(ENSEMBLE, {})
        metrics = {k: float(v) for k, v in measured.items() if isinstance(v, float | int)}
        temperatures = [entries[m].temperature for m in members]
        fused = FusedEnsemble([load_model(run / m / "model.pt")[0] for m in members], temperatures)
        onnx_path = onnx_dir / f"{FUSED_ENSEMBLE}.onnx"
        image_size = entries[members[0]].input.shape[0]
        report["models"][FUSED_ENSEMBLE], fused_probs = export_graph(
            FUSED_ENSEMBLE, fused, image_size, onnx_path, data, test, flavor, PROBABILITIES, tuple(temperatures)
        )
        # The exported graph is the ensemble training evaluated: same top-1 on the same test split.
        report["models"][FUSED_ENSEMBLE]["test_top1"] = _accuracy(fused_probs, test[1])
        _write_fused_ensemble(repo, FUSED_ENSEMBLE, members, entries, onnx_path, flavor, opts, metrics)
        if flavor == "cpu":
            # The ensemble's cost at 8x8 is reading three members' weights: INT8 reads a quarter of them.
            int8_path, int8 = int8_sibling(FUSED_ENSEMBLE, onnx_path, data, test, fused_probs, None)
            quantized = int8_name(FUSED_ENSEMBLE)
            int8_metrics = {**metrics, "top1": int8["int8_top1"], "ece": int8["int8_ece"]}
            _write_fused_ensemble(repo, quantized, members, entries, int8_path, flavor, opts, int8_metrics, "int8")
            report["models"][quantized] = int8
            _print_int8(quantized, int8)
        _write_scheduler_ensemble(repo, members, entries, opts, metrics)
    cascade = cascade_entry(results, entries)
    if cascade is not None and cascade.student in tried:
        # Fitted for the candidate: it waits beside it until promotion; the served cascade stays the one served.
        student = entries[cascade.student]
        candidate = student.candidate.model_copy(update={"cascade": cascade})
        entries[cascade.student] = student.model_copy(update={"candidate": candidate})
        cascade = served.cascade if served is not None else None
    manifest = Manifest(
        flavor=flavor,
        recipe=recipe.name,
        dataset=data.description,
        split=recipe.data.split,
        preprocessing=data.preprocessing,
        models=entries,
        cascade=cascade,
    )
    write_manifest(repo, manifest)
    _write_report(run, report)
    rows = pareto_rows(results, report)
    write_pareto(rows, run, f"recipe {recipe.name}: accuracy vs. in-process cost", PARETO_NOTE, run / "results.md")
    return report


def _ensemble_entry(name: str, backend: str, members: list[str], first: ModelEntry, version: int, **fields):
    return ModelEntry(
        name=name,
        role="ensemble",
        arch=f"{len([m for m in members if m != FUSION_STEP])} x {first.arch}",
        version=version,
        backend=backend,
        input=first.input,
        output=TensorSpec(name=PROBABILITIES, dtype="FP32", shape=first.output.shape),
        class_names=first.class_names,
        members=members,
        **fields,
    )


def _print_int8(name: str, int8: dict) -> None:
    print(
        f"[export] {name}: top-1 {int8['int8_top1']:.2%} (fp32 {int8['fp32_top1']:.2%}), "
        f"speed-up x{int8['latency_p50']['batch_1']['speedup']:.2f} at batch 1",
        flush=True,
    )


def _write_fused_ensemble(
    repo: Path,
    name: str,
    members: list[str],
    entries: dict[str, ModelEntry],
    onnx_path: Path,
    flavor: str,
    opts: ServingOptions,
    metrics: dict,
    precision: str = "fp32",
) -> None:
    first = entries[members[0]]
    out = TensorSpec(name=PROBABILITIES, dtype="FP32", shape=first.output.shape)
    files = {"model.onnx": onnx_path}
    if flavor == "cpu":
        files.update(BACKEND_FILES)
    config = model_config(name, first.input, out, flavor, opts)
    version, hashes = write_model(repo, name, config, files, first.class_names, opts.keep_versions)
    entries[name] = _ensemble_entry(
        name, first.backend, members, first, version, files=hashes, metrics=metrics, precision=precision
    )


def _write_scheduler_ensemble(
    repo: Path, members: list[str], entries: dict[str, ModelEntry], opts: ServingOptions, metrics: dict
) -> None:
    first = entries[members[0]]
    temperatures = [entries[m].temperature for m in members]
    max_batch = opts.max_batch_size
    version, hashes = write_model(
        repo,
        FUSION_STEP,
        fusion_config(FUSION_STEP, members, first.output, temperatures, max_batch),
        BACKEND_FILES,
        None,
        opts.keep_versions,
    )
    probs = TensorSpec(name="probabilities", dtype="FP32", shape=first.output.shape)
    entries[FUSION_STEP] = ModelEntry(
        name=FUSION_STEP,
        role="fusion",
        arch="mean of calibrated probabilities",
        version=version,
        backend="python",
        input=TensorSpec(name="logits_0", dtype="FP32", shape=first.output.shape),
        output=probs,
        class_names=first.class_names,
        members=members,
        files=hashes,
    )
    version, hashes = write_model(
        repo,
        SCHEDULER_ENSEMBLE,
        ensemble_config(SCHEDULER_ENSEMBLE, FUSION_STEP, members, first.input, first.output, max_batch),
        {},
        first.class_names,
        opts.keep_versions,
    )
    entries[SCHEDULER_ENSEMBLE] = _ensemble_entry(
        SCHEDULER_ENSEMBLE, "ensemble", [*members, FUSION_STEP], first, version, files=hashes, metrics=metrics
    )


def cascade_entry(results: dict, entries: dict[str, ModelEntry]) -> Cascade | None:
    measured = results["models"].get("cascade")
    if measured is None:
        return None
    student, teacher = measured["members"]
    if student not in entries or teacher not in entries:
        raise UserError(f"the cascade needs {student} and {teacher} served; export serves {', '.join(entries)}")
    return Cascade(
        student=student,
        teacher=teacher,
        threshold=measured["threshold"],
        metrics={k: float(v) for k, v in measured.items() if isinstance(v, float | int) and k != "threshold"},
    )


def _write_report(run: Path, report: dict) -> None:
    (run / "export_report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [
        f"# Export report ({report['flavor']} flavour)",
        "",
        f"Parity on the {report['test_images']} held-out test images.",
        "",
        "| model | ONNX vs PyTorch max abs diff | top-1 agreement | FP16 vs FP32 agreement | FP16 max abs diff |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, m in report["models"].items():
        if "onnx_vs_torch" in m:
            a, h = m["onnx_vs_torch"], m["fp16_vs_fp32"]
            lines.append(
                f"| {name} | {a['max_abs_diff']:.2e} | {a['top1_agreement']:.2%} | "
                f"{h['top1_agreement']:.2%} | {h['max_abs_diff']:.2e} |"
            )
    for name, m in report["models"].items():
        if "int8_top1" in m:
            lines += [
                "",
                f"## {name}: INT8 static quantisation (QDQ, per-channel, QUInt8 activations)",
                "",
                f"Top-1 {m['int8_top1']:.2%} vs fp32 {m['fp32_top1']:.2%} (drop {m['top1_drop_points']:.2f} points); "
                f"agreement with fp32 {m['agreement_with_fp32']:.2%}.",
                "",
                "| batch | fp32 p50 ms | int8 p50 ms | speed-up |",
                "|---:|---:|---:|---:|",
            ]
            for batch, s in m["latency_p50"].items():
                lines.append(
                    f"| {batch.split('_')[1]} | {s['fp32_ms']:.2f} | {s['int8_ms']:.2f} | x{s['speedup']:.2f} |"
                )
    (run / "export_report.md").write_text("\n".join(lines) + "\n")
