"""Gateway pieces that need no server: fusion arithmetic, A/B assignment, settings, image decoding,
merging concurrent Triton calls."""

import asyncio
import io
import socket
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from gateway.errors import BadImage, PayloadTooLarge, UnsupportedMediaType
from gateway.process import free_port
from gateway.serving.images import decode_image
from gateway.serving.routing import ABRouter, ABStats
from gateway.settings import GatewaySettings
from gateway.triton.coalesce import Coalescer
from kdcontract.fusion import fuse, softmax

FORMATS = ["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]


def test_fusion_arithmetic_by_hand():
    a = np.array([[2.0, 0.0, 0.0]])
    b = np.array([[0.0, 0.0, 4.0]])
    pa, pb2 = softmax(a), softmax(b, temperature=2.0)
    np.testing.assert_allclose(fuse([a, b], [1.0, 2.0], "mean_prob"), (pa + pb2) / 2)
    np.testing.assert_allclose(fuse([a, b], [1.0, 2.0], "weighted", [3.0, 1.0]), 0.75 * pa + 0.25 * pb2)
    np.testing.assert_allclose(fuse([a, b], [1.0, 2.0], "logit_mean"), softmax((a + b / 2) / 2))
    # Majority vote: two members say class 0, one says class 2.
    vote = fuse([a, a, b], [1.0, 1.0, 1.0], "vote")
    assert vote.argmax() == 0 and vote[0, 0] == pytest.approx(2 / 3, abs=1e-5)
    np.testing.assert_allclose(vote.sum(), 1.0)
    # softmax(logits / T) by hand: logits (2, 0, 0), T = 1 -> e^2 / (e^2 + 2).
    assert pa[0, 0] == pytest.approx(np.e**2 / (np.e**2 + 2))


def test_ab_split_within_two_points_of_its_weights_and_sticky():
    router = ABRouter({"student": 0.8, "teacher": 0.2})
    arms = [router.assign(f"client-{i}") for i in range(10_000)]
    assert abs(arms.count("teacher") / 10_000 - 0.2) < 0.02
    assert all(router.assign(f"client-{i}") == arms[i] for i in range(0, 10_000, 97))
    # Without a key the draw is random per request: both arms appear, in about their proportions.
    keyless_router = ABRouter({"student": 0.5, "teacher": 0.5}, seed=1)
    keyless = [keyless_router.assign(None) for _ in range(2000)]
    assert abs(keyless.count("teacher") / 2000 - 0.5) < 0.05


def test_ab_stats_percentiles_and_agreement():
    stats = ABStats(["student", "teacher"], window=100)
    for ms in range(-99, 101):  # the window keeps the last 100: 1..100
        stats.record("student", float(ms))
    stats.record_shadow("teacher", 10.0, True)
    stats.record_shadow("teacher", 12.0, False)
    summary = stats.summary()
    assert summary["student"]["count"] == 200 and summary["student"]["latency_ms"]["p50"] == pytest.approx(50.5)
    assert summary["teacher"]["shadow"]["agreement_rate"] == 0.5


def test_settings_refuse_a_bad_configuration(monkeypatch):
    monkeypatch.setenv("KDSERVE_AB_WEIGHTS", '{"student": -1, "teacher": 0.5}')
    with pytest.raises(ValidationError, match="non-negative"):
        GatewaySettings()
    monkeypatch.setenv("KDSERVE_AB_WEIGHTS", '{"student": 3, "teacher": 1}')
    assert GatewaySettings().ab_weights == {"student": 0.75, "teacher": 0.25}
    monkeypatch.setenv("KDSERVE_SHADOW_FRACTION", "1.5")
    with pytest.raises(ValidationError):
        GatewaySettings()


def test_capture_goes_to_a_directory_or_an_s3_prefix_never_both_nor_neither(monkeypatch, tmp_path):
    monkeypatch.setenv("KDSERVE_CAPTURE_FRACTION", "0.5")
    with pytest.raises(ValidationError, match="exactly one of capture_dir"):
        GatewaySettings()
    monkeypatch.setenv("KDSERVE_CAPTURE_URL", "https://bucket.example.com/capture")
    with pytest.raises(ValidationError, match="capture_url"):
        GatewaySettings()
    monkeypatch.setenv("KDSERVE_CAPTURE_URL", "s3://kdserve-capture/traffic")
    assert GatewaySettings().capture_url == "s3://kdserve-capture/traffic"
    monkeypatch.setenv("KDSERVE_CAPTURE_DIR", str(tmp_path))
    with pytest.raises(ValidationError, match="exactly one of capture_dir"):
        GatewaySettings()


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def test_decode_matches_training_preparation_and_refuses_bad_images():
    from kdcontract.digits import digit_png_bytes
    from training.data import load_data, load_digits_images
    from training.recipe import DataConfig

    images, _ = load_digits_images(8)
    spec = load_data(DataConfig(dataset="digits", image_size=8)).preprocessing
    decoded = decode_image(digit_png_bytes(5), spec, FORMATS, 10_000)
    np.testing.assert_array_equal(decoded, images[5].numpy())
    with pytest.raises(UnsupportedMediaType):
        decode_image(b"definitely not an image", spec, FORMATS, 10_000)
    with pytest.raises(BadImage):
        decode_image(_png(Image.new("RGB", (32, 32)))[:60], spec, FORMATS, 10_000)
    with pytest.raises(PayloadTooLarge):
        decode_image(_png(Image.new("1", (200, 200))), spec, FORMATS, 10_000)
    with pytest.raises(UnsupportedMediaType, match="not allowed"):
        decode_image(_png(Image.new("RGB", (8, 8)), "BMP"), spec, ["PNG"], 10_000)


class GatedTriton:
    """A stand-in for Triton's answer to a call: each call waits until the test opens its gate, then
    answers every image with its own id (so the test sees which rows went to whom) or fails."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.gates: list[asyncio.Event] = []
        self.fail: set[int] = set()

    async def send(self, key: str, images: np.ndarray) -> np.ndarray:
        call = len(self.calls)
        self.calls.append(images[:, 0].tolist())
        self.gates.append(asyncio.Event())
        await self.gates[call].wait()
        if call in self.fail:
            raise RuntimeError(f"call {call} failed")
        return images * 10

    def coalescer(self, in_flight: int, max_images: int = 64, wait_s: float = 10.0, sizes: list | None = None):
        record = sizes.append if sizes is not None else (lambda n: None)
        return Coalescer(self.send, in_flight, max_images, wait_s, on_batch=lambda key, n: record(n))


def request(coalescer: Coalescer, *ids: int, model: str = "m") -> asyncio.Task:
    """One request of images that each carry their id (the stand-in answers id * 10)."""
    return asyncio.create_task(coalescer.run(model, np.array([[i] for i in ids])))


def test_waiting_requests_share_the_next_call_within_the_image_bound():
    async def scenario() -> None:
        triton, sizes = GatedTriton(), []
        coalescer = triton.coalescer(in_flight=1, max_images=4, sizes=sizes)
        first = request(coalescer, 1)
        await asyncio.sleep(0)
        assert triton.calls == [[1]]  # alone: sent at once, nothing waited for
        waiting = [request(coalescer, *ids) for ids in ((2, 3), (4,), (5,), (6, 7, 8))]
        cancelled = request(coalescer, 9)
        await asyncio.sleep(0)
        cancelled.cancel()  # its caller stops waiting before its call is sent
        triton.fail.add(1)
        triton.gates[0].set()
        assert (await first).tolist() == [[10]]
        await asyncio.sleep(0)
        assert triton.calls == [[1], [2, 3, 4, 5]]  # the next call takes what fits in 4 images
        triton.gates[1].set()
        for task in waiting[:3]:  # a failed call fails every request in it
            with pytest.raises(RuntimeError, match="call 1 failed"):
                await task
        await asyncio.sleep(0)
        assert triton.calls[2] == [6, 7, 8]  # the rest follow; the cancelled request never reaches Triton
        triton.gates[2].set()
        assert (await waiting[3]).tolist() == [[60], [70], [80]]
        assert triton.calls == [[1], [2, 3, 4, 5], [6, 7, 8]] and sizes == [1, 4, 3]

    asyncio.run(scenario())


def test_lone_requests_are_not_held_back_while_calls_are_free():
    async def scenario() -> None:
        triton = GatedTriton()
        coalescer = triton.coalescer(in_flight=2)
        a, b, other = request(coalescer, 1), request(coalescer, 2), request(coalescer, 3, model="other model")
        await asyncio.sleep(0)
        assert triton.calls == [[1], [2], [3]]  # two calls may be under way per model, models apart
        for gate in triton.gates:
            gate.set()
        assert [(await t).tolist() for t in (a, b, other)] == [[[10]], [[20]], [[30]]]

    asyncio.run(scenario())


def test_a_request_that_waits_past_the_deadline_times_out_and_is_never_sent():
    async def scenario() -> None:
        triton = GatedTriton()
        coalescer = triton.coalescer(in_flight=1, wait_s=0.05)
        first = request(coalescer, 1)
        await asyncio.sleep(0)
        with pytest.raises(TimeoutError):
            await request(coalescer, 2)
        triton.gates[0].set()
        assert (await first).tolist() == [[10]]
        await asyncio.sleep(0)
        assert triton.calls == [[1]]

    asyncio.run(scenario())


def test_percentiles_are_numpys_linear_interpolation_and_none_without_samples():
    from kdcontract.stats import percentiles

    # Linear interpolation over 1..100: the q-th percentile sits at rank 1 + 0.99 * q.
    assert percentiles(range(1, 101)) == {"p50": 50.5, "p95": 95.05, "p99": 99.01}
    assert percentiles([], (50, 90)) == {"p50": None, "p90": None}


def test_free_ports_are_outside_the_kernels_ephemeral_range_and_bindable():
    # Client sockets take their source ports from the ephemeral range: a server's port chosen there can be
    # taken between choosing it and binding it (seen: Triton's gRPC port, under the suite's traffic).
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(not low <= port <= high for port in ports), (low, high, ports)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", ports[-1]))
