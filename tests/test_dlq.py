"""Issue 3: the dead letter queue, end to end with real ``python -m mrpool`` processes.

Every job here runs ``work.py`` (below) as its map command. Whether an item
fails is decided by ``broken.json`` in the job directory (item id -> failure
mode), so a test "fixes the cause" by rewriting or deleting that file. Every
attempt appends ``<id> <MRPOOL_ATTEMPT>`` to ``calls.log``, the side log that
proves which items really ran (and with which cumulative attempt number); a
``slow`` file makes every attempt sleep, for the crash test.

What is proved: failed items are parked with their full, cumulative history;
``dlq list/show/stats/export`` report them faithfully; ``dlq retry`` (all or
named) moves successes out of the DLQ exactly once, also across a SIGKILL;
``purge`` needs ``--yes``; ``dlq.max_items`` never loses an item; the Python
API matches the CLI; and ``dlq.json`` is only a derived cache.
"""

from __future__ import annotations

import base64
import json
import os
import zlib
from pathlib import Path

import psutil
import pytest
from conftest import PY, journal_records, kill_group, wait_for, write_job

from mrpool import api
from mrpool.errors import MrpoolError, UsageError
from mrpool.journal import decode_line, encode_record

pytestmark = pytest.mark.timeout(120)

IDS = list(range(1, 11))  # item i sits at input index i - 1

WORK_PY = r"""
import json, os, sys, time

item = json.load(sys.stdin)
iid, n = str(item["id"]), item["n"]
with open("calls.log", "a") as log:
    log.write(f"{iid} {os.environ['MRPOOL_ATTEMPT']}\n")
if os.path.exists("slow"):
    time.sleep(float(open("slow").read()))
try:
    with open("broken.json") as f:
        mode = json.load(f).get(iid)
except FileNotFoundError:
    mode = None
if mode == "io":  # same failure, numbers and paths differ per item
    print(f"reading shard for item {iid}", file=sys.stderr)
    print(f"read failed at offset {n * 4096} in /var/data/shard-{n}/part{n * 7}.bin errno 5",
          file=sys.stderr)
    sys.exit(3)
if mode == "checksum":  # a different failure
    print(f"checksum mismatch in block {n}", file=sys.stderr)
    sys.exit(4)
print(json.dumps({"double": n * 2}))
"""


# -- helpers -------------------------------------------------------------------------
def make_job(
    tmp_path: Path,
    broken: dict[int, str] | None,
    *,
    retries: int = 1,
    workers: int = 2,
    extra: dict | None = None,
) -> tuple[Path, Path]:
    """A 10-item job (``{"id": i, "n": i}``) whose items in ``broken`` fail; returns (job file, job dir)."""
    job_dir = tmp_path / "job"
    jobfile = write_job(
        job_dir,
        [{"id": i, "n": i} for i in IDS],
        {"command": [PY, "-S", "work.py"], "retries": retries, "backoff": 0},
        workers=workers,
        extra=extra,
        files={"work.py": WORK_PY},
    )
    set_broken(job_dir, broken)
    return jobfile, job_dir


def set_broken(job_dir: Path, broken: dict[int, str] | None) -> None:
    """Make the items in ``broken`` fail (mode "io" or "checksum"); None fixes everything."""
    path = job_dir / "broken.json"
    if broken is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(json.dumps({str(k): v for k, v in broken.items()}))


def calls(job_dir: Path) -> list[tuple[int, int]]:
    """``(item id, MRPOOL_ATTEMPT)`` of every attempt the map command started."""
    path = job_dir / "calls.log"
    if not path.exists():
        return []
    return [tuple(int(x) for x in line.split()) for line in path.read_text().splitlines()]


def start_job(mrpool, jobfile: Path, job_id: str, expect: int):
    """``mrpool run`` to the end; checks the id line and the exit status."""
    r = mrpool.run("run", str(jobfile), "--job-id", job_id)
    assert r.stdout.splitlines()[0] == job_id, r.stderr
    assert r.returncode == expect, r.stderr
    return r


def dlq_ids(mrpool, job_id: str) -> list[int]:
    return [int(e["id"]) for e in mrpool.dlq(job_id)]


def result_ids(mrpool, job_id: str) -> list[int]:
    return [int(row["id"]) for row in mrpool.results(job_id)]


def checked_status(mrpool, job_id: str) -> dict:
    """``status --json``, asserting the contract's invariant total = succeeded + dlq + failed + pending."""
    s = mrpool.status(job_id)
    assert s["total"] == s["succeeded"] + s["dlq"] + s["failed"] + s["pending"], s
    return s


def ok_ids_of_retry(job_dir: Path) -> list[int]:
    """Ids journaled as succeeded by the latest ``dlq retry`` session ([] before it opens)."""
    records = journal_records(job_dir)
    opens = [i for i, r in enumerate(records) if r["k"] == "open" and r["cmd"] == "dlq retry"]
    if not opens:
        return []
    return [IDS[e[0]] for r in records[opens[-1] :] if r["k"] == "ok" for e in r["b"]]


# -- tests ---------------------------------------------------------------------------
def test_failed_items_are_parked_and_dlq_retry_finishes_the_job(mrpool, tmp_path):
    """Items 4-6 fail every attempt: run exits 1 with them (and only them) in the DLQ;
    after the cause is fixed, ``dlq retry`` exits 0 and every id has exactly one result."""
    jobfile, job_dir = make_job(tmp_path, {4: "io", 5: "io", 6: "io"}, retries=1)

    # Phase 1: the run parks 4, 5, 6 after 1 + retries = 2 attempts each.
    r = start_job(mrpool, jobfile, "j", expect=1)
    assert "3 in the DLQ" in r.stderr
    assert "mrpool dlq list j" in r.stderr and "mrpool dlq retry j" in r.stderr
    entries = mrpool.dlq("j")
    assert [int(e["id"]) for e in entries] == [4, 5, 6]
    for e in entries:
        assert e["attempts"] == 2
        assert "exit status 3" in e["error"] and "read failed" in e["error"], e
        assert e["signature"]
    s = checked_status(mrpool, "j")
    assert (s["total"], s["succeeded"], s["dlq"], s["failed"], s["pending"]) == (10, 7, 3, 0, 0)
    assert s["state"] == "completed_with_failures"
    assert sorted(result_ids(mrpool, "j")) == [1, 2, 3, 7, 8, 9, 10]

    # Phase 2: fix the cause; the retry runs only the DLQ items, once each.
    set_broken(job_dir, None)
    before = len(calls(job_dir))
    r = mrpool.run("dlq", "retry", "j")
    assert r.returncode == 0, r.stderr
    assert sorted(calls(job_dir)[before:]) == [(4, 3), (5, 3), (6, 3)]

    # Phase 3: the DLQ is empty and each of the 10 ids has exactly one result.
    assert mrpool.dlq("j") == []
    assert result_ids(mrpool, "j") == IDS
    s = checked_status(mrpool, "j")
    assert (s["state"], s["succeeded"], s["dlq"]) == ("completed", 10, 0)


def test_retry_that_still_fails_keeps_only_that_item_with_every_attempt(mrpool, tmp_path):
    """A retry where item 5 still fails: 4 and 6 leave the DLQ, 5 stays with the history
    of all four attempts across both runs, numbered cumulatively 1, 2, 3, 4."""
    jobfile, job_dir = make_job(tmp_path, {4: "io", 5: "io", 6: "io"}, retries=1)
    start_job(mrpool, jobfile, "j", expect=1)

    # Phase 1: fix 4 and 6 only; the retry exits 1 because 5 is parked again.
    set_broken(job_dir, {5: "io"})
    r = mrpool.run("dlq", "retry", "j")
    assert r.returncode == 1, r.stderr
    assert "1 in the DLQ" in r.stderr

    # Phase 2: only 5 is left, with attempts 1..4 in its history, oldest first.
    [entry] = mrpool.dlq("j")
    assert (int(entry["id"]), entry["attempts"]) == (5, 4)
    shown = json.loads(mrpool.run("dlq", "show", "j", "5").stdout)
    assert [h["attempt"] for h in shown["history"]] == [1, 2, 3, 4]
    times = [h["t"] for h in shown["history"]]
    assert times == sorted(times)
    assert shown["first_failure"] == times[0] <= shown["last_failure"] == times[-1]
    # the map really saw the cumulative numbers
    assert [a for i, a in calls(job_dir) if i == 5] == [1, 2, 3, 4]

    # Phase 3: the others are results, once each; the counts add up.
    assert result_ids(mrpool, "j") == [i for i in IDS if i != 5]
    s = checked_status(mrpool, "j")
    assert (s["succeeded"], s["dlq"]) == (9, 1)


def test_show_and_export_give_item_data_and_full_history(mrpool, tmp_path):
    """``dlq show`` prints one item whole (data + every attempt: kind, message, stderr
    tail, duration, worker pid, exit code); ``dlq export -o`` writes one JSONL object per item."""
    jobfile, job_dir = make_job(tmp_path, {4: "io", 5: "io", 6: "checksum"}, retries=1)
    start_job(mrpool, jobfile, "j", expect=1)
    records = journal_records(mrpool.job_dir("j"))
    worker_pids = {r["pid"] for r in records if r["k"] == "worker" and r.get("ev") == "started"}

    # Phase 1: show one item.
    r = mrpool.run("dlq", "show", "j", "4")
    assert r.returncode == 0, r.stderr
    shown = json.loads(r.stdout)
    assert int(shown["id"]) == 4 and shown["item"] == {"id": 4, "n": 4}
    assert shown["attempts"] == 2 and len(shown["history"]) == 2
    for h in shown["history"]:
        assert h["kind"] == "exit" and h["code"] == 3
        assert (
            h["msg"]
            == "exit status 3: read failed at offset 16384 in /var/data/shard-4/part28.bin errno 5"
        )
        assert "reading shard for item 4" in h["tail"]  # the stderr tail, not just the last line
        assert isinstance(h["dur"], float) and h["dur"] > 0
        assert h["pid"] in worker_pids  # the worker that ran the attempt
    assert shown["error"] == shown["history"][-1]["msg"]

    # Phase 2: an id that is not in the DLQ is an error, not an empty answer.
    r = mrpool.run("dlq", "show", "j", "7")
    assert r.returncode != 0 and "not in the DLQ" in r.stderr

    # Phase 3: export to a file: one object per DLQ item, with data and history.
    out = tmp_path / "dlq.jsonl"
    r = mrpool.run("dlq", "export", "j", "-o", str(out))
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [int(row["id"]) for row in rows] == [4, 5, 6]
    for row in rows:
        assert row["item"] == {"id": int(row["id"]), "n": int(row["id"])}
        assert [h["attempt"] for h in row["history"]] == [1, 2]
    assert rows[2]["history"][-1]["code"] == 4
    assert "checksum mismatch in block 6" in rows[2]["error"]


def test_stats_groups_failures_that_differ_only_in_numbers_and_paths(mrpool, tmp_path):
    """Items 4, 5, 6, 8 fail with the same I/O error (offsets, paths and numbers differ) and
    item 9 with a checksum error: ``dlq stats`` shows two signatures, 4 items and 1."""
    broken = {4: "io", 5: "io", 6: "io", 8: "io", 9: "checksum"}
    jobfile, _ = make_job(tmp_path, broken, retries=0)
    start_job(mrpool, jobfile, "j", expect=1)

    # Phase 1: dlq list: the I/O items share one signature, the checksum item has another.
    by_id = {int(e["id"]): e for e in mrpool.dlq("j")}
    assert sorted(by_id) == [4, 5, 6, 8, 9]
    io_signatures = {by_id[i]["signature"] for i in (4, 5, 6, 8)}
    assert len({by_id[i]["error"] for i in (4, 5, 6, 8)}) == 4  # the messages do differ
    assert len(io_signatures) == 1, {i: by_id[i]["signature"] for i in by_id}
    assert by_id[9]["signature"] not in io_signatures

    # Phase 2: dlq stats --json: two groups, largest first.
    r = mrpool.run("dlq", "stats", "j", "--json")
    assert r.returncode == 0, r.stderr
    groups = json.loads(r.stdout)
    assert [(g["count"], g["signature"]) for g in groups] == [
        (4, io_signatures.pop()),
        (1, by_id[9]["signature"]),
    ]
    assert sorted(int(i) for i in groups[0]["ids"]) == [4, 5, 6, 8]

    # Phase 3: the human form says how many items share each error.
    r = mrpool.run("dlq", "stats", "j")
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("4 item(s)") and lines[1].startswith("1 item(s)")


def test_retry_of_named_items_runs_only_those(mrpool, tmp_path):
    """``dlq retry JOB 5`` runs item 5 only; an id that is not in the DLQ (unknown, or
    succeeded) is refused with exit 2 and runs nothing."""
    jobfile, job_dir = make_job(tmp_path, {4: "io", 5: "io", 6: "io"}, retries=0)
    start_job(mrpool, jobfile, "j", expect=1)
    set_broken(job_dir, None)

    # Phase 1: retry 5 alone: it succeeds, 4 and 6 stay parked (so exit 1).
    before = len(calls(job_dir))
    r = mrpool.run("dlq", "retry", "j", "5")
    assert r.returncode == 1, r.stderr
    assert calls(job_dir)[before:] == [(5, 2)]
    assert dlq_ids(mrpool, "j") == [4, 6]
    assert 5 in result_ids(mrpool, "j")

    # Phase 2: ids not in the DLQ: exit 2, nothing runs, nothing changes.
    before = len(calls(job_dir))
    for bad in (["99"], ["7"], ["4", "99"]):
        r = mrpool.run("dlq", "retry", "j", *bad)
        assert r.returncode == 2, (bad, r.stderr)
        assert "99" in r.stderr or "7" in r.stderr
    assert len(calls(job_dir)) == before
    assert dlq_ids(mrpool, "j") == [4, 6]


def test_purge_needs_yes_and_drops_only_what_is_named(mrpool, tmp_path):
    """``dlq purge`` without ``--yes`` refuses (exit 2, nothing changes); a named purge
    drops only those items; a full purge drops the rest. Purged items are out of total."""
    jobfile, job_dir = make_job(tmp_path, {4: "io", 5: "io", 6: "io"}, retries=0)
    start_job(mrpool, jobfile, "j", expect=1)
    journal_size = (mrpool.job_dir("j") / "journal.log").stat().st_size

    # Phase 1: no --yes: refused, the journal untouched.
    r = mrpool.run("dlq", "purge", "j")
    assert r.returncode == 2 and "--yes" in r.stderr
    r = mrpool.run("dlq", "purge", "j", "4")
    assert r.returncode == 2
    assert (mrpool.job_dir("j") / "journal.log").stat().st_size == journal_size
    assert dlq_ids(mrpool, "j") == [4, 5, 6]

    # Phase 2: purge 5 by name.
    r = mrpool.run("dlq", "purge", "j", "5", "--yes")
    assert r.returncode == 0, r.stderr
    assert dlq_ids(mrpool, "j") == [4, 6]
    s = checked_status(mrpool, "j")
    assert (s["total"], s["dlq"], s["purged"]) == (9, 2, 1)

    # Phase 3: purge the rest; the job is complete without them and retry has nothing to run.
    r = mrpool.run("dlq", "purge", "j", "--yes")
    assert r.returncode == 0, r.stderr
    assert mrpool.dlq("j") == []
    s = checked_status(mrpool, "j")
    assert (s["total"], s["succeeded"], s["dlq"], s["purged"]) == (7, 7, 0, 3)
    assert s["state"] == "completed"
    set_broken(job_dir, None)
    before = len(calls(job_dir))
    r = mrpool.run("dlq", "retry", "j")
    assert r.returncode == 0, r.stderr
    assert len(calls(job_dir)) == before
    assert result_ids(mrpool, "j") == [1, 2, 3, 7, 8, 9, 10]


def test_sigkill_of_dlq_retry_midway_loses_and_duplicates_nothing(mrpool, tmp_path):
    """SIGKILL the whole ``dlq retry`` process group after some successes are journaled;
    a second ``dlq retry`` finishes: no success is re-run, every id has one result."""
    parked = [3, 4, 5, 6, 7, 8]
    jobfile, job_dir = make_job(tmp_path, dict.fromkeys(parked, "io"), retries=0)
    start_job(mrpool, jobfile, "j", expect=1)
    assert dlq_ids(mrpool, "j") == parked

    # Phase 1: fixed but slow; kill the retry once two successes are on disk.
    set_broken(job_dir, None)
    (job_dir / "slow").write_text("0.3")
    proc = mrpool.start("dlq", "retry", "j", "--workers", "1")
    try:
        wait_for(
            lambda: len(ok_ids_of_retry(mrpool.job_dir("j"))) >= 2,
            what="two successes journaled by dlq retry",
        )
    finally:
        kill_group(proc)
    done_before_kill = ok_ids_of_retry(mrpool.job_dir("j"))
    assert 2 <= len(done_before_kill) < len(parked)  # really mid-way
    calls_at_kill = len(calls(job_dir))

    # Phase 2: recorded successes are already out of the DLQ.
    assert not set(done_before_kill) & set(dlq_ids(mrpool, "j"))

    # Phase 3: retry again: finishes, never re-running a recorded success.
    (job_dir / "slow").write_text("0")
    r = mrpool.run("dlq", "retry", "j")
    assert r.returncode == 0, r.stderr
    rerun = {i for i, _ in calls(job_dir)[calls_at_kill:]}
    assert not rerun & set(done_before_kill), (rerun, done_before_kill)
    assert rerun | set(done_before_kill) == set(parked)
    assert mrpool.dlq("j") == []
    assert result_ids(mrpool, "j") == IDS
    s = checked_status(mrpool, "j")
    assert (s["state"], s["succeeded"]) == ("completed", 10)


def test_full_dlq_with_on_full_stop_stops_and_keeps_the_item_failed(mrpool, tmp_path):
    """``dlq.max_items: 2`` and three failing items: the run stops at the third with a
    clear error and exit 1, that item kept as ``failed``; items already parked that fail
    again on ``resume`` keep their place (no false "full"); ``resume`` finishes once fixed."""
    extra = {"dlq": {"max_items": 2, "on_full": "stop"}}
    jobfile, job_dir = make_job(
        tmp_path, {4: "io", 5: "io", 6: "io"}, retries=0, workers=1, extra=extra
    )

    # Phase 1: the run stops with a message naming the limit.
    r = start_job(mrpool, jobfile, "j", expect=1)
    assert "DLQ is full" in r.stderr and "max_items" in r.stderr, r.stderr
    assert "mrpool resume j" in r.stderr

    # Phase 2: 4 and 5 parked, 6 failed (not lost, not parked), the rest not done.
    assert dlq_ids(mrpool, "j") == [4, 5]
    s = checked_status(mrpool, "j")
    assert (s["total"], s["dlq"], s["failed"]) == (10, 2, 1)
    assert s["state"] == "interrupted"
    assert s["succeeded"] < 10 - 3 and 6 not in result_ids(mrpool, "j")

    # Phase 3: fix only the overflowing item: 4 and 5 fail again but are re-parked in
    # their own places (the DLQ does not grow), so the resume runs to the end.
    set_broken(job_dir, {4: "io", 5: "io"})
    r = mrpool.run("resume", "j")
    assert r.returncode == 1, r.stderr
    assert "DLQ is full" not in r.stderr, r.stderr
    assert dlq_ids(mrpool, "j") == [4, 5]
    s = checked_status(mrpool, "j")
    assert (s["state"], s["succeeded"], s["dlq"], s["failed"], s["pending"]) == (
        "completed_with_failures",
        8,
        2,
        0,
        0,
    )

    # Phase 4: fix the cause; resume finishes the job.
    set_broken(job_dir, None)
    r = mrpool.run("resume", "j")
    assert r.returncode == 0, r.stderr
    assert result_ids(mrpool, "j") == IDS
    assert mrpool.dlq("j") == []
    assert checked_status(mrpool, "j")["state"] == "completed"


def test_full_dlq_with_on_full_keep_failed_runs_on(mrpool, tmp_path):
    """``on_full: keep_failed``: the overflowing item stays ``failed``, the run says why on
    stderr, and the rest of the job still runs; nothing is lost."""
    extra = {"dlq": {"max_items": 2, "on_full": "keep_failed"}}
    jobfile, job_dir = make_job(
        tmp_path, {4: "io", 5: "io", 6: "io"}, retries=0, workers=1, extra=extra
    )

    # Phase 1: exit 1 and the policy is reported; 7..10 ran after the DLQ filled up.
    r = start_job(mrpool, jobfile, "j", expect=1)
    assert "DLQ is full" in r.stderr and "kept as failed" in r.stderr, r.stderr
    assert "mrpool resume j" in r.stderr
    assert {7, 8, 9, 10} <= {i for i, _ in calls(job_dir)}
    assert dlq_ids(mrpool, "j") == [4, 5]
    s = checked_status(mrpool, "j")
    assert (s["total"], s["succeeded"], s["dlq"], s["failed"], s["pending"]) == (10, 7, 2, 1, 0)

    # Phase 2: after the fix, resume picks up the failed item too.
    set_broken(job_dir, None)
    r = mrpool.run("resume", "j")
    assert r.returncode == 0, r.stderr
    assert result_ids(mrpool, "j") == IDS


def test_python_api_lists_gets_stats_retries_and_purges(mrpool, tmp_path, monkeypatch):
    """``open_dlq().entries/get/stats``, ``retry_dlq`` and ``purge_dlq`` in-process agree
    with the CLI; the in-process retry leaves no child process behind."""
    jobfile, job_dir = make_job(tmp_path, {4: "io", 5: "io", 6: "checksum"}, retries=1)
    start_job(mrpool, jobfile, "j", expect=1)
    monkeypatch.setenv("MRPOOL_TEST_TAG", mrpool.tag)  # map commands are leak-checked too
    state = mrpool.state_dir

    # Phase 1: reading.
    dlq = api.open_dlq("j", state_dir=state)
    entries = dlq.entries()
    assert [int(e.id) for e in entries] == [4, 5, 6]
    assert [e.brief() for e in entries] == mrpool.dlq("j")
    entry = dlq.get("5")
    assert entry.item == {"id": 5, "n": 5} and entry.attempts == 2
    assert [h["attempt"] for h in entry.history] == [1, 2]
    with pytest.raises(MrpoolError):
        dlq.get("7")
    stats = dlq.stats()
    assert sorted(g["count"] for g in stats) == [1, 2]
    assert sum(g["count"] for g in stats) == 3

    # Phase 2: retry 4 in-process after fixing it; unknown ids are a usage error.
    set_broken(job_dir, {5: "io", 6: "checksum"})
    with pytest.raises(UsageError):
        api.retry_dlq("j", ["42"], state_dir=state)
    report = api.retry_dlq("j", ["4"], state_dir=state, workers=1)
    assert psutil.Process(os.getpid()).children(recursive=True) == []
    assert (report.exit_code, report.counts["dlq"], report.counts["succeeded"]) == (1, 2, 8)
    assert [int(e.id) for e in api.open_dlq("j", state_dir=state).entries()] == [5, 6]

    # Phase 3: purge one by name, then the rest.
    assert api.purge_dlq("j", ["6"], state_dir=state) == 1
    assert [int(e.id) for e in api.open_dlq("j", state_dir=state).entries()] == [5]
    assert api.purge_dlq("j", state_dir=state) == 1
    assert api.open_dlq("j", state_dir=state).entries() == []
    status = api.job_status("j", state_dir=state)
    assert (status["total"], status["purged"], status["state"]) == (8, 2, "completed")


def test_dlq_snapshot_is_derived_damaged_or_missing_gives_same_answer(mrpool, tmp_path):
    """``dlq.json`` is a cache: with a flipped byte, ``dlq list`` warns and answers from the
    journal; with the file gone it answers the same, silently."""
    jobfile, job_dir = make_job(tmp_path, {4: "io", 5: "io", 6: "checksum"}, retries=1)
    start_job(mrpool, jobfile, "j", expect=1)
    snapshot = mrpool.job_dir("j") / "dlq.json"
    assert snapshot.exists()
    baseline = mrpool.run("dlq", "list", "j", "--json")
    assert baseline.returncode == 0 and not baseline.stderr
    shown = mrpool.run("dlq", "show", "j", "6").stdout

    # Phase 1: flip a byte inside the snapshot's packed references (a trusting reader would
    # show another record): its checksum fails.
    good = snapshot.read_bytes()
    data = bytearray(good)
    data[data.index(b'"refs":"') + 12] ^= 0x01
    snapshot.write_bytes(bytes(data))
    r = mrpool.run("dlq", "list", "j", "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout) == json.loads(baseline.stdout)
    assert "dlq.json" in r.stderr and "damaged" in r.stderr
    assert mrpool.run("dlq", "show", "j", "6").stdout == shown

    # Phase 1b: a well-formed snapshot whose references lead elsewhere (the first parked
    # item's records named as the last one's): refused as stale where they are read (show),
    # answered from the journal.
    record = decode_line(good)
    refs = _unpacked(record["refs"])
    refs[-1] = refs[0]
    snapshot.write_bytes(encode_record({**record, "refs": _packed(refs)}))
    r = mrpool.run("dlq", "show", "j", "6")
    assert r.returncode == 0 and r.stdout == shown
    assert "dlq.json" in r.stderr and "damaged" in r.stderr
    r = mrpool.run("dlq", "list", "j", "--json")
    assert json.loads(r.stdout) == json.loads(baseline.stdout)

    # Phase 1c: a well-formed snapshot of another journal (its prefix's CRC differs): not
    # trusted, answered from the journal.
    snapshot.write_bytes(encode_record({**record, "journal_crc": record["journal_crc"] ^ 1}))
    r = mrpool.run("dlq", "list", "j", "--json")
    assert r.returncode == 0
    assert json.loads(r.stdout) == json.loads(baseline.stdout)
    assert "dlq.json" in r.stderr and "changed" in r.stderr
    assert mrpool.run("dlq", "show", "j", "6").stdout == shown

    # Phase 2: delete it: same answer, no warning.
    snapshot.unlink()
    r = mrpool.run("dlq", "list", "j", "--json")
    assert r.returncode == 0 and not r.stderr
    assert json.loads(r.stdout) == json.loads(baseline.stdout)
    assert mrpool.run("dlq", "show", "j", "6").stdout == shown


def test_dlq_snapshot_of_version_2_reads_the_same(mrpool, tmp_path):
    """A ``dlq.json`` written by the previous format (v2: references only, no briefs) is
    read as it is: list, show and stats answer as from a v3 snapshot, without a warning;
    the next session's snapshot is v3 again."""
    jobfile, job_dir = make_job(tmp_path, {4: "io", 5: "io", 6: "checksum"}, retries=1)
    start_job(mrpool, jobfile, "j", expect=1)
    snapshot = mrpool.job_dir("j") / "dlq.json"
    answers = [mrpool.run(*cmd).stdout for cmd in _DLQ_READS]

    # Phase 1: the v2 snapshot of the same journal, built from its f records.
    from mrpool.journal import read_records

    journal = mrpool.job_dir("j") / "journal.log"
    refs: dict[str, list[int]] = {}
    for start, _, record in read_records(journal):
        if record["k"] == "f":
            refs.setdefault(str(record["i"]), []).append(start)
    v2 = {"k": "dlq", "v": 2, "journal_offset": journal.stat().st_size, "records": refs}
    snapshot.write_bytes(encode_record(v2))
    for cmd, answer in zip(_DLQ_READS, answers):
        r = mrpool.run(*cmd)
        assert (r.returncode, r.stdout) == (0, answer) and "damaged" not in r.stderr, cmd

    # Phase 2: a session (retrying item 4, which fails again) writes v3 from the v2
    # snapshot and its own failures: 4's history is whole, 6's unchanged.
    assert mrpool.run("dlq", "retry", "j", "4").returncode == 1
    assert decode_line(snapshot.read_bytes())["v"] == 3
    shown = json.loads(mrpool.run("dlq", "show", "j", "4").stdout)
    assert [h["attempt"] for h in shown["history"]] == [1, 2, 3, 4]
    assert mrpool.run("dlq", "show", "j", "6").stdout == answers[2]
    listed = {e["id"]: e for e in json.loads(mrpool.run("dlq", "list", "j", "--json").stdout)}
    assert listed[4]["attempts"] == 4 and listed[4]["last_failure"] == shown["last_failure"]
    assert listed[4]["first_failure"] == shown["history"][0]["t"]


_DLQ_READS = [
    ("dlq", "list", "j", "--json"),
    ("dlq", "list", "j"),
    ("dlq", "show", "j", "6"),
    ("dlq", "stats", "j", "--json"),
    ("dlq", "export", "j"),
]


def _unpacked(text: str):
    """A packed column of dlq.json (base64 of zlib of JSON, mrpool/dlqfile.py)."""
    return json.loads(zlib.decompress(base64.b64decode(text)))


def _packed(value) -> str:
    return base64.b64encode(zlib.compress(json.dumps(value).encode())).decode()


RAISING_MOD = """
def work(item):
    if item["n"] % 2:
        raise ValueError(f"odd item {item['id']}")
    return deeper(item)

def deeper(item):
    raise LookupError("no " + str(item["id"]) + "\\nsecond line")
"""


def test_a_traceback_is_journaled_once_and_every_prefix_of_the_journal_resolves_it(
    mrpool, tmp_path
):
    """Twenty items failing with two tracebacks: the journal holds each traceback inline
    once and names it from the other records (tail_at, always an earlier record), and
    dlq show / export give every item its whole tail. Cut after any record (what a
    crash or a salvage leaves), every reference in what is left still resolves."""
    # Phase 1: 20 items, all failing: odd ones with one message line, even ones with two.
    items = [{"id": f"x{n}", "n": n} for n in range(20)]
    job = write_job(
        tmp_path / "job", items, {"callable": "raiser:work"}, workers=1,
        files={"raiser.py": RAISING_MOD},
    )  # fmt: skip
    start_job(mrpool, job, "j", expect=1)
    journal = mrpool.job_dir("j") / "journal.log"
    failures = [r for r in journal_records(mrpool.job_dir("j")) if r["k"] == "f"]
    inline = [r for r in failures if "tail" in r]
    odd_tails = {r["tail"] for r in inline if r["i"] % 2}
    assert len(failures) == 20 and len(odd_tails) == 1, inline
    assert sum(1 for r in failures if "tail_at" in r) == 9  # the odd ones but the first
    assert all("sig" in r for r in failures)

    # Phase 2: what users see: the message as the error, the frames as the tail.
    shown = json.loads(mrpool.run("dlq", "show", "j", "x7").stdout)
    (attempt,) = shown["history"]
    assert attempt["msg"] == "ValueError: odd item x7"
    assert attempt["tail"] == odd_tails.pop()
    assert 'in work\n    raise ValueError(f"odd item' in attempt["tail"]
    assert "worker.py" not in attempt["tail"] and "^^^" not in attempt["tail"]
    even = json.loads(mrpool.run("dlq", "show", "j", "x8").stdout)["history"][0]
    assert even["tail"].endswith("LookupError: no x8\nsecond line")  # msg has one line
    exported = [json.loads(line) for line in mrpool.run("dlq", "export", "j").stdout.splitlines()]
    assert all(e["history"][0]["tail"].startswith("Traceback") for e in exported)
    listed = mrpool.dlq("j")
    assert len({e["signature"] for e in listed}) == 2

    # Phase 3: every prefix ending at a record boundary resolves its references.
    data = journal.read_bytes()
    (mrpool.job_dir("j") / "dlq.json").unlink()
    (mrpool.job_dir("j") / "checkpoint.json").unlink()
    ends = [i + 1 for i, byte in enumerate(data) if byte == 0x0A]
    for end in ends[len(ends) // 2 :: 6]:
        journal.write_bytes(data[:end])
        prefix = [r for r in journal_records(mrpool.job_dir("j")) if r["k"] == "f"]
        offsets = {0}
        offset = 0
        for line in data[:end].splitlines(keepends=True):
            offset += len(line)
            offsets.add(offset)
        for record in prefix:
            if "tail_at" in record:
                assert record["tail_at"] in offsets and record["tail_at"] < end
        r = mrpool.run("dlq", "export", "j")
        assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
        for e in map(json.loads, r.stdout.splitlines()):
            assert all(h["tail"].startswith("Traceback") for h in e["history"])
