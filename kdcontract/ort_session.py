"""The one ONNX Runtime session recipe: what Triton serves with, so in-process figures compare.

Export measures in-process latency with it, the bench's in-process baseline uses it, and the export
ships this file beside the Triton Python-backend `model.py` (as `kd_ort_session.py`) that serves every
graph on the `cpu` flavour. So it imports nothing but ONNX Runtime, and that only when called.
"""

from __future__ import annotations

from pathlib import Path

# Spinning pool threads take the cores a co-located gateway needs; off where it is served.
ALLOW_SPINNING = False
INTRA_OP_THREADS = 2


def open_session(
    path: str | Path | bytes, intra_op_threads: int = INTRA_OP_THREADS, allow_spinning: bool = ALLOW_SPINNING
):
    """An ONNX Runtime CPU session for `path` (or a serialized model): `intra_op_threads` threads, one inter-op
    thread, spinning as given, warnings only."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
    options.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
