"""``Session`` against the in-process ``FakeExecutor``: the supervisor's own rules --
retries, parking, hand-backs, the abort path -- without a process in sight.

Each test builds a real job directory (ingest, job.json, journal header) and runs one
session on it, then checks what was journaled by replaying it from disk, the way the
next command would see it.
"""

from __future__ import annotations

import json
import threading

import pytest
from fake_executor import LOST, RAISE, UNSTARTED, FakeExecutor

from mrpool import records
from mrpool.errors import StorageError
from mrpool.items import ingest
from mrpool.journal import JournalWriter, read_records
from mrpool.planner import PlanOptions, plan_session
from mrpool.slots import crash_evidence
from mrpool.spec import spec_from_dict
from mrpool.store import DLQ, FAILED, SUCCEEDED, JobStore, create_job_dir, write_job_file
from mrpool.supervisor import LOST_OUTCOME_LIMIT, Session, SessionOptions


def make_store(tmp_path, n: int = 6) -> JobStore:
    src = tmp_path / "src"
    src.mkdir()
    (src / "items.jsonl").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(n)))
    (src / "m.py").write_text("def f(item):\n    return item\n")
    spec = spec_from_dict({"input": "items.jsonl", "map": {"callable": "m:f"}}, base_dir=src)

    def build(tmp):
        report = ingest(spec, tmp)
        write_job_file(
            tmp, "j", spec, report.total, report.duplicates, report.id_mode, report.items_table
        )
        journal = JournalWriter(tmp / "journal.log", 0)
        journal.append(records.job("j", report.total, report.duplicates, report.id_mode))
        journal.close()

    return create_job_dir(tmp_path / "state", "j", build)


def run_session(store: JobStore, executor: FakeExecutor, **options) -> Session:
    state = store.load_state(store.info().total)
    journal = JournalWriter(store.journal_path, state.offset)
    plan = plan_session(store.dir, state, PlanOptions(), crash_evidence(store.dir, state))
    session = Session(store, state, journal, plan, executor, SessionOptions(**options))
    try:
        session.run()
    finally:
        journal.close()  # as api._run_session does, after the session or its abort
    return session


def replayed(store: JobStore):
    """The state the next command would read (from the journal on disk)."""
    return store.load_state(store.info().total)


def kinds(store: JobStore, kind: str) -> list[dict]:
    return [rec for _, _, rec in read_records(store.journal_path) if rec["k"] == kind]


def test_a_failed_attempt_is_retried_under_the_next_number_then_succeeds(tmp_path):
    store = make_store(tmp_path)
    fake = FakeExecutor(lambda item, attempt: ValueError("flaky") if attempt == 1 else item["id"])
    run_session(store, fake, retries=1)
    state = replayed(store)
    assert list(state.status) == [SUCCEEDED] * 6
    assert sorted(fake.ran) == sorted([(i, 1) for i in range(6)] + [(i, 2) for i in range(6)])
    assert [rec["next"] for rec in kinds(store, "f")] == ["retry"] * 6


def test_an_item_that_fails_every_attempt_is_parked_after_one_plus_retries(tmp_path):
    store = make_store(tmp_path)
    fake = FakeExecutor(lambda item, attempt: ValueError("bad") if item["id"] == 3 else item["id"])
    session = run_session(store, fake, retries=2)
    state = replayed(store)
    assert state.status[3] == DLQ and state.attempts[3] == 3
    assert [(i, a) for i, a in fake.ran if i == 3] == [(3, 1), (3, 2), (3, 3)]
    assert [rec["next"] for rec in kinds(store, "f")] == ["retry", "retry", "dlq"]
    assert session.report("j").exit_code == 1


def test_a_lost_outcome_runs_again_uncharged_until_the_third_loss_counts(tmp_path):
    store = make_store(tmp_path, n=2)
    losses = {0: 1, 1: LOST_OUTCOME_LIMIT}  # item 0 loses one outcome, item 1 every one

    def behave(item, attempt):
        if losses[item["id"]]:
            losses[item["id"]] -= 1
            return LOST
        return item["id"]

    fake = FakeExecutor(behave)
    run_session(store, fake, retries=0)
    state = replayed(store)
    assert state.status[0] == SUCCEEDED  # retries 0, yet the lost outcome was not charged
    assert [a for i, a in fake.ran if i == 0] == [1, 2]
    assert [a for i, a in fake.ran if i == 1] == list(range(1, LOST_OUTCOME_LIMIT + 1))
    assert state.status[1] == DLQ  # its third loss counted as a failed attempt: parked
    failure = kinds(store, "f")[-1]
    assert failure["i"] == 1 and failure["kind"] == "worker_died"


def test_each_hand_back_takes_the_next_attempt_number(tmp_path):
    store = make_store(tmp_path, n=1)
    answers = iter([LOST, LOST, "done"])
    fake = FakeExecutor(lambda item, attempt: next(answers))
    run_session(store, fake)
    assert fake.ran == [(0, 1), (0, 2), (0, 3)]  # a number that ran is never used again


def test_a_storage_error_aborts_the_session_without_a_crash_streak(tmp_path):
    store = make_store(tmp_path, n=4)
    fake = FakeExecutor(lambda item, attempt: RAISE if item["id"] == 2 else item["id"])
    with pytest.raises(StorageError):
        run_session(store, fake, retries=0)
    closes = kinds(store, "close")
    assert closes and closes[-1]["reason"].startswith("aborted: StorageError")
    assert fake.calls[-2:] == ["cancel", "shutdown"]
    state = replayed(store)
    assert state.open_count == 0 and not any(state.streak)
    # the attempts open at the abort stay charged: their outcomes may have run
    assert all(state.attempts[i] == 1 for i in range(4) if state.status[i] != SUCCEEDED)


def test_two_storage_errors_in_a_row_park_nothing(tmp_path):
    store = make_store(tmp_path, n=3)
    for _ in range(2):
        with pytest.raises(StorageError):
            run_session(store, FakeExecutor(lambda item, attempt: RAISE))
    fake = FakeExecutor(lambda item, attempt: item["id"])
    run_session(store, fake)
    state = replayed(store)
    assert list(state.status) == [SUCCEEDED] * 3
    assert not kinds(store, "f")  # no crash_loop parking, no failure at all


def test_an_attempt_handed_back_unstarted_runs_again_under_its_own_number(tmp_path):
    store = make_store(tmp_path, n=1)
    answers = iter([UNSTARTED, UNSTARTED, "done"])
    fake = FakeExecutor(lambda item, attempt: next(answers))
    run_session(store, fake, retries=0)
    assert fake.ran == [(0, 1), (0, 1), (0, 1)]  # it never began: its number was never used
    assert replayed(store).status[0] == SUCCEEDED


def test_what_the_executor_says_is_journaled_after_the_outcomes_it_came_with(tmp_path):
    store = make_store(tmp_path, n=2)
    answers = {0: iter([LOST, 0]), 1: iter([1])}
    run_session(store, FakeExecutor(lambda item, attempt: next(answers[item["id"]])))
    journal = [rec for _, _, rec in read_records(store.journal_path)]
    workers = [rec for rec in journal if rec["k"] == "worker"]
    assert [w["ev"] for w in workers] == ["started", "died"]  # from start(), from wait()
    started = journal.index(workers[0])
    assert journal[started - 1]["k"] == "plan" and journal[started + 1]["k"] == "s"


def test_a_stop_request_cuts_the_session_and_keeps_the_rest_pending(tmp_path):
    store = make_store(tmp_path, n=6)
    stop = threading.Event()

    def behave(item, attempt):
        stop.set()  # asked while the first batch runs: that batch is still recorded
        return item["id"]

    session = run_session(store, FakeExecutor(behave, room=2), stop=stop)
    assert session.report("j").state == "interrupted"
    state = replayed(store)
    assert state.counts[SUCCEEDED] == 2 and state.open_count == 0
    assert kinds(store, "close")[-1]["reason"] == "interrupted: stopped by the caller"


def test_a_full_dlq_with_keep_failed_keeps_the_item_as_failed(tmp_path):
    store = make_store(tmp_path, n=3)
    fake = FakeExecutor(lambda item, attempt: ValueError("no"))
    session = run_session(store, fake, dlq_max_items=1, dlq_on_full="keep_failed")
    state = replayed(store)
    assert state.counts[DLQ] == 1 and state.counts[FAILED] == 2
    assert [f["next"] for f in kinds(store, "f")] == ["dlq", "failed", "failed"]
    assert "kept as failed" in session.report("j").message
