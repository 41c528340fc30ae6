"""The drift test (kdcontract.drift): anytime-valid false alarms on unchanged traffic, detection on drifted
traffic. Seeded simulations, as the rollout's statistics study is."""

from __future__ import annotations

import io
import math
import time

import numpy as np
import pytest

from gateway.process import GatewayProcess
from kdcontract.client_forms import ClientForm, render_image
from kdcontract.digits import digit_png_bytes, digits_gray, held_out_indices
from kdcontract.drift import STARTS_KEPT, UNSURE, VersionCounts, judge_drift, log_evidence, reference_from
from kdcontract.manifest import DriftReference, read_manifest
from loadtest.clients.measure import metric_value

CLASSES = 10
PNG = {"Content-Type": "image/png"}
REFERENCE = DriftReference(images=270, unsure_below=0.8, unsure_rate=0.10, class_shares=[0.1] * CLASSES)


def stream(rng: np.random.Generator, n: int, unsure_rate: float, shares: list[float]) -> np.ndarray:
    """`n` calibrated answers: the predicted class drawn from `shares`, its confidence below 0.8 at `unsure_rate`."""
    predicted = rng.choice(CLASSES, size=n, p=shares)
    confidence = np.where(rng.random(n) < unsure_rate, 0.5, 0.95)
    probabilities = np.full((n, CLASSES), 0.0)
    probabilities[np.arange(n), predicted] = confidence
    return probabilities


def first_alarm(probabilities: np.ndarray, tolerance: float, alpha: float, every: int) -> int | None:
    """The image count at which the test first rejects, judged every `every` images (as the monitor does)."""
    counts = VersionCounts()
    for start in range(0, len(probabilities), every):
        counts.add(probabilities[start : start + every], REFERENCE.unsure_below)
        if judge_drift(counts, REFERENCE, tolerance, alpha).detected:
            return counts.images
    return None


def test_unchanged_traffic_at_the_edge_of_the_tolerance_raises_at_most_alpha_false_alarms_however_often_judged():
    """The hardest unchanged traffic: every share exactly at its reference plus the tolerance (the null's edge),
    judged after every 50 images for 10,000 images: 200 seeded streams, false alarms <= 5%. The same streams
    judged without the tolerance (their shares then exceed the bounds by 5 points) are alarms: the check can fail."""
    alpha = 0.05
    shares = [0.15] + [0.85 / 9] * 9  # class 0 at its edge (0.10 + 0.05); the others below theirs

    def alarms(tolerance: float, seeds: range) -> int:
        return sum(
            first_alarm(stream(np.random.default_rng(s), 10_000, 0.15, shares), tolerance, alpha, every=50) is not None
            for s in seeds
        )

    false_alarms = alarms(0.05, range(200))
    print(f"false alarms: {false_alarms} of 200 streams")
    assert false_alarms <= 10, false_alarms  # 5% of 200
    assert alarms(0.0, range(20)) == 20


def test_a_change_after_a_long_quiet_history_is_detected_about_as_fast_as_at_the_start():
    """A test on all answers since counting began would need the quiet history outweighed first (18,497 answers
    after 2,450 quiet ones, measured in `make loop` before): the tests begun every BLOCK answers see the change
    from their start. 10,000 answers at the reference's rates, then four times the unsure answers."""
    quiet, shares = 10_000, [0.1] * CLASSES
    delays = []
    for seed in range(30):
        rng = np.random.default_rng(seed)
        stream_ = np.concatenate([stream(rng, quiet, 0.10, shares), stream(rng, 3_000, 0.40, shares)])
        alarm = first_alarm(stream_, 0.05, 0.05, every=25)
        assert alarm is not None and alarm > quiet  # nothing before the change
        delays.append(alarm - quiet)
    print(f"from the change to detection after {quiet} quiet answers: median {np.median(delays):g}, max {max(delays)}")
    assert np.median(delays) <= 150, np.median(delays)


@pytest.mark.parametrize(("unsure_rate", "shares", "within"), [
    (0.40, [0.1] * CLASSES, 120),  # inputs it was not trained on: four times as many unsure answers
    (0.10, [0.5] + [0.5 / 9] * 9, 120),  # answers collapsing onto one class
])  # fmt: skip
def test_drifted_traffic_is_detected_within_a_stated_number_of_images(unsure_rate, shares, within):
    delays = [
        first_alarm(stream(np.random.default_rng(seed), 2_000, unsure_rate, shares), 0.05, 0.05, every=10)
        for seed in range(50)
    ]
    print(f"images to detection: median {np.median(delays):g}, max {max(delays)}")
    assert all(d is not None for d in delays)
    assert np.median(delays) <= within, np.median(delays)


def test_the_evidence_is_a_mixture_of_likelihood_ratios_and_nothing_is_evidence_against_a_bound_of_one():
    # One alternative's ratio by hand: k = 3 of n = 4 against 0.25 at q = 0.25 + 0.75 * j / 65.
    qs = [0.25 + 0.75 * j / 65 for j in range(1, 65)]
    expected = math.log(np.mean([(q / 0.25) ** 3 * ((1 - q) / 0.75) for q in qs]))
    assert log_evidence(3, 4, 0.25) == pytest.approx(expected)
    assert log_evidence(10, 10, 1.0) == 0.0 and log_evidence(0, 0, 0.1) == 0.0
    assert log_evidence(0, 1000, 0.1) < 0  # only fewer hits than the bound: evidence for the null


def test_a_reference_is_measured_from_calibrated_answers():
    rng = np.random.default_rng(0)
    probabilities = stream(rng, 1000, 0.2, [0.1] * CLASSES)
    probabilities[:, 0] += 0.01  # no ties at one confidence
    reference = reference_from(probabilities)
    assert reference.images == 1000 and sum(reference.class_shares) == pytest.approx(1)
    assert reference.unsure_rate <= 0.10 and reference.unsure_below <= 0.96
    verdict = judge_drift(VersionCounts(), reference, 0.05, 0.05)
    assert not verdict.detected and verdict.evidence[UNSURE] == 0 and verdict.images == 0


def test_tests_begin_every_block_and_only_the_latest_are_kept_each_at_its_share_of_alpha():
    counts = VersionCounts()
    for _ in range(100):
        counts.add(stream(np.random.default_rng(0), 250, 0.1, [0.1] * CLASSES), REFERENCE.unsure_below)
    assert [j for j, *_ in counts.starts] == list(range(101 - STARTS_KEPT + 1, 102))
    assert counts.starts[-1][1] == counts.images == 25_000
    verdict = judge_drift(counts, REFERENCE, 0.05, 0.05)
    j = next(j for j, images, *_ in counts.starts if images == counts.images - verdict.since)
    assert verdict.threshold == pytest.approx(math.log10(11 * j * (j + 1) / 0.05))
    assert not verdict.detected  # 25,000 answers at the reference's rates


def rotated(index: int) -> bytes:
    """A held-out digit as a 64 px PNG turned a quarter: a form no client form in training takes."""
    picture = render_image(digits_gray()[0][index], ClientForm(size=64, resample="bilinear")).rotate(90)
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def test_a_served_version_is_flagged_once_its_traffic_turns_to_a_form_it_was_not_trained_on(tiny_repo, triton):
    """Upright held-out digits leave the student's test quiet; the same digits turned a quarter raise it within
    a stated number of images, on `/v1/drift`, the metrics the alert reads, and the log."""
    gateway = GatewayProcess(tiny_repo, triton.http_url, env={"KDSERVE_DRIFT_INTERVAL_S": "0.1"})
    try:
        manifest = read_manifest(tiny_repo)
        version = manifest.models["student_kd"].version
        assert manifest.models["student_kd"].drift_reference is not None  # the export measured it
        held_out = held_out_indices(manifest.split)

        def send(pngs: list[bytes]) -> dict:
            for png in pngs:
                resp = gateway.client.post("/v1/classify?model=student_kd", content=png, headers=PNG)
                assert resp.status_code == 200, resp.text
            time.sleep(0.3)  # past a judgement
            return gateway.client.get("/v1/drift").json()["versions"][f"student_kd@{version}"]

        upright = send([digit_png_bytes(int(i)) for i in held_out[:200]])
        assert upright["images"] == 200 and not upright["detected"], upright
        sent = 0
        while sent < 400:
            turned = send([rotated(int(i)) for i in held_out[sent : sent + 10]])
            sent += 10
            if turned["detected"]:
                break
        print(f"drift detected after {sent} rotated images ({turned['strongest']})")
        assert turned["detected"] and sent <= 300, (sent, turned)  # 80 measured here
        metrics = gateway.client.get("/metrics").text
        labels = {"model": "student_kd", "version": str(version)}
        assert metric_value(metrics, "kdserve_drift_detected", labels) == 1
        assert metric_value(metrics, "kdserve_drift_images", labels) == 200 + sent
        assert "drift: student_kd version" in gateway.log_path.read_text()
    finally:
        gateway.stop()
