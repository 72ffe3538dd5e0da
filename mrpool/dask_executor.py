"""``DaskExecutor``: the map phase on a Dask distributed cluster.

Imported only when a job asks for it (``executor: {kind: dask}``, ``--executor
dask``); needs the ``dask`` extra (``pip install 'mrpool[dask]'``). The supervisor
is unchanged: it journals every start before ``submit``, and owns retries,
backoff, the DLQ, the lock and the checkpoint. Dask only runs attempts.

How a ``Batch`` runs::

    supervisor --submit--> one Dask task per slice (~TASK_SECONDS of work)
       Dask worker process: _run_slice --pipe--> helper process (remote_helper.py):
                                                 LocalExecutor, 1 worker, forked
    supervisor <--(ok rows, failures, hand-backs)-- the task's result

* Dask's retries are off: the scheduler's ``allowed-failures`` must be 0 (a
  client cannot set it per task). A ``LocalCluster`` we start gets it in its
  config; an external scheduler is checked at ``start`` and refused otherwise,
  because a silent re-run would reuse an attempt number behind the journal.
* While a slice runs, its task reports the attempt running (``log_event``, at
  most every 50 ms). When a Dask worker dies (``KilledWorker``), that attempt is
  failed as ``worker_died``; the rest of the slice is handed back as started
  (the next number: it may have run), see ``remote_helper.lost_slice``.
* Timeouts, hung attempts and a map command's process tree are the helper's
  ``LocalExecutor``'s business, on the node, as locally.
* Lease: workers kill a session's attempts when the supervisor has not renewed
  its lease for ``LEASE_SECONDS`` (a dead supervisor's tasks would otherwise run
  on), and ``start`` kills helpers left by earlier sessions of the same job. A
  dead session's results go nowhere: only this session's futures are read.
* Ctrl-C: the futures are cancelled and the helpers killed from each worker's
  event loop (``Client.run``), not from the busy task threads.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from . import records
from .errors import ExecutorError
from .executor import Batch, Failure, HandBack, Outcomes, Successes
from .remote_helper import Helper, HelperError, HelperGone, lost_slice
from .slots import UNKNOWN, CrashEvidence
from .worker import WorkerConfig

__all__ = ["DaskExecutor", "LEASE_SECONDS"]

TASK_SECONDS = 0.25  # work per Dask task: a task's own cost is then small (NOTES.md)
MAX_SLICE = 4096
MAX_SLICE_BYTES = 4 << 20
TASKS_PER_THREAD = 2  # one running, one waiting on the worker: no idle gap between tasks
LEASE_SECONDS = 10.0
RENEW_EVERY = 1.0
NO_WORKER_DEADLINE = {"local": 30.0, "external": 120.0}
CONNECT_TIMEOUT = 30.0


def _dask_modules():
    import dask
    import distributed

    return dask, distributed


@dataclass
class _Task:
    future: Any
    batch: Batch


class DaskExecutor:
    """Attempts run as Dask tasks, on a cluster at ``address`` or a ``LocalCluster`` of
    ``workers`` processes started for the session (``address`` None)."""

    def __init__(self, config: WorkerConfig, workers: int, address: str | None = None) -> None:
        self.config = config
        self.n = workers
        self.address = address
        self._events: list[dict[str, Any]] = []  # for the next start() or wait() to return
        self.session = f"{config.job_id}.{os.getpid()}.{secrets.token_hex(4)}"
        self._topic = f"mrpool-{self.session}"
        self._config = asdict(config)
        self._cluster: Any = None
        self._client: Any = None
        self._tasks: dict[str, _Task] = {}
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._running: dict[str, tuple[int, int]] = {}  # task key -> attempt it last reported
        self._per_item = 0.0
        self._work = (0.0, 0.0)  # decayed (seconds, items) of the slices that came back
        self._item_bytes = 0
        self._threads = 0
        self._next_threads = 0.0
        self._next_renew = 0.0
        self._no_worker_since: float | None = None
        self._count = 0
        self._kind = "local" if address is None else "external"

    # -- crash evidence ------------------------------------------------------
    @staticmethod
    def crash_evidence(job_dir: Any, state: Any, *, end_stragglers: bool = True) -> CrashEvidence:
        """None to give: a Dask session keeps no record of which attempts its workers
        had begun, so every open attempt is charged and none gets a crash streak
        (crashes.py rule 1 and 2; its leftovers on the cluster end with their lease)."""
        if not state.open_count:
            return CrashEvidence(began=[], running=[])
        return UNKNOWN

    @staticmethod
    def discard_evidence(job_dir: Any) -> None:
        """Nothing kept on this machine to discard."""

    # -- lifecycle -----------------------------------------------------------
    def start(self) -> list[dict[str, Any]]:
        dask, distributed = _dask_modules()
        if self.address is None:
            with dask.config.set({"distributed.scheduler.allowed-failures": 0}):
                self._cluster = distributed.LocalCluster(  # its scheduler reads it at start
                    n_workers=self.n,
                    threads_per_worker=1,
                    processes=True,
                    host="127.0.0.1",
                    dashboard_address=None,
                    silence_logs=logging.ERROR,
                )
            self._client = distributed.Client(self._cluster, set_as_default=False)
        else:
            try:
                self._client = distributed.Client(
                    self.address, timeout=CONNECT_TIMEOUT, set_as_default=False
                )
            except (OSError, TimeoutError) as e:
                raise ExecutorError(
                    f"cannot reach the Dask scheduler at {self.address}: {e}"
                ) from None
        self._check_no_retries()
        self._client.subscribe_topic(self._topic, self._on_note)
        workers = self._open_on_workers()
        self._threads = sum(self._client.nthreads().values())
        self._next_renew = time.monotonic() + RENEW_EVERY
        return [
            records.executor(
                "dask", self._client.scheduler.address, self._kind, workers, self._threads
            )
        ]

    def _check_no_retries(self) -> None:
        allowed = self._client.run_on_scheduler(_allowed_failures)
        if allowed != 0:
            raise ExecutorError(
                f"the Dask scheduler at {self._client.scheduler.address} has allowed-failures = "
                f"{allowed}: it would re-run a task behind the journal's back. Start it with "
                "'DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0 dask scheduler'"
            )

    def _open_on_workers(self) -> int:
        """Open the session on every worker (killing helpers of earlier sessions of this
        job there), and check each can run the job. The number of workers."""
        if self._kind == "external":
            try:
                self._client.wait_for_workers(1, timeout=NO_WORKER_DEADLINE["external"])
            except TimeoutError:
                raise ExecutorError(
                    f"no Dask worker connected to {self.address} within "
                    f"{NO_WORKER_DEADLINE['external']:g} s (start one: dask worker {self.address})"
                ) from None
        answers = self._client.run(_open_session, self.session, self._config)
        for address, problem in sorted(answers.items()):
            if problem:
                raise ExecutorError(
                    f"Dask worker {address} cannot run this job: {problem} "
                    "(see 'Running on a cluster' in the README)"
                )
        return len(answers)

    def shutdown(self) -> None:
        """Close the session's helpers on every worker, then the client (and the cluster
        we started)."""
        client, self._client = self._client, None
        if client is not None:
            try:
                client.run(_close_session, self.session, on_error="ignore")
            except Exception:  # noqa: BLE001 - the cluster may be gone: nothing left to close
                pass
            try:
                client.unsubscribe_topic(self._topic)
            except Exception:  # noqa: BLE001
                pass
            client.close()
        if self._cluster is not None:
            self._cluster.close()
            self._cluster = None

    # -- dispatch ------------------------------------------------------------
    def _slice_size(self) -> int:
        if self._per_item <= 0:
            return 1
        by_bytes = MAX_SLICE_BYTES // self._item_bytes if self._item_bytes else MAX_SLICE
        return max(1, min(MAX_SLICE, by_bytes, int(TASK_SECONDS / self._per_item)))

    def capacity(self) -> int:
        free = TASKS_PER_THREAD * self._threads - len(self._tasks)
        return free * self._slice_size() if free > 0 else 0

    def submit(self, batch: Batch) -> None:
        size = self._slice_size()
        for first in range(0, len(batch), size):
            part = batch if size >= len(batch) else batch.part(first, first + size)
            body = b"".join(part.lines)
            if any(not line.endswith(b"\n") for line in (part.lines[0], part.lines[-1])):
                raise RuntimeError("a Batch line without its trailing LF")
            self._item_bytes = max(1, len(body) // len(part))
            self._count += 1
            key = f"mrpool-slice-{self.session}-{self._count}"
            future = self._client.submit(
                _run_slice,
                self.session,
                self._topic,
                self._config,
                part.indices,
                part.attempts,
                body,
                key=key,
                pure=False,
                retries=0,
            )
            self._tasks[key] = _Task(future, part)
            future.add_done_callback(self._finished.put)

    def _on_note(self, event: tuple[float, Any]) -> None:
        """A task's report of the attempt it is running (on the client's loop thread)."""
        key, index, attempt = event[1]
        self._running[key] = (index, attempt)

    # -- collecting ----------------------------------------------------------
    def wait(self, timeout: float) -> Outcomes:
        outcomes = Outcomes()
        self._renew_lease()
        try:
            future = self._finished.get(timeout=timeout)
        except queue.Empty:
            future = None
        while future is not None:
            self._collect(future, outcomes)
            try:
                future = self._finished.get_nowait()
            except queue.Empty:
                future = None
        self._check_workers()
        if self._events:
            outcomes.events, self._events = self._events, []
        return outcomes

    def _collect(self, future: Any, outcomes: Outcomes) -> None:
        task = self._tasks.pop(future.key, None)
        if task is None:
            return  # cancelled by us: already handed back
        running = self._running.pop(future.key, None)
        if future.status == "finished":
            head, rows = future.result()
            self._file(task.batch, orjson.loads(head), rows, outcomes)
            return
        _, distributed = _dask_modules()
        problem = future.exception() if future.status == "error" else None
        if problem is not None and not isinstance(problem, distributed.KilledWorker):
            raise ExecutorError(f"a Dask task of this session failed: {problem}")
        error = records.error("worker_died", f"Dask worker died: {problem or 'task lost'}")
        failed, requeued = lost_slice(task.batch.indices, task.batch.attempts, running, error)
        summary = {"ok": [], "failed": failed, "requeued": requeued}
        self._file(task.batch, summary, b"[]", outcomes)
        self._events.append(records.task_lost(future.key, str(problem)))

    def _file(self, batch: Batch, summary: dict, rows: bytes, outcomes: Outcomes) -> None:
        if summary["ok"]:
            outcomes.ok.append(Successes(summary["ok"], rows))
        if summary["failed"] or summary["requeued"]:
            line_of = dict(zip(batch.indices, batch.lines))
            for index, attempt, duration, error in summary["failed"]:
                outcomes.failed.append(Failure(index, attempt, line_of[index], error, duration))
            for index, attempt, started in summary["requeued"]:
                outcomes.requeued.append(HandBack(index, attempt, line_of[index], started))
        secs = summary.get("secs")
        if secs is not None and len(batch):
            # weighted by items, so that a big slice's measure outweighs the one-item
            # slices a session starts with (a per-slice average took ~10 round trips to
            # come down from them, most of a short job)
            self._work = (0.5 * self._work[0] + secs, 0.5 * self._work[1] + len(batch))
            self._per_item = self._work[0] / self._work[1]

    def _renew_lease(self) -> None:
        now = time.monotonic()
        if now < self._next_renew:
            return
        self._next_renew = now + RENEW_EVERY
        try:
            self._client.run(_renew_lease, self.session, wait=False)
        except Exception:  # noqa: BLE001 - no scheduler: _check_workers ends the session
            pass

    def _check_workers(self) -> None:
        """Refresh the worker count; end the session when no worker has been there for
        ``NO_WORKER_DEADLINE`` seconds (a hang otherwise: nothing would ever run)."""
        now = time.monotonic()
        if now < self._next_threads:
            return
        self._next_threads = now + 1.0
        try:
            self._threads = sum(self._client.nthreads().values())
        except Exception:  # noqa: BLE001 - the scheduler is gone: as good as no worker
            self._threads = 0
        if self._threads:
            self._no_worker_since = None
            return
        if self._no_worker_since is None:
            self._no_worker_since = now
        deadline = _no_worker_deadline(self._kind)
        if now - self._no_worker_since > deadline:
            where = "the local Dask cluster" if self._kind == "local" else self.address
            raise ExecutorError(
                f"no Dask worker left at {where} for {deadline:g} s; what ran is recorded: "
                f"resume the job when workers are back (mrpool resume {self.config.job_id})"
            )

    # -- stopping ------------------------------------------------------------
    def started(self) -> list[int]:
        """Every attempt in flight: without a slot per item, any of them may have begun
        (counting one that had not only skips an attempt number; reusing one that had
        would be wrong)."""
        return [index for task in self._tasks.values() for index in task.batch.indices]

    def cancel(self) -> list[tuple[int, int, bytes]]:
        lost: list[tuple[int, int, bytes]] = []
        futures = []
        for task in self._tasks.values():
            lost.extend(zip(task.batch.indices, task.batch.attempts, task.batch.lines))
            futures.append(task.future)
        self._tasks.clear()
        self._running.clear()
        if self._client is not None:
            try:
                self._client.cancel(futures)
                self._client.run(_cancel_session, self.session, on_error="ignore")
            except Exception:  # noqa: BLE001 - the cluster may be gone: nothing runs there
                pass
        return lost


def _no_worker_deadline(kind: str) -> float:
    """Seconds without any worker before the session ends: ``NO_WORKER_DEADLINE``, or
    ``$MRPOOL_DASK_NO_WORKER_SECONDS`` (a cluster whose nodes take longer to come back)."""
    text = os.environ.get("MRPOOL_DASK_NO_WORKER_SECONDS")
    try:
        return float(text) if text else NO_WORKER_DEADLINE[kind]
    except ValueError:
        return NO_WORKER_DEADLINE[kind]


def _allowed_failures(dask_scheduler: Any) -> int:
    return dask_scheduler.allowed_failures


# -- inside a Dask worker process ------------------------------------------------------
class _WorkerSession:
    """One supervisor session's helpers in this Dask worker process."""

    def __init__(self, session: str, config: dict[str, Any]) -> None:
        self.session = session
        self.job_id = config["job_id"]
        self.config = WorkerConfig(**config)
        self.idle: list[Helper] = []
        self.busy: set[Helper] = set()
        self.dead = False

    def take(self) -> Helper:
        with _LOCK:
            if self.idle:
                helper = self.idle.pop()
                self.busy.add(helper)
                return helper
        helper = Helper(self.config)  # raises HelperError: this node cannot run the job
        with _LOCK:
            self.busy.add(helper)
            if self.dead:  # cancelled while it started
                self.busy.discard(helper)
                helper.kill()
                raise HelperGone(None)
        return helper

    def give_back(self, helper: Helper) -> None:
        with _LOCK:
            self.busy.discard(helper)
            if not self.dead:
                self.idle.append(helper)
                return
        helper.close()

    def drop(self, helper: Helper) -> None:
        with _LOCK:
            self.busy.discard(helper)
        helper.kill()

    def kill_all(self) -> None:
        """Stop the session here: kill its helpers and every attempt they run."""
        with _LOCK:
            self.dead = True
            helpers = [*self.idle, *self.busy]
            self.idle.clear()
        for helper in helpers:
            helper.kill()


_LOCK = threading.Lock()
_SESSIONS: dict[str, _WorkerSession] = {}
_LEASES: dict[str, float] = {}  # session -> monotonic deadline on this worker
_ENDED: set[str] = set()  # sessions closed, cancelled or expired here: their late tasks run nothing
_watchdog_started = False


def _session_here(session: str, config: dict[str, Any]) -> _WorkerSession | None:
    """This worker's record of ``session``, made on first use (a worker that joined, or
    was restarted, after the session opened). Earlier sessions of the same job are
    killed: a supervisor that opens a session of a job holds its lock, so any other
    session of that job here belongs to a supervisor that is gone."""
    global _watchdog_started
    stale: list[_WorkerSession] = []
    with _LOCK:
        if session in _ENDED:
            return None
        found = _SESSIONS.get(session)
        if found is None:
            for other in list(_SESSIONS.values()):
                if other.job_id == config["job_id"]:
                    stale.append(_end(other.session))
            found = _SESSIONS[session] = _WorkerSession(session, config)
            _LEASES.setdefault(session, time.monotonic() + LEASE_SECONDS)
        if not _watchdog_started:
            _watchdog_started = True
            threading.Thread(target=_lease_watchdog, name="mrpool-lease", daemon=True).start()
    for old in stale:
        old.kill_all()
    return found


def _end(session: str) -> _WorkerSession | None:
    """Forget ``session`` here for good (call with ``_LOCK`` held); its record, if any."""
    _ENDED.add(session)
    _LEASES.pop(session, None)
    return _SESSIONS.pop(session, None)


def _lease_watchdog() -> None:
    """Kill the attempts of sessions whose supervisor stopped renewing their lease."""
    while True:
        time.sleep(0.5)
        now = time.monotonic()
        with _LOCK:
            late = [s for s, until in _LEASES.items() if until < now]
            expired = [_end(s) for s in late]
        for session in expired:
            if session is not None:
                session.kill_all()


async def _open_session(session: str, config: dict[str, Any]) -> str | None:
    """``Client.run`` at start: open the session here and start one helper, which checks
    this node can run the job. None, or why not."""
    import asyncio

    record = _session_here(session, config)
    if record is None:
        return None

    def warm_up() -> str | None:
        try:
            record.give_back(record.take())
        except HelperError as e:
            return str(e)
        except HelperGone:
            return None
        return None

    return await asyncio.to_thread(warm_up)


async def _renew_lease(session: str) -> None:
    with _LOCK:
        if session not in _ENDED:
            _LEASES[session] = time.monotonic() + LEASE_SECONDS


def _close_session(session: str) -> None:
    """``Client.run`` at the end of a session: its helpers exit (politely when idle)."""
    with _LOCK:
        record = _end(session)
        if record is None:
            return
        record.dead = True
        idle, busy = list(record.idle), list(record.busy)
        record.idle.clear()
    for helper in busy:
        helper.kill()
    for helper in idle:
        helper.ask_to_exit()
    for helper in idle:
        helper.close()


def _cancel_session(session: str) -> None:
    """``Client.run`` on Ctrl-C: kill the session's attempts now."""
    with _LOCK:
        record = _end(session)
    if record is not None:
        record.kill_all()


def _run_slice(
    session: str,
    topic: str,
    config: dict[str, Any],
    indices: list[int],
    attempts: list[int],
    body: bytes,
) -> tuple[bytes, bytes]:
    """The Dask task: run a slice in this worker's helper; ``(summary, rows)``."""
    from distributed import get_worker

    record = _session_here(session, config)
    if record is None or record.dead:
        return _untouched(indices, attempts)
    worker = get_worker()
    key = worker.get_current_task()
    last = [0.0]

    def on_running(index: int, attempt: int) -> None:
        now = time.monotonic()
        if now - last[0] >= 0.05:
            last[0] = now
            worker.log_event(topic, [key, index, attempt])

    try:
        helper = record.take()
    except HelperGone:
        return _untouched(indices, attempts)
    except HelperError as e:
        raise RuntimeError(f"Dask worker {worker.address} cannot run this job: {e}") from None
    try:
        summary, rows = helper.run(indices, attempts, body, on_running, lambda: record.dead)
    except HelperGone as gone:
        record.drop(helper)
        if record.dead:  # stopped on purpose: nothing it ran is its fault
            return orjson.dumps(
                {
                    "ok": [],
                    "failed": [],
                    "requeued": [[i, a, True] for i, a in zip(indices, attempts)],
                }
            ), b"[]"
        error = records.error("worker_died", "mrpool helper process died")
        failed, requeued = lost_slice(indices, attempts, gone.running, error)
        return orjson.dumps({"ok": [], "failed": failed, "requeued": requeued}), b"[]"
    record.give_back(helper)
    return orjson.dumps(summary), rows


def _untouched(indices: list[int], attempts: list[int]) -> tuple[bytes, bytes]:
    """A slice this session no longer runs here: handed back as it came (never started)."""
    requeued = [[i, a, False] for i, a in zip(indices, attempts)]
    return orjson.dumps({"ok": [], "failed": [], "requeued": requeued}), b"[]"
