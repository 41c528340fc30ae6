"""The capture in S3-compatible object storage, against a real S3 server process (moto's, over HTTP): a
gateway writes its segments as objects, retention and the size cap remove the oldest, and training
reads the prefix back, naming and skipping the objects that are not whole segments."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from gateway.capture.sinks import ObjectStoreSink
from gateway.process import GatewayProcess, free_port
from kdcontract.capture import capture_files, capture_listing, read_capture
from kdcontract.digits import digit_png_bytes
from kdcontract.imageprep import prepare
from kdcontract.manifest import read_manifest

BUCKET = "kdserve-capture"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture
def s3(tmp_path, monkeypatch):
    """A moto S3 server on a free port, a bucket in it, and the environment boto3 reaches it with (set
    here for in-process clients; passed to the gateway's process)."""
    port = free_port()
    log = (tmp_path / "moto.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=log, stderr=subprocess.STDOUT
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(url, timeout=1)
            break
        except httpx.HTTPError:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "moto.log").read_text()
            time.sleep(0.1)
    env = {**CREDENTIALS, "AWS_ENDPOINT_URL": url}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    yield env
    proc.terminate()
    proc.wait(10)
    log.close()


def test_a_gateway_captures_into_object_storage_and_training_reads_the_prefix(tiny_repo, triton, s3, capsys):
    from training.data import load_capture

    url = f"s3://{BUCKET}/traffic"
    env = {
        **s3,
        "KDSERVE_CAPTURE_FRACTION": "1.0",
        "KDSERVE_CAPTURE_URL": url,
        "KDSERVE_CAPTURE_SEGMENT_IMAGES": "8",
        "KDSERVE_CAPTURE_SEGMENT_S": "0.3",
    }
    spec = read_manifest(tiny_repo).preprocessing
    sent = {}
    with GatewayProcess(tiny_repo, triton.http_url, env=env) as gateway:
        for index in range(1700, 1720):
            png = digit_png_bytes(index)
            resp = gateway.client.post("/v1/classify?model=student", content=png, headers={"Content-Type": "image/png"})
            assert resp.status_code == 200, resp.text
            sent[resp.headers["x-request-id"]] = png
    # Stopped (SIGTERM): the open segment was written before the process ended.
    names = [name for name, _ in capture_listing(url)]
    assert len(names) >= 3 and all(n.startswith("images-") and n.endswith(".npz") for n in names), names
    captured = read_capture(capture_files(url))
    assert captured.skipped == [] and sorted(captured.request_ids.tolist()) == sorted(sent)
    for rid, image in zip(captured.request_ids, captured.images, strict=True):
        np.testing.assert_array_equal(image, prepare(Image.open(io.BytesIO(sent[str(rid)])), spec))

    import boto3

    client = boto3.client("s3")
    whole = client.get_object(Bucket=BUCKET, Key=f"traffic/{names[0]}")["Body"].read()
    bad = {
        "images-9999999999999-x-000001.npz": whole[: len(whole) // 2],
        "images-9999999999999-x-000002.npz": b"",
        "notes.txt": b"not a segment",
    }
    for name, data in bad.items():
        client.put_object(Bucket=BUCKET, Key=f"traffic/{name}", Body=data)
    client.put_object(Bucket=BUCKET, Key="traffic/deeper/images-1.npz", Body=whole)  # another prefix's
    images = load_capture(url, spec, [str(d) for d in range(10)])
    assert len(images) == len(sent)
    printed = capsys.readouterr().out
    for name in bad:
        assert f"{url}/{name} skipped" in printed


def test_the_object_store_sink_removes_past_retention_then_the_oldest_over_the_cap(s3):
    url = f"s3://{BUCKET}/sink"
    sink = ObjectStoreSink(url, retention_s=100, max_bytes=2**20)
    for k in range(4):
        sink.put(f"images-{k}.npz", b"x" * 400_000)
    now = time.time()
    assert sink.enforce(now) == 2  # 1.6 MB over the 1 MiB cap: the two oldest go
    assert [name for name, _ in capture_listing(url)] == ["images-2.npz", "images-3.npz"]
    assert sink.enforce(now + 50) == 0
    assert sink.enforce(now + 200) == 2  # past the retention
    assert capture_listing(url) == []


def test_a_missing_bucket_is_one_clear_error_for_training(s3, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "training", "check-data", "--recipe", "digits", "--set", "distill.capture=s3://nope/x"],
        capture_output=True,
        text=True,
        env={**os.environ, **s3},
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert result.returncode == 2, result.stderr
    assert "capture s3://nope/x could not be read" in result.stderr and "NoSuchBucket" in result.stderr
    assert "Traceback" not in result.stderr
