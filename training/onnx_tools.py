"""ONNX export, ONNX Runtime inference, parity checks, FP16 conversion and INT8 static quantisation."""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from kdcontract.errors import UserError
from kdcontract.fusion import top1
from kdcontract.stats import percentiles

INPUT_NAME, OUTPUT_NAME = "images", "logits"
OPSET = 18


# Bumped when what export_onnx writes changes for the same model (a new graph rewrite, say), so graphs
# kept from an earlier export are made again.
GRAPH_FORMAT = 2  # 2: TorchScript's exporter


def graph_key(model: torch.nn.Module, image_size: int, output_name: str, constants: tuple = ()) -> str:
    """What an exported graph is a function of: the module's type and weights (with their shapes, so a
    pruned model differs), the input size, the output, the exporter and opset, and `constants` baked
    into the graph that are not weights (an ensemble's temperatures)."""
    digest = hashlib.sha256()
    settings = [type(model).__name__, image_size, output_name, list(constants), torch.__version__, OPSET, GRAPH_FORMAT]
    digest.update(json.dumps(settings).encode())
    for name, tensor in model.state_dict().items():
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_onnx(
    model: torch.nn.Module, image_size: int, path: Path, output_name: str = OUTPUT_NAME, key: str | None = None
) -> bool:
    """uint8 [N,H,W,3] -> logits (or `output_name`) with a dynamic batch axis, weights inside the one .onnx file.

    TorchScript's exporter, not torch's default dynamo one: for the same trained ResNet18 both write the
    same graph (20 Conv with BatchNorm folded in, 17 Relu, 8 Add), TorchScript's in 0.65 s, dynamo's in
    9.3 s (a ResNet50: 1.3 s against 14.9 s) on a 2-core EPYC, and export is on the path to every
    served model (the demo's page, a re-distilled version, the suite's fixtures). torch deprecates it
    from 2.9 on; kdserve pins torch 2.14.1, where it is whole, and the parity gate in export compares
    every graph with PyTorch. Height and width are fixed, so kernel taps that only ever read padding are
    dropped (`drop_padding_taps`).

    With a `key` (`graph_key`), a graph exported earlier from the same key is kept instead of exported
    again (a re-export of unchanged models is then a matter of the parity checks). Returns whether the
    graph was kept.
    """
    key_file = path.with_name(f"{path.name}.key")
    if key is not None and path.is_file() and key_file.is_file() and key_file.read_text() == key:
        return True
    key_file.unlink(missing_ok=True)  # written after the graph: a crash in between leaves no stale key
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's deprecation notice, printed on every call
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_axes={INPUT_NAME: {0: "batch"}, output_name: {0: "batch"}},
        )
    graph = onnx.load(str(path))
    if drop_padding_taps(graph):
        onnx.save(graph, str(path))
    onnx.checker.check_model(str(path), full_check=True)  # full: shapes must infer, strictly
    if key is not None:
        key_file.write_text(key)
    return False


def run_logits(sess: ort.InferenceSession, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The graph's output (logits, or a fused ensemble's probabilities) for `images`, in batches."""
    outputs = [sess.run(None, {INPUT_NAME: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs).astype(np.float32)


@dataclass
class Parity:
    max_abs_diff: float
    top1_agreement: float
    images: int

    def as_dict(self) -> dict:
        return asdict(self)


def parity(reference: np.ndarray, candidate: np.ndarray) -> Parity:
    return Parity(
        max_abs_diff=float(np.abs(reference - candidate).max()),
        top1_agreement=float((top1(reference) == top1(candidate)).mean()),
        images=len(reference),
    )


def require_parity(name: str, result: Parity, max_abs_diff: float, min_agreement: float) -> None:
    if result.max_abs_diff > max_abs_diff or result.top1_agreement < min_agreement:
        raise UserError(
            f"{name}: export refused, ONNX differs from PyTorch (max |diff| {result.max_abs_diff:.2e} > "
            f"{max_abs_diff:.0e} or top-1 agreement {result.top1_agreement:.4f} < {min_agreement})"
        )


def convert_fp16(src: Path, dst: Path) -> None:
    """FP16 weights and compute, keeping the uint8 input and fp32 logits so clients do not change."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    onnx.save(convert_float_to_float16(onnx.load(str(src)), keep_io_types=True), str(dst))


class _ImageBatches:
    """ONNX Runtime calibration reader over a uint8 image array."""

    def __init__(self, images: np.ndarray, batch_size: int = 64):
        self._batches = iter(images[i : i + batch_size] for i in range(0, len(images), batch_size))

    def get_next(self) -> dict | None:
        batch = next(self._batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(src: Path, dst: Path, calibration_images: np.ndarray) -> None:
    """Static INT8: QDQ format, per-channel weights, unsigned 8-bit activations, 7-bit weight range.

    QUInt8 activations (not the signed default) are what gives the speed-up on AVX2 CPUs: their
    integer kernels are u8 x s8. Without VNNI those kernels sum pairs of u8 x s8 products into
    saturating int16 (vpmaddubsw), which cost the digits student 3 points of top-1 with every
    calibration method tried; `reduce_range` (7-bit weights) avoids the saturation: 0.4 points.
    Calibration uses training images, never the test split.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(_ImageBatches, CalibrationDataReader):
        pass

    prepared = dst.with_name(dst.stem + ".pre.onnx")
    quant_pre_process(str(src), str(prepared), skip_symbolic_shape=True)
    try:
        quantize_static(
            str(prepared),
            str(dst),
            Reader(calibration_images),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            reduce_range=True,
        )
    finally:
        prepared.unlink(missing_ok=True)


def latency_ms(sess: ort.InferenceSession, images: np.ndarray, repeats: int = 30) -> dict[str, float]:
    """Median and p90 wall time of one `run` on `images` (after a warm-up run)."""
    sess.run(None, {INPUT_NAME: images})
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sess.run(None, {INPUT_NAME: images})
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return percentiles(times, (50, 90), digits=6)


def _conv_attributes(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _used_taps(size: int, kernel: int, stride: int, pad_begin: int, pad_end: int) -> tuple[int, int]:
    """First and last kernel tap that reads a real input pixel at some output position (dilation 1)."""
    outputs = (size + pad_begin + pad_end - kernel) // stride + 1
    used = [t for t in range(kernel) if any(0 <= o * stride - pad_begin + t < size for o in range(outputs))]
    return used[0], used[-1]


def drop_padding_taps(model: onnx.ModelProto) -> int:
    """Slice out of every Conv the kernel taps that only ever multiply zero padding; returns how many
    convolutions changed. The result is the same function (same output shapes, same sums less terms
    that are exactly zero).

    With the input's height and width fixed, a small image leaves deep layers with 1x1 or 2x2 feature
    maps: a 3x3 convolution on a 1x1 map reads one tap of nine, yet ONNX Runtime multiplies the whole
    kernel. For the 8x8 digits, ResNet's last stage is mostly such weights (6.3 M of a ResNet18's 11.2 M
    parameters); at batch 1 the model is bound by reading its weights, so the dead taps cost time.
    """
    inferred = onnx.shape_inference.infer_shapes(model)
    shapes = {
        info.name: [d.dim_value if d.HasField("dim_value") else 0 for d in info.type.tensor_type.shape.dim]
        for info in [*inferred.graph.value_info, *inferred.graph.input]
    }
    initializers = {init.name: init for init in model.graph.initializer}
    uses = _uses(model)
    # The exporter shares one initializer between equal weights, through Identity nodes (zero-initialised
    # residual branches are all equal before training): a trimmed convolution then gets its own copy.
    producers = {out: node for node in model.graph.node for out in node.output}
    changed: set[str] = set()
    for node in model.graph.node:
        source = node.input[1] if node.op_type == "Conv" else ""
        while source not in initializers and source in producers and producers[source].op_type == "Identity":
            source = producers[source].input[0]
        if source not in initializers:
            continue
        attrs = _conv_attributes(node)
        spatial = shapes.get(node.input[0], [])[2:]
        weight = onnx.numpy_helper.to_array(initializers[source])
        rank = weight.ndim - 2
        if (
            len(spatial) != rank
            or not all(spatial)
            or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET")
            or any(d != 1 for d in attrs.get("dilations", [1] * rank))
        ):
            continue
        strides, pads = attrs.get("strides", [1] * rank), list(attrs.get("pads", [0] * 2 * rank))
        slices, new_pads = [slice(None), slice(None)], list(pads)
        for axis in range(rank):
            kernel = weight.shape[2 + axis]
            first, last = _used_taps(spatial[axis], kernel, strides[axis], pads[axis], pads[rank + axis])
            slices.append(slice(first, last + 1))
            new_pads[axis] = pads[axis] - first
            new_pads[rank + axis] = pads[rank + axis] - (kernel - 1 - last)
        trimmed = weight[tuple(slices)]
        if trimmed.shape == weight.shape or min(new_pads) < 0:
            continue
        if source == node.input[1] and uses[source] == 1:
            initializers[source].CopyFrom(onnx.numpy_helper.from_array(trimmed, source))
        else:
            own = f"{node.output[0]}_trimmed_weight"
            model.graph.initializer.append(onnx.numpy_helper.from_array(trimmed, own))
            node.input[1] = own
        for attr in node.attribute:
            if attr.name == "kernel_shape":
                attr.CopyFrom(onnx.helper.make_attribute("kernel_shape", list(trimmed.shape[2:])))
            elif attr.name == "pads":
                attr.CopyFrom(onnx.helper.make_attribute("pads", new_pads))
        changed.add(node.input[1])
    gone = changed | _drop_unused(model)
    # The exporter records each weight's shape in value_info too; a stale one fails shape inference.
    stale = [info for info in model.graph.value_info if info.name in gone]
    for info in stale:
        model.graph.value_info.remove(info)
    return len(changed)


def _uses(model: onnx.ModelProto) -> dict[str, int]:
    uses: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    return uses


def _drop_unused(model: onnx.ModelProto) -> set[str]:
    """Remove the Identity nodes and initializers nothing reads any more (shared weights that trimmed
    copies replaced); returns the names removed."""
    outputs = {out.name for out in model.graph.output}
    removed: set[str] = set()
    while True:
        uses = _uses(model)
        dead = [
            node
            for node in model.graph.node
            if node.op_type == "Identity" and not uses.get(node.output[0]) and node.output[0] not in outputs
        ]
        if not dead:
            break
        for node in dead:
            removed.add(node.output[0])
            model.graph.node.remove(node)
    uses = _uses(model)
    for init in [i for i in model.graph.initializer if not uses.get(i.name) and i.name not in outputs]:
        removed.add(init.name)
        model.graph.initializer.remove(init)
    return removed
