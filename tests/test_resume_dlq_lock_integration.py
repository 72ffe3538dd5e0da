"""Issue 6: resume, the DLQ, deduplication and the job lock working *together*.

Every test drives the real CLI (``python -m mrpool``) in subprocesses, as in
production, against one job whose map command is ``work.py`` (``WORK_PY``
below), written into the job file's directory. Three knobs in that directory
make every scenario deterministic, with no sleep used to order anything:

* ``fail.txt`` -- words ``ID`` (every attempt of item ID fails) or ``ID@N``
  (only attempt N fails). Rewriting or deleting it "fixes the cause".
* ``gate-ID`` / ``gate-ID@N`` -- while such a file exists, that item (or only
  its attempt N) blocks. A gated item holds a run *busy* for as long as a test
  needs: to SIGKILL it at an exact point, or to race other resumers against it.
* ``side.log`` -- every attempt appends ``ID ATTEMPT`` (``MRPOOL_ATTEMPT``) when
  it starts: proof of what really ran, how often, with which attempt number.

The test waits for *state* (journal records, side-log lines, process exits)
with ``wait_for``; the phases are ordered by those events alone.

The scenarios::

    1 golden path   run: 1-3 ok, 4-6 -> DLQ, SIGKILL before 7-10 finish
                    -> plan = 7 unique items -> cause fixed -> two resumes
                    race: one runs, one exits 3 naming it -> 10 ok, clean
    2 lock vs DLQ   run parks 3-6 -> three racers; the winner holds the DLQ,
                    gated -> five more losers (resume, dlq retry, dlq purge):
                    all exit 3, the job directory is byte-for-byte unchanged
    3 dedup         one item in the DLQ *and* in flight, one failed *and* in
                    flight at a crash -> each planned once, as pending, run once
    4 cleanup       fail -> DLQ -> resume succeeds -> DLQ empty, lock free at
                    once, no lock/holder file, process or /dev/shm segment left
    5 partial       1-5 ok, 6-8 DLQ, 9-10 unfinished -> resume plans exactly
                    5 (2 pending + 3 DLQ, no overlap), runs each once
    6 takeover      the winning resumer is SIGKILLed mid-retry -> its stale
                    lock never blocks: the loser's retry takes over, re-runs the
                    two cut-short attempts and finishes the job

Item ``k`` is ``{"id": k, "n": k}`` at input index ``k - 1``; the helpers below
translate journal indices to ids so assertions read in ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    PY,
    journal_records,
    kill_group,
    mrpool_shm,
    shm_entries,
    tagged_processes,
    wait_for,
    write_job,
)

from mrpool import api
from mrpool.records import started_attempts

pytestmark = pytest.mark.timeout(120)

JOB = "job"
# attempts per worker (map.concurrency): 1, or what scripts/stress.sh lanes sets. Each
# scenario derives from it which items are in flight where a gate holds a run; at 1 a
# worker runs its items strictly one after another and every order is asserted exactly.
K = int(os.environ.get("MRPOOL_TEST_CONCURRENCY") or 1)


def lanes(workers: int) -> int:
    """How many attempts a session with ``workers`` workers holds at once."""
    return workers * K


def in_order(ran: list[tuple[int, int]], expected: list[tuple[int, int]], lanes: int) -> bool:
    """``ran`` is ``expected`` -- in exactly that order when one lane ran them.

    With more lanes, attempts of different items interleave in any order; each
    item's own attempts still run one after another.
    """
    if lanes == 1:
        return ran == expected
    per_item = {k: [a for i, a in ran if i == k] for k, _ in ran}
    return sorted(ran) == sorted(expected) and all(v == sorted(v) for v in per_item.values())


WORK_PY = r"""
import json, os, sys, time

here = os.path.dirname(os.path.abspath(__file__))
item = json.load(sys.stdin)
iid, attempt = str(item["id"]), os.environ["MRPOOL_ATTEMPT"]
with open(os.path.join(here, "side.log"), "a") as log:
    log.write(f"{iid} {attempt}\n")
for gate in (f"gate-{iid}", f"gate-{iid}@{attempt}"):
    while os.path.exists(os.path.join(here, gate)):
        time.sleep(0.005)
try:
    with open(os.path.join(here, "fail.txt")) as f:
        rules = set(f.read().split())
except FileNotFoundError:
    rules = set()
if iid in rules or f"{iid}@{attempt}" in rules:
    sys.exit(f"injected failure for item {iid}")
print(json.dumps({"id": int(iid), "attempt": int(attempt)}))
"""

# What a job directory holds at rest after a clean session. A session also keeps,
# while it lives, the files only the holder writes: the lock, its holder record and
# its workers' slot file (heartbeats tick in it). A SIGKILLed holder cannot remove
# them: they stay behind, block nobody, and the next session replaces them.
AT_REST = {"job.json", "items.jsonl", "journal.log", "checkpoint.json", "dlq.json"}
LOCK_FILES = {"lock", "holder.json"}
HOLDER_FILES = LOCK_FILES | {"slots.bin"}
# what a SIGKILLed holder leaves once `status` has looked: it removes a dead holder's lock
# files (lock.clear_stale); slots.bin stays for the next session to read
STATUS_SWEPT = {"slots.bin"}
FIRST_RUN = {"job.json", "items.jsonl", "journal.log"}  # before any session ended cleanly


# -- the bench: one job, its knobs, and every process a test starts ---------------------
class Bench:
    """One job (id ``JOB``) in ``src/``, its map knobs, and the processes a test started."""

    def __init__(self, mrpool, src: Path) -> None:
        self.mrpool = mrpool
        self.src = src
        self.procs: list[subprocess.Popen] = []

    # the job and its knobs
    def write_job(
        self, n: int, *, workers: int, retries: int = 0, fail: str = "", gates: tuple = ()
    ) -> Path:
        self.jobfile = write_job(
            self.src,
            [{"id": k, "n": k} for k in range(1, n + 1)],
            {"command": [PY, "-S", "work.py"], "retries": retries, "backoff": 0},
            name=JOB,
            workers=workers,
            files={"work.py": WORK_PY},
        )
        self.fail(fail)
        for rule in gates:
            self.close_gate(rule)
        return self.jobfile

    def fail(self, rules: str) -> None:
        (self.src / "fail.txt").write_text(rules)

    def fix(self) -> None:
        (self.src / "fail.txt").unlink(missing_ok=True)

    def close_gate(self, rule: int | str) -> None:
        (self.src / f"gate-{rule}").touch()

    def open_gate(self, rule: int | str) -> None:
        (self.src / f"gate-{rule}").unlink()

    def ran(self) -> list[tuple[int, int]]:
        """``(id, attempt)`` of every attempt started so far, in order."""
        try:
            text = (self.src / "side.log").read_text()
        except FileNotFoundError:
            return []
        return [(int(i), int(a)) for i, a in (line.split() for line in text.splitlines())]

    # processes
    def start(self, *args: str) -> subprocess.Popen:
        proc = self.mrpool.start(*args, stdin=subprocess.DEVNULL, text=True)
        self.procs.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                kill_group(proc)
            for stream in (proc.stdout, proc.stderr):
                if stream:
                    stream.close()

    def run_to_end(self, expect: int = 1) -> None:
        """``run`` the job to its end; it must create the job and exit ``expect``."""
        r = self.mrpool.run("run", str(self.jobfile), "--job-id", JOB)
        assert (r.returncode, r.stdout.splitlines()[:1]) == (expect, [JOB]), r.stdout + r.stderr
        assert f"job {JOB}: completed" in r.stderr, r.stderr

    # state
    @property
    def job_dir(self) -> Path:
        return self.mrpool.job_dir(JOB)

    def records(self) -> list[dict[str, Any]]:
        return journal_records(self.job_dir)

    def wait_journal(self, predicate, what: str) -> list[dict[str, Any]]:
        """Wait until ``predicate(journal records)`` holds; return the records."""
        found: list = []

        def check():
            found[:] = self.records()
            return predicate(found)

        wait_for(check, timeout=30, what=what)
        return found

    def files(self) -> set[str]:
        return set(os.listdir(self.job_dir))

    def counts(self) -> tuple:
        """``(state, succeeded, dlq, failed, pending, in_flight, lock pid)`` via ``status --json``."""
        r = self.mrpool.run("status", JOB, "--json")
        assert r.returncode == 0, (r.stderr, sorted(map(str, self.mrpool.state_dir.rglob("*"))))
        s = json.loads(r.stdout)
        assert s["total"] == s["succeeded"] + s["dlq"] + s["failed"] + s["pending"]
        pid = s["lock"]["pid"] if s["lock"] else None
        return (
            s["state"],
            s["succeeded"],
            s["dlq"],
            s["failed"],
            s["pending"],
            s["in_flight"],
            pid,
        )

    def dlq(self) -> dict[int, int]:
        """``{id: attempts}`` of the DLQ via ``dlq list --json``."""
        return {int(e["id"]): e["attempts"] for e in self.mrpool.dlq(JOB)}

    def plan(self) -> tuple[dict[str, int], list[tuple[int, str]]]:
        """What ``resume`` would run now, without running anything: summary, ``(id, source)``."""
        plan = api.plan_resume(JOB, state_dir=self.mrpool.state_dir)
        return plan.summary(), [(index + 1, source) for index, source, _ in plan.items()]

    def results(self) -> dict[int, dict]:
        rows = self.mrpool.results(JOB)
        ids = [row["id"] for row in rows]
        assert len(ids) == len(set(ids)), f"an id listed twice in results: {ids}"
        return {row["id"]: row["result"] for row in rows}


@pytest.fixture
def bench(mrpool, tmp_path: Path, request):
    """The test's bench; afterwards: no process of ours runs, and its temp dirs are gone.

    A passing test's directories are checked for leftovers (lock, holder record,
    slot file, temp files -- conftest's ``no_leftovers`` rule and more) and removed; a
    failing test's are kept for inspection.
    """
    failed_before = request.session.testsfailed
    b = Bench(mrpool, tmp_path / "src")
    yield b
    b.kill_all()  # a failed test must not leave gated runs behind
    if request.session.testsfailed != failed_before:
        request.node.allow_leftover_files = True  # a SIGKILLed holder's files: not a 2nd error
        return
    jobs = mrpool.state_dir / "jobs"
    for job_dir in jobs.iterdir() if jobs.is_dir() else ():
        stray = [n for n in os.listdir(job_dir) if n in HOLDER_FILES or ".tmp-" in n]
        assert not stray, f"{job_dir}: files left behind: {stray}"
    for directory in (b.src, mrpool.state_dir):
        shutil.rmtree(directory)
        assert not directory.exists()


# -- journal views (in item ids) -------------------------------------------------------
def sessions(records: list[dict]) -> list[list[dict]]:
    """The journal cut into sessions: each starts at an ``open`` record."""
    cut: list[list[dict]] = []
    for record in records:
        if record["k"] == "open":
            cut.append([])
        if cut:
            cut[-1].append(record)
    return cut


def started(records: list[dict]) -> list[tuple[int, int]]:
    return [
        (index + 1, attempt)
        for r in records
        if r["k"] == "s"
        for index, attempt in started_attempts(r)
    ]


def succeeded(records: list[dict]) -> list[int]:
    return [entry[0] + 1 for r in records if r["k"] == "ok" for entry in r["b"]]


def failed(records: list[dict], next_: str) -> list[tuple[int, int]]:
    """``(id, attempt)`` of failures whose ``next`` is ``retry`` or ``dlq``."""
    return [(r["i"] + 1, r["a"]) for r in records if r["k"] == "f" and r["next"] == next_]


def kinds(records: list[dict]) -> Counter:
    return Counter(r["k"] for r in records)


def plan_record(records: list[dict]) -> dict[str, int]:
    (plan,) = [r for r in records if r["k"] == "plan"]
    return {k: v for k, v in plan.items() if k not in ("k", "t")}


# -- racing and comparing --------------------------------------------------------------
def race(bench: Bench, *commands: tuple[str, ...]) -> tuple[subprocess.Popen, list]:
    """Start ``commands`` at once; wait until all but one have exited.

    Returns the one still running (the winner, which a gate holds busy) and the
    losers as ``(argv, returncode, stderr)``.
    """
    procs = [(argv, bench.start(*argv)) for argv in commands]
    wait_for(
        lambda: sum(p.poll() is not None for _, p in procs) >= len(procs) - 1,
        timeout=30,
        what="all but one racer to exit",
    )
    running = [p for _, p in procs if p.poll() is None]
    assert len(running) == 1, [(argv, p.returncode, p.stderr.read()) for argv, p in procs]
    losers = [(argv, p.wait(), p.communicate()[1]) for argv, p in procs if p is not running[0]]
    return running[0], losers


def assert_blocked(losers: list, winner_pid: int) -> None:
    """Each loser exited 3 with one stderr line naming the live holder; it never planned."""
    for argv, code, err in losers:
        assert code == 3, (argv, code, err)
        assert len(err.strip().splitlines()) == 1, (argv, err)
        assert f"locked by pid {winner_pid} on {socket.gethostname()} since " in err, (argv, err)


def snapshot(job_dir: Path) -> dict[str, tuple[int, str]]:
    """``name -> (size, sha256)`` of every file but those only the live holder writes."""
    out = {}
    for name in sorted(os.listdir(job_dir)):
        if name not in HOLDER_FILES:
            data = (job_dir / name).read_bytes()
            out[name] = (len(data), hashlib.sha256(data).hexdigest())
    return out


def holder_pid(job_dir: Path) -> int:
    return json.loads((job_dir / "holder.json").read_text())["pid"]


def finish(proc: subprocess.Popen) -> tuple[int, dict | None, str]:
    """Wait for a CLI process; ``(exit code, its --json report or None, stderr)``."""
    out, err = proc.communicate(timeout=60)
    report = json.loads(out.splitlines()[-1]) if out.strip().startswith("{") else None
    return proc.returncode, report, err


def plan_of(pending=0, failed=0, dlq=0, duplicates=0, poison_parked=0) -> dict[str, int]:
    total = pending + failed + dlq
    return dict(
        pending=pending,
        failed=failed,
        dlq=dlq,
        duplicates=duplicates,
        poison_parked=poison_parked,
        total=total,
    )


# -- 1 ---------------------------------------------------------------------------------
def test_complete_resume_workflow_with_dlq_and_lock(mrpool, bench):
    """The golden path, with real processes end to end.

    Phases: (1) ``run``: 1-3 succeed, 4-6 fail twice each into the DLQ, 7 is
    held at a gate and the run's process group is SIGKILLed, so 7-10 never
    finish; (2) the plan, read without running anything: 7 unique items;
    (3) the cause is fixed and two ``resume`` processes race: one proceeds (held
    at a gate on item 4), the other exits 3 naming it; (4) the gate opens: all 7
    succeed, the DLQ empties, the lock is gone, 10 results, each once.
    """
    # -- phase 1: run -> 1-3 ok, 4-6 parked with their history, SIGKILL at item 7
    # 7-10 are gated: one lane holds 7 (8-10 never start); more lanes hold 7-10
    bench.write_job(10, workers=1, retries=1, fail="4 5 6", gates=(7, 8, 9, 10))
    held = [(k, 1) for k in range(7, 11)][: lanes(1)]
    once, twice = [(k, 1) for k in (1, 2, 3)], [(k, a) for k in (4, 5, 6) for a in (1, 2)]
    run = bench.start("run", str(bench.jobfile), "--job-id", JOB)
    records = bench.wait_journal(
        lambda rs: len(failed(rs, "dlq")) == 3 and set(held) <= set(started(rs)),
        "4-6 to be parked and the gated items to start",
    )
    wait_for(lambda: set(held) <= set(bench.ran()), what="the gated items to block")
    kill_group(run)
    assert run.returncode == -signal.SIGKILL

    assert sorted(succeeded(records)) == [1, 2, 3]
    assert sorted(failed(records, "retry")) == [(4, 1), (5, 1), (6, 1)]
    assert sorted(failed(records, "dlq")) == [(4, 2), (5, 2), (6, 2)]
    assert kinds(records)["open"] == 1 and kinds(records)["close"] == 0
    assert in_order(bench.ran(), once + twice + held, lanes(1)), bench.ran()
    # the dead run's lock and holder record are left behind, and block nobody
    assert bench.files() == FIRST_RUN | HOLDER_FILES
    assert holder_pid(bench.job_dir) == run.pid
    assert bench.counts() == ("interrupted", 3, 3, 0, 4, len(held), None)
    assert bench.dlq() == {4: 2, 5: 2, 6: 2}
    shown = json.loads(mrpool.run("dlq", "show", JOB, "4").stdout)
    assert [h["attempt"] for h in shown["history"]] == [1, 2]
    assert "injected failure for item 4" in shown["error"]

    # -- phase 2: the plan: 4 pending + 3 from the DLQ, no overlap, 7 unique items
    summary, planned = bench.plan()
    assert summary == plan_of(pending=4, dlq=3)
    assert planned == [(k, "dlq") for k in (4, 5, 6)] + [(k, "pending") for k in (7, 8, 9, 10)]
    # planning read the state and wrote nothing
    assert bench.files() == FIRST_RUN | STATUS_SWEPT

    # -- phase 3: cause fixed; two resumers race, the winner is held at item 4
    # (all 7 planned items are gated: one lane holds 4, more lanes the first of them)
    bench.fix()
    for k in (4, 5, 6):
        bench.close_gate(k)
    n = len(once + twice) + len(held)
    planned_attempts = [(4, 3), (5, 3), (6, 3)] + [(k, 1 + ((k, 1) in held)) for k in range(7, 11)]
    first = planned_attempts[: lanes(1)]
    winner, losers = race(bench, ("resume", JOB, "--json"), ("resume", JOB, "--json"))
    records = bench.wait_journal(
        lambda rs: set(first) <= set(started(rs)), "the winner to start item 4"
    )
    wait_for(lambda: set(first) <= set(bench.ran()), what="the winner's items to block")
    assert_blocked(losers, winner.pid)
    assert [s[0]["pid"] for s in sessions(records)] == [run.pid, winner.pid]
    assert plan_record(sessions(records)[1]) == plan_of(pending=4, dlq=3)
    assert holder_pid(bench.job_dir) == winner.pid
    assert bench.counts() == ("running", 3, 3, 0, 4, len(first), winner.pid)
    # 4's third attempt has started, not ended (and 5's and 6's, when lanes hold them)
    assert bench.dlq() == {k: 2 + ((k, 3) in first) for k in (4, 5, 6)}
    assert sorted(bench.ran()[n:]) == sorted(first)

    # -- phase 4: the gates open: all 7 succeed, nothing left behind
    for k in range(4, 11):
        bench.open_gate(k)
    code, report, err = finish(winner)
    assert code == 0, err
    assert report["plan"] == plan_of(pending=4, dlq=3)
    assert [report[k] for k in ("state", "succeeded", "failed", "dlq")] == ["completed", 10, 0, 0]
    assert in_order(bench.ran()[n:], planned_attempts, lanes(1)), bench.ran()
    records = bench.records()
    resumed = sessions(records)[1]
    assert sorted(succeeded(resumed)) == [4, 5, 6, 7, 8, 9, 10]
    assert failed(resumed, "retry") == failed(resumed, "dlq") == []
    assert resumed[-1]["k"] == "close" and resumed[-1]["reason"] == "finished"
    assert bench.counts() == ("completed", 10, 0, 0, 0, 0, None)
    assert bench.dlq() == {}
    assert bench.files() == AT_REST
    results = bench.results()
    assert list(results) == list(range(1, 11))
    assert [r["attempt"] for r in results.values()] == [1, 1, 1, 3, 3, 3] + [
        a for _, a in planned_attempts[3:]
    ]


# -- 2 ---------------------------------------------------------------------------------
def test_concurrent_resume_blocked_with_dlq(mrpool, bench):
    """Only one process ever reads-and-modifies the DLQ; losers change nothing on disk.

    Phases: (1) ``run`` parks 3-6 in the DLQ; (2) three racers (``resume``,
    ``dlq retry``, ``resume``) start at once: one wins and is held while
    retrying the DLQ (both its workers gated), two exit 3; (3) with the winner
    busy, five more losers -- ``resume`` (plain, ``--no-dlq``,
    ``--reset-failed``), ``dlq retry 5``, ``dlq purge --yes`` -- all exit 3 and
    the job directory is byte-for-byte what it was; (4) the gates open: the
    winner alone retries the DLQ once, 6 (still broken) is parked again with
    two attempts in its history, one per session.
    """
    # -- phase 1: run -> 1-2 ok, 3-6 in the DLQ
    bench.write_job(6, workers=2, fail="3 4 5 6")
    bench.run_to_end()
    assert bench.counts() == ("completed_with_failures", 2, 4, 0, 0, 0, None)
    assert bench.dlq() == {3: 1, 4: 1, 5: 1, 6: 1}
    assert bench.files() == AT_REST
    records = bench.records()
    assert sorted(failed(records, "dlq")) == [(3, 1), (4, 1), (5, 1), (6, 1)]
    assert sorted(bench.ran()) == [(k, 1) for k in range(1, 7)]

    # -- phase 2: three racers; the winner is held with 3 and 4 in flight
    bench.fail("6")  # 6 stays broken, the others are fixed
    for k in (3, 4, 5, 6):
        bench.close_gate(k)
    held = {(k, 2) for k in (3, 4, 5, 6)[: lanes(2)]}  # 3 and 4 (two lanes), or all four
    winner, losers = race(bench, ("resume", JOB), ("dlq", "retry", JOB), ("resume", JOB))
    records = bench.wait_journal(lambda rs: held <= set(started(rs)), "the winner to start 3, 4")
    wait_for(lambda: held <= set(bench.ran()), what="3 and 4 to block at their gates")
    assert_blocked(losers, winner.pid)
    assert len(sessions(records)) == 2 and sessions(records)[1][0]["pid"] == winner.pid
    assert plan_record(sessions(records)[1]) == plan_of(dlq=4)
    assert bench.counts() == ("running", 2, 4, 0, 0, len(held), winner.pid)

    # -- phase 3: five more losers while the winner holds the DLQ: nothing changes
    before = snapshot(bench.job_dir)
    ran_before = bench.ran()
    dlq_before = bench.dlq()
    assert dlq_before == {k: 1 + ((k, 2) in held) for k in (3, 4, 5, 6)}
    wave = [
        ("resume", JOB),
        ("resume", JOB, "--no-dlq"),
        ("resume", JOB, "--reset-failed"),
        ("dlq", "retry", JOB, "5"),
        ("dlq", "purge", JOB, "--yes"),
    ]
    procs = [(argv, bench.start(*argv)) for argv in wave]
    assert_blocked(
        [(argv, p.wait(timeout=30), p.communicate()[1]) for argv, p in procs], winner.pid
    )
    assert winner.poll() is None
    assert snapshot(bench.job_dir) == before
    assert holder_pid(bench.job_dir) == winner.pid
    assert bench.ran() == ran_before
    assert bench.dlq() == dlq_before
    assert bench.counts() == ("running", 2, 4, 0, 0, len(held), winner.pid)

    # -- phase 4: the gates open; the winner retries each DLQ item once
    for k in (3, 4, 5, 6):
        bench.open_gate(k)
    code, _, err = finish(winner)
    assert code == 1, err  # 6 is parked again
    assert sorted(bench.ran()[6:]) == [(3, 2), (4, 2), (5, 2), (6, 2)]
    records = bench.records()
    run_session, retried = sessions(records)
    assert retried[0]["pid"] == winner.pid and run_session[-1]["k"] == "close"
    assert sorted(started(retried)) == [(3, 2), (4, 2), (5, 2), (6, 2)]
    assert sorted(succeeded(retried)) == [3, 4, 5]
    assert failed(retried, "dlq") == [(6, 2)]
    assert bench.counts() == ("completed_with_failures", 5, 1, 0, 0, 0, None)
    assert bench.dlq() == {6: 2}
    shown = json.loads(mrpool.run("dlq", "show", JOB, "6").stdout)
    assert [h["attempt"] for h in shown["history"]] == [1, 2]
    assert bench.files() == AT_REST
    assert list(bench.results()) == [1, 2, 3, 4, 5]


# -- 3 ---------------------------------------------------------------------------------
def test_deduplication_with_dlq_and_pending(mrpool, bench):
    """An item that is in two places at once is planned once, as pending, and runs once.

    Phases: (1) ``run`` (1 worker, retries 1): 1-2 ok, 3 fails twice into the
    DLQ, 4 is held at a gate and the run is stopped by SIGINT (exit 130; 4 is
    pending, 5 never started); (2) a ``resume`` (2 workers) takes 3 out of the
    DLQ and holds it at a gate, while 4 fails its attempt 2 (failed, retry due)
    and its attempt 3 is held at a gate -- then SIGKILL: 3 is in the DLQ *and*
    in flight, 4 is failed *and* in flight; (3) the plan: 3 items, all from the
    pending source, 2 overlaps collapsed; (4) the final ``resume`` runs 3, 4
    and 5 exactly once each.
    """
    # -- phase 1: run -> 1-2 ok, 3 parked, interrupted (SIGINT) at item 4
    # 4 and 5 are gated: one lane holds 4 (5 never starts), more lanes hold 4 and 5
    bench.write_job(5, workers=1, retries=1, fail="3", gates=(4, 5))
    held = [(4, 1), (5, 1)][: lanes(1)]
    run = bench.start("run", str(bench.jobfile), "--job-id", JOB)
    bench.wait_journal(
        lambda rs: (3, 2) in failed(rs, "dlq") and set(held) <= set(started(rs)),
        "3 to be parked and item 4 to start",
    )
    wait_for(lambda: set(held) <= set(bench.ran()), what="item 4 to block at its gate")
    run.send_signal(signal.SIGINT)
    code, _, err = finish(run)
    assert code == 130, err
    records = bench.records()
    assert sorted(succeeded(records)) == [1, 2]
    assert failed(records, "retry") == [(3, 1)] and failed(records, "dlq") == [(3, 2)]
    assert records[-1]["k"] == "close" and records[-1]["reason"] == "interrupted by SIGINT"
    assert in_order(bench.ran(), [(1, 1), (2, 1), (3, 1), (3, 2)] + held, lanes(1)), bench.ran()
    assert bench.counts() == ("interrupted", 2, 1, 0, 2, 0, None)
    assert bench.dlq() == {3: 2}
    assert bench.files() == AT_REST
    assert bench.plan() == (plan_of(pending=2, dlq=1), [(3, "dlq"), (4, "pending"), (5, "pending")])

    # -- phase 2: a resume holds 3 (from the DLQ) and 4 (after a failure) in flight; SIGKILL
    bench.open_gate(4)
    bench.fail("3 4@2")
    bench.close_gate(3)
    bench.close_gate("4@3")
    # two lanes: 3 and 4 hold them (5 never starts); more lanes: 5 is held at its gate too
    five = [(5, 1 + ((5, 1) in held))] if lanes(2) > 2 else []
    n = 4 + len(held)
    crashed = bench.start("resume", JOB, "--workers", "2")
    records = bench.wait_journal(
        lambda rs: {(3, 3), (4, 3), *five} <= set(started(rs)), "3 and 4 to be in flight"
    )
    wait_for(
        lambda: {(3, 3), (4, 3), *five} <= set(bench.ran()), what="3 and 4 to block at their gates"
    )
    kill_group(crashed)
    session = sessions(records)[1]
    assert plan_record(session) == plan_of(pending=2, dlq=1)
    assert sorted(started(session)) == [(3, 3), (4, 2), (4, 3), *five]
    assert failed(session, "retry") == [(4, 2)] and succeeded(session) == []
    # any interleaving of 3 and 4 (and 5), 4's attempts in order
    assert in_order(bench.ran()[n:], [(3, 3), (4, 2), (4, 3), *five], 2), bench.ran()
    # in their last settled places (3: dlq, 4: failed), and in flight at the crash
    assert bench.counts() == ("interrupted", 2, 1, 1, 1, 2 + len(five), None)
    assert bench.dlq() == {3: 3}
    assert bench.files() == AT_REST | STATUS_SWEPT

    # -- phase 3: the plan: 3 and 4 collapse onto their pending (in-flight) source
    summary, planned = bench.plan()
    assert summary == plan_of(pending=3, duplicates=2)
    assert planned == [(3, "pending"), (4, "pending"), (5, "pending")]

    # -- phase 4: the final resume runs each of 3, 4, 5 exactly once
    bench.fix()
    bench.open_gate(3)
    bench.open_gate("4@3")
    bench.open_gate(5)
    n += 3 + len(five)
    attempt5 = 1 + ((5, 1) in held) + len(five)  # 5's attempts so far, plus this one
    done = bench.start("resume", JOB, "--json")
    code, report, err = finish(done)
    assert code == 0, err
    assert report["plan"] == plan_of(pending=3, duplicates=2)
    assert "3 item(s) to run (3 pending, 0 failed, 0 from the DLQ; 2 duplicate(s) collapsed" in err
    last = bench.ran()[n:]
    assert sorted(last) == [(3, 4), (4, 4), (5, attempt5)]
    session = sessions(bench.records())[2]
    assert sorted(started(session)) == [(3, 4), (4, 4), (5, attempt5)]
    assert sorted(succeeded(session)) == [3, 4, 5]
    assert bench.counts() == ("completed", 5, 0, 0, 0, 0, None)
    assert bench.dlq() == {}
    assert bench.files() == AT_REST
    results = bench.results()
    assert {k: r["attempt"] for k, r in results.items()} == {1: 1, 2: 1, 3: 4, 4: 4, 5: attempt5}


# -- 4 ---------------------------------------------------------------------------------
def test_retry_success_cleans_up_dlq_and_releases_lock(mrpool, bench):
    """A successful retry leaves the DLQ and leaves nothing else behind.

    Phases: (1) ``run``: 2 and 3 fail into the DLQ; (2) the cause is fixed and
    ``resume`` retries the DLQ: both succeed and leave it; (3) the lock is free
    at once: another ``resume`` and a ``dlq retry`` take it and find nothing
    left; (4) nothing remains: no lock or holder file, no temp file, no process,
    no /dev/shm segment.
    """
    shm_before = mrpool_shm(shm_entries())

    # -- phase 1: run -> 1 and 4 ok, 2 and 3 parked
    bench.write_job(4, workers=2, fail="2 3")
    bench.run_to_end()
    assert bench.counts() == ("completed_with_failures", 2, 2, 0, 0, 0, None)
    assert bench.dlq() == {2: 1, 3: 1}
    assert sorted(failed(bench.records(), "dlq")) == [(2, 1), (3, 1)]
    assert bench.files() == AT_REST

    # -- phase 2: cause fixed; resume retries the DLQ, both succeed and leave it
    bench.fix()
    r = mrpool.run("resume", JOB, "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["plan"] == plan_of(dlq=2)
    assert (report["state"], report["succeeded"], report["dlq"]) == ("completed", 4, 0)
    session = sessions(bench.records())[1]
    assert sorted(started(session)) == [(2, 2), (3, 2)]
    assert sorted(succeeded(session)) == [2, 3]
    assert bench.dlq() == {}
    assert mrpool.run("dlq", "stats", JOB, "--json").stdout.strip() == "[]"
    assert bench.counts() == ("completed", 4, 0, 0, 0, 0, None)
    assert bench.files() == AT_REST

    # -- phase 3: the lock was released: the next takers get it at once, with nothing to do
    for argv in (("resume", JOB), ("dlq", "retry", JOB)):
        r = mrpool.run(*argv)
        assert r.returncode == 0, (argv, r.stderr)
        assert "nothing left to run" in r.stderr
    assert len(sessions(bench.records())) == 2  # nothing to run: no session opened
    assert sorted(bench.ran()) == [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2), (4, 1)]

    # -- phase 4: nothing left behind
    assert bench.files() == AT_REST
    assert not HOLDER_FILES & bench.files()
    assert os.listdir(mrpool.state_dir / "tmp") == []
    assert tagged_processes(mrpool.tag) == []
    assert mrpool_shm(shm_entries()) - shm_before == set()
    assert list(bench.results()) == [1, 2, 3, 4]


# -- 5 ---------------------------------------------------------------------------------
def test_resume_after_partial_failure(mrpool, bench):
    """Resume after a run that partly failed and was cut short runs exactly what is left.

    Phases: (1) ``run`` (1 worker): 1-5 succeed, 6-8 fail into the DLQ, 9 is
    held at a gate and the run's process group is SIGKILLed: 9 and 10 never
    finish; (2) the plan: pending 9-10 and DLQ 6-8, no overlap, 5 items;
    (3) ``resume`` with the cause fixed processes exactly those 5, once each,
    and 6-8 leave the DLQ.
    """
    # -- phase 1: run -> 1-5 ok, 6-8 parked, SIGKILL while 9 is held
    # 9 and 10 are gated: one lane holds 9 (10 never starts), more lanes hold 9 and 10
    bench.write_job(10, workers=1, fail="6 7 8", gates=(9, 10))
    held = [(9, 1), (10, 1)][: lanes(1)]
    run = bench.start("run", str(bench.jobfile), "--job-id", JOB)
    records = bench.wait_journal(
        lambda rs: (
            len(succeeded(rs)) + len(failed(rs, "dlq")) == 8 and set(held) <= set(started(rs))
        ),
        "1-8 to settle and item 9 to start",
    )
    wait_for(lambda: set(held) <= set(bench.ran()), what="item 9 to block at its gate")
    kill_group(run)
    assert sorted(succeeded(records)) == [1, 2, 3, 4, 5]
    assert sorted(failed(records, "dlq")) == [(6, 1), (7, 1), (8, 1)]
    assert in_order(started(records), [(k, 1) for k in range(1, 9)] + held, lanes(1))
    assert in_order(bench.ran(), [(k, 1) for k in range(1, 9)] + held, lanes(1)), bench.ran()
    assert bench.counts() == ("interrupted", 5, 3, 0, 2, len(held), None)
    assert bench.dlq() == {6: 1, 7: 1, 8: 1}
    assert bench.files() == FIRST_RUN | STATUS_SWEPT

    # -- phase 2: the plan: 2 pending + 3 from the DLQ, disjoint
    summary, planned = bench.plan()
    assert summary == plan_of(pending=2, dlq=3)
    assert planned == [(6, "dlq"), (7, "dlq"), (8, "dlq"), (9, "pending"), (10, "pending")]
    by_source = {s: {k for k, src in planned if src == s} for s in ("pending", "dlq")}
    assert by_source == {"pending": {9, 10}, "dlq": {6, 7, 8}}

    # -- phase 3: resume processes exactly those 5; 6-8 leave the DLQ
    bench.fix()
    bench.open_gate(9)
    bench.open_gate(10)
    r = mrpool.run("resume", JOB, "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["plan"] == plan_of(pending=2, dlq=3)
    rerun = [(6, 2), (7, 2), (8, 2), (9, 2), (10, 1 + ((10, 1) in held))]
    assert in_order(bench.ran()[8 + len(held) :], rerun, lanes(1)), bench.ran()
    session = sessions(bench.records())[1]
    assert in_order(started(session), rerun, lanes(1))
    ok = succeeded(session)
    assert (ok if lanes(1) == 1 else sorted(ok)) == [6, 7, 8, 9, 10]
    assert bench.dlq() == {}
    assert bench.counts() == ("completed", 10, 0, 0, 0, 0, None)
    assert bench.files() == AT_REST
    assert list(bench.results()) == list(range(1, 11))


# -- 6 ---------------------------------------------------------------------------------
def test_winner_killed_mid_resume_loser_takes_over(mrpool, bench):
    """A winner SIGKILLed mid-retry never blocks the loser, whose retry finishes the job.

    Phases: (1) ``run`` parks 5-8 in the DLQ; (2) ``resume`` and ``dlq retry``
    race with the cause fixed: the winner takes 5 and 6 out of the DLQ and is
    held at their gates, the loser exits 3 naming it; (3) the winner's process
    group is SIGKILLed: its lock file and holder record stay behind, naming a
    dead pid, and 5 and 6 are in the DLQ *and* in flight; (4) the loser runs its
    command again: it takes the lock, plans 5-6 as pending and 7-8 from the
    DLQ, re-runs the two cut-short attempts and finishes: 8 results, DLQ empty.
    """
    # -- phase 1: run -> 1-4 ok, 5-8 parked
    bench.write_job(8, workers=2, fail="5 6 7 8")
    bench.run_to_end()
    assert bench.counts() == ("completed_with_failures", 4, 4, 0, 0, 0, None)
    assert bench.dlq() == {5: 1, 6: 1, 7: 1, 8: 1}
    assert bench.files() == AT_REST

    # -- phase 2: race; the winner is held with 5 and 6 in flight
    bench.fix()
    for k in (5, 6, 7, 8):
        bench.close_gate(k)
    cut = (5, 6, 7, 8)[: lanes(2)]  # two lanes: 5 and 6 are cut short; more: all four
    rest = tuple(k for k in (5, 6, 7, 8) if k not in cut)
    held = {(k, 2) for k in cut}
    winner, losers = race(bench, ("resume", JOB), ("dlq", "retry", JOB))
    records = bench.wait_journal(lambda rs: held <= set(started(rs)), "the winner to start 5, 6")
    wait_for(lambda: held <= set(bench.ran()), what="5 and 6 to block at their gates")
    assert_blocked(losers, winner.pid)
    ((loser_argv, _, _),) = losers
    assert sessions(records)[1][0]["pid"] == winner.pid
    assert plan_record(sessions(records)[1]) == plan_of(dlq=4)
    assert bench.counts() == ("running", 4, 4, 0, 0, len(cut), winner.pid)

    # -- phase 3: SIGKILL the winner mid-retry
    kill_group(winner)
    assert winner.returncode == -signal.SIGKILL
    assert bench.files() == AT_REST | HOLDER_FILES
    assert holder_pid(bench.job_dir) == winner.pid
    # 5 and 6 stay in the DLQ (their last settled place), in flight at the crash
    assert bench.counts() == ("completed_with_failures", 4, 4, 0, 0, len(cut), None)
    assert bench.dlq() == {k: 1 + (k in cut) for k in (5, 6, 7, 8)}
    assert sessions(bench.records())[1][-1]["k"] != "close"
    planned = plan_of(pending=len(cut), dlq=len(rest), duplicates=len(cut))
    assert bench.plan() == (
        planned,
        [(k, "pending" if k in cut else "dlq") for k in (5, 6, 7, 8)],
    )

    # -- phase 4: the loser's retry takes over and finishes
    for k in (5, 6, 7, 8):
        bench.open_gate(k)
    takeover = bench.start(*loser_argv, "--json")
    code, report, err = finish(takeover)
    assert code == 0, err
    assert report["plan"] == planned
    records = bench.records()
    assert [s[0]["pid"] for s in sessions(records)[1:]] == [winner.pid, takeover.pid]
    last = sessions(records)[2]
    final = {k: 2 + (k in cut) for k in (5, 6, 7, 8)}  # the attempt that succeeds
    assert sorted(started(last)) == sorted(final.items())
    assert sorted(succeeded(last)) == [5, 6, 7, 8]
    # at-least-once for the attempts whose outcome was never recorded; once for the rest
    assert sorted(bench.ran()[8:]) == sorted({*held, *final.items()})
    assert bench.counts() == ("completed", 8, 0, 0, 0, 0, None)
    assert bench.dlq() == {}
    assert bench.files() == AT_REST
    results = bench.results()
    assert list(results) == list(range(1, 9))
    assert [r["attempt"] for r in results.values()] == [1, 1, 1, 1, *final.values()]
