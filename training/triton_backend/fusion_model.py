"""Triton Python-backend model that fuses ensemble members' logits into one probability vector.

The last step of the `ensemble` model: mean of temperature-calibrated softmax probabilities, the
same rule the gateway uses. Temperatures come from config.pbtxt (written from the manifest).
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self.temperatures = [float(t) for t in json.loads(params["temperatures"])]
        self.input_names = [tensor["name"] for tensor in config["input"]]
        self.output_name = config["output"][0]["name"]

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                probs = []
                for name, temperature in zip(self.input_names, self.temperatures, strict=True):
                    logits = pb_utils.get_input_tensor_by_name(request, name).as_numpy().astype(np.float64)
                    z = logits / temperature
                    z = np.exp(z - z.max(axis=-1, keepdims=True))
                    probs.append(z / z.sum(axis=-1, keepdims=True))
                fused = np.mean(probs, axis=0).astype(np.float32)
                responses.append(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, fused)]))
            except Exception as exc:
                error = pb_utils.TritonError(f"fusion failed: {exc}", pb_utils.TritonError.INVALID_ARG)
                responses.append(pb_utils.InferenceResponse(output_tensors=[], error=error))
        return responses
