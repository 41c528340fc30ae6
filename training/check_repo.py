"""`python -m training check-repo <repo>`: does the repository match its manifest and its graphs?

Parses every config.pbtxt with Triton's own protobuf schema, compares each served model's inputs
and outputs with its ONNX graph, checks every file against the manifest's sha256 and the labels
against the class names. Returns the list of problems (empty when the repository is sound).
"""

from __future__ import annotations

from pathlib import Path

import onnx
from google.protobuf import text_format
from pydantic import ValidationError
from tritonclient.grpc import model_config_pb2

from kdcontract.manifest import MANIFEST_NAME, ModelEntry, SchemaMismatch, file_sha256, read_manifest
from kdcontract.versions import loaded_by_config
from training.triton_repo import DTYPES, STALL_REASON, parse_config, stalling_queue_policy

ONNX_DTYPES = {onnx.TensorProto.UINT8: "UINT8", onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16"}


def _onnx_io(path: Path) -> dict[str, tuple[str, list]]:
    graph = onnx.load(str(path), load_external_data=False).graph
    io = {}
    for value in [*graph.input, *graph.output]:
        tensor = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        io[value.name] = (ONNX_DTYPES.get(tensor.elem_type, str(tensor.elem_type)), dims)
    return io


def _check_tensors(name: str, config, entry: ModelEntry, graph_io: dict | None) -> list[str]:
    problems = []
    declared = {t.name: t for t in [*config.input, *config.output]}
    for spec in (entry.input, entry.output):
        tensor = declared.get(spec.name)
        if tensor is None:
            problems.append(f"{name}: config.pbtxt lacks tensor '{spec.name}' named in the manifest")
            continue
        if tensor.data_type != model_config_pb2.DataType.Value(DTYPES[spec.dtype]) or list(tensor.dims) != spec.shape:
            problems.append(f"{name}: config tensor '{spec.name}' is not {spec.dtype} {spec.shape}")
        if graph_io is not None:
            if spec.name not in graph_io:
                problems.append(f"{name}: ONNX graph has no tensor '{spec.name}'")
                continue
            dtype, dims = graph_io[spec.name]
            # The graph's first axis is the dynamic batch; Triton's dims exclude it.
            if dtype != spec.dtype or dims[0] != -1 or dims[1:] != spec.shape:
                problems.append(
                    f"{name}: ONNX '{spec.name}' is {dtype} {dims}, config says {spec.dtype} [-1, *{spec.shape}]"
                )
    return problems


def check_repository(repo: Path) -> list[str]:
    repo = Path(repo)
    if not (repo / MANIFEST_NAME).is_file():
        return [f"{repo / MANIFEST_NAME} not found: export a run into this repository first"]
    try:
        manifest = read_manifest(repo)
    except SchemaMismatch as exc:
        return [str(exc)]
    except ValidationError as exc:
        return [f"{MANIFEST_NAME} does not match the schema: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}"]
    problems = []
    for name, entry in manifest.models.items():
        config_path = repo / name / "config.pbtxt"
        if not config_path.is_file():
            problems.append(f"{name}: {config_path} missing")
            continue
        try:
            config = parse_config(config_path.read_text())
        except text_format.ParseError as exc:
            problems.append(f"{name}: config.pbtxt does not parse: {exc}")
            continue
        if config.name != name:
            problems.append(f"{name}: config.pbtxt names the model '{config.name}'")
        if stalling_queue_policy(config):
            problems.append(f"{name}: dynamic_batching has a queue policy: {STALL_REASON}")
        version_dir = repo / name / str(entry.version)
        if not version_dir.is_dir():
            problems.append(f"{name}: version directory {version_dir} missing")
        loaded = loaded_by_config(config)
        if loaded is not None and not set(entry.loaded_versions()) <= set(loaded):
            problems.append(
                f"{name}: config.pbtxt loads versions {loaded}, the manifest serves {entry.loaded_versions()}"
            )
        if entry.candidate is not None and not (repo / name / str(entry.candidate.version)).is_dir():
            problems.append(f"{name}: candidate version directory {repo / name / str(entry.candidate.version)} missing")
        candidate_files = entry.candidate.files if entry.candidate is not None else {}
        for rel, digest in {**entry.files, **candidate_files}.items():
            path = repo / rel
            if not path.is_file():
                problems.append(f"{name}: {rel} missing")
            elif file_sha256(path) != digest:
                problems.append(f"{name}: {rel} does not match its sha256 in the manifest")
        onnx_path = version_dir / "model.onnx"
        graph_io = _onnx_io(onnx_path) if onnx_path.is_file() else None
        if entry.role not in ("ensemble", "fusion"):
            if graph_io is None:
                problems.append(f"{name}: {onnx_path} missing")
            problems += _check_tensors(name, config, entry, graph_io)
        if entry.role == "ensemble" and config.platform == "ensemble":
            steps = [step.model_name for step in config.ensemble_scheduling.step]
            if steps != entry.members:
                problems.append(f"{name}: ensemble steps {steps} differ from the manifest's members {entry.members}")
            problems += [
                f"{name}: step model '{s}' is not in the repository" for s in steps if s not in manifest.models
            ]
        labels = repo / name / "labels.txt"
        if labels.is_file() and labels.read_text().splitlines() != entry.class_names:
            problems.append(f"{name}: labels.txt differs from the manifest's class names")
    return problems
