"""ONNX export, ONNX Runtime inference, parity checks, FP16 conversion and INT8 static quantisation."""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from training.errors import UserError

INPUT_NAME, OUTPUT_NAME = "images", "logits"
OPSET = 18


def export_onnx(model: torch.nn.Module, image_size: int, path: Path, output_name: str = OUTPUT_NAME) -> None:
    """uint8 [N,H,W,3] -> logits (or `output_name`) with a dynamic batch axis, weights inside the one .onnx file.

    The dynamo exporter is torch's default; `external_data=False` stops it writing the weights to
    a separate `.onnx.data` file, which a Triton version directory would then have to carry too.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, image_size, image_size, 3, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.eval(),
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[output_name],
            dynamic_shapes={"images": {0: batch}},
            verbose=False,
        )
    onnx.checker.check_model(str(path))


def session(path: Path, threads: int = 2) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_logits(sess: ort.InferenceSession, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """The graph's output (logits, or a fused ensemble's probabilities) for `images`, in batches."""
    outputs = [sess.run(None, {INPUT_NAME: images[i : i + batch_size]})[0] for i in range(0, len(images), batch_size)]
    return np.concatenate(outputs).astype(np.float32)


def predictions(logits: np.ndarray) -> np.ndarray:
    """Top-1 class; multi-head logits [N, K, C] are fused by the mean of the heads' softmax."""
    if logits.ndim == 3:
        shifted = np.exp(logits - logits.max(-1, keepdims=True))
        return (shifted / shifted.sum(-1, keepdims=True)).mean(1).argmax(-1)
    return logits.argmax(-1)


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
        top1_agreement=float((predictions(reference) == predictions(candidate)).mean()),
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
    return {"p50": statistics.median(times), "p90": times[int(0.9 * (len(times) - 1))]}
