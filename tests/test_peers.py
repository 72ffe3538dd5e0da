"""What users of peer tools expect (issue 22 items 1b, 2, 3; issue 21 item 3).

* The Python API from any thread: ``run_job`` / ``resume_job`` on a worker thread
  finish and leave a clean job; a ``stop`` event interrupts such a session as Ctrl-C
  would; two jobs run in two threads of one process; two threads resuming the same
  job: one proceeds, the other gets ``LockedError`` and does not drop the first
  one's lock (POSIX locks belong to the process).
* ``mrpool unlock``: removes a dead local holder's files; refuses a live local
  holder (also with ``--force``); refuses a holder on another host without
  ``--force``, removes it with ``--force``, after which ``resume`` proceeds.
* ``mrpool joblog``: one row per attempt (success, exit 5, SIGKILL, timeout, an
  attempt lost to a supervisor SIGKILL), JSONL and GNU parallel's TSV columns.
* No lock file left after a SIGKILLed ``dlq purge`` (issue 21 item 3).

Real processes throughout: the maps are shell commands gated on files the tests
create, the holders real ``mrpool`` processes that are SIGKILLed.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import socket
import subprocess
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import PY, REPO, kill_group, wait_for, write_job

from mrpool import api
from mrpool.errors import LockedError
from mrpool.joblog import iter_attempts
from mrpool.journal import JournalWriter, read_records

pytestmark = pytest.mark.timeout(180)

LOCK_FILES = ("lock", "holder.json")
HOSTNAME = socket.gethostname()


def shell_job(directory: Path, items: list[dict[str, Any]], **map_extra: Any) -> Path:
    """A job whose map runs each item's ``sh`` script (``$G``: the job directory)."""
    return write_job(
        directory,
        items,
        {"command": ["sh", "-c", "{item.sh}"], **map_extra},
        workers=2,
    )


def gated(directory: Path, output: str = "1") -> str:
    """A script that waits for ``directory/gate``, then prints ``output``."""
    return f"while [ ! -e {directory}/gate ]; do sleep 0.01; done; echo {output}"


def lock_files(job_dir: Path) -> list[str]:
    return [name for name in LOCK_FILES if (job_dir / name).exists()]


def in_thread(target, *args, **kwargs) -> tuple[threading.Thread, list[Any]]:
    """Run ``target`` on a new thread; the list gets its return value or exception."""
    outcome: list[Any] = []

    def body() -> None:
        try:
            outcome.append(target(*args, **kwargs))
        except BaseException as error:  # noqa: BLE001 - handed to the test to assert on
            outcome.append(error)

    thread = threading.Thread(target=body)
    thread.start()
    return thread, outcome


def joined(thread: threading.Thread, outcome: list[Any]) -> Any:
    thread.join(60)
    assert not thread.is_alive(), "the API call on the thread did not end"
    assert len(outcome) == 1
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


def events(mrpool, job_id: str) -> list[dict[str, Any]]:
    r = mrpool.run("events", job_id)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


@pytest.fixture
def tagged(mrpool, monkeypatch):
    """In-process API calls: their map commands carry the test's tag (leak-checked)."""
    monkeypatch.setenv("MRPOOL_TEST_TAG", mrpool.tag)
    return mrpool


# -- the API from any thread ------------------------------------------------------------
def test_run_job_and_resume_job_complete_from_a_worker_thread(tagged, tmp_path):
    """Phases: run_job on a thread (one item fails) -> resume_job on a thread after the
    fix -> both sessions closed in the journal, main-thread signal handlers untouched."""
    mrpool = tagged
    flag = tmp_path / "fixed"
    items = [{"id": i, "sh": f"echo {i}"} for i in range(4)]
    items.append({"id": "late", "sh": f"[ -e {flag} ] && echo 9"})
    job = shell_job(tmp_path / "job", items)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    # -- phase 1: run_job on a worker thread: finishes, one item parked
    report = joined(*in_thread(api.run_job, str(job), job_id="th", state_dir=mrpool.state_dir))
    assert (report.state, report.exit_code) == ("completed_with_failures", 1)
    assert lock_files(mrpool.job_dir("th")) == []
    # -- phase 2: resume_job on a worker thread runs the parked item
    flag.touch()
    report = joined(*in_thread(api.resume_job, "th", state_dir=mrpool.state_dir))
    assert (report.state, report.exit_code, report.counts["succeeded"]) == ("completed", 0, 5)
    # -- phase 3: a clean state: both sessions closed, finished; the handlers are the caller's
    log = events(mrpool, "th")
    closes = [e for e in log if e["event"] == "session_finished"]
    assert [e["reason"] for e in closes] == ["finished", "finished"]
    assert [e["event"] for e in log].count("session_started") == 2
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    assert sorted(r["result"] for r in mrpool.results("th")) == [0, 1, 2, 3, 9]
    assert mrpool.status("th")["lock"] is None


def test_stop_event_interrupts_a_session_on_a_worker_thread(tagged, tmp_path):
    """Phases: a gated run_job on a thread -> stop.set() -> interrupted, attempts kept
    pending -> a CLI resume (gate open) finishes every item."""
    mrpool = tagged
    job_dir = tmp_path / "job"
    job = shell_job(job_dir, [{"id": i, "sh": gated(job_dir, str(i))} for i in range(3)])
    stop = threading.Event()
    thread, outcome = in_thread(
        api.run_job, str(job), job_id="st", state_dir=mrpool.state_dir, stop=stop
    )
    # -- phase 1: attempts are running on the thread's session
    wait_for(
        lambda: mrpool.job_dir("st").exists() and mrpool.status("st")["in_flight"] == 2,
        what="two attempts in flight",
    )
    # -- phase 2: stop it from this thread: interrupted, like Ctrl-C
    stop.set()
    report = joined(thread, outcome)
    assert (report.state, report.exit_code) == ("interrupted", 130)
    status = mrpool.status("st")
    assert (status["state"], status["pending"], status["lock"]) == ("interrupted", 3, None)
    close = [e for e in events(mrpool, "st") if e["event"] == "session_finished"][-1]
    assert close["reason"] == "interrupted: stopped by the caller"
    # -- phase 3: resume finishes; the cut attempts count (attempt 2 for them)
    (job_dir / "gate").touch()
    r = mrpool.run("resume", "st")
    assert r.returncode == 0, r.stderr
    assert sorted(r["result"] for r in mrpool.results("st")) == [0, 1, 2]
    # the joblog: the two cut attempts as interrupted, then every item's success
    rows = [json.loads(line) for line in joblog(mrpool, "st").splitlines()]
    assert [(r["id"], r["attempt"], r["outcome"]) for r in rows[:2]] == [
        (0, 1, "interrupted"),
        (1, 1, "interrupted"),
    ]
    assert sorted((r["id"], r["attempt"], r["outcome"]) for r in rows[2:]) == [
        (0, 2, "ok"),
        (1, 2, "ok"),
        (2, 1, "ok"),
    ]


def test_two_jobs_in_two_threads_of_one_process(tagged, tmp_path):
    """Two run_job calls at once on two threads: both complete with their own results,
    and the caller's garbage-collector threshold is back afterwards."""
    mrpool = tagged
    threshold = gc.get_threshold()
    gate_dir = tmp_path / "shared"
    gate_dir.mkdir()
    calls = []
    for name in ("a", "b"):
        job = shell_job(
            tmp_path / name,
            [
                {"id": i, "sh": gated(gate_dir, f"1{i}{'0' if name == 'a' else '1'}")}
                for i in range(5)
            ],
        )
        calls.append(in_thread(api.run_job, str(job), job_id=name, state_dir=mrpool.state_dir))
    # both hold their job at the same time before either may finish
    wait_for(
        lambda: all(
            mrpool.job_dir(n).exists() and mrpool.status(n)["in_flight"] > 0 for n in ("a", "b")
        ),
        what="both jobs running",
    )
    (gate_dir / "gate").touch()
    reports = [joined(*call) for call in calls]
    assert [(r.job_id, r.state) for r in reports] == [("a", "completed"), ("b", "completed")]
    assert sorted(r["result"] for r in mrpool.results("a")) == [100, 110, 120, 130, 140]
    assert sorted(r["result"] for r in mrpool.results("b")) == [101, 111, 121, 131, 141]
    assert gc.get_threshold() == threshold


def test_two_threads_resuming_the_same_job_one_proceeds_the_other_is_locked(tagged, tmp_path):
    """POSIX locks are per process: the second thread must still be refused, and its
    refusal (or a status / unlock from this process) must not drop the first's lock."""
    mrpool = tagged
    job_dir = tmp_path / "job"
    job = shell_job(
        job_dir, [{"id": 0, "sh": f"[ -e {job_dir}/ready ] || exit 1; {gated(job_dir)}"}]
    )
    assert mrpool.run("run", str(job), "--job-id", "same").returncode == 1  # parked
    (job_dir / "ready").touch()
    first, first_outcome = in_thread(api.resume_job, "same", state_dir=mrpool.state_dir)
    wait_for(lambda: mrpool.status("same")["in_flight"] == 1, what="the first resume running")
    # -- phase 1: the second thread is refused at once, naming this process
    second, second_outcome = in_thread(api.resume_job, "same", state_dir=mrpool.state_dir)
    with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        joined(second, second_outcome)
    # -- phase 2: this process looking at the job, or trying to unlock it, drops nothing
    assert api.job_status("same", state_dir=mrpool.state_dir)["lock"]["pid"] == os.getpid()
    with pytest.raises(LockedError):
        api.unlock_job("same", state_dir=mrpool.state_dir, force=True)
    # -- phase 3: the first still holds the kernel lock: another process is refused
    r = mrpool.run("resume", "same")
    assert r.returncode == 3 and f"pid {os.getpid()}" in r.stderr, r.stderr
    assert lock_files(mrpool.job_dir("same")) == list(LOCK_FILES)
    # -- phase 4: the first finishes the job and leaves nothing behind
    (job_dir / "gate").touch()
    report = joined(first, first_outcome)
    assert (report.state, report.counts["succeeded"]) == ("completed", 1)
    assert lock_files(mrpool.job_dir("same")) == []


# -- mrpool unlock ----------------------------------------------------------------------
def parked_job(mrpool, tmp_path, job_id: str) -> Path:
    """A job with one item in the DLQ until ``ready`` exists, gated after that."""
    job_dir = tmp_path / job_id
    script = f"[ -e {job_dir}/ready ] || exit 1; {gated(job_dir)}"
    job = shell_job(job_dir, [{"id": "x", "sh": script}])
    assert mrpool.run("run", str(job), "--job-id", job_id).returncode == 1
    return job_dir


def holding_resume(mrpool, job_id: str):
    """A real ``mrpool resume`` that holds the job (its attempt waits on the gate)."""
    proc = mrpool.start("resume", job_id)
    wait_for(lambda: lock_files(mrpool.job_dir(job_id)) == list(LOCK_FILES), what="a holder")
    wait_for(
        lambda: json.loads((mrpool.job_dir(job_id) / "holder.json").read_text())["pid"] == proc.pid,
        what="its holder record",
    )
    return proc


def test_unlock_removes_a_dead_local_holder(mrpool, tmp_path):
    """A SIGKILLed resume leaves lock + holder.json: unlock removes them, naming it."""
    job_dir = parked_job(mrpool, tmp_path, "dead")
    (job_dir / "ready").touch()
    proc = holding_resume(mrpool, "dead")
    kill_group(proc)
    assert lock_files(mrpool.job_dir("dead")) == list(LOCK_FILES)
    r = mrpool.run("unlock", "dead")
    assert r.returncode == 0, r.stderr
    assert f"pid {proc.pid} on {HOSTNAME}" in r.stderr and "mrpool resume dead" in r.stderr
    assert lock_files(mrpool.job_dir("dead")) == []
    r = mrpool.run("unlock", "dead")
    assert (r.returncode, "nothing to do" in r.stderr) == (0, True), r.stderr


def test_unlock_refuses_a_live_local_holder_even_with_force(mrpool, tmp_path):
    """A running resume holds the kernel lock; a live process's record without it is
    still alive on this host: unlock refuses both (exit 3), --force too."""
    job_dir = parked_job(mrpool, tmp_path, "live")
    (job_dir / "ready").touch()
    proc = holding_resume(mrpool, "live")
    try:
        # -- phase 1: the kernel lock is held right now
        for args in (("unlock", "live"), ("unlock", "live", "--force")):
            r = mrpool.run(*args)
            assert r.returncode == 3 and f"pid {proc.pid}" in r.stderr, (args, r.stderr)
            assert "nothing removed" in r.stderr
        assert lock_files(mrpool.job_dir("live")) == list(LOCK_FILES)
    finally:
        (job_dir / "gate").touch()
        assert proc.wait(timeout=60) == 0
    # -- phase 2: a record naming a live process on this host, the kernel lock free
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        record = {
            "v": 1,
            "pid": sleeper.pid,
            "hostname": HOSTNAME,
            "create_time": psutil.Process(sleeper.pid).create_time(),
            "acquired_at": time.time(),
            "command": "mrpool resume live",
        }
        (mrpool.job_dir("live") / "holder.json").write_text(json.dumps(record))
        r = mrpool.run("unlock", "live", "--force")
        assert r.returncode == 3 and "alive on this host" in r.stderr, r.stderr
        assert json.loads((mrpool.job_dir("live") / "holder.json").read_text()) == record
    finally:
        sleeper.kill()
        sleeper.wait()
    # the sleeper is gone: now its record is provably dead, and unlock removes it
    r = mrpool.run("unlock", "live")
    assert r.returncode == 0, r.stderr
    assert lock_files(mrpool.job_dir("live")) == []


def test_unlock_force_is_the_way_out_of_a_foreign_host_holder(mrpool, tmp_path):
    """A record from host test-host blocks resume (exit 3, the message names the way
    out); unlock refuses it without --force and removes it with --force; resume proceeds."""
    job_dir = parked_job(mrpool, tmp_path, "far")
    (job_dir / "ready").touch()
    (job_dir / "gate").touch()
    record = {
        "v": 1,
        "pid": 4242,
        "hostname": "test-host",
        "create_time": 1.0,
        "acquired_at": time.time() - 3600,
        "command": "mrpool resume far",
    }
    (mrpool.job_dir("far") / "lock").touch(mode=0o600)
    (mrpool.job_dir("far") / "holder.json").write_text(json.dumps(record))
    # -- phase 1: resume and status: refused / reported, the message says what to do
    r = mrpool.run("resume", "far")
    assert r.returncode == 3, r.stderr
    assert "pid 4242 on test-host" in r.stderr and "mrpool unlock far --force" in r.stderr
    assert mrpool.status("far")["lock"]["hostname"] == "test-host"
    # -- phase 2: unlock without --force refuses and keeps the record
    r = mrpool.run("unlock", "far")
    assert r.returncode == 3 and "--force" in r.stderr, r.stderr
    assert json.loads((mrpool.job_dir("far") / "holder.json").read_text()) == record
    # -- phase 3: --force prints what it knows, then removes it
    r = mrpool.run("unlock", "far", "--force")
    assert r.returncode == 0, r.stderr
    assert "pid 4242 on test-host since" in r.stderr and "(mrpool resume far)" in r.stderr
    assert lock_files(mrpool.job_dir("far")) == []
    # -- phase 4: resume proceeds
    r = mrpool.run("resume", "far")
    assert r.returncode == 0, r.stderr
    assert mrpool.status("far")["state"] == "completed"


# -- mrpool joblog ----------------------------------------------------------------------
def joblog(mrpool, job_id: str, *flags: str) -> str:
    r = mrpool.run("joblog", job_id, *flags)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_joblog_rows_for_success_exit_signal_and_timeout(mrpool, tmp_path):
    """One row per attempt with the right codes and durations; --tsv: GNU parallel's columns."""
    items = [
        {"id": "ok", "sh": "echo 1"},
        {"id": "five", "sh": "exit 5"},
        {"id": "killed", "sh": "kill -9 $$"},
        {"id": "slow", "sh": "sleep 30"},
    ]
    job = shell_job(tmp_path / "job", items, timeout=1.0)
    before = time.time()
    assert mrpool.run("run", str(job), "--job-id", "jl").returncode == 1
    after = time.time()
    rows = {row["id"]: row for row in map(json.loads, joblog(mrpool, "jl").splitlines())}
    # -- JSONL: one row per attempt, each field as documented
    assert set(rows) == {"ok", "five", "killed", "slow"}
    fields = [(r["outcome"], r["exit_code"], r["signal"]) for r in map(rows.get, rows)]
    assert dict(zip(rows, fields)) == {
        "ok": ("ok", 0, None),
        "five": ("failed", 5, None),
        "killed": ("failed", None, 9),
        "slow": ("timeout", None, 9),
    }
    for row in rows.values():
        assert row["attempt"] == 1 and row["host"] == HOSTNAME
        assert before <= row["start"] <= after
        assert 0 <= row["duration"] <= after - row["start"]
    assert rows["slow"]["duration"] >= 1.0  # it ran until the timeout killed it
    assert rows["ok"]["duration"] < 1.0
    assert [rows[i]["seq"] for i in ("ok", "five", "killed", "slow")] == [1, 2, 3, 4]
    # -- the events of the same attempts carry the same fields
    ended = {
        e["id"]: e for e in events(mrpool, "jl") if e["event"] in ("item_succeeded", "item_parked")
    }
    for item_id, row in rows.items():
        assert (ended[item_id]["exit_code"], ended[item_id]["signal"]) == (
            row["exit_code"],
            row["signal"],
        )
        assert ended[item_id]["duration"] == row["duration"]
    # -- TSV: the header, nine columns, GNU parallel's meanings
    lines = joblog(mrpool, "jl", "--tsv").splitlines()
    assert lines[0].split("\t") == [
        "Seq",
        "Host",
        "Starttime",
        "JobRuntime",
        "Send",
        "Receive",
        "Exitval",
        "Signal",
        "Command",
    ]
    cells = {line.split("\t")[8]: line.split("\t") for line in lines[1:]}
    assert all(len(c) == 9 for c in cells.values()) and len(cells) == 4
    assert {k: (c[0], c[6], c[7]) for k, c in cells.items()} == {
        "ok": ("1", "0", "0"),
        "five": ("2", "5", "0"),
        "killed": ("3", "-1", "9"),
        "slow": ("4", "-1", "9"),
    }
    assert float(cells["slow"][3]) >= 1.0 and cells["ok"][1] == HOSTNAME
    assert abs(float(cells["ok"][2]) - rows["ok"]["start"]) < 0.001


def test_joblog_shows_an_attempt_lost_to_a_supervisor_sigkill(mrpool, tmp_path):
    """Attempt 1 dies with its SIGKILLed session ("lost"); attempt 2 (resume) is "ok"."""
    job_dir = tmp_path / "job"
    job = shell_job(job_dir, [{"id": "g", "sh": gated(job_dir, "7")}])
    proc = mrpool.start("run", str(job), "--job-id", "lost")
    wait_for(
        lambda: mrpool.job_dir("lost").exists() and mrpool.status("lost")["in_flight"] == 1,
        what="the attempt running",
    )
    r = mrpool.run("joblog", "lost")
    assert [json.loads(line)["outcome"] for line in r.stdout.splitlines()] == ["running"]
    kill_group(proc)
    (job_dir / "gate").touch()
    assert mrpool.run("resume", "lost").returncode == 0
    rows = [json.loads(line) for line in joblog(mrpool, "lost").splitlines()]
    assert [(r["attempt"], r["outcome"], r["duration"]) for r in rows[:1]] == [(1, "lost", None)]
    assert [(r["attempt"], r["outcome"], r["exit_code"]) for r in rows[1:]] == [(2, "ok", 0)]


def test_joblog_streams_in_flat_memory(tmp_path):
    """50,000 attempts, started and ended in batches of 4096 as the executor sends them:
    the joblog holds the attempts of one batch and an offset table, not the rows or the
    ids (a 1M-item job's joblog must not hold them all)."""
    n, batch = 50_000, 4096
    job_dir = tmp_path / "big"
    job_dir.mkdir()
    with open(job_dir / "items.jsonl", "wb") as items:
        items.writelines(b'"item-%06d"\t{}\n' % i for i in range(n))
    journal = JournalWriter(job_dir / "journal.log", 0)
    journal.append({"k": "open", "t": 1.0, "host": "h"})
    for first in range(0, n, batch):
        count = min(batch, n - first)
        journal.append({"k": "s", "t": 2.0, "r": [[first, count, 1]]})
        journal.append(
            {"k": "ok", "t": 3.0, "b": [[i, 1, 0.5, 1] for i in range(first, first + count)]}
        )
        journal.write()
    journal.close()
    tracemalloc.start()
    try:
        for _ in read_records(job_dir / "journal.log"):  # what any reader of the journal costs:
            pass  # its 1 MiB buffer and one batch record decoded
        _, reading = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        count = 0
        for row in iter_attempts(job_dir, job_dir / "journal.log", command=False, live=False):
            count += (row["outcome"], row["start"], row["duration"]) == ("ok", 2.0, 0.5)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert count == n
    # held whole, the ids would be ~3 MB as Python strings and the rows ~25 MB; the
    # offset table is 0.4 MB, one batch of attempts in flight ~0.4 MB
    assert peak < reading + 2_000_000, f"joblog peak {peak} bytes, reading alone {reading}"
    print(f"\n[joblog] {n} attempts: peak {peak / 1e6:.2f} MB, reading {reading / 1e6:.2f} MB")


# -- issue 21 item 3: the lock file a SIGKILLed purge left --------------------------------
PURGE_PY = "import sys\nfrom mrpool import api\napi.purge_dlq(sys.argv[1])\n"


def test_no_lock_file_left_after_killed_purge_and_resume(mrpool, tmp_path):
    """``api.purge_dlq`` SIGKILLed while it holds the lock, then ``resume``: nothing left.
    And killed between its release's two unlinks (holder.json gone, lock not): the job
    is complete, no command need take the lock again -- the next look at it (status)
    removes the lone lock file."""
    for job_id, point, left in (
        ("held", "dlq.purge.after_lock", ["lock", "holder.json"]),
        ("half", "lock.after_holder_unlink", ["lock"]),
    ):
        job = shell_job(tmp_path / job_id, [{"id": 1, "sh": "echo 1"}, {"id": 2, "sh": "exit 3"}])
        assert mrpool.run("run", str(job), "--job-id", job_id).returncode == 1
        purge = subprocess.run(
            [PY, "-c", PURGE_PY, job_id],
            env=mrpool.env(MRPOOL_FAILPOINTS=f"{point}=kill"),
            cwd=str(REPO),
            capture_output=True,
            text=True,
        )
        assert purge.returncode == -signal.SIGKILL, purge.stderr
        assert sorted(lock_files(mrpool.job_dir(job_id))) == sorted(left), job_id
        if job_id == "held":  # nothing purged yet: resume runs the DLQ item again
            r = mrpool.run("resume", job_id)
            assert r.returncode == 1 and "1 in the DLQ" in r.stderr, r.stderr
        else:  # purged and complete: a status, and later a resume, find nothing to clean
            status = mrpool.status(job_id)
            assert (status["state"], status["lock"], status["purged"]) == ("completed", None, 1)
            assert lock_files(mrpool.job_dir(job_id)) == []
            r = mrpool.run("resume", job_id)
            assert r.returncode == 0 and "nothing left to run" in r.stderr, r.stderr
        assert lock_files(mrpool.job_dir(job_id)) == [], job_id
