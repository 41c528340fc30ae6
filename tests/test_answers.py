"""The shared answer store behind feedback: whole records, one claim per request across replicas,
retention and the record cap enforced on disk, ids that tell "expired" from "never seen"."""

from __future__ import annotations

import asyncio
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor

from gateway.feedback.answers import LABEL_SUFFIX, Answer, AnswerStore, ShadowAnswer, issued_at, new_request_id
from gateway.feedback.join import FeedbackItem, FeedbackJoin
from gateway.files import create_once, file_stamp, write_whole
from gateway.telemetry.metrics import GatewayMetrics


def answer(at: float, arm: str = "student") -> Answer:
    return Answer(arm=arm, model="student_kd", version=1, top1=[3], at=at)


def test_request_ids_carry_their_issuing_time_and_client_ids_do_not():
    rid = new_request_id(now=1_700_000_000.123)
    assert len(rid) == 32 and int(rid, 16) >= 0
    assert abs(issued_at(rid) - 1_700_000_000.123) < 0.001
    assert new_request_id() != new_request_id()
    assert issued_at("client-chosen-id") is None and issued_at("z" * 32) is None


def test_an_answer_written_by_one_replica_is_found_and_claimed_once_by_any(tmp_path):
    writer = AnswerStore(tmp_path, ttl_s=600, max_records=1000, queue_size=10)
    reader = AnswerStore(tmp_path, ttl_s=600, max_records=1000, queue_size=10)  # another replica, same volume
    writer.write([("req-1", answer(time.time(), "teacher"))])
    found = reader.find("req-1")
    assert found is not None and found.answer.arm == "teacher" and found.answer.top1 == [3]
    assert reader.find("req-2") is None
    # Eight claims racing from threads (as replicas would): exactly one wins.
    with ThreadPoolExecutor(8) as pool:
        wins = list(pool.map(lambda _: AnswerStore.claim(reader.find("req-1"), LABEL_SUFFIX, "3"), range(8)))
    assert wins.count(True) == 1
    assert not list(tmp_path.rglob(".*")), "a temporary file was left behind"


def test_buckets_past_the_retention_go_and_the_cap_removes_the_oldest_first(tmp_path):
    # Written under a cap of 1,000 (by replicas with that setting), swept by one restarted with a cap of 100.
    writer = AnswerStore(tmp_path, ttl_s=60, max_records=1000, queue_size=10)
    now = time.time()
    writer.write([(f"old-{i}", answer(now - 200)) for i in range(5)])
    writer.write([(f"mid-{i}", answer(now - 30)) for i in range(80)])
    writer.write([(f"new-{i}", answer(now)) for i in range(80)])
    store = AnswerStore(tmp_path, ttl_s=60, max_records=100, queue_size=10)
    assert store.find("old-0") is not None
    store.sweep(now)
    assert store.find("old-0") is None, "an answer older than the retention survived the sweep"
    # 160 live records over the cap of 100: the older bucket goes, the newest stays.
    assert store.find("mid-0") is None and store.find("new-79") is not None
    assert sum(1 for p in tmp_path.rglob("*.json")) == 80


def test_a_full_queue_drops_instead_of_waiting_and_the_writer_drains_it(tmp_path):
    async def scenario() -> tuple[list[bool], bool]:
        store = AnswerStore(tmp_path, ttl_s=600, max_records=1000, queue_size=3)
        accepted = [store.remember(f"r{i}", answer(time.time())) for i in range(5)]
        writer = asyncio.create_task(store.run())
        await store.flush()
        await asyncio.sleep(0.05)
        writer.cancel()
        return accepted, all(store.find(f"r{i}") is not None for i in range(3))

    accepted, written = asyncio.run(scenario())
    assert accepted == [True, True, True, False, False] and written
    record = json.loads(next(tmp_path.rglob("*.json")).read_text())
    assert record["arm"] == "student" and record["top1"] == [3]


def pairs_counted(metrics: GatewayMetrics) -> float:
    return sum(
        metrics.feedback_pairs.labels("student", "teacher", a, b)._value.get()
        for a in ("true", "false")
        for b in ("true", "false")
    )


def test_a_shadow_answering_before_or_after_the_feedback_is_paired_exactly_once(tmp_path):
    metrics = GatewayMetrics()
    store = AnswerStore(tmp_path, ttl_s=600, max_records=1000, queue_size=10)
    join = FeedbackJoin(store, [str(d) for d in range(10)], metrics)
    now = time.time()
    primary = Answer(arm="student", model="student_kd", version=1, top1=[3], at=now, shadow_arm="teacher")
    # The shadow first, then the feedback: the feedback counts the pair.
    store.write([("early", primary), ("early", ShadowAnswer([3], now))])
    assert asyncio.run(join.accept_all([FeedbackItem(request_id="early", label="3")], "anonymous"))[0].status == 200
    assert pairs_counted(metrics) == 1
    # The feedback first (the shadow still running), then the shadow: the writer counts the pair.
    store.write([("late", primary)])
    assert asyncio.run(join.accept_all([FeedbackItem(request_id="late", label="8")], "anonymous"))[0].status == 200
    assert pairs_counted(metrics) == 1
    store.write([("late", ShadowAnswer([8], now))])
    assert pairs_counted(metrics) == 2
    assert metrics.feedback_pairs.labels("student", "teacher", "false", "true")._value.get() == 1
    store.write([("late", ShadowAnswer([8], now))])  # written again: still one pair
    assert pairs_counted(metrics) == 2


def test_only_the_experiments_label_keys_count_in_the_gates_and_every_accepted_label_is_still_kept(tmp_path):
    """`gates.label_keys`: a key outside it labels its own requests (accepted, kept, counted per key), but its
    labels move neither the top-1 counts nor the pairs the top-1 gate is judged on."""
    metrics = GatewayMetrics()
    store = AnswerStore(tmp_path, ttl_s=600, max_records=1000, queue_size=10)
    join = FeedbackJoin(store, [str(d) for d in range(10)], metrics, gate_keys=lambda: ["honest"])
    now = time.time()
    for rid, key in (("h", "honest"), ("x", "hostile")):
        answered = Answer(arm="student", model="student_kd", version=1, top1=[3], at=now, shadow_arm="teacher", key=key)
        store.write([(rid, answered), (rid, ShadowAnswer([3], now))])
        result = asyncio.run(join.accept_all([FeedbackItem(request_id=rid, label="4")], key))[0]
        assert result.status == 200 and store.find(rid).label() == "4"
    assert metrics.feedback_top1.labels("student", "false")._value.get() == 1  # the honest key's label only
    assert pairs_counted(metrics) == 1
    assert metrics.feedback_key_labels.labels("hostile", "false")._value.get() == 1
    assert metrics.feedback_key_labels.labels("honest", "false")._value.get() == 1


def test_a_claimed_label_is_never_seen_empty_and_one_bad_record_costs_no_other(tmp_path):
    store = AnswerStore(tmp_path, ttl_s=600, max_records=1000, queue_size=10)
    now = time.time()
    store.write([("r", Answer(arm="student", model="student_kd", version=1, top1=[3], at=now, shadow_arm="teacher"))])
    found = store.find("r")
    assert AnswerStore.claim(found, LABEL_SUFFIX, "3") and found.label() == "3"
    assert not AnswerStore.claim(found, LABEL_SUFFIX, "5") and found.label() == "3"
    assert sorted(p.name for p in found.path.parent.iterdir()) == sorted(
        [found.path.name, found.path.stem + LABEL_SUFFIX]
    )

    def broken_pairing(*_):
        raise KeyError("a label the pairing cannot read")

    store.on_late_pair = broken_pairing
    other = Answer(arm="teacher", model="teacher", version=1, top1=[1], at=now)
    store.write([("r", ShadowAnswer([3], now)), ("next", other)])
    assert store.find("next") is not None, "the record after a failing one was lost"


def test_answers_and_labels_are_readable_by_the_gateways_group_only(tmp_path):
    """Review finding 18: records of what people sent (answers, labels, capture segments) were written 0o644
    on a shared volume. Now owner read-write, group read (the replicas share a group), others nothing."""
    store = AnswerStore(tmp_path, ttl_s=600, max_records=1000, queue_size=10)
    store.write([("req-1", answer(time.time()))])
    assert AnswerStore.claim(store.find("req-1"), LABEL_SUFFIX, "3")
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert len(written) == 2
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {oct(0o640)}


def test_the_record_cap_is_hard_even_within_the_newest_bucket(tmp_path):
    """Review finding 20: the sweep never removes the newest bucket, so max_records was no cap while one
    bucket filled up. Past the cap the writer keeps no more records, and says how many it dropped."""
    store = AnswerStore(tmp_path, ttl_s=600, max_records=5, queue_size=10)
    dropped = []
    store.on_dropped = dropped.append
    now = time.time()
    store.write([(f"req-{i}", answer(now)) for i in range(8)])
    store.sweep()
    assert sum(1 for _ in tmp_path.rglob("*.json")) == 5 and sum(dropped) == 3
    assert store.find("req-4") is not None and store.find("req-5") is None
    # A second store on the same volume (another replica) sees the records already there.
    other = AnswerStore(tmp_path, ttl_s=600, max_records=5, queue_size=10)
    other.on_dropped = dropped.append
    other.write([("req-9", answer(now))])
    assert other.find("req-9") is None and sum(dropped) == 4


def test_a_file_replaced_by_one_of_the_same_size_within_one_clock_tick_is_a_new_stamp(tmp_path):
    """Review finding 20: the followed files' stamp was (mtime, size); a replacement is a new inode."""
    path = tmp_path / "manifest.json"
    write_whole(path, '{"v": 1}')
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    before = file_stamp(path)
    write_whole(path, '{"v": 2}')
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert file_stamp(path) != before


def test_a_claim_whose_link_was_made_but_answered_exists_is_still_won(tmp_path, monkeypatch):
    """Review (NFS): a retransmitted LINK may answer "exists" to the caller whose first LINK made it."""
    real_link = os.link

    def link_then_exists(source, target):
        real_link(source, target)
        raise FileExistsError(target)

    monkeypatch.setattr(os, "link", link_then_exists)
    assert create_once(tmp_path / "claim", "3")
    monkeypatch.setattr(os, "link", real_link)
    assert not create_once(tmp_path / "claim", "4") and (tmp_path / "claim").read_text() == "3"


def test_only_the_key_that_made_a_request_may_label_it_even_an_id_the_client_chose(tmp_path):
    """Issue 36: any caller with a classify key could label any request id (the first label won, and the
    owner's own feedback then got 409), ids may be the client's, and those labels train the next student.
    The answer records the caller's key; a label from another key is 403 and counts nothing."""
    metrics = GatewayMetrics()
    store = AnswerStore(tmp_path, ttl_s=600, max_records=1000, queue_size=10)
    join = FeedbackJoin(store, [str(d) for d in range(10)], metrics)
    now = time.time()
    issued = new_request_id(now)
    for request_id in (issued, "alice-own-id-7"):  # an id the gateway issued, and one the client chose
        store.write([(request_id, Answer(arm="student", model="student_kd", version=1, top1=[3], at=now, key="alice"))])

    def label(request_id: str, key: str):
        return asyncio.run(join.accept_all([FeedbackItem(request_id=request_id, label="7")], key))[0]

    for request_id in (issued, "alice-own-id-7"):
        foreign = label(request_id, "mallory")
        assert foreign.status_code == 403 and foreign.kind == "foreign_request", foreign
        assert label(request_id, "anonymous").status_code == 403
        assert label(request_id, "alice").status == 200  # the owner's label is not taken by the first comer
    assert metrics.feedback.labels("foreign_request")._value.get() == 4
    assert metrics.feedback_top1.labels("student", "false")._value.get() == 2  # the two labels alice sent
    # Per key, whether its labels agree with what was answered: a key far apart from the others shows.
    assert metrics.feedback_key_labels.labels("alice", "false")._value.get() == 2
    assert metrics.feedback_key_labels.labels("mallory", "false")._value.get() == 0


def test_an_answer_recorded_before_keys_were_recorded_is_still_joinable(tmp_path):
    """Records written by a gateway before this change carry no key: they stay joinable (they expire
    within the store's retention), as answers already given stay joinable after a restart."""
    store = AnswerStore(tmp_path, ttl_s=600, max_records=1000, queue_size=10)
    join = FeedbackJoin(store, [str(d) for d in range(10)], GatewayMetrics())
    store.write([("old", answer(time.time()))])
    legacy = store.find("old").answer
    assert legacy.key is None
    assert asyncio.run(join.accept_all([FeedbackItem(request_id="old", label="3")], "anyone"))[0].status == 200
