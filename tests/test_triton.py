"""The real tritonserver binary serving the exported repository, called through tritonclient."""

import os
import signal
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from training.data import load_data
from training.manifest import read_manifest
from training.onnx_tools import run_logits, session
from training.recipe import load_recipe


@pytest.fixture(scope="module")
def test_images():
    data = load_data(load_recipe("digits").data)
    return data.test.images[:64].numpy()


def infer(url: str, model: str, images: np.ndarray, output: str = "logits") -> np.ndarray:
    client = httpclient.InferenceServerClient(url)
    tensor = httpclient.InferInput("images", list(images.shape), "UINT8")
    tensor.set_data_from_numpy(images, binary_data=True)
    result = client.infer(model, [tensor], outputs=[httpclient.InferRequestedOutput(output, binary_data=True)])
    return result.as_numpy(output)


def test_every_model_is_ready(triton, tiny_repo):
    client = httpclient.InferenceServerClient(triton.http_url)
    assert client.is_server_ready()
    for name in read_manifest(tiny_repo).models:
        assert client.is_model_ready(name), name


def test_served_predictions_equal_in_process_onnx_runtime(triton, tiny_repo, test_images):
    manifest = read_manifest(tiny_repo)
    for name, entry in manifest.models.items():
        if entry.role in ("ensemble", "fusion"):
            continue
        local = run_logits(session(tiny_repo / name / str(entry.version) / "model.onnx"), test_images)
        served = infer(triton.http_url, name, test_images)
        assert served.shape == local.shape, name
        np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-5, err_msg=name)
        assert (served.argmax(-1) == local.argmax(-1)).all(), name


def test_triton_ensemble_fuses_calibrated_member_probabilities(triton, tiny_repo, test_images):
    manifest = read_manifest(tiny_repo)
    members = [m for m in manifest.models["ensemble"].members if m.startswith("variant_")]
    probs = []
    for member in members:
        logits = run_logits(session(tiny_repo / member / "1" / "model.onnx"), test_images)
        z = logits / manifest.models[member].temperature
        z = np.exp(z - z.max(-1, keepdims=True))
        probs.append(z / z.sum(-1, keepdims=True))
    served = infer(triton.http_url, "ensemble", test_images, output="probabilities")
    np.testing.assert_allclose(served, np.mean(probs, axis=0), atol=1e-5)
    np.testing.assert_allclose(served.sum(-1), 1.0, atol=1e-5)


def test_bad_input_is_rejected_per_request(triton, test_images):
    with pytest.raises(InferenceServerException) as err:
        infer(triton.http_url, "student_kd", np.zeros((1, 9, 8, 3), dtype=np.uint8))
    assert "400" in str(err.value) or "shape" in str(err.value)
    # The server is unharmed: the next request succeeds.
    assert infer(triton.http_url, "student_kd", test_images[:2]).shape == (2, 10)


def test_supervisor_restarts_a_crashed_server(triton, test_images):
    before = triton.pid
    os.kill(before, signal.SIGKILL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (triton.pid != before and triton.is_ready()):
        time.sleep(0.5)
    assert triton.pid != before and triton.restarts >= 1
    assert infer(triton.http_url, "student_plain", test_images[:4]).shape == (4, 10)
