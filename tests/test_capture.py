"""Served traffic captured as distillation data: the segment format and its reader (skipping what is not
whole, naming it), retention and size cap, and a real gateway capturing every request, joining feedback
labels, and leaving only whole files when killed."""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
import signal
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from gateway.capture.sinks import LocalSink
from gateway.process import GatewayProcess
from kdcontract.capture import (
    UNLABELLED,
    CapturedImage,
    LabelItem,
    decode_label_lines,
    decode_rows,
    directory_files,
    encode_images,
    encode_labels,
    read_capture,
    segment_name,
)
from kdcontract.digits import digit_png_bytes, digits_gray
from kdcontract.imageprep import prepare
from kdcontract.manifest import read_manifest
from tests.conftest import run_training

CLASSES = [str(d) for d in range(10)]


def rows(request_id: str, n: int, seed: int = 0) -> list[CapturedImage]:
    rng = np.random.default_rng(seed)
    return [
        CapturedImage(
            request_id,
            i,
            rng.integers(0, 256, (8, 8, 3), dtype=np.uint8),
            "student_kd",
            1,
            i % 10,
            np.full(10, 0.1, np.float32),
            1000.0 + i,
            b"png" if i % 2 else None,
        )
        for i in range(n)
    ]


def test_segments_round_trip_and_labels_join_by_request_and_position():
    first, second = rows("req-a", 3, seed=1), rows("req-b", 2, seed=2)
    files = [
        (segment_name("images", 1.0, "w1", 1), encode_images(first, CLASSES)),
        (segment_name("images", 2.0, "w2", 1), encode_images(second, CLASSES)),
        (segment_name("labels", 3.0, "w2", 2), encode_labels([("req-a", ["7", "1", "2"], 3.0), ("nope", ["3"], 3.0)])),
    ]
    captured = read_capture(files)
    assert captured.skipped == [] and captured.class_names == CLASSES
    assert len(captured.images) == 5 and captured.images.dtype == np.uint8
    np.testing.assert_array_equal(captured.images[:3], np.stack([r.image for r in first]))
    assert captured.labels.tolist() == [7, 1, 2, UNLABELLED, UNLABELLED] and captured.labelled == 3
    assert captured.request_ids.tolist() == ["req-a"] * 3 + ["req-b"] * 2


def test_each_label_keeps_the_key_that_sent_it_and_segments_without_keys_still_read():
    """Issue 36: training judges each key's labels against the other keys', so the capture keeps the key."""
    files = [
        (segment_name("images", 1.0, "w", 1), encode_images(rows("req-a", 2) + rows("req-b", 1), CLASSES)),
        (segment_name("labels", 2.0, "w", 2), encode_labels([LabelItem("req-a", ["4", "5"], 2.0, "alice")])),
        (segment_name("labels", 3.0, "w", 3), b'{"request_id": "req-b", "labels": ["9"], "at": 3.0}\n'),  # older
    ]
    captured = read_capture(files)
    assert captured.labels.tolist() == [4, 5, 9] and captured.label_keys.tolist() == ["alice", "alice", ""]
    assert decode_label_lines(files[1][1]) == [LabelItem("req-a", ["4", "5"], 2.0, "alice")]


def test_truncated_empty_and_foreign_files_are_named_and_skipped():
    whole = encode_images(rows("req-a", 4), CLASSES)
    files = [
        (segment_name("images", 1.0, "w", 1), whole),
        (segment_name("images", 2.0, "w", 2), whole[: len(whole) // 2]),  # a crash mid-write without rename
        (segment_name("images", 3.0, "w", 3), b""),
        (segment_name("labels", 4.0, "w", 4), b"{not json\n"),
        ("notes.txt", b"hello"),
        (segment_name("images", 5.0, "w", 5), b"PK\x03\x04 not really a zip"),
    ]
    captured = read_capture(files)
    assert len(captured.images) == 4
    assert sorted(name for name, _ in captured.skipped) == sorted(name for name, _ in files[1:])
    assert all(reason for _, reason in captured.skipped)


def test_the_sink_removes_segments_past_retention_then_the_oldest_over_the_cap(tmp_path):
    sink = LocalSink(tmp_path, retention_s=100, max_bytes=2**20)
    now = time.time()
    for k, age in enumerate((500, 50, 40, 30)):
        sink.put(f"images-{k}.npz", b"x" * 400_000)
        os.utime(tmp_path / f"images-{k}.npz", (now - age, now - age))
    (tmp_path / ".images-9.npz.left-by-a-crash").write_bytes(b"half")
    os.utime(tmp_path / ".images-9.npz.left-by-a-crash", (now - 3600, now - 3600))
    (tmp_path / ".images-10.npz.being-written").write_bytes(b"half")
    assert sink.enforce(now) == 2  # the one past retention, then the oldest while over 1 MiB
    remaining = sorted(p.name for p in tmp_path.iterdir())
    assert remaining == [".images-10.npz.being-written", "images-2.npz", "images-3.npz"]


@pytest.fixture
def capturing(tiny_repo, triton, tmp_path):
    capture = tmp_path / "capture"
    env = {
        "KDSERVE_CAPTURE_FRACTION": "1.0",
        "KDSERVE_CAPTURE_DIR": str(capture),
        "KDSERVE_CAPTURE_SEGMENT_IMAGES": "16",
        "KDSERVE_CAPTURE_SEGMENT_S": "0.5",
        "KDSERVE_ANSWERS_DIR": str(tmp_path / "answers"),
        "KDSERVE_AB_WEIGHTS": '{"student": 0.5, "teacher": 0.5}',
    }
    gateway = GatewayProcess(tiny_repo, triton.http_url, env=env)
    yield gateway, capture
    gateway.stop()


def test_a_gateway_captures_every_image_as_the_models_saw_it_with_feedback_labels(capturing, tiny_repo):
    gateway, capture = capturing
    _, labels = digits_gray()
    spec = read_manifest(tiny_repo).preprocessing
    sent = {}
    for index in range(1600, 1640):
        png = digit_png_bytes(index)
        resp = gateway.client.post("/v1/classify?model=auto", content=png, headers={"Content-Type": "image/png"})
        assert resp.status_code == 200, resp.text
        sent[resp.headers["x-request-id"]] = (index, png, resp.json()["predictions"][0]["top_k"][0]["label"])
    time.sleep(0.3)
    feedback = [{"request_id": rid, "label": str(labels[i])} for rid, (i, _, _) in list(sent.items())[:25]]
    assert gateway.client.post("/v1/feedback", json=feedback).status_code == 200
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        captured = read_capture(directory_files(capture))
        if len(captured.images) == len(sent) and captured.labelled == 25:
            break
        time.sleep(0.2)
    assert captured.skipped == [] and len(captured.images) == len(sent) and captured.labelled == 25
    for rid, image, label, top1 in zip(
        captured.request_ids, captured.images, captured.labels, captured.top1, strict=True
    ):
        index, png, answered = sent[str(rid)]
        np.testing.assert_array_equal(image, prepare(Image.open(io.BytesIO(png)), spec))
        assert CLASSES[top1] == answered
        assert label in (UNLABELLED, labels[index])
    text = gateway.client.get("/metrics").text
    assert "kdserve_capture_images_total 40.0" in text


def capture_until_killed(tiny_repo, triton, tmp_path) -> tuple[Path, int]:
    """A gateway capturing three clients' traffic, SIGKILLed once five segments are written; the capture
    it left and the images in it (every file a whole segment)."""
    capture = tmp_path / "capture"
    env = {
        "KDSERVE_CAPTURE_FRACTION": "1.0",
        "KDSERVE_CAPTURE_DIR": str(capture),
        "KDSERVE_CAPTURE_SEGMENT_IMAGES": "4",
        "KDSERVE_CAPTURE_SEGMENT_S": "0.2",
    }
    gateway = GatewayProcess(tiny_repo, triton.http_url, env=env)
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(base_url=gateway.url, timeout=10) as client:
            index = 0
            while not stop.is_set():
                files = [
                    ("images", (f"{k}.png", digit_png_bytes(1500 + (index + k) % 200), "image/png")) for k in range(8)
                ]
                try:
                    client.post("/v1/classify?model=student", files=files)
                except httpx.HTTPError:
                    return  # the gateway is gone
                index += 8

    workers = [threading.Thread(target=traffic) for _ in range(3)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 20
    while len(list(capture.glob("images-*.npz"))) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(gateway.proc.pid, signal.SIGKILL)
    gateway.proc.wait()
    stop.set()
    for worker in workers:
        worker.join()
    captured = read_capture(directory_files(capture))
    assert captured.skipped == [], captured.skipped  # every file left is a whole segment
    assert len(captured.images) >= 5 * 4
    gateway.stop()
    return capture, len(captured.images)


def test_a_gateway_killed_mid_capture_leaves_only_whole_segments(tiny_repo, triton, tmp_path):
    capture, images = capture_until_killed(tiny_repo, triton, tmp_path)
    assert images == len(read_capture(directory_files(capture)).images) >= 5 * 4
    # Each row names the key that made its request (a gateway without keys: every caller is `anonymous`).
    assert {row.key for row in decode_rows(sorted(capture.glob("images-*.npz"))[0].read_bytes())[1]} == {"anonymous"}


def test_a_student_redistilled_from_a_killed_gateways_capture_reads_every_whole_file_names_the_bad_ones_and_is_exported(
    tiny_run, tiny_repo, triton, tmp_path
):
    capture, whole_images = capture_until_killed(tiny_repo, triton, tmp_path)
    segment = sorted(capture.glob("images-*.npz"))[0].read_bytes()
    bad = {"images-9999999999999-x-000001.npz": segment[: len(segment) // 3], "images-9999999999999-x-000002.npz": b""}
    bad["traffic.csv"] = b"request_id,label\n"
    for name, data in bad.items():
        (capture / name).write_bytes(data)
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, ignore=shutil.ignore_patterns("__pycache__"))
    before = read_manifest(repo)
    result = run_training(
        "redistill", "--run", str(tiny_run), "--capture", str(capture), "--repo", str(repo),
        "--out", str(tmp_path / "redistilled"), "--set", "student.train.epochs=1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    for name in bad:
        assert f"capture file {capture / name} skipped" in result.stdout
    report = json.loads((tmp_path / "redistilled" / "redistill.json").read_text())
    # It continued from the served student (the run's recipe leaves the start and epochs to defaults).
    assert report["redistilled"]["start"] == f"student_kd version {before.models['student_kd'].version}"
    assert report["redistilled"]["epochs"] == 1
    assert report["captured_images"] == whole_images  # every image of every whole file, the kill's last one too
    after = read_manifest(repo)
    for name in ("student_kd", "student_kd_int8"):  # a candidate beside the current version, which still answers
        assert after.models[name].version == before.models[name].version
        assert after.models[name].candidate.version == before.models[name].version + 1
        assert (repo / name / str(after.models[name].candidate.version) / "model.onnx").is_file()
        assert report["export"]["versions"][name] == after.models[name].candidate.version
    candidate = after.models["student_kd"].candidate
    assert report["export"]["candidate"] == f"student_kd@{candidate.version}"
    assert candidate.source == str(tmp_path / "redistilled" / "student_seed0" / "model.pt")
    assert candidate.metrics["top1"] == pytest.approx(report["redistilled"]["top1"])
    assert candidate.offline_gate == report["candidate"]["offline"]
    # The cascade refitted for the candidate waits for its promotion; the served one is unchanged.
    assert after.cascade == before.cascade and candidate.cascade.metrics != before.cascade.metrics
    assert after.models["teacher"] == before.models["teacher"]
    assert "every config matches its graph" in result.stdout  # check-repo passed on the new repository
    offline = report["candidate"]["offline"]  # the offline gate's figures, whatever it decided
    assert offline["passed"] and offline["top1"]["images"] == report["test_images"]
    assert offline["top1"]["interval"][0] <= offline["top1"]["difference"] <= offline["top1"]["interval"][1]


def test_a_redistilled_student_surely_worse_than_the_served_one_is_refused_offline_unless_forced(
    tiny_run, tiny_repo, triton, tmp_path
):
    """Issue 36: a re-distilled student was exported and served whatever its evaluation said. A student
    made worse on purpose (fresh weights, one epoch, instead of continuing from the served one) is refused
    with exit 2 and one line of figures, the repository untouched; `--force` exports it all the same."""
    capture, _ = capture_until_killed(tiny_repo, triton, tmp_path)
    repo = tmp_path / "repo"
    shutil.copytree(tiny_repo, repo, ignore=shutil.ignore_patterns("__pycache__"))
    before = (repo / "manifest.json").read_bytes()
    args = [
        "redistill", "--run", str(tiny_run), "--capture", str(capture), "--repo", str(repo),
        "--out", str(tmp_path / "broken"), "--set", "student.train.epochs=1", "--set", "redistill.start=fresh",
    ]  # fmt: skip
    refused = run_training(*args)
    assert refused.returncode == 2, refused.stderr[-3000:]
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("error: the re-distilled student is not exported: top-1 ") and "--force" in error, error
    assert (repo / "manifest.json").read_bytes() == before
    offline = json.loads((tmp_path / "broken" / "redistill.json").read_text())["candidate"]["offline"]
    assert not offline["passed"] and offline["top1"]["interval"][1] < -offline["max_drop"]
    forced = run_training(*args, "--force")
    assert forced.returncode == 0, forced.stderr[-3000:]
    served = json.loads(before)["models"]["student_kd"]["version"]
    assert read_manifest(repo).models["student_kd"].candidate.version == served + 1


def _declaring(segment: bytes, shape: tuple[int, ...]) -> bytes:
    """The segment with its images array's header rewritten to declare `shape` (the data left as it was)."""
    source, target = zipfile.ZipFile(io.BytesIO(segment)), io.BytesIO()
    with zipfile.ZipFile(target, "w") as out:
        for info in source.infolist():
            data = source.read(info)
            if info.filename == "images.npy":
                header = np.lib.format.header_data_from_array_1_0(np.zeros((1, 8, 8, 3), np.uint8))
                header["shape"] = shape
                head = io.BytesIO()
                np.lib.format.write_array_header_1_0(head, header)
                data = head.getvalue() + data[len(head.getvalue()) :]
            out.writestr(info, data)
    return target.getvalue()


def test_a_segment_of_another_image_size_or_declaring_a_huge_shape_is_skipped_not_fatal():
    """Review finding 16: one segment of another image size aborted a whole re-distillation (np.concatenate
    outside the try), and a header declaring a huge shape raised an uncaught MemoryError."""
    small = rows("req-a", 3, seed=1)
    large = [CapturedImage(**{**r.__dict__, "image": np.zeros((16, 16, 3), np.uint8)}) for r in rows("req-b", 2)]
    whole = encode_images(small, CLASSES)
    files = [
        (segment_name("images", 1.0, "w", 1), whole),
        (segment_name("images", 2.0, "w", 2), encode_images(large, CLASSES)),
        (segment_name("images", 3.0, "w", 3), _declaring(whole, (10**12, 8, 8, 3))),
        (segment_name("images", 4.0, "w", 4), encode_images(rows("req-c", 2, seed=3), CLASSES)),
    ]
    captured = read_capture(files)
    assert len(captured.images) == 5 and captured.images.shape[1:] == (8, 8, 3)
    assert captured.request_ids.tolist() == ["req-a"] * 3 + ["req-c"] * 2
    skipped = dict(captured.skipped)
    assert set(skipped) == {files[1][0], files[2][0]}
    assert "16x16" in skipped[files[1][0]] and "8x8" in skipped[files[1][0]]
    assert "declares" in skipped[files[2][0]]


def test_segments_are_read_one_at_a_time_into_one_array():
    """Review finding 19: every segment was held in memory at once, then copied on decode and on concatenate
    (3-4x the capture). Given loaders, the reader holds one segment at a time beside the array it fills."""
    count, per_segment = 16, 1000

    def segment(i: int) -> bytes:
        images = np.full((per_segment, 16, 16, 3), i, np.uint8)
        segment_rows = [
            CapturedImage(f"r{i}", j, images[j], "student_kd", 1, 0, np.full(10, 0.1, np.float32), 1.0)
            for j in range(per_segment)
        ]
        return encode_images(segment_rows, CLASSES)

    one_segment = len(segment(0))
    files = [(segment_name("images", float(i + 1), "w", i), functools.partial(segment, i)) for i in range(count)]
    tracemalloc.start()
    try:
        captured = read_capture(files)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(captured.images) == count * per_segment
    assert [int(captured.images[i * per_segment, 0, 0, 0]) for i in range(count)] == list(range(count))
    result = captured.images.nbytes
    # Beside the result: the segment being read, its images array, and this test's own making of it (~4
    # segments). Before: every segment, every decoded part and the concatenation (~3x the result).
    assert peak < result + 8 * one_segment, f"peak {peak / 2**20:.1f} MiB for a {result / 2**20:.1f} MiB capture"


def test_erase_removes_one_requests_images_labels_and_answers_everywhere_they_are_kept(tmp_path, capsys):
    """Review finding 18: there was no way to erase one person's data. `python -m gateway erase` removes the
    captured images, labels and A/B answers of given request ids, and leaves everything else whole."""
    from gateway.cli import main
    from gateway.feedback.answers import Answer, AnswerStore

    capture, answers = tmp_path / "capture", tmp_path / "answers"
    sink = LocalSink(capture, retention_s=3600, max_bytes=2**30)
    sink.put(segment_name("images", 1.0, "w", 1), encode_images(rows("req-a", 2, seed=1) + rows("req-b", 1), CLASSES))
    sink.put(segment_name("images", 2.0, "w", 2), encode_images(rows("req-a", 1, seed=2), CLASSES))
    sink.put(segment_name("labels", 3.0, "w", 3), encode_labels([("req-a", ["1", "2"], 3.0), ("req-b", ["7"], 3.0)]))
    store = AnswerStore(answers, ttl_s=600, max_records=100, queue_size=10)
    now = time.time()
    store.write(
        [(rid, Answer(arm="student", model="student_kd", version=1, top1=[3], at=now)) for rid in ("req-a", "req-b")]
    )

    assert main(["erase", "--request-id", "req-a", "--capture-dir", str(capture), "--answers-dir", str(answers)]) == 0
    report = capsys.readouterr().out
    assert "3 captured images" in report and "1 label" in report and "1 A/B answer" in report
    captured = read_capture(directory_files(capture))
    assert captured.request_ids.tolist() == ["req-b"] and captured.labels.tolist() == [7]
    assert sorted(p.name for p in capture.iterdir()) == [
        segment_name("images", 1.0, "w", 1),
        segment_name("labels", 3.0, "w", 3),
    ]
    assert store.find("req-a") is None and store.find("req-b") is not None
    assert main(["erase", "--request-id", "req-a", "--capture-dir", str(capture), "--answers-dir", str(answers)]) == 0
    assert "0 captured images" in capsys.readouterr().out  # nothing left to erase: said, not an error


def test_erase_by_key_removes_every_request_that_key_made_and_nothing_of_another_keys(tmp_path, capsys):
    """Finding 18's other half: a person known by their API key, not by request ids. Captured images record
    the key that made the request, as labels and answers do; a label written before labels recorded their
    key goes with its request's images."""
    from gateway.cli import main
    from gateway.feedback.answers import Answer, AnswerStore

    def keyed(request_id: str, n: int, key: str | None) -> list[CapturedImage]:
        return [dataclasses.replace(row, key=key) for row in rows(request_id, n)]

    capture, answers = tmp_path / "capture", tmp_path / "answers"
    sink = LocalSink(capture, retention_s=3600, max_bytes=2**30)
    mixed = keyed("alice-1", 2, "alice") + keyed("bob-1", 1, "bob") + keyed("old-1", 1, None)
    sink.put(segment_name("images", 1.0, "w", 1), encode_images(mixed, CLASSES))
    sink.put(segment_name("images", 2.0, "w", 2), encode_images(keyed("alice-2", 1, "alice"), CLASSES))
    labels = [("alice-1", ["1", "2"], 3.0), ("alice-2", ["4"], 3.0, "alice"), ("bob-1", ["7"], 3.0, "bob")]
    sink.put(segment_name("labels", 3.0, "w", 3), encode_labels(labels))
    assert [r.key for r in decode_rows((capture / segment_name("images", 1.0, "w", 1)).read_bytes())[1]] == [
        "alice", "alice", "bob", None,
    ]  # fmt: skip
    store = AnswerStore(answers, ttl_s=600, max_records=100, queue_size=10)
    now = time.time()
    store.write([
        (rid, Answer(arm="student", model="student_kd", version=1, top1=[3], at=now, key=key))
        for rid, key in (("alice-1", "alice"), ("alice-2", "alice"), ("bob-1", "bob"))
    ])  # fmt: skip

    assert main(["erase", "--key", "alice", "--capture-dir", str(capture), "--answers-dir", str(answers)]) == 0
    report = capsys.readouterr().out
    assert "erased 3 captured images, 2 label line(s), 2 A/B answer(s)" in report and "key(s) alice" in report
    captured = read_capture(directory_files(capture))
    assert captured.request_ids.tolist() == ["bob-1", "old-1"] and captured.labels.tolist() == [7, -1]
    assert not (capture / segment_name("images", 2.0, "w", 2)).exists()  # alice's alone: removed
    assert store.find("alice-1") is None and store.find("alice-2") is None and store.find("bob-1") is not None
