"""Triton Python-backend model that runs an ONNX graph with ONNX Runtime on the CPU.

Copied into each version directory of the `cpu` flavour (Triton 2.51 from nvidia-pytriton has no
ONNX Runtime backend). Dynamic batching hands `execute` several requests: valid ones run as one
ONNX Runtime call, and every request gets its own response or its own error.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        options = ort.SessionOptions()
        # Thread counts come from config.pbtxt so instance count x threads can match the cores.
        options.intra_op_num_threads = int(params.get("intra_op_threads", "1"))
        options.inter_op_num_threads = int(params.get("inter_op_threads", "1"))
        options.log_severity_level = 3
        version_dir = os.path.join(args["model_repository"], args["model_version"])
        onnx_path = os.path.join(version_dir, params.get("onnx_file", "model.onnx"))
        self.session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        self.item_shape = tuple(int(d) for d in config["input"][0]["dims"])
        self.max_batch_size = int(config.get("max_batch_size", 0))

    def _validate(self, request):
        tensor = pb_utils.get_input_tensor_by_name(request, self.input_name)
        if tensor is None:
            return None, f"missing input tensor '{self.input_name}'"
        array = tensor.as_numpy()
        if array.dtype != np.uint8:
            return None, f"input '{self.input_name}' must be UINT8, got {array.dtype}"
        if array.ndim != len(self.item_shape) + 1 or tuple(array.shape[1:]) != self.item_shape:
            return None, f"input '{self.input_name}' must have shape [N, {', '.join(map(str, self.item_shape))}]"
        return array, None

    def execute(self, requests):
        responses = [None] * len(requests)
        arrays, owners = [], []
        for index, request in enumerate(requests):
            array, problem = self._validate(request)
            if problem:
                error = pb_utils.TritonError(problem, pb_utils.TritonError.INVALID_ARG)
                responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=error)
            else:
                arrays.append(array)
                owners.append((index, len(array)))
        if arrays:
            try:
                logits = self.session.run([self.output_name], {self.input_name: np.concatenate(arrays)})[0]
            except Exception as exc:  # one failed run fails its requests, never the server
                error = pb_utils.TritonError(f"inference failed: {exc}", pb_utils.TritonError.INTERNAL)
                for index, _ in owners:
                    responses[index] = pb_utils.InferenceResponse(output_tensors=[], error=error)
            else:
                offset = 0
                for index, count in owners:
                    part = np.ascontiguousarray(logits[offset : offset + count], dtype=np.float32)
                    offset += count
                    responses[index] = pb_utils.InferenceResponse(
                        output_tensors=[pb_utils.Tensor(self.output_name, part)]
                    )
        return responses

    def finalize(self):
        self.session = None
