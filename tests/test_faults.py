"""Faults against the real gateway and Triton, each on its own pair, with the issue's bounds.

The same functions write `benchmarks/faults.md` (`python -m loadtest faults`)."""

from __future__ import annotations

from loadtest.faults import LOST, hostile_inputs, overload, sigterm_under_load, triton_killed, triton_stalled


def test_hostile_inputs_get_their_status_in_the_error_shape(gateway):
    rows = hostile_inputs(gateway.url)
    wrong = [r for r in rows if r["status"] != r["expected"] or not r["error_shape"]]
    assert not wrong, wrong


def test_triton_killed_mid_load_answers_again_within_10_s_with_no_500_and_nothing_lost(tiny_repo):
    result = triton_killed(tiny_repo)
    assert set(result.statuses) <= {"200", "503", "504"}, result.statuses
    assert result.statuses.get(LOST, 0) == 0
    assert 0 < result.figures["recovery_s"] < 10, result.figures


def test_triton_frozen_past_the_deadline_gives_504s_in_time_then_recovers(tiny_repo):
    result = triton_stalled(tiny_repo, deadline_s=1.0, stall_s=3.0)
    assert set(result.statuses) <= {"200", "504"} and result.statuses.get("504", 0) > 0, result.statuses
    assert 0 < result.figures["max_504_ms"] <= 1500, result.figures  # the deadline + 0.5 s
    assert 0 <= result.figures["recovery_after_sigcont_s"] < 5, result.figures


def test_overload_sheds_with_503_and_answers_within_the_deadline(tiny_repo):
    result = overload(tiny_repo, clients=48, images=32, seconds=12.0)
    assert set(result.statuses) <= {"200", "503", "429"}, result.statuses
    assert result.statuses.get("503", 0) > 0 and result.statuses.get("200", 0) > 0, result.statuses
    assert result.figures["answered_p99_ms"] <= result.figures["deadline_ms"], result.figures


def test_sigterm_turns_readiness_off_first_finishes_in_flight_and_exits_in_grace(tiny_repo):
    result = sigterm_under_load(tiny_repo, drain_s=1.0)
    assert result.statuses.get(LOST, 0) == 0, result.statuses
    assert set(result.statuses) == {"200"}, result.statuses  # in flight at the signal or during the drain
    assert 0 <= result.figures["unready_after_ms"] < 500, result.figures
    assert result.figures["answered_200_after_signal"] > 0  # served during the drain
    assert result.figures["exit_after_s"] < 1.0 + 20.0, result.figures
