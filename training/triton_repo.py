"""Writes the Triton model repository: configs, numbered versions, labels, the ensemble, the manifest.

Flavours (DESIGN.md): `cpu` serves each ONNX graph from a Python-backend `model.py` running ONNX
Runtime (Triton from nvidia-pytriton has no ONNX Runtime backend); `gpu` uses Triton's native
`onnxruntime_onnx` backend with the TensorRT accelerator in FP16, for NVIDIA's Triton container.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from training.manifest import TensorSpec

BACKEND_DIR = Path(__file__).parent / "triton_backend"
DTYPES = {"UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32", "FP16": "TYPE_FP16"}


@dataclass
class ServingOptions:
    """Serving knobs written into every config.pbtxt."""

    max_batch_size: int = 64
    preferred_batch_sizes: list[int] = field(default_factory=lambda: [8, 16, 32])
    max_queue_delay_us: int = 2000  # how long a request may wait for others to batch with
    max_queue_size: int = 256  # beyond this, requests are rejected at once instead of piling up
    queue_timeout_us: int = 5_000_000  # a request waiting longer is rejected, not served late
    instances: int = 1
    intra_op_threads: int = 2
    keep_versions: int = 3


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _dims(shape: list[int]) -> str:
    return "[ " + ", ".join(str(d) for d in shape) + " ]"


def _tensor(tensor: TensorSpec) -> str:
    return f'  {{ name: "{tensor.name}" data_type: {DTYPES[tensor.dtype]} dims: {_dims(tensor.shape)} }}'


def _parameters(params: dict[str, str]) -> list[str]:
    return [f'parameters: {{ key: "{k}" value: {{ string_value: {json.dumps(v)} }} }}' for k, v in params.items()]


def _batching(opts: ServingOptions) -> list[str]:
    preferred = [b for b in opts.preferred_batch_sizes if b <= opts.max_batch_size]
    return [
        "dynamic_batching {",
        f"  preferred_batch_size: {_dims(preferred)}",
        f"  max_queue_delay_microseconds: {opts.max_queue_delay_us}",
        "  default_queue_policy {",
        "    timeout_action: REJECT",
        f"    default_timeout_microseconds: {opts.queue_timeout_us}",
        "    allow_timeout_override: true",
        f"    max_queue_size: {opts.max_queue_size}",
        "  }",
        "}",
    ]


def _warmup(inp: TensorSpec) -> list[str]:
    # One zero image at load time, so the first real request does not pay for lazy initialisation.
    return [
        "model_warmup [ {",
        '  name: "zeros" batch_size: 1',
        f'  inputs {{ key: "{inp.name}" value: {{ data_type: {DTYPES[inp.dtype]} dims: {_dims(inp.shape)} '
        "zero_data: true } }",
        "} ]",
    ]


def model_config(name: str, inp: TensorSpec, out: TensorSpec, flavor: str, opts: ServingOptions) -> str:
    lines = [f'name: "{name}"']
    if flavor == "cpu":
        lines.append('backend: "python"')
    else:
        lines += ['platform: "onnxruntime_onnx"', 'default_model_filename: "model.onnx"']
    lines += [
        f"max_batch_size: {opts.max_batch_size}",
        "input [",
        _tensor(inp),
        "]",
        "output [",
        _tensor(out),
        "]",
        "version_policy: { latest: { num_versions: 1 } }",
        *_batching(opts),
    ]
    if flavor == "cpu":
        lines.append(f"instance_group [ {{ count: {opts.instances} kind: KIND_CPU }} ]")
        lines += _parameters({"intra_op_threads": str(opts.intra_op_threads), "onnx_file": "model.onnx"})
    else:
        lines += [
            f"instance_group [ {{ count: {opts.instances} kind: KIND_GPU }} ]",
            "optimization { execution_accelerators { gpu_execution_accelerator : [ {",
            '  name : "tensorrt"',
            '  parameters { key: "precision_mode" value: "FP16" }',
            '  parameters { key: "max_workspace_size_bytes" value: "1073741824" }',
            '  parameters { key: "trt_engine_cache_enable" value: "1" }',
            "} ] } }",
        ]
    lines += _warmup(inp)
    return "\n".join(lines) + "\n"


def fusion_config(name: str, members: list[str], out: TensorSpec, temperatures: list[float], max_batch: int) -> str:
    logits_shape = out.shape
    lines = [f'name: "{name}"', 'backend: "python"', f"max_batch_size: {max_batch}", "input ["]
    lines += [
        ",\n".join(
            f'  {{ name: "logits_{i}" data_type: TYPE_FP32 dims: {_dims(logits_shape)} }}' for i in range(len(members))
        ),
        "]",
        "output [",
        f'  {{ name: "probabilities" data_type: TYPE_FP32 dims: {_dims(logits_shape)} }}',
        "]",
        "instance_group [ { count: 1 kind: KIND_CPU } ]",
        *_parameters({"temperatures": json.dumps(temperatures), "members": json.dumps(members)}),
    ]
    return "\n".join(lines) + "\n"


def ensemble_config(
    name: str, fusion: str, members: list[str], inp: TensorSpec, out: TensorSpec, max_batch: int
) -> str:
    steps = []
    for i, member in enumerate(members):
        steps.append(
            f'  {{ model_name: "{member}" model_version: -1 input_map {{ key: "{inp.name}" value: "{inp.name}" }} '
            f'output_map {{ key: "logits" value: "logits_{i}" }} }}'
        )
    fusion_inputs = " ".join(f'input_map {{ key: "logits_{i}" value: "logits_{i}" }}' for i in range(len(members)))
    steps.append(
        f'  {{ model_name: "{fusion}" model_version: -1 {fusion_inputs} '
        'output_map { key: "probabilities" value: "probabilities" } }'
    )
    lines = [
        f'name: "{name}"',
        'platform: "ensemble"',
        f"max_batch_size: {max_batch}",
        "input [",
        _tensor(inp),
        "]",
        "output [",
        f'  {{ name: "probabilities" data_type: TYPE_FP32 dims: {_dims(out.shape)} }}',
        "]",
        "ensemble_scheduling { step [",
        ",\n".join(steps),
        "] }",
    ]
    return "\n".join(lines) + "\n"


def existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def write_model(
    repo: Path, name: str, config: str, files: dict[str, Path], labels: list[str] | None, keep_versions: int
) -> tuple[int, dict[str, str]]:
    """Add a new numbered version holding `files`, keep the newest `keep_versions`, write config and labels.

    Returns the new version and {path relative to the repository: sha256} for the manifest.
    """
    model_dir = repo / name
    version = (existing_versions(model_dir) or [0])[-1] + 1
    version_dir = model_dir / str(version)
    version_dir.mkdir(parents=True)
    for target, source in files.items():
        shutil.copyfile(source, version_dir / target)
    for old in existing_versions(model_dir)[:-keep_versions]:
        shutil.rmtree(model_dir / str(old))
    (model_dir / "config.pbtxt").write_text(config)
    if labels is not None:
        (model_dir / "labels.txt").write_text("\n".join(labels) + "\n")
    hashed = [version_dir / t for t in files] + [model_dir / "config.pbtxt"]
    if labels is not None:
        hashed.append(model_dir / "labels.txt")
    return version, {str(p.relative_to(repo)): sha256(p) for p in hashed}
