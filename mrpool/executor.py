"""The executor boundary: how attempts are run. Today: local worker processes.

The supervisor owns *what* runs and what an outcome means (journal, retries,
DLQ); an executor only runs attempts and reports how each ended. The whole
interface is ``Executor``: ``start``, ``capacity``, ``submit``, ``wait``,
``cancel``, ``shutdown``. A cluster executor (Dask, Ray) implements the same
five verbs and inherits every journal, DLQ and lock guarantee unchanged.

``LocalExecutor`` keeps N forked workers, each with its own pipe and slot:

    supervisor --batch--> pipe --> worker --(slot: item, since, heartbeat)
    supervisor <-outcomes- pipe <-- worker

Batches are sized per worker so a batch takes about 20 ms (one item at a time
for slow items), and a fast worker gets its next batch queued before it runs
dry. ``wait`` multiplexes every pipe and every worker's death sentinel; a worker
that dies is handled in one place, ``_worker_lost``: the item its slot names is
failed as ``worker_died`` (or ``timeout`` / ``hung`` when we killed it), the rest
of its batch is handed back un-charged, and a replacement is started.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_any
from pathlib import Path
from typing import Any, Protocol

import orjson

from .slots import RUNNING, SlotTable
from .worker import WorkerConfig, kill_tree, worker_main

__all__ = ["Attempt", "Outcome", "Executor", "LocalExecutor"]

BATCH_SECONDS = 0.02
MAX_BATCH = 256
HUNG_AFTER = 60.0  # seconds without a heartbeat


@dataclass(slots=True)
class Attempt:
    """One try of one item. ``tries``/``budget`` count attempts in this session."""

    index: int
    attempt: int
    line: bytes
    source: str = "pending"
    tries: int = 0
    budget: int = 1


@dataclass(slots=True)
class Outcome:
    """How an attempt ended: ``ok`` with ``result``, a failure, or ``requeue`` (never ran)."""

    attempt: Attempt
    ok: bool
    result: Any = None
    error: dict[str, Any] | None = None
    duration: float = 0.0
    worker: int = 0
    requeue: bool = False


class Executor(Protocol):
    def start(self) -> None: ...
    def capacity(self) -> int: ...
    def submit(self, attempts: list[Attempt]) -> None: ...
    def wait(self, timeout: float) -> list[Outcome]: ...
    def started(self) -> list[int]: ...
    def cancel(self) -> list[Attempt]: ...
    def shutdown(self, keep_slots: bool = False) -> None: ...

    events: list[dict[str, Any]]  # worker started/died records for the journal


@dataclass
class _Worker:
    slot: int
    process: Any
    conn: Any
    pid: int = 0
    in_flight: deque = field(default_factory=deque)
    batches: int = 0
    per_item: float = 0.0  # EWMA of an item's duration; 0 = unknown
    kill_reason: str | None = None


class LocalExecutor:
    """N forked worker processes on this machine."""

    def __init__(self, config: WorkerConfig, workers: int, slots_path: Path | None = None) -> None:
        self.config = config
        self.n = workers
        self.slots = SlotTable(workers, slots_path)
        self.workers: list[_Worker | None] = [None] * workers
        self.events: list[dict[str, Any]] = []
        self._ctx = multiprocessing.get_context("fork")
        self._timeout = config.timeout
        self._next_check = 0.0

    # -- lifecycle -------------------------------------------------------
    def start(self) -> None:
        for slot in range(self.n):
            self._spawn(slot)

    def _spawn(self, slot: int) -> _Worker:
        self.slots.reset(slot)
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        process = self._ctx.Process(
            target=worker_main,
            args=(self.config, self.slots, slot, child_end, os.getpid()),
            name=f"mrpool-worker-{slot}",
            daemon=True,
        )
        process.start()
        child_end.close()
        worker = self.workers[slot] = _Worker(slot, process, parent_end, process.pid)
        self.events.append({"k": "worker", "ev": "started", "pid": process.pid, "slot": slot})
        return worker

    def shutdown(self, keep_slots: bool = False) -> None:
        """Stop every worker: ask politely, then SIGKILL what lingers. Reap all.

        The slot file is removed unless ``keep_slots`` (a failed session: the next
        one reads from it which items were running)."""
        live = [w for w in self.workers if w is not None]
        for w in live:
            try:
                w.conn.send_bytes(b"")
            except OSError:
                pass
        deadline = time.monotonic() + 1.0
        for w in live:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                self._kill(w)
                w.process.join(1.0)
            w.conn.close()
            w.process.close()
        self.workers = [None] * self.n
        self.slots.close(remove=not keep_slots)

    def started(self) -> list[int]:
        """Items a worker has started whose outcome has not been delivered yet.

        A worker runs its queue in order and its slot names the last item it
        started (running or ended), so everything in its queue up to that item
        has started and everything after it has not.
        """
        found: list[int] = []
        for w in self.workers:
            if w is None:
                continue
            last = self.slots.read(w.slot).index
            queued = [a.index for a in w.in_flight]
            if last in queued:
                found.extend(queued[: queued.index(last) + 1])
        return found

    def cancel(self) -> list[Attempt]:
        """Kill every worker mid-attempt (Ctrl-C); return what they held, unfinished."""
        lost: list[Attempt] = []
        for w in self.workers:
            if w is None:
                continue
            self._kill(w)
            w.process.join(2.0)
            lost.extend(w.in_flight)
            w.in_flight.clear()
        return lost

    def _kill(self, w: _Worker) -> None:
        child = self.slots.read(w.slot).child
        try:
            os.kill(w.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if child > 0:
            kill_tree(child)

    # -- dispatch --------------------------------------------------------
    def _batch_size(self, w: _Worker) -> int:
        if w.per_item <= 0:
            return 1
        return max(1, min(MAX_BATCH, int(BATCH_SECONDS / w.per_item)))

    def _open_batches(self, w: _Worker) -> int:
        size = self._batch_size(w)
        allowed = 2 if size > 1 else 1  # fast items: keep one batch queued behind the running one
        return allowed if not w.in_flight else max(0, allowed - -(-len(w.in_flight) // size))

    def capacity(self) -> int:
        return sum(
            self._open_batches(w) * self._batch_size(w) for w in self.workers if w is not None
        )

    def submit(self, attempts: list[Attempt]) -> None:
        """Hand ``attempts`` out to workers with room, in order, in batches."""
        queue = deque(attempts)
        while queue:
            progressed = False
            for w in self.workers:
                if w is None or not queue:
                    continue
                size = self._batch_size(w)
                for _ in range(self._open_batches(w)):
                    batch = [queue.popleft() for _ in range(min(size, len(queue)))]
                    if not batch:
                        break
                    self._send(w, batch)
                    progressed = True
            if not progressed:
                raise RuntimeError("submit() was given more attempts than capacity()")

    def _send(self, w: _Worker, batch: list[Attempt]) -> None:
        header = orjson.dumps([[a.index, a.attempt] for a in batch])
        body = b"".join([a.line for a in batch])  # items.jsonl lines end with LF
        w.in_flight.extend(batch)
        try:
            w.conn.send_bytes(header + b"\n" + body)
        except OSError:
            pass  # the worker died; its sentinel fires in wait() and the batch is handed back

    # -- collecting ------------------------------------------------------
    def wait(self, timeout: float) -> list[Outcome]:
        """Outcomes that arrived within ``timeout`` seconds (possibly none)."""
        live = [w for w in self.workers if w is not None]
        by_conn = {w.conn: w for w in live}
        by_sentinel = {w.process.sentinel: w for w in live}
        outcomes: list[Outcome] = []
        for ready in wait_any([*by_conn, *by_sentinel], timeout):
            w = by_conn.get(ready)
            if w is not None:
                self._receive(w, outcomes)
        for _sentinel, w in by_sentinel.items():
            if not w.process.is_alive():
                self._worker_lost(w, outcomes)
        if time.monotonic() >= self._next_check:
            self._check_deadlines()
            self._next_check = time.monotonic() + 0.05
        return outcomes

    def _receive(self, w: _Worker, outcomes: list[Outcome]) -> None:
        pid = w.pid
        in_flight = w.in_flight
        try:
            while w.conn.poll():
                rows = orjson.loads(w.conn.recv_bytes())
                for index, _attempt_no, ok, payload, duration in rows:
                    attempt = in_flight.popleft()
                    if attempt.index != index:
                        raise RuntimeError(
                            f"worker {pid} answered for item {index}, expected {attempt.index}"
                        )
                    if ok:
                        outcomes.append(Outcome(attempt, True, payload, None, duration, pid))
                    else:
                        payload["pid"] = pid
                        outcomes.append(Outcome(attempt, False, None, payload, duration, pid))
                mean = sum(row[4] for row in rows) / len(rows)
                w.per_item = mean if w.per_item <= 0 else 0.7 * w.per_item + 0.3 * mean
        except (EOFError, OSError):
            pass  # died mid-send: _worker_lost attributes what is left

    def _worker_lost(self, w: _Worker, outcomes: list[Outcome]) -> None:
        """The crash path: attribute the held item, hand back the rest, replace the worker."""
        self._receive(w, outcomes)
        view = self.slots.read(w.slot)
        w.process.join(1.0)
        code = w.process.exitcode
        if view.child > 0:
            kill_tree(view.child)
        blamed = view.index if view.state == RUNNING else -1
        for attempt in w.in_flight:
            if attempt.index == blamed:
                ran = time.monotonic() - view.started
                outcomes.append(
                    Outcome(attempt, False, None, self._death_error(w, code), ran, w.pid)
                )
            else:
                outcomes.append(Outcome(attempt, False, requeue=True, worker=w.pid))
        w.in_flight.clear()
        self.events.append(
            {
                "k": "worker",
                "ev": "died",
                "pid": w.pid,
                "slot": w.slot,
                "exitcode": code,
                "reason": w.kill_reason,
            }
        )
        w.conn.close()
        w.process.close()
        self.workers[w.slot] = None
        self._spawn(w.slot)

    def _death_error(self, w: _Worker, code: int | None) -> dict[str, Any]:
        if w.kill_reason == "timeout":
            return {
                "kind": "timeout",
                "msg": f"timed out after {self._timeout:g} s",
                "tail": "",
                "pid": w.pid,
            }
        if w.kill_reason == "hung":
            return {
                "kind": "hung",
                "msg": f"worker hung: no heartbeat for {HUNG_AFTER:g} s",
                "tail": "",
                "pid": w.pid,
            }
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "?"
            msg = f"worker died: signal {-code} ({name})"
        else:
            msg = f"worker died: exit status {code}"
        return {
            "kind": "worker_died",
            "msg": msg,
            "tail": "",
            "pid": w.pid,
            "signal": -code if code and code < 0 else None,
        }

    def _check_deadlines(self) -> None:
        """Kill a worker whose attempt outran its timeout, or that stopped heartbeating."""
        now = time.monotonic()
        for w in self.workers:
            if w is None or w.kill_reason:
                continue
            view = self.slots.read(w.slot)
            if view.state == RUNNING and self._timeout is not None:
                # A command's own timeout is enforced in the worker; this is the backstop.
                grace = 0.2 if self.config.callable else 5.0
                if now - view.started > self._timeout + grace:
                    w.kill_reason = "timeout"
                    self._kill(w)
                    continue
            if view.heartbeat and now - view.heartbeat > HUNG_AFTER:
                w.kill_reason = "hung"
                self._kill(w)
