#!/usr/bin/env python3
"""Crash-torture matrix: every command x every kill target x both map kinds x retries.

A *cell* is ``PHASE/TARGET/MAP/rRETRIES``:

* PHASE   -- the command SIGKILLed: ``run``, ``resume``, ``dlq-retry``, ``dlq-purge``,
  ``reduce`` (a ``run`` whose job has a reduce step, killed once its items are done);
* TARGET  -- what the SIGKILL hits: ``supervisor`` alone, one ``worker`` (a child of
  the supervisor: a map worker, or the reduce step's child), the whole ``group``;
* MAP     -- ``command`` (``/bin/sh`` script) or ``callable``;
* RETRIES -- the job's ``map.retries``: 0 or 2.

One *trial* of a cell: a job of ``--items`` items, most *innocent* (they never fail)
and a few *bad* ones (they fail until the trial's ``fixed`` file exists, so the DLQ
has something in it). The phase's command gets work to do (``resume``: after a run
stopped by SIGTERM -- a clean stop -- or, in half the trials, by a SIGKILL of its group,
so that the resume's kill is a second crash in a row; ``dlq retry``/``dlq purge``: after
a run that parked the bad items), is SIGKILLed at a seeded random instant, and the job
is then finished: ``resume`` until it exits 0/1 with nothing pending or failed (at
most ``MAX_RESUMES``), then ``fixed`` is created and ``dlq retry`` runs the DLQ (the
purge cells ``dlq purge --yes`` the bad items instead). Every map execution appends
``{"id", "a", "pid"}`` to the trial's ``side.log`` with one ``O_APPEND`` write: ``a`` is
``$MRPOOL_ATTEMPT`` for a command; a callable cannot see its attempt number (the
worker does not expose it), so its ``a`` is null and the weaker property is checked.

Problem kinds (each trial's problems name the kind first):

* ``lost``            an item that should have a result and has none;
* ``duplicate``       ``results`` lists an id twice;
* ``rerun``           a success recorded before a session ran again in it;
* ``attempt_reuse``   one ``(id, attempt)`` executed twice (command maps), or an item
  executed more often than it had distinct journaled attempts (callable maps);
* ``unjournaled``     a command ran an attempt number the journal never started;
* ``innocent_parked`` after the resumes an innocent item is not succeeded, for a
  reason the kill does not explain (the message says where it went: DLQ kind,
  error); a worker kill can explain a ``worker_died`` of the item it held (retries
  0), and a ``crash_loop`` needs at least ``crash_limit`` crashes in the trial;
* ``status``          ``status --json`` disagrees with ``results``/``dlq list --json``,
  or the final state is not ``completed``;
* ``exit``            a command exited with a code it should not have;
* ``unfinished``      still pending/failed after ``MAX_RESUMES`` resumes;
* ``reduce``          the reduce step's output is missing or wrong;
* ``orphans``         a process outlived its SIGKILLed supervisor by 2 s;
* ``leftovers``       lock/holder/temp/slot files, live processes or /dev/shm
  segments left after the trial;
* ``error``           the trial itself blew up.

Usage::

    python scripts/torture_matrix.py [--trials 120] [--seed S] [--cells 'resume/*,*/group/*']
        [--items 16] [--jobs 1] [--first K] [--keep]

``--trials`` is the total, spread round-robin over the selected cells; trial ``k`` of
a cell always draws from ``Random("SEED/CELL/k")``, so every failure prints a
one-line repro command. Exits 1 if any trial found a problem.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import psutil

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
for path in (REPO, SCRIPTS):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from crash_stress import (  # noqa: E402
    _running,
    _wait_until,
    kill_supervisor_alone,
    mrpool_cli,
    mrpool_start,
)

from mrpool import api  # noqa: E402
from mrpool.crashes import crash_limit  # noqa: E402
from mrpool.errors import MrpoolError  # noqa: E402
from mrpool.journal import read_records  # noqa: E402
from mrpool.records import started_attempts  # noqa: E402

PHASES = ("run", "resume", "dlq-retry", "dlq-purge", "reduce")
TARGETS = ("supervisor", "worker", "group")
MAPS = ("command", "callable")
RETRIES = (0, 2)
CELLS = [
    f"{phase}/{target}/{kind}/r{retries}"
    for phase in PHASES
    for target in TARGETS
    for kind in MAPS
    for retries in RETRIES
]
MAX_RESUMES = 6
BAD_EVERY = 5  # items it000, it005, ...: bad (not in the reduce cells)

MAP_SH = """\
# side log first (one O_APPEND write), then the work
printf '{"id":"%s","a":%s,"pid":%s}\\n' "$MRPOOL_ITEM_ID" "$MRPOOL_ATTEMPT" "$$" >> side.log
sleep "$2"
if [ "$1" = bad ] && [ ! -e fixed ]; then echo "bad item $MRPOOL_ITEM_ID" >&2; exit 3; fi
printf '{"id":"%s"}\\n' "$MRPOOL_ITEM_ID"
"""

REDUCE_SH = """\
sleep 0.3
wc -l | tr -d ' '
"""

MAPPER_PY = '''\
"""Torture-matrix map and reduce callables (see scripts/torture_matrix.py)."""
import json
import os
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def work(item):
    attempt = os.environ.get("MRPOOL_ATTEMPT")  # not exposed to callables today
    line = {"id": item["id"], "a": int(attempt) if attempt else None, "pid": os.getpid()}
    fd = os.open(os.path.join(HERE, "side.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, (json.dumps(line) + "\\n").encode())
    finally:
        os.close(fd)
    time.sleep(item["t"])
    if item["kind"] == "bad" and not os.path.exists(os.path.join(HERE, "fixed")):
        raise RuntimeError(f"bad item {item['id']}")
    return {"id": item["id"]}


def total(results):
    time.sleep(0.3)
    return len(results)
'''


@dataclass
class TrialResult:
    cell: str
    k: int
    seed: int
    kill: str = ""  # what the kill hit ("" = it missed: the command had ended)
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, detail)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def repro(self) -> str:
        return (
            f"python scripts/torture_matrix.py --seed {self.seed} --cells {self.cell} "
            f"--first {self.k} --trials 1"
        )


class Trial:
    """One trial of one cell, in its own directory and state dir."""

    def __init__(self, root: Path, cell: str, k: int, seed: int, items: int) -> None:
        self.cell, self.k = cell, k
        self.phase, self.target, self.map_kind, retries = cell.split("/")
        self.retries = int(retries[1:])
        self.rng = random.Random(f"{seed}/{cell}/{k}")
        self.result = TrialResult(cell, k, seed)
        self.dir = root / f"{cell.replace('/', '-')}-{k}"
        self.state_dir = self.dir / "state"
        self.job_id = "tm"
        self.tag = uuid.uuid4().hex
        self.env = dict(os.environ)
        self.env.pop("MRPOOL_FAILPOINTS", None)
        self.env.update(
            MRPOOL_HOME=str(self.state_dir), MRPOOL_TEST_TAG=self.tag, PYTHONPATH=str(REPO)
        )
        self.items = [
            {
                "id": f"it{i:03d}",
                "kind": "bad" if self.phase != "reduce" and i % BAD_EVERY == 0 else "ok",
                "t": round(self.rng.uniform(0.01, 0.06), 3),
            }
            for i in range(items)
        ]
        self.innocent = [it["id"] for it in self.items if it["kind"] == "ok"]
        self.bad = [it["id"] for it in self.items if it["kind"] == "bad"]
        self.worker_kills = 0
        self.crashes = 0  # kills of a supervisor (alone or with its group) that landed
        self.watchers: list[threading.Thread] = []
        self._write_job()

    def _write_job(self) -> None:
        self.dir.mkdir(parents=True)
        with open(self.dir / "items.jsonl", "w") as handle:
            handle.writelines(json.dumps(it) + "\n" for it in self.items)
        (self.dir / "map.sh").write_text(MAP_SH)
        (self.dir / "reduce.sh").write_text(REDUCE_SH)
        (self.dir / "tmmap.py").write_text(MAPPER_PY)
        if self.map_kind == "command":
            step = {"command": ["/bin/sh", "map.sh", "{item.kind}", "{item.t}"]}
            reduce = {"command": ["/bin/sh", "reduce.sh"]}
        else:
            step = {"callable": "tmmap:work"}
            reduce = {"callable": "tmmap:total"}
        job = {
            "name": "tm",
            "input": "items.jsonl",
            "workers": 2,
            "map": {**step, "retries": self.retries},
        }
        if self.phase == "reduce":
            job["reduce"] = reduce
        self.job_file = self.dir / "job.json"
        self.job_file.write_text(json.dumps(job))

    def problem(self, kind: str, detail: str) -> None:
        self.result.problems.append((kind, detail))

    # -- processes -------------------------------------------------------------
    def cli(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
        return mrpool_cli(self.env, *args, timeout=timeout)

    def start(self, *args: str) -> subprocess.Popen:
        return mrpool_start(self.env, *args, stderr=subprocess.PIPE)

    def expect_exit(self, r: subprocess.CompletedProcess, allowed: tuple[int, ...], what: str):
        if r.returncode not in allowed or "Traceback" in r.stderr:
            self.problem("exit", f"{what} exited {r.returncode}: {r.stderr.strip()[-300:]}")

    # -- observations ----------------------------------------------------------
    @property
    def journal(self) -> Path:
        return self.state_dir / "jobs" / self.job_id / "journal.log"

    def exists(self) -> bool:
        return (self.state_dir / "jobs" / self.job_id / "job.json").exists()

    def records(self) -> list[dict]:
        try:
            return [record for _, _, record in read_records(self.journal)]
        except MrpoolError:
            return []

    def outcomes(self) -> int:
        count = 0
        for record in self.records():
            if record["k"] == "ok":
                count += len(record["b"])
            elif record["k"] == "f":
                count += 1
        return count

    def recorded(self) -> set[str]:
        try:
            return {row["id"] for row in api.iter_results(self.job_id, state_dir=self.state_dir)}
        except MrpoolError:
            return set()

    def side(self, offset: int = 0) -> list[dict]:
        try:
            with open(self.dir / "side.log", "rb") as handle:
                handle.seek(offset)
                return [json.loads(line) for line in handle.read().splitlines()]
        except FileNotFoundError:
            return []

    def side_size(self) -> int:
        try:
            return (self.dir / "side.log").stat().st_size
        except FileNotFoundError:
            return 0

    def session(self, start) -> object:
        """Run ``start()`` (a session), checking no recorded success ran again in it."""
        recorded, offset = self.recorded(), self.side_size()  # in this order
        value = start()
        again = sorted({line["id"] for line in self.side(offset)} & recorded)
        if again:
            self.problem("rerun", f"recorded successes ran again: {again[:8]}")
        return value

    # -- the kill ----------------------------------------------------------------
    def killed(self, *args: str) -> None:
        """Start ``args``, SIGKILL the cell's target at a seeded random instant."""

        def run() -> None:
            before = self.journal.stat().st_size if self.journal.exists() else 0
            proc = self.start(*args)
            try:
                self._wait_instant(proc, before)
                self._kill(proc)
                code = proc.wait(timeout=180)
                err = proc.stderr.read()
                if self.target == "worker" and code not in (0, 1) or "Traceback" in err:
                    self.problem(
                        "exit",
                        f"{args[0]} after a {self.target} kill exited {code}: {err.strip()[-300:]}",
                    )
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout=60)
                proc.stderr.close()

        self.session(run)

    def _wait_instant(self, proc: subprocess.Popen, journal_before: int) -> None:
        rng = self.rng
        if self.phase == "dlq-purge" or rng.random() < 0.3:
            time.sleep(rng.uniform(0.0, 0.6))  # anywhere: start-up, planning, work
            return
        if self.phase == "reduce":  # once every item is done: the reduce step runs
            _wait_until(lambda: proc.poll() is not None or self.outcomes() >= len(self.items), 60)
            time.sleep(rng.uniform(0.0, 0.35))
            return
        _wait_until(
            lambda: (
                proc.poll() is not None
                or (self.journal.exists() and self.journal.stat().st_size > journal_before)
            ),
            60,
        )
        time.sleep(rng.uniform(0.0, 0.25))

    def _kill(self, proc: subprocess.Popen) -> None:
        if proc.poll() is not None:
            return
        if self.target == "group":
            try:
                os.killpg(proc.pid, signal.SIGKILL)
                self.result.kill = "group"
                self.crashes += 1
            except ProcessLookupError:
                pass
        elif self.target == "supervisor":
            # The next command starts at once, while the orphans may still be ending (as a
            # user's would); a thread checks that they are gone within the 2 s bound.
            def watch() -> None:
                killed, outlived = kill_supervisor_alone(proc)
                self.result.kill = "supervisor" if killed else ""
                self.crashes += killed
                if outlived:
                    self.problem("orphans", f"outlived the supervisor by 2 s: {outlived}")

            self.watchers.append(threading.Thread(target=watch, daemon=True))
            self.watchers[-1].start()
            _wait_until(lambda: proc.poll() is not None, 30)
        else:

            def children() -> list[psutil.Process]:
                try:
                    return [p for p in psutil.Process(proc.pid).children() if _running(p)]
                except psutil.Error:
                    return []

            # a worker kill needs a worker: wait a little for one (dlq retry forks late)
            _wait_until(lambda: proc.poll() is not None or children(), 2.0)
            found = children()
            if found:
                try:
                    self.rng.choice(found).kill()
                    self.result.kill = "worker"
                    self.worker_kills += 1
                except psutil.Error:
                    pass

    # -- the trial -----------------------------------------------------------------
    def run(self) -> TrialResult:
        started = time.monotonic()
        shm_before = _shm()
        try:
            self._setup()
            self.killed(*self._phase_args())
            self._finish()
            self._check()
        except Exception as e:  # noqa: BLE001 - a trial that blew up is a problem
            self.problem("error", f"{type(e).__name__}: {e}")
        for watcher in self.watchers:
            watcher.join(60)
        self._check_leftovers(shm_before)
        self.result.seconds = round(time.monotonic() - started, 2)
        return self.result

    def _phase_args(self) -> tuple[str, ...]:
        if self.phase in ("run", "reduce"):
            return ("run", str(self.job_file), "--job-id", self.job_id)
        if self.phase == "resume":
            return ("resume", self.job_id)
        if self.phase == "dlq-retry":
            return ("dlq", "retry", self.job_id)
        return ("dlq", "purge", self.job_id, "--yes")

    def _setup(self) -> None:
        """Give the phase's command work: a stopped run (resume), parked items (dlq)."""
        if self.phase in ("run", "reduce"):
            return
        run_args = ("run", str(self.job_file), "--job-id", self.job_id)
        if self.phase == "resume":
            proc = self.start(*run_args)
            want = self.rng.randint(2, len(self.items) // 2)
            crash = self.rng.random() < 0.5  # else a clean stop: no crash, no streak
            _wait_until(lambda: proc.poll() is not None or self.outcomes() >= want, 60)
            if proc.poll() is None:
                if crash:  # as a user's would be: then the resume's is a 2nd crash in a row
                    os.killpg(proc.pid, signal.SIGKILL)
                    self.crashes += 1
                else:
                    proc.send_signal(signal.SIGTERM)
            code = proc.wait(timeout=60)
            if code == -signal.SIGKILL:
                proc.stderr.close()
                return
            err = proc.stderr.read()
            proc.stderr.close()
            if code not in (0, 1, 130) or "Traceback" in err:
                self.problem("exit", f"set-up run exited {code}: {err.strip()[-300:]}")
            return
        self.expect_exit(self.session(lambda: self.cli(*run_args)), (1,), "set-up run")
        if self.phase == "dlq-retry":
            (self.dir / "fixed").touch()

    def _finish(self) -> None:
        """``resume`` until done, judge the innocent items, then empty the DLQ."""
        if not self.exists():  # the killed run died before the job existed: run it again
            r = self.session(lambda: self.cli("run", str(self.job_file), "--job-id", self.job_id))
            self.expect_exit(r, (0, 1), "run (again)")
        for _ in range(MAX_RESUMES):
            r = self.session(lambda: self.cli("resume", self.job_id))
            self.expect_exit(r, (0, 1), "resume")
            status = api.job_status(self.job_id, state_dir=self.state_dir)
            if r.returncode in (0, 1) and not (status["pending"] or status["failed"]):
                break
        else:
            self.problem("unfinished", f"still pending/failed after {MAX_RESUMES} resumes")
        self._judge_innocent()
        if self.phase == "dlq-purge":
            parked = {e["id"] for e in self.dlq_list()}
            innocent = sorted(parked & set(self.innocent))
            if innocent:
                r = self.session(lambda: self.cli("dlq", "retry", self.job_id, *innocent))
                self.expect_exit(r, (0,), "dlq retry (innocent)")
            if parked - set(innocent):
                self.expect_exit(self.cli("dlq", "purge", self.job_id, "--yes"), (0,), "purge")
            return
        (self.dir / "fixed").touch()
        if self.dlq_list():
            r = self.session(lambda: self.cli("dlq", "retry", self.job_id))
            self.expect_exit(r, (0,), "dlq retry")
        if self.phase == "reduce" and api.job_status(self.job_id, state_dir=self.state_dir)[
            "reduce"
        ] != {"ok": True, "error": None}:
            r = self.session(lambda: self.cli("resume", self.job_id))  # the reduce is owed
            self.expect_exit(r, (0,), "resume (reduce)")

    def dlq_list(self, cli: bool = False) -> list[dict]:
        """``dlq list --json`` (through the CLI for the final check, else in-process)."""
        if not cli:
            return [
                e.brief() for e in api.open_dlq(self.job_id, state_dir=self.state_dir).entries()
            ]
        r = self.cli("dlq", "list", self.job_id, "--json")
        self.expect_exit(r, (0,), "dlq list")
        return json.loads(r.stdout) if r.returncode == 0 else []

    def _judge_innocent(self) -> None:
        """After the resumes an innocent item is succeeded -- or the kill explains it."""
        recorded = self.recorded()
        parked = {e["id"]: e for e in self.dlq_list()}
        explained = self.worker_kills if self.retries == 0 else 0
        for item_id in self.innocent:
            if item_id in recorded:
                continue
            entry = parked.get(item_id)
            kind = entry and entry.get("kind")
            if kind == "worker_died" and explained > 0:
                explained -= 1  # the item the killed worker held, no retry left
                continue
            if kind == "crash_loop" and self.crashes >= crash_limit(self.retries):
                continue  # in flight at every crash: the poison rule (mrpool/crashes.py)
            where = (
                f"in the DLQ as {entry.get('kind')}: {entry.get('error')}"
                if entry
                else "not succeeded, not in the DLQ"
            )
            self.problem("innocent_parked", f"{item_id} {where}")

    def _check(self) -> None:
        r = self.cli("results", self.job_id)
        self.expect_exit(r, (0,), "results")
        ids = [json.loads(line)["id"] for line in r.stdout.splitlines()]
        counts = Counter(ids)
        dupes = sorted(i for i, n in counts.items() if n > 1)
        if dupes:
            self.problem("duplicate", f"listed twice: {dupes[:8]}")
        should = (
            set(self.innocent) if self.phase == "dlq-purge" else {it["id"] for it in self.items}
        )
        lost = sorted(should - set(counts))
        if lost:
            self.problem("lost", f"no result: {lost[:8]}")
        dlq = self.dlq_list(cli=True)
        r = self.cli("status", self.job_id, "--json")
        self.expect_exit(r, (0,), "status")
        status = json.loads(r.stdout)
        got = {k: status.get(k) for k in ("state", "succeeded", "dlq", "pending", "failed", "lock")}
        want = {
            "state": "completed",
            "succeeded": len(counts),
            "dlq": len(dlq),
            "pending": 0,
            "failed": 0,
            "lock": None,
        }
        if got != want or status["total"] != sum(
            status[k] for k in ("succeeded", "dlq", "pending", "failed")
        ):
            self.problem("status", f"status {got} (total {status['total']}), expected {want}")
        if self.phase == "reduce":
            try:
                output = api.reduce_output(self.job_id, state_dir=self.state_dir)
            except MrpoolError as e:
                output = {"ok": False, "error": str(e)}
            if not output.get("ok") or output.get("output") != len(self.items):
                self.problem("reduce", f"reduce output {output}")
        self._check_attempts()

    def _check_attempts(self) -> None:
        journaled: dict[str, set[int]] = defaultdict(set)
        ids = [it["id"] for it in self.items]
        for record in self.records():
            if record["k"] == "s":
                for index, attempt in started_attempts(record):
                    journaled[ids[index]].add(attempt)
        runs = self.side()
        if all(line["a"] is not None for line in runs):  # commands: the strong property
            pairs = Counter((line["id"], line["a"]) for line in runs)
            twice = sorted(pair for pair, n in pairs.items() if n > 1)
            if twice:
                pids = {p: [x["pid"] for x in runs if (x["id"], x["a"]) == p] for p in twice[:4]}
                self.problem("attempt_reuse", f"(id, attempt) run twice: {pids}")
            unknown = sorted(p for p in pairs if p[1] not in journaled[p[0]])
            if unknown:
                self.problem("unjournaled", f"attempts the journal never started: {unknown[:8]}")
            return
        executions = Counter(line["id"] for line in runs)  # callables: the weaker one
        over = sorted(
            f"{i}: ran {n}x, {len(journaled[i])} attempts"
            for i, n in executions.items()
            if n > len(journaled[i])
        )
        if over:
            self.problem("attempt_reuse", f"more executions than attempts: {over[:6]}")

    def _check_leftovers(self, shm_before: set[str]) -> None:
        deadline = time.monotonic() + 3.0
        alive = self._tagged()
        while alive and time.monotonic() < deadline:
            time.sleep(0.05)
            alive = self._tagged()
        if alive:
            self.problem("leftovers", f"processes still running: {[p.pid for p in alive]}")
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
        job_dir = self.state_dir / "jobs" / self.job_id
        if job_dir.is_dir():
            stray = sorted(
                n
                for n in os.listdir(job_dir)
                if n in ("lock", "holder.json", "slots.bin") or ".tmp-" in n
            )
            if stray:
                self.problem("leftovers", f"files left in the job dir: {stray}")
        new_shm = {n for n in _shm() - shm_before if "mrpool" in n}
        if new_shm:
            self.problem("leftovers", f"/dev/shm segments: {sorted(new_shm)}")

    def _tagged(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            try:
                if p.environ().get("MRPOOL_TEST_TAG") == self.tag and _running(p):
                    found.append(p)
            except (psutil.Error, OSError):
                continue
        return found


def _shm() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


# -- running a matrix ----------------------------------------------------------------
def select_cells(patterns: str | None) -> list[str]:
    """The cells matching any of the comma-separated ``fnmatch`` patterns (all if None)."""
    if not patterns:
        return list(CELLS)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    chosen = [c for c in CELLS if any(fnmatch.fnmatchcase(c, p) for p in wanted)]
    if not chosen:
        raise SystemExit(f"--cells {patterns!r} matches no cell; cells look like {CELLS[0]}")
    return chosen


def schedule(cells: list[str], trials: int, first: int = 0) -> list[tuple[str, int]]:
    """``trials`` (cell, k) pairs, round-robin over ``cells`` from trial ``first`` of each."""
    pairs = ((cell, k) for k in itertools.count(first) for cell in cells)
    return list(itertools.islice(pairs, trials))


def run_matrix(
    root: Path,
    pairs: list[tuple[str, int]],
    seed: int,
    items: int = 16,
    jobs: int = 1,
    keep: bool = False,
    report=None,
) -> list[TrialResult]:
    """Run the trials ``pairs`` under ``root``; ``report(result)`` after each one."""

    def one(pair: tuple[str, int]) -> TrialResult:
        trial = Trial(root, pair[0], pair[1], seed, items)
        result = trial.run()
        if result.ok or not keep:
            shutil.rmtree(trial.dir, ignore_errors=True)
        if report:
            report(result)
        return result

    if jobs <= 1:
        return [one(pair) for pair in pairs]
    with ThreadPoolExecutor(jobs) as pool:
        return list(pool.map(one, pairs))


def summary(results: list[TrialResult]) -> str:
    """Counts per cell and per problem kind, one line each."""
    lines = []
    by_cell: dict[str, list[TrialResult]] = defaultdict(list)
    for r in results:
        by_cell[r.cell].append(r)
    kinds = Counter(kind for r in results for kind, _ in r.problems)
    for cell in [c for c in CELLS if c in by_cell]:
        rs = by_cell[cell]
        cell_kinds = Counter(kind for r in rs for kind, _ in r.problems)
        kills = Counter(r.kill or "missed" for r in rs)
        lines.append(
            f"{cell:32} trials {len(rs):3}  failed {sum(not r.ok for r in rs):3}  "
            f"kills {dict(kills)}  problems {dict(cell_kinds) or 0}"
        )
    failed = [r for r in results if not r.ok]
    lines.append(
        f"total: {len(results)} trials, {len(failed)} with problems; by kind: {dict(kinds) or 0}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=len(CELLS) * 2, help="in all")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--cells", default=None, help="comma-separated fnmatch patterns")
    parser.add_argument("--first", type=int, default=0, help="first trial number of each cell")
    parser.add_argument("--items", type=int, default=16)
    parser.add_argument("--jobs", type=int, default=1, help="trials run at once")
    parser.add_argument("--keep", action="store_true", help="keep failed trials' directories")
    parser.add_argument("--list", action="store_true", help="print the cells and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(CELLS))
        return 0
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**32)
    cells = select_cells(args.cells)
    pairs = schedule(cells, args.trials, args.first)
    root = Path(tempfile.mkdtemp(prefix="mrpool-torture-matrix-"))
    print(
        f"torture matrix: {len(pairs)} trials over {len(cells)} cells, seed {seed}, in {root}",
        file=sys.stderr,
    )

    def report(result: TrialResult) -> None:
        if result.ok:
            return
        print(
            f"FAIL {result.cell} trial {result.k} (seed {seed}, kill {result.kill or 'missed'})",
            file=sys.stderr,
        )
        for kind, detail in result.problems:
            print(f"  {kind}: {detail}", file=sys.stderr)
        print(f"  repro: {result.repro()}", file=sys.stderr)

    started = time.monotonic()
    try:
        results = run_matrix(root, pairs, seed, args.items, args.jobs, args.keep, report)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    print(summary(results))
    print(f"seed {seed}, {time.monotonic() - started:.0f} s")
    return 1 if any(not r.ok for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
