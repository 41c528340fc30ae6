"""The real tritonserver binary serving the exported repository, called through tritonclient."""

import os
import signal
import time

import numpy as np
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from gateway.process import free_port
from gateway.triton.server import EmbeddedTriton, TritonError, TritonPorts
from kdcontract.fusion import fuse
from kdcontract.manifest import read_manifest
from kdcontract.ort_session import open_session
from tests.conftest import triton_inference_stats
from training.data import load_data
from training.onnx_tools import run_logits
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


def group_gone(pgid: int, within_s: float = 10.0) -> bool:
    """True once no process of the group is left (killed processes are reaped asynchronously)."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


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
        local = run_logits(open_session(tiny_repo / name / str(entry.version) / "model.onnx"), test_images)
        served = infer(triton.http_url, name, test_images)
        assert served.shape == local.shape, name
        np.testing.assert_allclose(served, local, rtol=1e-5, atol=1e-5, err_msg=name)
        assert (served.argmax(-1) == local.argmax(-1)).all(), name


@pytest.mark.parametrize("ensemble", ["ensemble_fused", "ensemble_scheduler"])
def test_triton_ensembles_fuse_calibrated_member_probabilities(triton, tiny_repo, test_images, ensemble):
    manifest = read_manifest(tiny_repo)
    members = [m for m in manifest.models[ensemble].members if m.startswith("variant_")]
    logits = [run_logits(open_session(tiny_repo / m / "1" / "model.onnx"), test_images) for m in members]
    expected = fuse(logits, [manifest.models[m].temperature for m in members], "mean_prob")  # the gateway's rule
    served = infer(triton.http_url, ensemble, test_images, output="probabilities")
    np.testing.assert_allclose(served, expected, atol=1e-5)
    np.testing.assert_allclose(served.sum(-1), 1.0, atol=1e-5)


def test_no_queue_stall_at_concurrency_one(triton, test_images):
    """Triton 2.51 with a queue policy made ~2-5% of sequential requests wait ~500 ms in its queue.

    Measured with its own statistics, not a stopwatch: the mean queue time per request was 11.5 ms
    with the policy and 0.06 ms without, over 1,000 calls.
    """

    def queue_ns_and_count(at_least: int = 0) -> tuple[int, int]:
        stats = triton_inference_stats(triton.http_url, "student_kd", successes_at_least=at_least)
        return int(stats["queue"]["ns"]), int(stats["success"]["count"])

    queue_before, count_before = queue_ns_and_count()
    for i in range(400):
        infer(triton.http_url, "student_kd", test_images[i % 64 : i % 64 + 1])
    queue_after, count_after = queue_ns_and_count(at_least=count_before + 400)
    assert count_after - count_before == 400
    mean_queue_ms = (queue_after - queue_before) / 400 / 1e6
    assert mean_queue_ms < 2.0, f"mean queue time {mean_queue_ms:.2f} ms per request: a queue stall is back"


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
    # The dead server's Python-backend stubs (its process group) did not outlive it.
    assert group_gone(before)


def test_a_failed_start_leaves_no_server_behind(tiny_repo):
    """The child runs in its own session (Ctrl-C never reaches it): a start that fails must stop it."""
    server = EmbeddedTriton(tiny_repo, TritonPorts(free_port(), free_port(), free_port()))
    with pytest.raises(TritonError, match="not ready"):
        server.start(timeout=0.01)  # spawned, but no Triton is ready that fast
    with pytest.raises(ProcessLookupError):
        os.kill(server.pid, 0)
    assert group_gone(server.pid)  # nor any stub it had started
