#!/usr/bin/env python3
"""Crash stress: SIGKILL mrpool at random instants, resume until done, count what broke.

One *trial* is one job of ~100 small items (a callable that appends its id to a
side log, sleeps ~2 ms and returns the id), run with 2 workers and hit by SIGKILL
at random instants. The trial's *kind* says what is killed:

* ``group``      -- the supervisor's whole process group (supervisor + workers);
* ``supervisor`` -- the supervisor alone: its workers must end by themselves within 2 s;
* ``worker``     -- one worker, found among the supervisor's children: that same run
  must still complete (the item the worker held is retried, ``retries: 1``).

For ``group`` / ``supervisor`` the killed run is followed by ``resume``s -- some of
them killed too -- until one finishes. Items that were in flight at two crashes in
a row are parked by mrpool as suspected poison (kind ``crash_loop``); here they are
legitimate, so the trial then ``dlq retry``s them. Then it counts:

* lost       -- ids with no result at the end;
* duplicated -- ids that ``results`` lists more than once;
* re-run     -- ids whose success was recorded before a kill and that ran again after
  it: before each session the recorded successes are snapshotted, and the side-log
  lines appended after the snapshot must not name any of them;
* problems   -- anything else: an orphaned worker, an unexpected exit status, a DLQ
  item that is not a crash loop, a final state other than ``completed``.

Usage::

    python scripts/crash_stress.py [--trials 200] [--seed N] [--items 100] [--workers 2]
                                   [--concurrency K]

``--concurrency 8`` (or ``MRPOOL_TEST_CONCURRENCY=8``) runs every trial with
``map.concurrency: 8``: each worker holds 8 attempts at once, so a kill cuts 8.

Exits 1 if any of lost / duplicated / re-run / problems is non-zero. The same
trial function is used by tests/test_resume.py (20+ trials in the normal suite).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from mrpool import api  # noqa: E402
from mrpool.errors import NoSuchJob  # noqa: E402
from mrpool.journal import read_records  # noqa: E402

KINDS = ("group", "supervisor", "worker")
MAX_SESSIONS = 12  # resumes per trial before the trial counts as a problem
KILLED_RESUMES = 2  # at most this many resumes per trial are killed too

MAP_SOURCE = '''\
"""Crash-trial map: log the id (one O_APPEND write), sleep a little, return the id."""
import os
import time

SIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "side.log")


def work(item):
    fd = os.open(SIDE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, b"%d\\n" % item["id"])
    finally:
        os.close(fd)
    time.sleep(SLEEP)
    return item["id"]
'''


@dataclass
class TrialResult:
    kind: str
    kills: Counter = field(default_factory=Counter)
    lost: int = 0
    duplicated: int = 0
    rerun: int = 0
    problems: list[str] = field(default_factory=list)
    sessions: int = 0
    interrupted: int = 0  # kills that left the job unfinished (resume had work to do)
    worker_died_retried: int = 0  # items a killed worker held, failed as worker_died
    crash_loops_retried: int = 0

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.rerun or self.problems)


class Trial:
    """One job under fire: ``python -m mrpool`` subprocesses against one state dir."""

    def __init__(
        self,
        workdir: Path,
        job_id: str,
        env: dict[str, str],
        rng: random.Random,
        kind: str,
        items: int = 100,
        workers: int = 2,
        sleep: float = 0.002,
        concurrency: int | None = None,
    ) -> None:
        self.dir = workdir
        self.job_id = job_id
        self.env = env
        self.state_dir = Path(env["MRPOOL_HOME"])
        self.rng = rng
        self.ids = list(range(1, items + 1))
        self.result = TrialResult(kind)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "items.jsonl").write_text("".join(f'{{"id": {i}}}\n' for i in self.ids))
        (workdir / "crashmap.py").write_text(MAP_SOURCE.replace("SLEEP", repr(sleep)))
        job = {
            "name": job_id,
            "input": "items.jsonl",
            "workers": workers,
            "map": {"callable": "crashmap:work", "retries": 1},
        }
        if concurrency is None:  # MRPOOL_TEST_CONCURRENCY: the whole suite with lanes
            concurrency = int(os.environ.get("MRPOOL_TEST_CONCURRENCY") or 1)
        if concurrency > 1:
            job["map"]["concurrency"] = concurrency
        self.job_file = workdir / "job.json"
        self.job_file.write_text(json.dumps(job))
        self.side = workdir / "side.log"

    # -- processes ---------------------------------------------------------
    def cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return mrpool_cli(self.env, *args, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen:
        return mrpool_start(self.env, *args)

    def session_args(self) -> tuple[str, ...]:
        """``run`` until the job exists (a run killed before that left nothing), then ``resume``."""
        if (self.state_dir / "jobs" / self.job_id / "job.json").exists():
            return ("resume", self.job_id)
        return ("run", str(self.job_file), "--job-id", self.job_id)

    # -- observations --------------------------------------------------------
    def recorded_ids(self) -> list[int]:
        try:
            return [row["id"] for row in api.iter_results(self.job_id, state_dir=self.state_dir)]
        except NoSuchJob:
            return []

    def side_offset(self) -> int:
        try:
            return self.side.stat().st_size
        except FileNotFoundError:
            return 0

    def side_since(self, offset: int) -> list[int]:
        try:
            with open(self.side, "rb") as handle:
                handle.seek(offset)
                return [int(line) for line in handle.read().split()]
        except FileNotFoundError:
            return []

    def snapshot(self) -> tuple[set[int], int]:
        """Successes recorded now, then the side log's size (in that order: see module doc)."""
        recorded = set(self.recorded_ids())
        return recorded, self.side_offset()

    def check_no_rerun(self, snapshot: tuple[set[int], int], when: str) -> None:
        recorded, offset = snapshot
        again = sorted(set(self.side_since(offset)) & recorded)
        if again:
            self.result.rerun += len(again)
            self.result.problems.append(f"{when}: recorded successes ran again: {again[:10]}")

    def unfinished(self) -> bool:
        try:
            status = api.job_status(self.job_id, state_dir=self.state_dir)
        except NoSuchJob:
            return False
        return bool(status["pending"] or status["failed"])

    def journal_has_outcome(self) -> bool:
        path = self.state_dir / "jobs" / self.job_id / "journal.log"
        try:
            return any(r["k"] in ("ok", "f") for _, _, r in read_records(path))
        except Exception:  # noqa: BLE001 - a half-written first record is not an outcome
            return False

    # -- kills -----------------------------------------------------------------
    def kill_group(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                self.result.kills["group"] += 1
            except ProcessLookupError:
                pass
        proc.wait(timeout=60)

    def kill_supervisor(self, proc: subprocess.Popen) -> None:
        """SIGKILL the supervisor alone; its workers must be gone within 2 s."""
        if proc.poll() is not None:
            return
        killed, outlived = kill_supervisor_alone(proc)
        self.result.kills["supervisor"] += killed
        if outlived:
            self.result.problems.append(f"workers outlived their supervisor by 2 s: {outlived}")

    def kill_session(self, proc: subprocess.Popen, journal_before: int) -> None:
        """Wait a random instant, then kill (group or supervisor, by the trial's kind)."""
        if self.rng.random() < 0.25:
            time.sleep(self.rng.uniform(0.0, 0.45))  # anywhere: start-up, planning, work
        else:  # once the session has written its first records: while items are worked on
            _wait_until(lambda: proc.poll() is not None or self.journal_size() > journal_before, 30)
            time.sleep(self.rng.uniform(0.0, 0.12))
        if self.result.kind == "supervisor":
            self.kill_supervisor(proc)
        else:
            self.kill_group(proc)

    def journal_size(self) -> int:
        try:
            return (self.state_dir / "jobs" / self.job_id / "journal.log").stat().st_size
        except FileNotFoundError:
            return 0

    # -- the trial -------------------------------------------------------------
    def run(self) -> TrialResult:
        try:
            if self.result.kind == "worker":
                self._worker_trial()
            else:
                self._crash_trial()
            self._final_checks()
        except Exception as e:  # noqa: BLE001 - a trial that blew up is a problem, not a crash
            self.result.problems.append(f"{type(e).__name__}: {e}")
        return self.result

    def _worker_trial(self) -> None:
        """Kill one worker mid-run: the run itself must still complete (exit 0)."""
        proc = self.start(*self.session_args())
        self.result.sessions += 1
        try:
            _wait_until(lambda: proc.poll() is not None or self.journal_has_outcome(), 30)
            time.sleep(self.rng.uniform(0.0, 0.06))
            snap = self.snapshot()
            try:
                workers = psutil.Process(proc.pid).children()
            except psutil.Error:
                workers = []
            if workers and proc.poll() is None:
                victim = self.rng.choice(workers)
                try:
                    victim.kill()
                    self.result.kills["worker"] += 1
                except psutil.Error:
                    pass
            code = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                self.kill_group(proc)
        if code != 0:
            self.result.problems.append(f"run after a worker kill exited {code}, expected 0")
        self.check_no_rerun(snap, "after the worker kill")
        path = self.state_dir / "jobs" / self.job_id / "journal.log"
        self.result.worker_died_retried = sum(
            1 for _, _, r in read_records(path) if r["k"] == "f" and r.get("kind") == "worker_died"
        )

    def _crash_trial(self) -> None:
        """Kill the run, then resume (killing some resumes) until one finishes."""
        killed_resumes = 0
        for session in range(MAX_SESSIONS):
            args = self.session_args()
            snap = self.snapshot()
            self.result.sessions += 1
            if session == 0 or (killed_resumes < KILLED_RESUMES and self.rng.random() < 0.5):
                # Killed at a random instant (or, now and then, it finished first: fine).
                proc = self.start(*args)
                try:
                    self.kill_session(proc, self.journal_size())
                finally:
                    if proc.poll() is None:
                        self.kill_group(proc)
                killed_resumes += session > 0
                self.check_no_rerun(snap, f"session {session} ({args[0]}, killed)")
                self.result.interrupted += self.unfinished()
                continue
            # Left alone: it must finish the job (exit 1 = crash loops parked in the DLQ).
            r = self.cli(*args)
            self.check_no_rerun(snap, f"session {session} ({args[0]})")
            if r.returncode not in (0, 1):
                self.result.problems.append(
                    f"{' '.join(args[:2])} exited {r.returncode}: {r.stderr.strip()[-300:]}"
                )
            break
        else:
            self.result.problems.append(f"not finished after {MAX_SESSIONS} sessions")
        self._retry_crash_loops()

    def _retry_crash_loops(self) -> None:
        """Items parked as crash loops are legitimate here: ``dlq retry`` them once."""
        dlq = api.open_dlq(self.job_id, state_dir=self.state_dir)
        parked = [entry.brief() for entry in dlq.entries()]
        if not parked:
            return
        others = [e for e in parked if e["kind"] != "crash_loop"]
        if others:
            self.result.problems.append(
                f"DLQ items that are not crash loops: {[(e['id'], e['kind'], e['error']) for e in others][:5]}"
            )
        self.result.crash_loops_retried += len(parked) - len(others)
        snap = self.snapshot()
        r = self.cli("dlq", "retry", self.job_id)
        self.result.sessions += 1
        if r.returncode != 0:
            self.result.problems.append(
                f"dlq retry exited {r.returncode}: {r.stderr.strip()[-300:]}"
            )
        self.check_no_rerun(snap, "dlq retry")

    def _final_checks(self) -> None:
        ids = self.recorded_ids()
        counts = Counter(ids)
        self.result.lost = sum(1 for i in self.ids if i not in counts)
        self.result.duplicated = sum(1 for n in counts.values() if n > 1)
        if set(counts) - set(self.ids):
            self.result.problems.append(
                f"results for unknown ids: {sorted(set(counts) - set(self.ids))[:5]}"
            )
        status = api.job_status(self.job_id, state_dir=self.state_dir)
        expected = ("completed", len(self.ids), len(self.ids), 0, 0, 0, None)
        got = tuple(
            status.get(k)
            for k in ("state", "total", "succeeded", "dlq", "failed", "pending", "lock")
        )
        if got != expected:
            self.result.problems.append(
                f"final status (state, total, succeeded, dlq, failed, pending, lock) = {got}"
            )


def mrpool_cli(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess:
    """``python -m mrpool ARGS`` to its end, output captured as text."""
    return subprocess.run(
        [sys.executable, "-m", "mrpool", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=str(REPO),
    )


def mrpool_start(env: dict[str, str], *args: str, stderr=subprocess.DEVNULL) -> subprocess.Popen:
    """``python -m mrpool ARGS`` started in its own process group (to kill it whole)."""
    return subprocess.Popen(
        [sys.executable, "-m", "mrpool", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=stderr is subprocess.PIPE,
        start_new_session=True,
        cwd=str(REPO),
    )


def kill_supervisor_alone(proc: subprocess.Popen, bound: float = 2.0) -> tuple[bool, list[int]]:
    """SIGKILL ``proc`` alone (not its group); then its descendants must end within
    ``bound`` seconds (the contract's 2 s; zombies count as gone). Returns whether the
    kill landed and the pids that outlived the bound (killed here, so nothing leaks)."""
    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        children = []
    try:
        os.kill(proc.pid, signal.SIGKILL)
        killed = True
    except ProcessLookupError:
        killed = False
    proc.wait(timeout=60)
    deadline = time.monotonic() + bound
    alive = children
    while alive and time.monotonic() < deadline:
        time.sleep(0.01)
        alive = [p for p in alive if _running(p)]
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass
    return killed, [p.pid for p in alive]


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _wait_until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not predicate():
        time.sleep(0.005)


def run_trial(
    workdir: Path, job_id: str, env: dict[str, str], rng: random.Random, kind: str, **options
) -> TrialResult:
    """Run one trial in ``workdir`` against the state dir ``env["MRPOOL_HOME"]``."""
    return Trial(workdir, job_id, env, rng, kind, **options).run()


# -- the command line ------------------------------------------------------------
def summarise(results: list[TrialResult]) -> dict[str, object]:
    kills: Counter = Counter()
    for r in results:
        kills.update(r.kills)
    return {
        "trials": len(results),
        "trials_by_kind": dict(Counter(r.kind for r in results)),
        "kills_by_kind": {k: kills.get(k, 0) for k in KINDS},
        "lost": sum(r.lost for r in results),
        "duplicated": sum(r.duplicated for r in results),
        "re_run": sum(r.rerun for r in results),
        "problems": sum(len(r.problems) for r in results),
        "sessions": sum(r.sessions for r in results),
        "interrupted": sum(r.interrupted for r in results),
        "worker_died_retried": sum(r.worker_died_retried for r in results),
        "crash_loop_items_retried": sum(r.crash_loops_retried for r in results),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--sleep", type=float, default=0.002, help="seconds per item")
    parser.add_argument(
        "--concurrency", type=int, default=None, help="map.concurrency (attempts per worker)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the state of failed trials")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix="mrpool-crash-stress-"))
    env = dict(os.environ)
    env.pop("MRPOOL_FAILPOINTS", None)
    env.update(MRPOOL_HOME=str(root / "state"), PYTHONPATH=str(REPO))
    print(f"crash stress: {args.trials} trials, seed {seed}, state in {root}", file=sys.stderr)
    started = time.monotonic()
    results: list[TrialResult] = []
    failed_dirs: list[Path] = []
    try:
        for n in range(args.trials):
            kind = rng.choices(KINDS, weights=(3, 1, 1))[0]
            workdir = root / f"trial-{n:04d}"
            result = run_trial(
                workdir,
                f"trial-{n:04d}",
                env,
                rng,
                kind,
                items=args.items,
                workers=args.workers,
                sleep=args.sleep,
                concurrency=args.concurrency,
            )
            results.append(result)
            if not result.ok:
                failed_dirs.append(workdir)
                print(f"trial {n} ({kind}) FAILED: {result}", file=sys.stderr)
            elif (n + 1) % 20 == 0:
                print(f"  {n + 1} trials ...", file=sys.stderr)
    finally:
        summary = summarise(results)
        summary["seconds"] = round(time.monotonic() - started, 1)
        summary["seed"] = seed
        kills = summary["kills_by_kind"]
        print(f"trials: {summary['trials']}  {summary['trials_by_kind']}")
        print("kills by kind: " + ", ".join(f"{k} {v}" for k, v in kills.items()))
        for key in ("lost", "duplicated", "re_run", "problems"):
            print(f"{key.replace('_', '-')}: {summary[key]}")
        print(
            f"sessions: {summary['sessions']} ({summary['interrupted']} killed mid-job), "
            f"worker_died retries: {summary['worker_died_retried']}, crash-loop items "
            f"retried: {summary['crash_loop_items_retried']}, {summary['seconds']} s, seed {seed}"
        )
        if args.keep and failed_dirs:
            print(f"failed trials kept under {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)
    bad = summary["lost"] or summary["duplicated"] or summary["re_run"] or summary["problems"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
