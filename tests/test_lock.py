"""Issue 5, the resume lock: one resumer per job, proven with real competing processes.

Every test here drives real ``python -m mrpool`` processes (or, for the lock's own
sharp edges, real ``JobLock`` objects in several processes) against one job and
checks what users rely on (CONTRACT.md, guarantee 3 and exit status 3):

* of 8 ``resume`` processes started at once, exactly one runs and the other 7
  exit 3 at once, naming the holder's pid -- 20 rounds, never a double winner;
* a holder killed with SIGKILL never blocks: the next ``resume`` takes over at
  once, and ``status`` never reports the dead holder, although its
  ``holder.json`` is still on disk;
* a holder record whose pid now names another process, or a zombie, is not a
  holder; one from another host is reported and never broken;
* a second acquire inside one process (another ``JobLock``, another thread) is
  refused, and the first one still holds;
* after every command ends (any exit status, SIGINT, SIGTERM, an error) the job
  directory holds no ``lock`` and no ``holder.json``;
* the unlink-on-release race (a waiter locking the old inode) never lets two
  processes in at once, also with ``clear_stale`` (what ``status`` runs) sweeping
  beside them -- it never removes a live holder's record;
* ``--wait`` waits; ``run``, ``resume`` and ``dlq retry`` all take the lock.

Synchronisation is on state (journal records, exit of processes), never on
sleeps. The map is a callable that blocks on a "gate" file the test creates, so a
holder holds exactly as long as a test needs it to.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import PY, REPO, journal_records, kill_group, wait_for, write_job

from mrpool import api
from mrpool.errors import LockedError
from mrpool.lock import JobLock, live_holder

pytestmark = pytest.mark.timeout(180)

HOSTNAME = socket.gethostname()
LOCK_FILES = ("lock", "holder.json")
# The contract says "within a second"; on a loaded 2-core machine starting 8
# interpreters at once costs most of that by itself, so the hard limit has slack
# and the measured figures are printed.
LOSER_LIMIT = 2.0
# Eight interpreters starting at once on two cores, beside the suite's other test worker:
# that wall time is mostly the machine's; the one-second contract is measured on a lone
# blocked command (benchmarks/lock_contention.py: ~0.3 s).
STAMPEDE_LIMIT = 3.0
# Twelve rounds (six over a SIGKILLed holder's record) in the suite; stress runs take 60.
RACE_ROUNDS = 60 if os.environ.get("MRPOOL_STRESS") == "1" else 12
RACERS = 8

# The map callable: items with "wait" block until the gate file exists; items
# with "fail" then raise (so they land in the DLQ and the next resume runs them again).
GATE_PY = """
import time
from pathlib import Path

GATE = Path(__file__).with_name("gate")


def hold(item):
    if item.get("wait"):
        while not GATE.exists():
            time.sleep(0.01)
    if item.get("fail"):
        raise RuntimeError("asked to fail")
    return item["id"]
"""

# One contender in the unlink race: acquire/release a JobLock N times, and inside
# the lock do a read-increment-write of a shared counter, with an O_EXCL marker
# file that a second process inside the lock would find already there.
# The race window (a waiter opened the lock file, the holder unlinks it and
# releases, the waiter locks the old inode) is microseconds wide; a random delay
# between fasteners' open and its lockf() widens it, and each process counts how
# often it did lock an unlinked inode, to prove the race really happened.
HAMMER_PY = """
import json, os, random, sys, time
from pathlib import Path
import fasteners
from mrpool.lock import JobLock

job_dir, counter, marker, rounds = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
overlaps = stale = 0
trylock = fasteners.InterProcessLock.trylock


def slow_trylock(self):
    global stale
    time.sleep(random.uniform(0, 0.005))  # a waiter preempted between open() and lockf()
    trylock(self)  # raises when the lock is held
    try:
        stale += os.fstat(self.lockfile.fileno()).st_ino != os.stat(self.path).st_ino
    except FileNotFoundError:
        stale += 1


def _holder_is_me(job_dir):
    try:
        return json.loads((Path(job_dir) / "holder.json").read_text())["pid"] == os.getpid()
    except (OSError, ValueError, KeyError):
        return False


fasteners.InterProcessLock.trylock = slow_trylock
for _ in range(rounds):
    with JobLock(job_dir, command="hammer").acquire(wait=10):
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            overlaps += 1
        if not _holder_is_me(job_dir):  # a sweeper (clear_stale) removed a live record
            overlaps += 1
        value = int(counter.read_text())
        time.sleep(0.0005)
        counter.write_text(str(value + 1))
        try:
            os.unlink(marker)
        except FileNotFoundError:
            overlaps += 1
    time.sleep(random.uniform(0, 0.01))  # let the others in: many hand-overs, many unlinks
print(overlaps, stale)
"""


# -- helpers -------------------------------------------------------------------------
class Gate:
    """The file the map callable waits for: closed = holders hold, open = they finish."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "gate"

    def open(self) -> None:
        self.path.touch()

    def close(self) -> None:
        self.path.unlink(missing_ok=True)


def make_gated_job(directory: Path, items: list[dict[str, Any]], **extra: Any) -> tuple[Path, Gate]:
    """A one-worker job whose map is ``gate:hold``; returns the job file and its (closed) gate."""
    job_file = write_job(
        directory,
        items,
        {"callable": "gate:hold", **extra},
        name="locked",
        workers=1,
        files={"gate.py": GATE_PY},
    )
    return job_file, Gate(directory)


def lock_files(job_dir: Path) -> list[str]:
    """Which of the lock's files exist in ``job_dir``."""
    return [name for name in LOCK_FILES if (job_dir / name).exists()]


def assert_no_lock_files(job_dir: Path, after: str) -> None:
    """The contract's 'clean after itself': no lock file, no holder file."""
    assert lock_files(job_dir) == [], f"after {after}: left in {job_dir}: {lock_files(job_dir)}"


def records_since(job_dir: Path, start: int) -> list[dict[str, Any]]:
    """The journal's records from index ``start`` on (none before the job exists)."""
    if not (job_dir / "journal.log").exists():
        return []
    return journal_records(job_dir)[start:]


def session_of(job_dir: Path, pid: int, start: int = 0) -> list[dict[str, Any]]:
    """The journal records of the session ``pid`` opened (after record ``start``)."""
    found: list[dict[str, Any]] | None = None
    for record in records_since(job_dir, start):
        if record["k"] == "open":
            found = [record] if record.get("pid") == pid else None
        elif found is not None:
            found.append(record)
    return found or []


def wait_until_running(job_dir: Path, proc: subprocess.Popen, start: int = 0) -> float:
    """Wait for ``proc`` to journal its first item start (``s``); return when that was seen."""
    wait_for(
        lambda: (
            proc.poll() is not None
            or any(r["k"] == "s" for r in session_of(job_dir, proc.pid, start))
        ),
        timeout=30,
        what=f"pid {proc.pid} to start an item",
    )
    seen = time.monotonic()
    if proc.poll() is not None:
        rc, _, err = finish(proc)
        raise AssertionError(f"pid {proc.pid} exited {rc} instead of running: {err}")
    return seen


def python_script(mrpool, script: Path, *args: Any) -> subprocess.Popen:
    """Start ``python script args...`` tagged for the leak checks, its output piped."""
    return subprocess.Popen(
        [PY, str(script), *map(str, args)],
        env=mrpool.env(),
        cwd=str(REPO),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def finish(proc: subprocess.Popen, timeout: float = 30) -> tuple[int, str, str]:
    """Wait for ``proc`` to end; its exit status and text output."""
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode(), err.decode()


def timed_run(mrpool, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run a command to completion; its result and wall time."""
    started = time.monotonic()
    result = mrpool.run(*args)
    return result, time.monotonic() - started


def start_holder(mrpool, job_dir: Path, *args: str) -> subprocess.Popen:
    """Start a command that will hold the job's lock, and wait until it runs an item."""
    start = len(records_since(job_dir, 0))
    proc = mrpool.start(*args)
    wait_until_running(job_dir, proc, start)
    return proc


def assert_refused_by(result: subprocess.CompletedProcess, holder_pid: int, command: str) -> None:
    """Exit 3 with one line naming the holder: pid, host, and what it runs."""
    assert result.returncode == 3, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"pid {holder_pid} on {HOSTNAME} since " in lines[0], lines[0]
    assert command in lines[0], lines[0]


def kernel_lock_is_held(path: Path) -> bool:
    """Ask another process whether the POSIX record lock on ``path`` is taken."""
    probe = (
        "import fcntl, sys\n"
        "with open(sys.argv[1], 'a') as f:\n"
        "    try:\n"
        "        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
        "    except OSError:\n"
        "        sys.exit(7)\n"
    )
    result = subprocess.run([PY, "-c", probe, str(path)], capture_output=True, text=True)
    assert result.returncode in (0, 7), result.stderr
    return result.returncode == 7


def plant_holder(job_dir: Path, **record: Any) -> dict[str, Any]:
    """Write a holder record (and the lock file a crashed holder leaves) as if a holder had died."""
    holder = {
        "v": 1,
        "hostname": HOSTNAME,
        "acquired_at": time.time() - 60,
        "command": "mrpool resume planted",
        **record,
    }
    (job_dir / "lock").touch(mode=0o600)
    (job_dir / "holder.json").write_text(json.dumps(holder))
    return holder


@dataclass
class Contender:
    """One of the racing processes, with when it started and ended (monotonic seconds)."""

    proc: subprocess.Popen
    started: float
    ended: float | None = None
    rc: int | None = None
    stderr: str = ""

    @property
    def wall(self) -> float:
        assert self.ended is not None
        return self.ended - self.started


def race_resumers(mrpool, job_id: str, n: int, *extra: str) -> list[Contender]:
    """Start ``n`` ``resume`` processes back to back, as close to at once as fork allows."""
    contenders = []
    for _ in range(n):
        started = time.monotonic()
        contenders.append(Contender(mrpool.start("resume", job_id, *extra), started))
    return contenders


def settle_race(job_dir: Path, contenders: list[Contender], start: int) -> None:
    """Wait until every contender has exited or opened a session (after record ``start``)."""
    deadline = time.monotonic() + 30
    while True:
        now = time.monotonic()
        for c in contenders:
            if c.ended is None and c.proc.poll() is not None:
                c.ended, c.rc = now, c.proc.returncode
        alive = [c for c in contenders if c.ended is None]
        opened = {r.get("pid") for r in records_since(job_dir, start) if r["k"] == "open"}
        if all(c.proc.pid in opened for c in alive):
            break
        if now > deadline:
            raise AssertionError(f"race did not settle: {[c.proc.pid for c in alive]} undecided")
        time.sleep(0.005)
    for c in contenders:
        if c.ended is not None:
            c.stderr = finish(c.proc)[2]


# -- the race ------------------------------------------------------------------------
def test_eight_resumers_at_once_exactly_one_runs_every_round(mrpool, tmp_path):
    """8 concurrent ``resume``s, 12 rounds: one runs, 7 exit 3 at once naming its pid.

    Half the rounds end with the winner SIGKILLed, so the next round races over a
    dead holder's ``holder.json``: it must neither block anyone nor be named.
    """
    job_file, gate = make_gated_job(tmp_path / "race", [{"id": "slow", "wait": True, "fail": True}])
    job_dir = mrpool.job_dir("race")

    # Setup: a run SIGKILLed mid-item leaves the item pending and a dead holder's record.
    first = start_holder(mrpool, job_dir, "run", str(job_file), "--job-id", "race")
    kill_group(first)
    finish(first)
    assert lock_files(job_dir) == list(LOCK_FILES)

    loser_walls: list[float] = []
    for round_no in range(RACE_ROUNDS):
        start = len(journal_records(job_dir))
        # Phase 1: the race, settled when each contender exited or opened a session.
        contenders = race_resumers(mrpool, "race", RACERS)
        settle_race(job_dir, contenders, start)
        running = [c for c in contenders if c.ended is None]
        opens = [r for r in records_since(job_dir, start) if r["k"] == "open"]
        assert len(running) == 1 and len(opens) == 1, (
            f"round {round_no}: {len(running)} running, {len(opens)} sessions opened"
        )
        winner = running[0]
        assert opens[0]["pid"] == winner.proc.pid

        # Phase 2: the losers exited 3 at once, naming the live winner (never a dead holder).
        for c in contenders:
            if c is not winner:
                assert_refused_by(
                    subprocess.CompletedProcess([], c.rc, "", c.stderr),
                    winner.proc.pid,
                    "mrpool resume race",
                )
                loser_walls.append(c.wall)
        slowest = max(c.wall for c in contenders if c is not winner)
        assert slowest < STAMPEDE_LIMIT, f"round {round_no}: a loser took {slowest:.2f} s"

        # Phase 3: the winner really runs the item; then it is SIGKILLed or let finish.
        wait_until_running(job_dir, winner.proc, start)
        if round_no % 2 == 1 and round_no != RACE_ROUNDS - 1:
            kill_group(winner.proc)
            rc = finish(winner.proc)[0]
            assert rc == -signal.SIGKILL
        else:
            gate.open()
            rc = finish(winner.proc)[0]
            gate.close()
            assert rc == 1  # the item fails on purpose and is parked; the next round retries it
            assert_no_lock_files(job_dir, f"round {round_no}")
        # Counted by exit status too: exactly one contender did not exit 3.
        assert sorted(c.proc.returncode for c in contenders) == sorted([3] * 7 + [rc])

    opens = [r for r in journal_records(job_dir) if r["k"] == "open"]
    assert len(opens) == 1 + RACE_ROUNDS  # the first run + one session per round, no more
    print(
        f"\n[lock] {RACE_ROUNDS} rounds x {RACERS} resumers: losers exit 3 in median "
        f"{statistics.median(loser_walls):.3f} s, max {max(loser_walls):.3f} s "
        f"(wall, from Popen to exit; {len(loser_walls)} samples)"
    )


# -- dead holders --------------------------------------------------------------------
def test_status_shows_live_holder_and_never_a_sigkilled_one_which_is_taken_over_at_once(
    mrpool, tmp_path
):
    """``status`` names a live holder; after SIGKILL it shows none, and ``resume`` takes over at once."""
    job_file, gate = make_gated_job(
        tmp_path / "takeover", [{"id": "slow", "wait": True}], retries=9
    )
    job_dir = mrpool.job_dir("takeover")

    # Phase 1: a live holder is shown by status, state running.
    before = time.time()
    holder = start_holder(mrpool, job_dir, "run", str(job_file), "--job-id", "takeover")
    status = mrpool.status("takeover")
    assert status["state"] == "running"
    lock = status["lock"]
    assert (lock["pid"], lock["hostname"]) == (holder.pid, HOSTNAME)
    assert before <= lock["acquired_at"] <= time.time()
    blocked, blocked_wall = timed_run(mrpool, "resume", "takeover")
    assert_refused_by(blocked, holder.pid, "mrpool run takeover")

    takeovers = []
    for _ in range(3):
        # Phase 2: SIGKILL the holder; its files stay, yet status shows no holder.
        dead_pid = holder.pid
        kill_group(holder)
        finish(holder)
        assert lock_files(job_dir) == list(LOCK_FILES)
        assert json.loads((job_dir / "holder.json").read_text())["pid"] == dead_pid
        status = mrpool.status("takeover")
        assert status["lock"] is None and status["state"] == "interrupted", status
        text = mrpool.run("status", "takeover").stdout
        assert [line.split() for line in text.splitlines() if line.startswith("lock")] == [
            ["lock", "-"]
        ]

        # Phase 3: the next resume takes over at once (first item start in its session).
        start = len(journal_records(job_dir))
        began = time.monotonic()
        holder = mrpool.start("resume", "takeover")
        takeovers.append(wait_until_running(job_dir, holder, start) - began)
        assert mrpool.status("takeover")["lock"]["pid"] == holder.pid

    # Phase 4: the last holder finishes; nothing is left and status shows no holder.
    gate.open()
    assert finish(holder)[0] == 0
    assert_no_lock_files(job_dir, "the last resume")
    status = mrpool.status("takeover")
    assert (status["state"], status["lock"], status["succeeded"]) == ("completed", None, 1)
    assert max(takeovers) < 5.0
    print(
        f"\n[lock] takeover after SIGKILL (resume start -> its first 's' record): "
        f"{', '.join(f'{t:.3f}' for t in takeovers)} s; "
        f"a lone blocked resume exits 3 in {blocked_wall:.3f} s"
    )


@pytest.fixture
def completed_job(mrpool, tmp_path) -> Path:
    """A finished one-item job (a ``resume`` on it takes the lock and finds nothing left)."""
    job_file, gate = make_gated_job(tmp_path / "done", [{"id": "a"}])
    result = mrpool.run("run", str(job_file), "--job-id", "done")
    assert result.returncode == 0, result.stderr
    return mrpool.job_dir("done")


def test_holder_record_naming_a_reused_pid_or_a_zombie_does_not_block(mrpool, completed_job):
    """A ``holder.json`` whose pid is now another process, or a zombie, is no holder."""
    job_dir = completed_job
    sleeper = subprocess.Popen(["sleep", "60"])
    zombie = subprocess.Popen(["true"])  # never waited for until the end: a zombie
    try:
        wait_for(
            lambda: psutil.Process(zombie.pid).status() == psutil.STATUS_ZOMBIE, what="a zombie"
        )
        me = psutil.Process()
        cases = {
            # Pid reuse: the pid is alive, but the process started at another time.
            "this test process": {"pid": me.pid, "create_time": me.create_time() - 1000},
            "a sleep process": {
                "pid": sleeper.pid,
                "create_time": psutil.Process(sleeper.pid).create_time() - 1000,
            },
            # The very process that wrote it, but it died and was not reaped.
            "a zombie": {
                "pid": zombie.pid,
                "create_time": psutil.Process(zombie.pid).create_time(),
            },
        }
        for case, record in cases.items():
            plant_holder(job_dir, **record)
            # Not reported as holding, in this process or by the CLI.
            assert live_holder(job_dir) is None, case
            status = mrpool.status("done")
            assert (status["lock"], status["state"]) == (None, "completed"), case
            # Not blocking: resume takes the lock (and drops the stale files on release).
            result = mrpool.run("resume", "done")
            assert result.returncode == 0, (case, result.stderr)
            assert "nothing left to run" in result.stderr, (case, result.stderr)
            assert_no_lock_files(job_dir, f"a resume over a record naming {case}")
    finally:
        sleeper.kill()
        sleeper.wait()
        zombie.wait()


def test_holder_record_from_another_host_is_reported_and_never_broken(mrpool, completed_job):
    """A record from another host cannot be checked from here: commands refuse and report it."""
    job_dir = completed_job
    planted = plant_holder(
        job_dir,
        pid=4242,
        hostname="elsewhere.invalid",
        create_time=1.0,
        command="mrpool resume done",
    )
    try:
        # Phase 1: every locking command refuses, naming the foreign holder.
        for args in (
            ("resume", "done"),
            ("dlq", "retry", "done"),
            ("resume", "done", "--wait", "0.3"),
        ):
            result = mrpool.run(*args)
            assert result.returncode == 3, (args, result.stderr)
            assert "pid 4242 on elsewhere.invalid" in result.stderr, (args, result.stderr)
        # Phase 2: status reports it, and the record is untouched.
        lock = mrpool.status("done")["lock"]
        assert (lock["pid"], lock["hostname"]) == (4242, "elsewhere.invalid")
        assert json.loads((job_dir / "holder.json").read_text()) == planted
    finally:
        for name in LOCK_FILES:  # the foreign holder's files: ours to remove in a test only
            (job_dir / name).unlink(missing_ok=True)


# -- one process, two acquires -------------------------------------------------------
def test_second_acquire_in_the_same_process_is_refused_and_the_first_still_holds(
    mrpool, completed_job
):
    """POSIX locks are per process: a second JobLock or a thread must still be refused."""
    job_dir = completed_job
    first = JobLock(job_dir, command="pytest holder").acquire()
    try:
        # Phase 1: another JobLock object, also via a different spelling of the path.
        for path in (job_dir, job_dir.parent / "." / job_dir.name):
            with pytest.raises(LockedError, match=f"pid {os.getpid()}"):
                JobLock(path).acquire()
        started = time.monotonic()
        with pytest.raises(LockedError):
            JobLock(job_dir).acquire(wait=0.3)
        assert 0.3 <= time.monotonic() - started < 2.0

        # Phase 2: another thread.
        outcome: list[BaseException | str] = []

        def take() -> None:
            try:
                JobLock(job_dir).acquire()
                outcome.append("acquired")
            except BaseException as error:
                outcome.append(error)

        thread = threading.Thread(target=take)
        thread.start()
        thread.join(10)
        assert len(outcome) == 1 and isinstance(outcome[0], LockedError), outcome

        # Phase 3: the refused attempts did not drop the first lock (no fd was closed on it):
        # the kernel lock itself is still held, and a resume is refused.
        assert first.held and lock_files(job_dir) == list(LOCK_FILES)
        assert kernel_lock_is_held(job_dir / "lock")
        assert api.job_status("done", state_dir=mrpool.state_dir)["lock"]["pid"] == os.getpid()
        assert_refused_by(mrpool.run("resume", "done"), os.getpid(), "pytest holder")
    finally:
        first.release()
    # Phase 4: released: nothing left, and the lock can be taken again (as a context manager).
    assert_no_lock_files(job_dir, "release")
    assert api.job_status("done", state_dir=mrpool.state_dir)["lock"] is None
    with JobLock(job_dir) as again:
        assert again.held
    assert_no_lock_files(job_dir, "the context manager")


# -- clean after every ending -----------------------------------------------------------
def test_no_lock_or_holder_file_after_any_command_ends(mrpool, tmp_path):
    """Exit 0, 1, 2, 130 (SIGINT and SIGTERM), of run, resume, dlq retry and purge: nothing left."""
    # Phase 1: run / resume / dlq retry / dlq purge, ending with 1 and 0.
    job_file, _ = make_gated_job(tmp_path / "mixed", [{"id": "ok"}, {"id": "bad", "fail": True}])
    job_dir = mrpool.job_dir("mixed")
    for args, expected in (
        (("run", str(job_file), "--job-id", "mixed"), 1),
        (("resume", "mixed"), 1),
        (("dlq", "retry", "mixed"), 1),
        (("dlq", "purge", "mixed", "--yes"), 0),
        (("resume", "mixed"), 0),
    ):
        result = mrpool.run(*args)
        assert result.returncode == expected, (args, result.stderr)
        assert_no_lock_files(job_dir, " ".join(args[:2]))

    # Phase 2: a run that succeeds outright.
    job_file, _ = make_gated_job(tmp_path / "fine", [{"id": "ok"}])
    result = mrpool.run("run", str(job_file), "--job-id", "fine")
    assert result.returncode == 0, result.stderr
    assert_no_lock_files(mrpool.job_dir("fine"), "a successful run")

    # Phase 3: interrupted holders (SIGINT on run, SIGTERM on resume) exit 130, clean.
    job_file, gate = make_gated_job(tmp_path / "stopped", [{"id": "slow", "wait": True}])
    job_dir = mrpool.job_dir("stopped")
    holder = start_holder(mrpool, job_dir, "run", str(job_file), "--job-id", "stopped")
    os.kill(holder.pid, signal.SIGINT)
    assert finish(holder)[0] == 130
    assert_no_lock_files(job_dir, "SIGINT")
    holder = start_holder(mrpool, job_dir, "resume", "stopped")
    os.kill(holder.pid, signal.SIGTERM)
    assert finish(holder)[0] == 130
    assert_no_lock_files(job_dir, "SIGTERM")

    # Phase 4: an error raised while holding the lock (the map callable vanished): exit 2, clean.
    module = tmp_path / "stopped" / "gate.py"
    module.rename(module.with_suffix(".away"))
    result = mrpool.run("resume", "stopped")
    assert result.returncode == 2, result.stderr
    assert_no_lock_files(job_dir, "an error inside the lock")
    module.with_suffix(".away").rename(module)

    # Phase 5: and the job still completes.
    gate.open()
    result = mrpool.run("resume", "stopped")
    assert result.returncode == 0, result.stderr
    assert_no_lock_files(job_dir, "the final resume")


# -- the unlink race -------------------------------------------------------------------
def test_unlink_on_release_never_lets_two_processes_in(mrpool, tmp_path):
    """4 processes x 50 acquire/release with ``wait``: the shared counter ends at exactly 200.

    Each release unlinks the lock file while others wait on it; a waiter that
    locked the old, unlinked inode while a newcomer locked the new file would
    put two processes inside at once: a lost increment or a doubled marker. The
    contenders widen the race window (see ``HAMMER_PY``) and count how often it
    opened; without the inode re-check this test fails (lost increments).
    """
    job_dir = mrpool.state_dir / "jobs" / "hammered"  # checked for leftovers by conftest
    job_dir.mkdir(parents=True)
    counter, marker = tmp_path / "counter", tmp_path / "inside"
    counter.write_text("0")
    script = tmp_path / "hammer.py"
    script.write_text(HAMMER_PY)
    procs = [python_script(mrpool, script, job_dir, counter, marker, "50") for _ in range(4)]
    outputs = [finish(proc, timeout=120) for proc in procs]
    stale = 0
    for rc, out, err in outputs:
        assert rc == 0, err
        overlaps, locked_unlinked = map(int, out.split())
        assert overlaps == 0, f"a process found another inside the lock {overlaps} times"
        stale += locked_unlinked
    assert counter.read_text() == "200"
    assert stale > 0, "the unlink race never happened: the test proved nothing"
    print(f"\n[lock] unlink race: an unlinked inode was locked {stale} times, never a double entry")
    assert not marker.exists()
    assert_no_lock_files(job_dir, "200 acquire/release")


# What read commands run on every look at a job (``status``): it takes the kernel lock for
# microseconds whenever it is free, to remove a dead holder's files.
SWEEPER_PY = """
import sys, time
from pathlib import Path
from mrpool.lock import clear_stale

job_dir, stop = sys.argv[1], Path(sys.argv[2])
removed = looks = 0
while not stop.exists():
    removed += clear_stale(job_dir)
    looks += 1
    time.sleep(0.0005)
print(looks, removed)
"""


def test_clear_stale_beside_racing_holders_never_removes_a_live_one(mrpool, tmp_path):
    """3 processes x 30 acquire/release while a sweeper runs ``clear_stale`` in a loop:
    nobody inside the lock ever finds its holder record gone or another process inside,
    no acquire times out, and the counter ends at exactly 90."""
    job_dir = mrpool.state_dir / "jobs" / "swept"  # checked for leftovers by conftest
    job_dir.mkdir(parents=True)
    counter, marker, stop = tmp_path / "counter", tmp_path / "inside", tmp_path / "stop"
    counter.write_text("0")
    (tmp_path / "hammer.py").write_text(HAMMER_PY)
    (tmp_path / "sweeper.py").write_text(SWEEPER_PY)
    sweeper = python_script(mrpool, tmp_path / "sweeper.py", job_dir, stop)
    hammers = [
        python_script(mrpool, tmp_path / "hammer.py", job_dir, counter, marker, "30")
        for _ in range(3)
    ]
    outputs = [finish(proc, timeout=120) for proc in hammers]
    stop.touch()
    rc, out, err = finish(sweeper, timeout=30)
    assert rc == 0, err
    looks, removed = map(int, out.split())
    for rc, out, err in outputs:
        assert rc == 0, err
        assert out.split()[0] == "0", "a holder found its record gone or another inside"
    assert counter.read_text() == "90"
    assert looks > 100, "the sweeper hardly ran: the test proved nothing"
    print(f"\n[lock] clear_stale looked {looks} times beside 90 hand-overs, removed {removed}")
    assert_no_lock_files(job_dir, "the hand-overs and the sweeper")


# -- --wait ----------------------------------------------------------------------------
def test_wait_acquires_once_the_holder_finishes_or_gives_up_after_its_time(mrpool, tmp_path):
    """``--wait 30`` acquires when the holder ends (exit 0); ``--wait 0.5`` exits 3 after ~0.5 s.

    A waiter stopped with Ctrl-C exits 130 and leaves the holder's lock alone.
    """
    job_file, gate = make_gated_job(tmp_path / "waited", [{"id": "slow", "wait": True}])
    job_dir = mrpool.job_dir("waited")
    holder = start_holder(mrpool, job_dir, "run", str(job_file), "--job-id", "waited")

    # Phase 1: start two patient waiters, an impatient one and one that does not wait.
    patient = Contender(mrpool.start("resume", "waited", "--wait", "30"), time.monotonic())
    interrupted = mrpool.start("resume", "waited", "--wait", "30")
    impatient = Contender(mrpool.start("resume", "waited", "--wait", "0.5"), time.monotonic())
    result, _ = timed_run(mrpool, "resume", "waited")
    assert_refused_by(result, holder.pid, "mrpool run waited")

    # Phase 2: the impatient one gives up after its time; the patient one is still waiting.
    impatient.rc, _, impatient.stderr = finish(impatient.proc)
    impatient.ended = time.monotonic()
    assert_refused_by(
        subprocess.CompletedProcess([], impatient.rc, "", impatient.stderr),
        holder.pid,
        "mrpool run waited",
    )
    assert 0.5 <= impatient.wall < 0.5 + LOSER_LIMIT, impatient.wall
    assert patient.proc.poll() is None, "the --wait 30 resume did not wait"

    # Phase 3: Ctrl-C on a waiter: exit 130, and the holder still holds (kernel lock and record).
    assert interrupted.poll() is None, "the --wait 30 resume did not wait"
    interrupted.send_signal(signal.SIGINT)
    assert finish(interrupted)[0] == 130
    assert kernel_lock_is_held(job_dir / "lock")
    assert mrpool.status("waited")["lock"]["pid"] == holder.pid

    # Phase 4: the holder finishes; the patient one then takes the lock and exits 0.
    gate.open()
    assert finish(holder)[0] == 0
    rc, _, err = finish(patient.proc)
    assert rc == 0, err
    assert "nothing left to run" in err
    assert_no_lock_files(job_dir, "the waiting resume")
    print(f"\n[lock] resume --wait 0.5 against a live holder exited 3 after {impatient.wall:.3f} s")


# -- every running command takes the lock ------------------------------------------------
def test_run_resume_and_dlq_retry_each_hold_the_lock_against_the_others(mrpool, tmp_path):
    """While ``run``, ``dlq retry`` or ``resume`` holds, the others (and ``dlq purge``) exit 3."""
    job_file, gate = make_gated_job(tmp_path / "each", [{"id": "x", "wait": True, "fail": True}])
    job_dir = mrpool.job_dir("each")
    holders = (
        ("run", str(job_file), "--job-id", "each"),
        ("dlq", "retry", "each"),
        ("resume", "each"),
    )
    challengers = (("resume", "each"), ("dlq", "retry", "each"), ("dlq", "purge", "each", "--yes"))
    walls = []
    for args in holders:
        # Phase 1: the holder runs the item (blocked on the closed gate).
        holder = start_holder(mrpool, job_dir, *args)
        command = "mrpool " + " ".join(a for a in args if a != str(job_file) and a != "--job-id")
        # Phase 2: each challenger is refused, naming the holder and what it runs.
        for challenger in challengers:
            result, wall = timed_run(mrpool, *challenger)
            assert_refused_by(result, holder.pid, command)
            walls.append(wall)
        # Phase 3: the holder parks the item (exit 1) and leaves nothing behind.
        gate.open()
        assert finish(holder)[0] == 1
        gate.close()
        assert_no_lock_files(job_dir, args[0])
    assert [e["id"] for e in mrpool.dlq("each")] == ["x"]
    print(
        f"\n[lock] a lone blocked command exits 3 in median {statistics.median(walls):.3f} s "
        f"(max {max(walls):.3f} s, {len(walls)} samples)"
    )
