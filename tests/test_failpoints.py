"""Crash and I/O-error injection at every named failpoint, then recovery.

Each scenario runs a real job with ``MRPOOL_FAILPOINTS`` armed so that the
supervisor SIGKILLs itself (or gets an I/O error) at an exact spot between two
syscalls, then resumes without failpoints and checks the guarantees: every item
ends succeeded or parked, each result exactly once, no recorded success ran
again, nothing left behind. Disk faults are also produced for real with
``RLIMIT_FSIZE`` (the kernel answers EFBIG once the journal outgrows it).
"""

from __future__ import annotations

import ast
import resource
import signal
import subprocess

import pytest
from conftest import PY, REPO, journal_records, write_job

from mrpool.failpoints import POINTS

pytestmark = pytest.mark.timeout(180)

MAPPER = """
import os

def work(item):
    with open(os.path.join(os.path.dirname(__file__), "side.log"), "a") as f:
        f.write(f"{item['id']}\\n")
    if item["id"] in (3, 11) and not os.path.exists(os.path.join(os.path.dirname(__file__), "fixed")):
        raise ValueError(f"item {item['id']} is broken")
    return item["id"] * 10
"""
N = 16


def make_job(tmp_path, retries=0):
    """16 items; items 3 and 11 fail until a `fixed` file exists (they go to the DLQ)."""
    return write_job(
        tmp_path / "job",
        [{"id": i} for i in range(N)],
        {"callable": "mapper:work", "retries": retries},
        workers=2,
        files={"mapper.py": MAPPER},
    )


def side_log(tmp_path) -> list[int]:
    path = tmp_path / "job" / "side.log"
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def recorded_ids(mrpool, job_id) -> set[int]:
    return {row["id"] for row in mrpool.results(job_id)}


def finish_and_check(mrpool, tmp_path, job_id, recorded_before: set[int]) -> None:
    """Resume (and retry the DLQ once the cause is fixed) until done; check the guarantees."""
    ran_before = len(side_log(tmp_path))
    r = mrpool.run("resume", job_id)
    assert r.returncode in (0, 1), r.stderr
    (tmp_path / "job" / "fixed").touch()
    r = mrpool.run("dlq", "retry", job_id)
    assert r.returncode == 0, r.stderr
    status = mrpool.status(job_id)
    assert (status["succeeded"], status["dlq"], status["pending"], status["failed"]) == (
        N,
        0,
        0,
        0,
    ), status
    ids = [row["id"] for row in mrpool.results(job_id)]
    assert sorted(ids) == list(range(N)), "every id exactly once"
    rerun = set(side_log(tmp_path)[ran_before:]) & recorded_before
    assert not rerun, f"recorded successes ran again: {rerun}"


KILL_POINTS = [
    ("journal.after_write", 3),
    ("journal.after_fsync", 2),
    ("checkpoint.before_replace", 1),
    ("checkpoint.after_replace", 1),
    ("dlq.before_replace", 1),
    ("dlq.after_replace", 1),
    ("supervisor.after_dispatch", 2),
    ("supervisor.after_outcome", 2),
    ("run.after_create", 1),
]


def test_every_failpoint_is_exercised():
    """The list below covers every failpoint the code defines (a new one needs a test)."""
    # tested below, in test_run.py, and in test_power_loss.py (the skip of a directory fsync)
    others = {"retry.after_success", "worker.before_send", "fsutil.fsync_dir"}
    others |= {"dlq.purge.after_lock", "lock.after_holder_unlink"}  # in test_peers.py
    others |= {  # in test_pymap.py
        "extend.after_items",
        "extend.before_replace",
        "extend.after_replace",
        "extend.before_record",
    }
    others |= {"rm.after_rename"}  # in test_fix_job.py (a crash between rm's rename and delete)
    assert {name for name, _ in KILL_POINTS} | others == set(POINTS)


@pytest.mark.parametrize("point,nth", KILL_POINTS)
def test_sigkill_at_failpoint_then_resume_loses_nothing(mrpool, tmp_path, point, nth):
    """Phases: run with the failpoint armed (dies by SIGKILL) -> check state -> resume to the end."""
    job = make_job(tmp_path)
    # -- phase 1: the run kills itself at the failpoint
    r = mrpool.run(
        "run",
        str(job),
        "--job-id",
        "fp",
        env=mrpool.env(MRPOOL_FAILPOINTS=f"{point}={'kill'}@{nth}"),
    )
    assert r.returncode == -signal.SIGKILL, (r.returncode, r.stderr)
    # -- phase 2: the job exists and reads cleanly; a dead holder does not block
    status = mrpool.status("fp")
    assert status["lock"] is None, status  # the dead holder is not reported as holding it
    assert status["state"] == "interrupted" or status["state"].startswith("completed"), status
    assert status["total"] == N
    recorded = recorded_ids(mrpool, "fp")
    # -- phase 3: resume finishes; nothing lost, nothing doubled, no recorded success re-run
    finish_and_check(mrpool, tmp_path, "fp", recorded)


def test_kill_between_dlq_success_and_snapshot(mrpool, tmp_path):
    """A DLQ item's success is recorded, then the retrier dies before rewriting dlq.json:
    after reopening the item is succeeded and NOT in the DLQ (one record is both)."""
    job = make_job(tmp_path)
    # -- phase 1: run; items 3 and 11 are parked
    r = mrpool.run("run", str(job), "--job-id", "fp")
    assert r.returncode == 1
    assert sorted(e["id"] for e in mrpool.dlq("fp")) == [3, 11]
    # -- phase 2: fix the cause; dlq retry dies right after the first success is written
    (tmp_path / "job" / "fixed").touch()
    r = mrpool.run(
        "dlq", "retry", "fp", env=mrpool.env(MRPOOL_FAILPOINTS="retry.after_success=kill")
    )
    assert r.returncode == -signal.SIGKILL
    succeeded_now = recorded_ids(mrpool, "fp") & {3, 11}
    assert succeeded_now, "the success before the kill is recorded"
    in_dlq = {e["id"] for e in mrpool.dlq("fp")}
    assert not (succeeded_now & in_dlq), "a succeeded item is never also in the DLQ"
    assert mrpool.status("fp")["succeeded"] + len(in_dlq) + mrpool.status("fp")["pending"] == N
    # -- phase 3: a second retry finishes; results unique
    r = mrpool.run("dlq", "retry", "fp")
    assert r.returncode == 0, r.stderr
    assert sorted(row["id"] for row in mrpool.results("fp")) == list(range(N))
    assert mrpool.dlq("fp") == []


@pytest.mark.parametrize("error", ["enospc", "eio", "efbig"])
@pytest.mark.parametrize(
    "point",
    [
        "journal.after_write",
        "journal.after_fsync",
        "checkpoint.before_replace",
        "dlq.before_replace",
    ],
)
def test_io_error_stops_with_clear_message_and_resume_recovers(mrpool, tmp_path, point, error):
    """A failing disk at each write: one-line error naming the file, exit 1, resume loses nothing."""
    job = make_job(tmp_path)
    # -- phase 1: the write fails
    r = mrpool.run(
        "run", str(job), "--job-id", "io", env=mrpool.env(MRPOOL_FAILPOINTS=f"{point}={error}@2")
    )
    if point.startswith(("checkpoint", "dlq")):
        armed_at = 1  # these are written once per session: the 2nd hit never comes
        r = (
            mrpool.run(
                "resume", "io", env=mrpool.env(MRPOOL_FAILPOINTS=f"{point}={error}@{armed_at}")
            )
            if r.returncode in (0, 1)
            else r
        )
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("mrpool:")]
    assert any("resume" in ln and (".log" in ln or ".json" in ln) for ln in lines), r.stderr
    assert "Traceback" not in r.stderr
    # -- phase 2: nothing is held, the job reads cleanly
    status = mrpool.status("io")
    assert status["lock"] is None
    recorded = recorded_ids(mrpool, "io")
    # -- phase 3: resume recovers everything
    finish_and_check(mrpool, tmp_path, "io", recorded)


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_real_efbig_from_rlimit_fsize_then_resume(mrpool, tmp_path):
    """The kernel refuses to grow the journal past RLIMIT_FSIZE (EFBIG): clear stop, full recovery."""
    items = [{"id": i} for i in range(200)]
    big_results = MAPPER.replace("(3, 11)", "(-1,)").replace(
        'return item["id"] * 10', 'return "r" * 150'
    )
    job = write_job(
        tmp_path / "job", items, {"callable": "mapper:work"}, files={"mapper.py": big_results}
    )
    # -- phase 1: run under a 15 kB file size limit: the items fit, the journal outgrows it mid-run
    r = subprocess.run(
        [PY, "-m", "mrpool", "run", str(job), "--job-id", "big"],
        env=mrpool.env(),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=str(REPO),
        preexec_fn=_limit_file_size(15_000),
    )
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert (
        "File too large" in r.stderr and "journal.log" in r.stderr and "Traceback" not in r.stderr
    )
    journal = mrpool.job_dir("big") / "journal.log"
    assert journal.stat().st_size <= 15_000
    # -- phase 2: the journal holds only whole records; what was recorded stays
    kinds = [rec["k"] for rec in journal_records(mrpool.job_dir("big"))]
    assert kinds[0] == "job" and "ok" in kinds
    recorded = recorded_ids(mrpool, "big")
    assert 0 < len(recorded) < 200
    # -- phase 3: without the limit, resume finishes everything exactly once
    ran_before = len(side_log(tmp_path))
    r = mrpool.run("resume", "big")
    assert r.returncode == 0, r.stderr
    ids = [row["id"] for row in mrpool.results("big")]
    assert sorted(ids) == list(range(200))
    assert not set(side_log(tmp_path)[ran_before:]) & recorded


def _guarded_by_enabled_flag(tree: ast.AST) -> list[str]:
    """``failpoints.hit(...)`` calls not inside an ``if`` that tests ``failpoints.ENABLED``
    first (as the condition, or the first operand of an ``and``)."""

    def tests_flag_first(test: ast.expr) -> bool:
        if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
            test = test.values[0]
        return ast.unparse(test) == "failpoints.ENABLED"

    unguarded: list[str] = []

    def visit(node: ast.AST, guarded: bool) -> None:
        if (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) == "failpoints.hit"
            and not guarded
        ):
            unguarded.append(f"line {node.lineno}: {ast.unparse(node)}")
        for child in ast.iter_child_nodes(node):
            inside = (
                guarded
                or (isinstance(node, ast.If) and child in node.body and tests_flag_first(node.test))
                or (  # ``failpoints.ENABLED and failpoints.hit(...)``: short-circuited
                    isinstance(node, ast.BoolOp)
                    and isinstance(node.op, ast.And)
                    and child is not node.values[0]
                    and tests_flag_first(node)
                )
            )
            visit(child, inside)

    visit(tree, False)
    return unguarded


def test_disabled_failpoints_cost_one_flag_check():
    """Off, a failpoint costs one global lookup: ENABLED is False without the variable,
    and every ``failpoints.hit`` in the package sits behind ``if failpoints.ENABLED``
    (so no call, no string formatting, no dict lookup on a hot path); an unknown name
    in the variable is refused."""
    with_calls = set()
    for path in sorted((REPO / "mrpool").glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        if "failpoints.hit(" in ast.unparse(tree):
            with_calls.add(path.name)
        assert not _guarded_by_enabled_flag(tree), (path.name, _guarded_by_enabled_flag(tree))
    # the check looked at the real call sites
    assert {"api.py", "fsutil.py", "journal.py", "supervisor.py", "worker.py"} <= with_calls
    out = subprocess.run(
        [PY, "-c", "import mrpool.failpoints as f; print(f.ENABLED)"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)},
    )
    assert out.stdout.strip() == "False"
    bad = subprocess.run(
        [PY, "-c", "import mrpool.failpoints"],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "MRPOOL_FAILPOINTS": "no.such=kill"},
    )
    assert bad.returncode != 0 and "unknown failpoint" in bad.stderr


SLOW_MAPPER = """
import time

def work(item):
    time.sleep(2.0 if item["id"] == 0 else 0.02)
    return item["id"]
"""


def slow_job(tmp_path, retries=0):
    """12 healthy items; item 0 is slow, so it is in flight at the early journal writes."""
    return write_job(
        tmp_path / "slow",
        [{"id": i} for i in range(12)],
        {"callable": "slowmap:work", "retries": retries},
        workers=2,
        files={"slowmap.py": SLOW_MAPPER},
    )


def test_two_storage_error_exits_park_nothing(mrpool, tmp_path):
    """Doing what a storage error says (free space, then resume) twice parks no healthy
    item as a crash loop: a session stopped by an exception is not a crash of its items."""
    job = slow_job(tmp_path)
    full_disk = mrpool.env(MRPOOL_FAILPOINTS="journal.after_write=enospc@5")
    r = mrpool.run("run", str(job), "--job-id", "se", env=full_disk)
    assert r.returncode == 1 and "No space left" in r.stderr, r.stderr
    assert "then 'mrpool resume se'" in r.stderr and "Traceback" not in r.stderr
    r = mrpool.run("resume", "se", env=full_disk)
    assert r.returncode == 1 and "No space left" in r.stderr, r.stderr
    r = mrpool.run("resume", "se")
    assert r.returncode == 0, r.stderr
    assert mrpool.dlq("se") == []
    assert sorted(row["id"] for row in mrpool.results("se")) == list(range(12))
    closes = [rec for rec in journal_records(mrpool.job_dir("se")) if rec["k"] == "close"]
    assert [c["reason"].split(":")[0] for c in closes] == ["aborted", "aborted", "finished"]


def test_crash_loop_message_counts_crashes(mrpool, tmp_path):
    """An item in flight at two crashes in a row is parked, and the message says two."""
    job = slow_job(tmp_path)
    crash = mrpool.env(MRPOOL_FAILPOINTS="supervisor.after_outcome=kill@1")
    r = mrpool.run("run", str(job), "--job-id", "cl", env=crash)  # item 0 is running
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = mrpool.run("resume", "cl", env=crash)  # item 0 runs first again
    assert r.returncode == -signal.SIGKILL, r.stderr
    r = mrpool.run("resume", "cl")
    assert r.returncode == 1, r.stderr
    [entry] = mrpool.dlq("cl")
    assert (entry["id"], entry["kind"]) == (0, "crash_loop"), entry
    assert "in flight at 2 crashes in a row" in entry["error"], entry


def test_one_crash_then_a_storage_error_parks_no_innocent_item(mrpool, tmp_path):
    """Issue 21 item 2's shape: an item that never fails, in flight at one real crash, must
    end succeeded. A storage error in the next session used to count as a second crash (no
    close record, so the streak rose again) and the item was parked as crash_loop."""
    job = slow_job(tmp_path)
    crash = mrpool.env(MRPOOL_FAILPOINTS="supervisor.after_outcome=kill@1")
    r = mrpool.run("run", str(job), "--job-id", "oc", env=crash)  # item 0 is running
    assert r.returncode == -signal.SIGKILL, r.stderr
    full_disk = mrpool.env(MRPOOL_FAILPOINTS="journal.after_write=enospc@3")
    r = mrpool.run("resume", "oc", env=full_disk)  # item 0 runs first again
    assert r.returncode == 1 and "No space left" in r.stderr, r.stderr
    r = mrpool.run("resume", "oc")
    assert r.returncode == 0, r.stderr
    assert mrpool.dlq("oc") == []
    assert sorted(row["id"] for row in mrpool.results("oc")) == list(range(12))


def test_abort_marker_settles_the_last_session_as_no_crash(mrpool, tmp_path):
    """The abort marker (what ``Session._abort`` leaves when the journal refuses even the
    close record) makes the next session settle the open attempts as an abort: item 0, in
    flight at two ends in a row, is run, not parked; the marker is then removed. A stale
    marker (an ``open`` record after it) changes nothing."""
    from mrpool.crashes import mark_aborted

    job = slow_job(tmp_path)
    crash = mrpool.env(MRPOOL_FAILPOINTS="supervisor.after_outcome=kill@1")
    for args in (("run", str(job), "--job-id", "am"), ("resume", "am")):
        r = mrpool.run(*args, env=crash)  # item 0 is running each time
        assert r.returncode == -signal.SIGKILL, r.stderr
    job_dir = mrpool.job_dir("am")
    assert mark_aborted(job_dir, 0)  # stale: open records follow offset 0
    assert mark_aborted(job_dir, (job_dir / "journal.log").stat().st_size)
    r = mrpool.run("resume", "am")
    assert r.returncode == 0, r.stderr
    assert mrpool.dlq("am") == []
    assert sorted(row["id"] for row in mrpool.results("am")) == list(range(12))
    opens = [rec for rec in journal_records(job_dir) if rec["k"] == "open"]
    assert [o.get("after") for o in opens] == [None, None, "abort"]
    assert not [p for p in job_dir.iterdir() if p.name.startswith("session-aborted-at-")]


BIG_MAPPER = """
import time

def work(item):
    time.sleep(2.0 if item["id"] == 0 else 0.01)
    return "r" * 1000
"""


def test_real_efbig_twice_parks_nothing(mrpool, tmp_path):
    """A real disk error (EFBIG from RLIMIT_FSIZE) stops two sessions in a row while item 0
    runs; each records that it aborted (a close record, or the marker when even that does
    not fit), so the third session runs item 0 instead of parking it as a crash loop."""
    job = write_job(
        tmp_path / "big",
        [{"id": i} for i in range(40)],
        {"callable": "bigmap:work"},
        workers=2,
        files={"bigmap.py": BIG_MAPPER},
    )
    journal = mrpool.job_dir("fd") / "journal.log"

    def limited(limit, *args):
        return subprocess.run(
            [PY, "-m", "mrpool", *args],
            env=mrpool.env(),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=str(REPO),
            preexec_fn=_limit_file_size(limit),
        )

    r = limited(8000, "run", str(job), "--job-id", "fd")  # item 0 is still running
    assert r.returncode == 1 and "File too large" in r.stderr, r.stderr
    r = limited(journal.stat().st_size + 8000, "resume", "fd")  # item 0 runs first again
    assert r.returncode == 1 and "File too large" in r.stderr, r.stderr
    r = mrpool.run("resume", "fd")
    assert r.returncode == 0, r.stderr
    assert mrpool.dlq("fd") == []
    assert len(mrpool.results("fd")) == 40
    assert not [p for p in mrpool.job_dir("fd").iterdir() if p.name.startswith("session-")]
