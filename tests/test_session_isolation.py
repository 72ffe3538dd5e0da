"""A crashed session never touches the next one, and its attempts are attributed exactly.

The setting of issues 21 and 22: the supervisor is SIGKILLed while attempts run,
with a ``resume --wait`` already waiting for the lock (as a restart loop or
systemd would be). The old session's workers may outlive their supervisor for a
moment; the new session must end them before it reads their slot file, and must
never share that file with them. Every map appends ``{"id", "a", "pid"}`` to a
side log with O_APPEND, which shows exactly what ran:

* no ``(id, attempt)`` pair runs twice (attempt numbers are cumulative, and an
  attempt counts once it began, even if the crash cut it short or its outcome
  died with the supervisor);
* no attempt of the new session is killed (by the old session's watchdog);
* nothing of the old session is alive 2 s after the kill;
* every item succeeds, and ``results`` lists each id once.

Then the attribution rules one by one (a supervisor frozen with SIGSTOP, then
SIGKILLed, pins the instant): an item queued behind the running one keeps its
attempt number, one that ran to completion unreported takes the next number,
the running one gets a crash streak; without evidence every open item is
charged and none gets a streak. And a disk-full exit leaves ``slots.bin`` only
when the next session needs it.
"""

from __future__ import annotations

import json
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest
from conftest import journal_records, tagged_processes, wait_for, write_job

from mrpool.records import started_attempts
from mrpool.store import JobState

ITEMS = 12

LOG_COMMAND = (
    "while [ ! -e go ]; do sleep 0.01; done; "  # items flow once the resume is waiting
    'printf \'{"id":"%s","a":%s,"pid":%s}\\n\' "$MRPOOL_ITEM_ID" "$MRPOOL_ATTEMPT" "$$"'
    " >> side.log; sleep 0.05"
)

# A callable is not told its attempt number: see reused_attempts for how its runs are checked.
LOG_CALLABLE = """
import os, time

HERE = os.path.dirname(os.path.abspath(__file__))  # callables run in the caller's directory

def work(item):
    while not os.path.exists(os.path.join(HERE, "go")):  # items flow once the resume waits
        time.sleep(0.01)
    line = '{"id":"%s","pid":%d}\\n' % (item["id"], os.getpid())
    fd = os.open(os.path.join(HERE, "side.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)
    time.sleep(0.05)
    return item["id"]
"""


def side_log(src: Path) -> list[dict]:
    try:
        text = (src / "side.log").read_text()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in text.splitlines() if line.endswith("}")]


def make_job(src: Path, kind: str) -> Path:
    items = [{"id": f"it{k:03d}"} for k in range(ITEMS)]
    if kind == "command":
        step = {"command": ["sh", "-c", LOG_COMMAND]}
        return write_job(src, items, step, name="iso", workers=2)
    step = {"callable": "logmap:work"}
    return write_job(src, items, step, name="iso", workers=2, files={"logmap.py": LOG_CALLABLE})


def killed_attempts(job_dir: Path) -> list[dict]:
    """Failures recorded anywhere in the job (none is expected: no map here ever fails)."""
    return [r for r in journal_records(job_dir) if r["k"] == "f"]


def crash_round(mrpool, tmp_path: Path, n: int, kind: str, target: str, rng) -> None:
    """One trial: run, a waiting resume, SIGKILL at a random instant, check everything."""
    # the old session's processes carry a tag of their own (the new session's: the test's)
    src, job_id, mark = tmp_path / f"r{n}", f"iso{n}", f"old-{n}-{mrpool.tag}"
    job = make_job(src, kind)
    run = mrpool.start("run", str(job), "--job-id", job_id, env=mrpool.env(MRPOOL_TEST_TAG=mark))
    # the id is printed: the job exists, and the run holds its lock
    assert run.stdout.readline().decode().strip() == job_id
    waiter = mrpool.start("resume", job_id, "--wait", "30")
    time.sleep(0.5)  # its start-up: then it polls the lock; the items wait for it
    (src / "go").touch()
    lines_before_kill = rng.randint(1, ITEMS - 4)
    wait_for(lambda: len(side_log(src)) >= lines_before_kill, what="attempts running")
    assert run.poll() is None and waiter.poll() is None, "killed too late: nothing proven"
    old = old_session(run.pid)
    if target == "group":
        os.killpg(run.pid, signal.SIGKILL)
    else:
        os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=30)

    # Nothing of the dead session runs 2 s after the kill (guarantee 4).
    wait_for(lambda: not any(map(alive, old)), timeout=2.0, what="the old session to be gone")
    out, err = waiter.communicate(timeout=90)
    assert waiter.returncode == 0, (out, err)

    # What ran: no (id, attempt) twice, no attempt killed, each item succeeded once.
    job_dir = mrpool.job_dir(job_id)
    runs = side_log(src)
    if kind == "command":
        pairs = Counter((line["id"], line["a"]) for line in runs)
        assert [pair for pair, count in pairs.items() if count > 1] == []
    else:
        assert reused_attempts(job_dir, runs) == []
    assert killed_attempts(job_dir) == []
    ids = [row["id"] for row in mrpool.results(job_id)]
    assert sorted(ids) == [f"it{k:03d}" for k in range(ITEMS)]
    status = mrpool.status(job_id)
    assert (status["state"], status["succeeded"], status["dlq"]) == ("completed", ITEMS, 0)
    assert not (job_dir / "slots.bin").exists()
    assert not tagged_processes(mark)  # nor anything it started after the snapshot


def old_session(supervisor: int) -> list[psutil.Process]:
    """The supervisor and everything it has started (its workers, their map commands)."""
    proc = psutil.Process(supervisor)
    return [proc, *proc.children(recursive=True)]


def alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reused_attempts(job_dir: Path, runs: list[dict]) -> list[str]:
    """Ids of a callable map that ran more often than they were given attempt numbers.

    Every run is an attempt that began, and each attempt that began keeps its number
    for good; a number journaled but never begun (queued at a crash) is given back
    and journaled again. So an item ran at most as often as the distinct numbers its
    start records name -- unless a number was used twice."""
    from mrpool.items import read_ids

    ids = read_ids(job_dir)
    numbers: dict[str, set[int]] = {}
    for record in journal_records(job_dir):
        if record["k"] == "s":
            for index, attempt in started_attempts(record):
                numbers.setdefault(ids[index], set()).add(attempt)
    ran = Counter(line["id"] for line in runs)
    return [item for item, count in ran.items() if count > len(numbers.get(item, ()))]


def test_attempt_numbers_never_reused_after_supervisor_kill(mrpool, tmp_path):
    """Issue 21 item 1 / issue 22 item 1: command maps, supervisor SIGKILLed, resume waiting."""
    rng = random.Random(2101)
    for n in range(3):
        crash_round(mrpool, tmp_path, n, "command", "supervisor", rng)


@pytest.mark.parametrize(
    "kind, target",
    [("callable", "supervisor"), ("command", "group"), ("callable", "group")],
)
def test_a_crashed_session_never_touches_the_next(mrpool, tmp_path, kind, target):
    rng = random.Random(f"{kind}-{target}")
    crash_round(mrpool, tmp_path, 0, kind, target, rng)


@pytest.mark.stress
@pytest.mark.timeout(1800)  # 50 rounds of a few seconds each
@pytest.mark.parametrize(
    "kind, target",
    [
        ("command", "supervisor"),
        ("callable", "supervisor"),
        ("command", "group"),
        ("callable", "group"),
    ],
)
def test_a_crashed_session_never_touches_the_next_many_rounds(mrpool, tmp_path, kind, target):
    seed = int(os.environ.get("MRPOOL_STRESS_SEED", "22"))
    rng = random.Random(f"{seed}-{kind}-{target}")
    for n in range(50):
        crash_round(mrpool, tmp_path, n, kind, target, rng)


# -- attribution, pinned with a frozen supervisor ------------------------------------
ROLES_CALLABLE = """
import os, signal, time

HERE = os.path.dirname(os.path.abspath(__file__))  # callables run in the caller's directory

def work(item):
    role = item["role"]
    if role == "freeze" and os.path.exists(os.path.join(HERE, "freeze")):
        os.kill(os.getppid(), signal.SIGSTOP)  # the supervisor: it journals nothing more
    elif role == "block":
        open(os.path.join(HERE, "blocking"), "w").close()
        while not os.path.exists(os.path.join(HERE, "unblock")):
            time.sleep(0.01)
    return item["id"]
"""

ROLES = ["warm", "freeze", "block", "queued", "queued"]


def frozen_crash(mrpool, tmp_path: Path, job_id: str) -> Path:
    """Item 0 succeeds; 1-4 go out in one batch to the one worker: 1 runs to completion
    (and freezes the supervisor, so its outcome is never journaled), 2 is running, 3
    and 4 are queued behind it -- when the supervisor is SIGKILLed."""
    src = tmp_path / job_id
    items = [{"id": k, "role": role} for k, role in enumerate(ROLES)]
    job = write_job(
        src, items, {"callable": "roles:work"}, workers=1, files={"roles.py": ROLES_CALLABLE}
    )
    (src / "freeze").touch()
    run = mrpool.start("run", str(job), "--job-id", job_id)
    wait_for(lambda: (src / "blocking").exists(), what="item 2 running")
    wait_for(
        lambda: psutil.Process(run.pid).status() == psutil.STATUS_STOPPED,
        what="the supervisor frozen",
    )
    os.kill(run.pid, signal.SIGKILL)
    run.wait(timeout=30)
    (src / "freeze").unlink()
    (src / "unblock").touch()
    return mrpool.job_dir(job_id)


def second_session(job_dir: Path) -> tuple[dict, JobState, dict[int, int]]:
    """The resume's ``open`` record, the state it leaves, and the attempts it started."""
    records = journal_records(job_dir)
    opens = [k for k, r in enumerate(records) if r["k"] == "open"]
    assert len(opens) == 2
    state = JobState(len(ROLES))
    for record in records[: opens[1] + 1]:
        state.apply(record)
    numbers = {}
    for record in records[opens[1] :]:
        if record["k"] == "s":
            numbers.update(started_attempts(record))
    return records[opens[1]], state, numbers


def test_each_open_attempt_is_charged_by_what_its_worker_did(mrpool, tmp_path):
    job_dir = frozen_crash(mrpool, tmp_path, "exact")
    r = mrpool.run("resume", "exact")
    assert r.returncode == 0, r.stderr
    opened, state, numbers = second_session(job_dir)
    assert (opened["began"], opened["cut"]) == ([1, 2], [2])
    # 1 ran to completion unreported, 2 was running: both counted; 3 and 4 never began.
    assert numbers == {1: 2, 2: 2, 3: 1, 4: 1}
    assert list(state.streak) == [0, 0, 1, 0, 0]  # only the running one is suspected
    assert [row["id"] for row in mrpool.results("exact")] == [0, 1, 2, 3, 4]


def test_without_evidence_every_open_attempt_is_charged_and_none_streaked(mrpool, tmp_path):
    job_dir = frozen_crash(mrpool, tmp_path, "blind")
    (job_dir / "slots.bin").unlink()  # as a remote executor leaves it: no slot file
    r = mrpool.run("resume", "blind")
    assert r.returncode == 0, r.stderr
    opened, state, numbers = second_session(job_dir)
    assert (opened["began"], opened["cut"]) == (None, [])
    assert numbers == {1: 2, 2: 2, 3: 2, 4: 2}
    assert list(state.streak) == [0] * len(ROLES)
    assert [row["id"] for row in mrpool.results("blind")] == [0, 1, 2, 3, 4]


# -- a full disk -------------------------------------------------------------------
@pytest.mark.parametrize(
    "nth, item0_lost",
    [(4, True), (5, False)],  # 4: item 0's outcome is lost; 5: the next batch's start is
    ids=["outcome-lost", "start-lost"],
)
def test_a_full_disk_exit_leaves_no_slots_file_and_reuses_no_attempt(
    mrpool, tmp_path, nth, item0_lost
):
    """Writes: 1 the job header, 2 the session's open record, 3 item 0's start, 4 its
    outcome, 5 the next batch's start. A storage error aborts the session: its close
    record charges every open attempt (crashes.py, rule 5), so no crash evidence is
    needed and no slot file is left; resume finishes, and an attempt whose outcome was
    lost is not run again under its number."""
    src = tmp_path / "full"
    items = [{"id": k, "role": "plain"} for k in range(6)]
    job = write_job(
        src, items, {"callable": "roles:work"}, workers=1, files={"roles.py": ROLES_CALLABLE}
    )
    failing = mrpool.env(MRPOOL_FAILPOINTS=f"journal.after_write=enospc@{nth}")
    r = mrpool.run("run", str(job), "--job-id", "full", env=failing)
    assert r.returncode == 1 and "No space left" in r.stderr, r.stderr
    job_dir = mrpool.job_dir("full")
    assert mrpool.status("full")["in_flight"] == 0  # the abort closed the session
    assert not (job_dir / "slots.bin").exists()
    r = mrpool.run("resume", "full")
    assert r.returncode == 0, r.stderr
    records = journal_records(job_dir)
    last_open = max(k for k, rec in enumerate(records) if rec["k"] == "open")
    rerun = [
        attempt
        for rec in records[last_open:]
        if rec["k"] == "s"
        for index, attempt in started_attempts(rec)
        if index == 0
    ]
    assert rerun == ([2] if item0_lost else [])  # item 0's lost attempt 1 counts
    assert [row["id"] for row in mrpool.results("full")] == list(range(6))
    assert not (job_dir / "slots.bin").exists()
