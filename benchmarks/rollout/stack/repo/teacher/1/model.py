"""Triton Python-backend model for the `cpu` flavour: ONNX graphs run by ONNX Runtime, optionally fused.

Copied as `model.py` into a version directory (Triton 2.51 from nvidia-pytriton has no ONNX Runtime
backend), beside `kd_fusion.py` and `kd_ort_session.py`: copies of `kdcontract.fusion` and
`kdcontract.ort_session`, so it runs where kdserve is not installed (NVIDIA's container) with the
same fusion and session settings as the rest of kdserve. What it does is set by config.pbtxt parameters:

- `onnx_file`: a served graph (student, teacher, variant, the fused ensemble...), its output as is;
- no `onnx_file`: the fusion step of Triton's ensemble scheduler, fusing `logits_<i>` inputs with
  one temperature each (`temperatures`).

Dynamic batching hands `execute` several requests: valid ones run as one ONNX Runtime call, and every
request gets its own response or its own error (INVALID_ARG for bad input, INTERNAL for a failed run).
"""

import json
import os
import sys

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shipped kdcontract modules beside this file
from kd_fusion import calibrated_mean
from kd_ort_session import open_session


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.output_name = config["output"][0]["name"]
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.temperatures = [float(t) for t in json.loads(params.get("temperatures", "[]"))]
        self.session = None
        if "onnx_file" in params:
            version_dir = os.path.join(args["model_repository"], args["model_version"])
            # Thread counts come from config.pbtxt so instance count x threads can match the cores.
            self.session = open_session(
                os.path.join(version_dir, params["onnx_file"]),
                intra_op_threads=int(params.get("intra_op_threads", "1")),
                allow_spinning=params.get("allow_spinning", "0") == "1",
            )
            self.item_shape = tuple(int(d) for d in config["input"][0]["dims"])
        elif len(self.temperatures) != len(self.input_names):
            raise ValueError("the fusion step needs one temperature per member's logits input")

    def _images(self, request):
        name = self.input_names[0]
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        if tensor is None:
            return None, f"missing input tensor '{name}'"
        array = tensor.as_numpy()
        if array.dtype != np.uint8:
            return None, f"input '{name}' must be UINT8, got {array.dtype}"
        if array.ndim != len(self.item_shape) + 1 or tuple(array.shape[1:]) != self.item_shape:
            return None, f"input '{name}' must have shape [N, {', '.join(map(str, self.item_shape))}]"
        return array, None

    def _logits(self, request):
        arrays = []
        for name in self.input_names:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                return None, f"missing input tensor '{name}'"
            arrays.append(tensor.as_numpy())
        return arrays, None

    def execute(self, requests):
        if self.session is None:  # the scheduler ensemble's fusion step: nothing to batch
            responses = []
            for request in requests:
                arrays, problem = self._logits(request)
                if problem:
                    responses.append(self._error(problem, pb_utils.TritonError.INVALID_ARG))
                    continue
                fused = calibrated_mean(arrays, self.temperatures).astype(np.float32)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, fused)]))
            return responses

        responses = [None] * len(requests)
        arrays, owners = [], []
        for index, request in enumerate(requests):
            array, problem = self._images(request)
            if problem:
                responses[index] = self._error(problem, pb_utils.TritonError.INVALID_ARG)
            else:
                arrays.append(array)
                owners.append((index, len(array)))
        if arrays:
            try:
                batch = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
                output = self.session.run([self.output_name], {self.input_names[0]: batch})[0]
            except Exception as exc:  # one failed run fails its requests, never the server
                for index, _ in owners:
                    responses[index] = self._error(f"inference failed: {exc}", pb_utils.TritonError.INTERNAL)
            else:
                offset = 0
                for index, count in owners:
                    part = np.ascontiguousarray(output[offset : offset + count], dtype=np.float32)
                    offset += count
                    responses[index] = pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(self.output_name, part)]
                    )
        return responses

    @staticmethod
    def _error(message, code):
        return pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(message, code))

    def finalize(self):
        self.session = None
