"""Writes the Triton model repository's models: configs, numbered versions, labels, the ensembles' configs.

(`training.export` decides what is served and writes the manifest through `kdcontract.manifest`.)

Configs are `model_config_pb2.ModelConfig` messages written with protobuf's `text_format`: Triton's
own schema, so a config that Triton would refuse cannot be written (and `check_repo` reads it back
with the same schema).

Flavours (DESIGN.md): `cpu` serves each ONNX graph from a Python-backend `model.py` running ONNX
Runtime (Triton from nvidia-pytriton has no ONNX Runtime backend); `gpu` uses Triton's native
`onnxruntime_onnx` backend with the TensorRT accelerator in FP16, for NVIDIA's Triton container.

Batching (measured on Triton 2.51, the embedded binary and NVIDIA's 24.10 container alike): any
`default_queue_policy` makes ~5% of lone requests wait ~500 ms in Triton's queue, and preferred
batch sizes with a queue delay make every lone request wait the whole delay. So the configs carry
`dynamic_batching` with neither: a free instance takes whatever is queued at once (batches still
form under load, as the bench's batch-size column shows) and bounded queueing is the gateway's
admission control. `check_repo` refuses a queue policy for that reason.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as pb

from kdcontract.manifest import TensorSpec, file_sha256
from kdcontract.versions import STAGING_PREFIX, load_only, replace_file

BACKEND_DIR = Path(__file__).parent / "triton_backend"
DTYPES = {"UINT8": "TYPE_UINT8", "FP32": "TYPE_FP32", "FP16": "TYPE_FP16"}
STALL_REASON = (
    "Triton 2.51 (embedded and NVIDIA 24.10) makes ~5% of requests wait ~500 ms in the queue when "
    "dynamic_batching has a queue policy; bound the queue in the gateway (admission control) instead"
)


@dataclass
class ServingOptions:
    """Serving knobs written into every config.pbtxt."""

    max_batch_size: int = 64
    # A lone request never waits for company: 0 keeps the measured p50 (a delay adds itself to every
    # request at low load). Raise it only where batches are worth a fixed wait (a busy GPU).
    max_queue_delay_us: int = 0
    instances: int = 1
    intra_op_threads: int = 2
    # ONNX Runtime's pool threads spin after each run by default. Measured here at 16 clients: with
    # spinning the gateway in front served 248-278 img/s, without 336-417 (same Triton throughput):
    # the spinning threads take the cores the gateway needs. Worth it only on dedicated cores.
    allow_spinning: bool = False
    keep_versions: int = 3


def _dtype(name: str) -> int:
    return pb.DataType.Value(DTYPES[name])


def _add_tensor(field, spec: TensorSpec) -> None:
    field.add(name=spec.name, data_type=_dtype(spec.dtype), dims=spec.shape)


def _ort_parameters(opts: ServingOptions) -> dict[str, str]:
    return {"intra_op_threads": str(opts.intra_op_threads), "allow_spinning": str(int(opts.allow_spinning))}


def _set_parameters(config: pb.ModelConfig, params: dict[str, str]) -> None:
    for key, value in params.items():
        config.parameters[key].string_value = value


def _batched(config: pb.ModelConfig, opts: ServingOptions) -> None:
    config.max_batch_size = opts.max_batch_size
    config.dynamic_batching.max_queue_delay_microseconds = opts.max_queue_delay_us
    # Present even when 0, so the config reads as "dynamic batching on, no delay" (proto3 drops zeros).
    config.dynamic_batching.SetInParent()


def _warmup(config: pb.ModelConfig, inp: TensorSpec) -> None:
    # One zero image at load time, so the first real request does not pay for lazy initialisation.
    warmup = config.model_warmup.add(name="zeros", batch_size=1)
    warmup.inputs[inp.name].data_type = _dtype(inp.dtype)
    warmup.inputs[inp.name].dims.extend(inp.shape)
    warmup.inputs[inp.name].zero_data = True


def model_config(name: str, inp: TensorSpec, out: TensorSpec, flavor: str, opts: ServingOptions) -> pb.ModelConfig:
    """One served ONNX graph: Python backend + ONNX Runtime (`cpu`) or onnxruntime_onnx + TensorRT (`gpu`)."""
    config = pb.ModelConfig(name=name)
    _add_tensor(config.input, inp)
    _add_tensor(config.output, out)
    _batched(config, opts)
    if flavor == "cpu":
        config.backend = "python"
        config.instance_group.add(count=opts.instances, kind=pb.ModelInstanceGroup.KIND_CPU)
        _set_parameters(config, {**_ort_parameters(opts), "onnx_file": "model.onnx"})
    else:
        config.platform = "onnxruntime_onnx"
        config.default_model_filename = "model.onnx"
        config.instance_group.add(count=opts.instances, kind=pb.ModelInstanceGroup.KIND_GPU)
        trt = config.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
        trt.parameters.update(
            {"precision_mode": "FP16", "max_workspace_size_bytes": "1073741824", "trt_engine_cache_enable": "1"}
        )
    _warmup(config, inp)
    return config


def fusion_config(name: str, members: list[str], out: TensorSpec, temperatures: list[float], max_batch: int):
    """The last step of the scheduler ensemble: calibrated members' logits -> mean probabilities."""
    config = pb.ModelConfig(name=name, backend="python", max_batch_size=max_batch)
    for i in range(len(members)):
        config.input.add(name=f"logits_{i}", data_type=_dtype("FP32"), dims=out.shape)
    config.output.add(name="probabilities", data_type=_dtype("FP32"), dims=out.shape)
    config.instance_group.add(count=1, kind=pb.ModelInstanceGroup.KIND_CPU)
    _set_parameters(config, {"temperatures": json.dumps(temperatures), "members": json.dumps(members)})
    return config


def ensemble_config(
    name: str, fusion: str, members: list[str], inp: TensorSpec, out: TensorSpec, max_batch: int
) -> pb.ModelConfig:
    """Triton's ensemble scheduler: every member on the same images, then the fusion step."""
    config = pb.ModelConfig(name=name, platform="ensemble", max_batch_size=max_batch)
    _add_tensor(config.input, inp)
    config.output.add(name="probabilities", data_type=_dtype("FP32"), dims=out.shape)
    for i, member in enumerate(members):
        step = config.ensemble_scheduling.step.add(model_name=member, model_version=-1)
        step.input_map[inp.name] = inp.name
        step.output_map["logits"] = f"logits_{i}"
    fuse = config.ensemble_scheduling.step.add(model_name=fusion, model_version=-1)
    for i in range(len(members)):
        fuse.input_map[f"logits_{i}"] = f"logits_{i}"
    fuse.output_map["probabilities"] = "probabilities"
    return config


def config_text(config: pb.ModelConfig) -> str:
    return text_format.MessageToString(config)


def parse_config(text: str) -> pb.ModelConfig:
    return text_format.Parse(text, pb.ModelConfig())


def stalling_queue_policy(config: pb.ModelConfig) -> bool:
    """Does this config carry the queue policy that stalls the pinned Triton (see STALL_REASON)?"""
    batching = config.dynamic_batching
    return config.HasField("dynamic_batching") and (
        batching.HasField("default_queue_policy") or len(batching.priority_queue_policy) > 0
    )


def existing_versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())


def write_model(
    repo: Path,
    name: str,
    config: pb.ModelConfig,
    files: dict[str, Path],
    labels: list[str] | None,
    keep_versions: int,
    also_loaded: tuple[int, ...] = (),
) -> tuple[int, dict[str, str]]:
    """Add a new numbered version holding `files`, keep the newest `keep_versions` (and `also_loaded`), write
    config and labels. The config loads the new version and `also_loaded` (a candidate's current version).

    Returns the new version and {path relative to the repository: sha256} for the manifest.
    """
    model_dir = repo / name
    version = (existing_versions(model_dir) or [0])[-1] + 1
    version_dir = model_dir / str(version)
    # Copied under a name Triton ignores ("ignore version directory ... fails to convert to integral
    # number") and renamed into place: a Triton polling the repository never loads a half-copied version.
    staging = model_dir / f"{STAGING_PREFIX}{version}"
    shutil.rmtree(staging, ignore_errors=True)  # left by an export that died part-way
    staging.mkdir(parents=True)
    for target, source in files.items():
        shutil.copyfile(source, staging / target)
    os.replace(staging, version_dir)
    for old in existing_versions(model_dir)[:-keep_versions]:
        if old not in also_loaded:
            shutil.rmtree(model_dir / str(old))
    load_only(config, [*also_loaded, version])
    replace_file(model_dir / "config.pbtxt", config_text(config))
    if labels is not None:
        replace_file(model_dir / "labels.txt", "\n".join(labels) + "\n")
    hashed = [version_dir / t for t in files] + [model_dir / "config.pbtxt"]
    if labels is not None:
        hashed.append(model_dir / "labels.txt")
    return version, {str(p.relative_to(repo)): file_sha256(p) for p in hashed}
