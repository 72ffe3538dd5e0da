"""The executor boundary: how attempts are run. Today: local worker processes.

The supervisor owns *what* runs and what an outcome means (journal, retries,
DLQ); an executor only runs attempts and reports how each ended. The interface
is ``Executor``: seven verbs (``start``, ``capacity``, ``submit``, ``wait``,
``started``, ``cancel``, ``shutdown``) and, asked of the *kind* of executor the
job's last session ran on (static methods, before anything starts), what that
session was running when it died (``crash_evidence``) and forgetting it once it is
settled (``discard_evidence``).
Journal records an executor has to say (a worker started or died, which cluster
the session runs on) come back from ``start`` and inside ``Outcomes.events``; the
supervisor records them.

What a new executor (dask_executor.py is one) must itself get right, because
the supervisor cannot check it:

* every submitted attempt comes back exactly once -- a success, a ``Failure``,
  or handed back in ``requeued`` as a ``HandBack`` whose ``started`` says whether
  it had begun (then it runs again under the next number) or not (under its own):
  a wrong True wastes a number; a wrong False runs one number twice;
* success rows arrive already encoded as the journal stores them (``Successes``,
  ``records.encode_rows``);
* the engine's own retries are off, or an attempt runs twice under one number;
* crash evidence: after a supervisor crash the next session asks the crashed
  session's kind of executor (``crash_evidence``) what was running. The local
  one reads the workers' slot file; one that cannot know answers
  ``slots.UNKNOWN`` (every open attempt charged, no crash streak), which is
  correct but cannot recognise a poison item (crashes.py).

The messages are batch-shaped, so that the supervisor's cost per item stays a
few list operations: ``submit`` takes a ``Batch`` (parallel lists of item
indices, attempt numbers and ``items.jsonl`` lines) and ``wait`` returns
``Outcomes``: successes as ``Successes`` (their indices, and their rows already
encoded as the journal's ``ok`` record stores them, so the supervisor journals
them without decoding and re-encoding every result), failures as ``Failure``
records, and attempts handed back to be run again. (A cluster executor encodes
its results' rows with ``orjson.dumps``, where they come back.)

``LocalExecutor`` keeps N forked workers, each with its own pipe and slot:

    supervisor --batch--> pipe --> worker --(slot: item, since, heartbeat)
    supervisor <--rows--- pipe <-- worker

Batches are sized per worker so a batch takes about 20 ms (one item at a time
for slow items), and a fast worker gets its next batch queued before it runs
dry. ``wait`` polls every pipe and a pidfd of every worker (not multiprocessing's
sentinel pipe: a process a callable forks inherits that, and it would not fire
until that process ends too); a worker that dies is handled in one place, ``_worker_lost``: the item its slot names is
failed as ``worker_died`` (or ``timeout`` / ``hung`` when we killed it), and the
rest of what it held is handed back -- with a new attempt number for items it
had started (their outcome died with it), with the same one for items it never
reached -- and a replacement is started. What each worker incarnation starts is
contained (containment.py): a killed or dead worker's leftovers are ended with
it, and the session's close (in ``shutdown``) ends whatever is left.

With ``concurrency`` K > 1 each worker has K lanes (worker.py, ``_Lanes``): it is
sent up to 2K items, one by one as room frees, runs K at once and answers in
any order, so what it holds is kept by item (``_Worker.inflight``), not in send
order. Its death charges exactly the attempts its lanes show running; of the
rest, those the begun table says it began take the next number, the others run
again under theirs (``_lanes_lost``). Each lane's timeout is the worker's own;
the supervisor's backstop is ``timeout + LANE_TIMEOUT_GRACE``. A worker that
asks to retire (a plain callable's thread past its timeout cannot be stopped)
is sent nothing more and is stopped and replaced once it holds nothing.
"""

from __future__ import annotations

import multiprocessing
import os
import select
import signal
import socket
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import orjson

from . import records, slots
from .containment import Containment, Unit
from .slots import RUNNING, SlotTable
from .worker import WorkerConfig, worker_main

__all__ = [
    "Batch",
    "Failure",
    "Successes",
    "HandBack",
    "Outcomes",
    "Executor",
    "LocalExecutor",
    "Answer",
]

BATCH_SECONDS = 0.02
MAX_BATCH = 4096  # the very fastest items: a few ms of work a batch, two queued per worker
MAX_BATCH_BYTES = 4 << 20  # large fast items: at most ~8 MiB of them held per worker
HUNG_AFTER = 60.0  # seconds without a heartbeat
LANE_TIMEOUT_GRACE = 5.0  # lanes: the worker times attempts out itself; then the backstop


@dataclass(slots=True)
class Batch:
    """Attempts to run in this order: item ``indices[k]`` as attempt ``attempts[k]``,
    ``lines[k]`` being its line of ``items.jsonl``."""

    indices: list[int]
    attempts: list[int]
    lines: list[bytes]

    def __len__(self) -> int:
        return len(self.indices)

    def part(self, start: int, stop: int) -> Batch:
        return Batch(self.indices[start:stop], self.attempts[start:stop], self.lines[start:stop])


@dataclass(slots=True)
class Failure:
    """An attempt that ended badly; ``error`` is ``{"kind", "msg", "tail", ...}``."""

    index: int
    attempt: int
    line: bytes
    error: dict[str, Any]
    duration: float


@dataclass(slots=True)
class Successes:
    """Attempts that succeeded: items ``indices``, and ``rows``, the JSON array of their
    ``[index, attempt, duration, result]`` rows in the same order -- exactly the
    ``b`` of the journal's ``ok`` record (a view into the message they came in)."""

    indices: list[int]
    rows: bytes | memoryview


@dataclass(slots=True)
class HandBack:
    """An attempt given back to be run again, uncharged. ``started``: it had begun (its
    outcome died with whoever ran it), so it runs again under the next number; else
    it never began and runs under ``attempt`` itself."""

    index: int
    attempt: int
    line: bytes
    started: bool


@dataclass(slots=True)
class Outcomes:
    """What came back from one ``wait``.

    ``ok``: successes, in batches. ``requeued``: attempts handed back. ``events``:
    journal records the executor has to say (``worker`` died / started, records.py),
    recorded by the supervisor after the outcomes.
    """

    ok: list[Successes] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    requeued: list[HandBack] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)

    def __len__(self) -> int:
        succeeded = sum(len(done.indices) for done in self.ok)
        return succeeded + len(self.failed) + len(self.requeued)


class Executor(Protocol):
    """What the supervisor needs of a way to run attempts (and nothing more)."""

    @staticmethod
    def crash_evidence(job_dir: Path, state: Any, *, end_stragglers: bool = True) -> Any:
        """What the last session of the job, run by this kind of executor, was doing with
        the attempts ``state`` has open when it died (a ``slots.CrashEvidence``). Asked
        before this session starts anything; ``end_stragglers``: the caller holds the
        lock and may end what that session left running."""

    @staticmethod
    def discard_evidence(job_dir: Path) -> None:
        """Forget that evidence (the session it described is settled in the journal)."""

    def start(self) -> list[dict[str, Any]]:
        """Bring up the workers; return the journal records saying so (records.py)."""

    def capacity(self) -> int:
        """How many attempts ``submit`` may be given now."""

    def submit(self, batch: Batch) -> None:
        """Start these attempts, in order (the supervisor has journaled their start)."""

    def wait(self, timeout: float) -> Outcomes:
        """Whatever ended within ``timeout`` seconds; every submitted attempt comes back
        exactly once: as a success, a failure, or handed back (``requeued``)."""

    def started(self) -> list[int]:
        """Items whose attempt really started and has not come back (for a clean stop)."""

    def cancel(self) -> list[tuple[int, int, bytes]]:
        """Kill everything running; return what had not come back."""

    def shutdown(self) -> None:
        """Stop and reap the workers, and remove what the session kept for them (after an
        abort too: the abort's own record settles its open attempts, crashes.py rule 5;
        only a crash, which calls nothing, leaves crash evidence behind)."""


@dataclass
class _Worker:
    slot: int
    process: Any
    conn: Any
    pid: int = 0
    unit: Unit | None = None
    death_fd: int = -1  # readable once it has exited: a pidfd, or its sentinel (old kernels)
    queued: deque[Batch] = field(default_factory=deque)  # sent, in order; answered in order
    answered: int = 0  # how much of queued[0] has been answered
    held: int = 0  # items sent and not yet answered
    per_item: float = 0.0  # EWMA of an item's duration; 0 = unknown
    item_bytes: int = 0  # mean size of an item in the last batch sent; 0 = none yet
    kill_reason: str | None = None
    killed: bool = False  # SIGKILLed by us (once: see LocalExecutor._kill)
    sock: Any = None  # the pipe's socket, for writes that never wait (see LocalExecutor._send)
    outgoing: deque[memoryview] = field(default_factory=deque)  # framed, not yet taken by the pipe
    poll_events: int = select.POLLIN
    # lanes (map.concurrency > 1): what it holds, by item -- it answers in any order
    inflight: dict[int, tuple[int, bytes]] | None = None
    retiring: bool = False  # it asked to be replaced: send nothing, stop it once it is empty
    kill_item: int = -1  # the item whose lane outran its timeout (kill_reason "timeout")

    def take_answered(self, count: int) -> Batch:
        """Drop the next ``count`` attempts this worker holds (it answered them), in order."""
        if count > self.held:
            raise RuntimeError(f"worker {self.pid} answered for {count} items, held {self.held}")
        parts: list[Batch] = []
        need = count
        while need:
            if not self.queued:
                raise RuntimeError(f"worker {self.pid} answered for items it was never sent")
            head = self.queued[0]
            start = self.answered
            stop = min(len(head), start + need)
            parts.append(head if start == 0 and stop == len(head) else head.part(start, stop))
            need -= stop - start
            if stop == len(head):
                self.queued.popleft()
                self.answered = 0
            else:
                self.answered = stop
        self.held -= count
        return parts[0] if len(parts) == 1 else _joined(parts)

    def unanswered(self) -> Batch:
        """Everything this worker holds that it has not answered, in order."""
        if self.inflight is not None:
            held = self.inflight.items()
            return Batch(
                [index for index, _ in held],
                [attempt for _, (attempt, _) in held],
                [line for _, (_, line) in held],
            )
        rest = [self.queued[0].part(self.answered, len(self.queued[0]))] if self.queued else []
        rest.extend(list(self.queued)[1:])
        return _joined(rest)

    def take_rest(self) -> Batch:
        """``unanswered()``, which this worker no longer holds."""
        rest = self.unanswered()
        if self.inflight is not None:
            self.inflight.clear()
        self.queued.clear()
        self.outgoing.clear()
        self.answered = self.held = 0
        return rest


@dataclass(slots=True)
class Answer:
    """One message of a worker (its format: worker.py): ``count`` attempts ended in
    ``duration`` seconds; ``failures`` ``[index, attempt, duration, error]``; ``rows``
    the encoded rows of the others, as the journal's ``ok`` record stores them."""

    count: int
    duration: float
    failures: list[list[Any]]
    rows: bytes | memoryview

    @classmethod
    def decode(cls, message: bytes | bytearray) -> Answer:
        """``message`` read, its rows kept as a view (large results are not copied)."""
        cut = message.index(b"\n")
        count, duration, failures = orjson.loads(memoryview(message)[:cut])
        return cls(count, duration, failures, memoryview(message)[cut + 1 :])

    def sort(self, answered: Batch, pid: int, outcomes: Outcomes) -> None:
        """File these outcomes of ``answered`` (the next ``count`` attempts the worker
        ``pid`` held, in order) into ``outcomes``: failures each with its own line and
        the worker's pid, successes as one ``Successes``."""
        succeeded = answered
        if self.failures:
            line_of = dict(zip(answered.indices, answered.lines))
            for index, attempt, duration, error in self.failures:
                error["pid"] = pid
                failure = Failure(index, attempt, line_of.pop(index), error, duration)
                outcomes.failed.append(failure)
            kept = [k for k, index in enumerate(answered.indices) if index in line_of]
            succeeded = Batch(
                [answered.indices[k] for k in kept],
                [answered.attempts[k] for k in kept],
                [answered.lines[k] for k in kept],
            )
        if succeeded.indices:
            if _first_index(self.rows) != succeeded.indices[0]:
                raise RuntimeError(
                    f"worker {pid} answered out of order: {bytes(self.rows[:40])!r}..."
                )
            outcomes.ok.append(Successes(succeeded.indices, self.rows))


def _joined(parts: list[Batch]) -> Batch:
    joined = Batch([], [], [])
    for part in parts:
        joined.indices += part.indices
        joined.attempts += part.attempts
        joined.lines += part.lines
    return joined


def _framed(parts: list[bytes]) -> bytes:
    """``parts`` as one message in the framing ``Connection.recv_bytes`` reads (the
    worker's side): a 4-byte big-endian length, or -1 and an 8-byte length past 2 GiB."""
    size = sum(map(len, parts))
    prefix = struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
    return b"".join([prefix, *parts])


def _received(sock: socket.socket) -> bytearray:
    """The next message on ``sock`` (the worker's end writes it as ``Connection.send_bytes``
    does, see ``_framed``), read into one buffer of its size: ``recv_bytes`` would grow a
    ``BytesIO`` and copy it out, holding twice a large result. Raises ``EOFError`` at end
    of file, ``OSError`` if the pipe broke."""
    (size,) = struct.unpack("!i", _exactly(sock, 4))
    if size == -1:
        (size,) = struct.unpack("!Q", _exactly(sock, 8))
    return _exactly(sock, size)


def _exactly(sock: socket.socket, size: int) -> bytearray:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        n = sock.recv_into(view[got:])
        if n == 0:
            raise EOFError
        got += n
    return buffer


def _death_fd(process: Any) -> int:
    """A descriptor readable once ``process`` (our child) has exited: a pidfd, which no
    other process can hold open, or its sentinel pipe on a kernel before 5.3."""
    try:
        return os.pidfd_open(process.pid)
    except (OSError, AttributeError):
        return process.sentinel


def _first_index(rows: bytes | memoryview) -> int | None:
    """The index of the first row of an encoded ``[[index, ...], ...]`` array (a cheap
    check that a worker answered in order), None for an empty array."""
    start = bytes(rows[:32])
    end = start.find(b",", 2)
    return int(start[2:end]) if start.startswith(b"[[") and end > 2 else None


def _started_prefix(rest: Batch, index: int, attempt: int) -> int:
    """How many of ``rest`` a worker started, given its slot's last (``index``, ``attempt``):
    it runs in order, so all up to that one and none after it (0 if it is not there)."""
    for position, (i, a) in enumerate(zip(rest.indices, rest.attempts)):
        if i == index and a == attempt:
            return position + 1
    return 0


# Sessions may run on several threads of one process. A fork copies every descriptor
# open at that instant, so a worker forked by one session while another session is
# between its own fork and closing its copy of the child's pipe ends would hold that
# worker's death sentinel open: its death would go unseen. Forks take turns.
_FORKING = threading.Lock()


class LocalExecutor:
    """N forked worker processes on this machine."""

    def __init__(
        self, config: WorkerConfig, workers: int, slots_path: Path | None = None, items: int = 0
    ) -> None:
        """``slots_path``: where the session's slot file goes, with a begun-table entry
        for each of the job's ``items`` (see slots.py); it is created by ``start``."""
        self.config = config
        self.n = workers
        self.lanes = config.concurrency
        self._slots_path = slots_path
        self._items = items
        self.slots: SlotTable | None = None
        self.workers: list[_Worker | None] = [None] * workers
        self._events: list[dict[str, Any]] = []  # for the next start() or wait() to return
        self._ctx = multiprocessing.get_context("fork")
        self._timeout = config.timeout
        self._next_check = 0.0
        self._poller = select.poll()
        self._by_fd: dict[int, tuple[_Worker, bool]] = {}  # fd -> (worker, is its death fd)
        # the job directory: the slot file's (a previous session's leftovers are found by it)
        self.containment = Containment(slots_path.parent if slots_path is not None else None)

    # -- crash evidence --------------------------------------------------
    @staticmethod
    def crash_evidence(job_dir: Path, state: Any, *, end_stragglers: bool = True) -> Any:
        """From the slot file the crashed session's workers left (slots.crash_evidence)."""
        return slots.crash_evidence(job_dir, state, end_stragglers=end_stragglers)

    @staticmethod
    def discard_evidence(job_dir: Path) -> None:
        slots.discard(job_dir)

    # -- lifecycle -------------------------------------------------------
    def start(self) -> list[dict[str, Any]]:
        """End what a crashed session of this job left (containment), create this
        session's slot file (a new one: see slots.py), fork the workers."""
        self.containment.start()
        self.slots = SlotTable(self.n, self._slots_path, self._items, lanes=self.lanes)
        for slot in range(self.n):
            self._spawn(slot)
        started, self._events = self._events, []
        return started

    def _spawn(self, slot: int) -> _Worker:
        self.slots.reset(slot)
        parent_end, child_end = self._ctx.Pipe(duplex=True)
        unit = self.containment.new_unit(slot)
        process = self._ctx.Process(
            target=worker_main,
            args=(self.config, self.slots, slot, child_end, os.getpid(), unit),
            name=f"mrpool-worker-{slot}",
            daemon=True,
        )
        with _FORKING:  # one fork at a time: a sibling session's pipe ends must not leak in
            process.start()
            self.containment.attach(process.pid)
            self.slots.register(slot, process.pid)  # on record before it is sent anything
            child_end.close()
        worker = self.workers[slot] = _Worker(slot, process, parent_end, process.pid, unit)
        if self.lanes > 1:
            worker.inflight = {}
        worker.death_fd = _death_fd(process)
        worker.sock = socket.socket(fileno=os.dup(parent_end.fileno()))
        for fd, is_death in ((parent_end.fileno(), False), (worker.death_fd, True)):
            self._by_fd[fd] = (worker, is_death)
            self._poller.register(fd, select.POLLIN)
        self._events.append(records.worker_started(process.pid, slot))
        return worker

    def _forget(self, w: _Worker) -> None:
        """Stop polling ``w`` (reaped), release its pipe and death fd, end what its
        incarnation left and drop its containment."""
        for fd in (w.conn.fileno(), w.death_fd):
            self._by_fd.pop(fd, None)
            self._poller.unregister(fd)
        if w.death_fd != w.process.sentinel:
            os.close(w.death_fd)
        w.conn.close()
        w.sock.close()
        w.process.close()
        self.workers[w.slot] = None
        if w.unit is not None:
            self.containment.release(w.unit, w.pid)

    def _reaped(self, w: _Worker, timeout: float) -> bool:
        """Whether ``w`` exits within ``timeout`` seconds; it is reaped if so."""
        if w.process.exitcode is not None:
            return True
        poller = select.poll()
        poller.register(w.death_fd, select.POLLIN)
        poller.poll(max(0.0, timeout) * 1000.0)
        return w.process.exitcode is not None

    def shutdown(self) -> None:
        """Stop every worker: ask politely, then SIGKILL what lingers. Reap all, and
        remove the slot file (see ``Executor.shutdown``)."""
        try:
            live = [w for w in self.workers if w is not None]
            for w in live:
                if w.outgoing:  # work still on its way to it: nothing to finish politely
                    self._kill(w)
                    continue
                try:
                    w.conn.send_bytes(b"")  # "exit"; its pipe is drained, this cannot wait
                except OSError:
                    pass
            deadline = time.monotonic() + 1.0
            for w in live:
                if not self._reaped(w, deadline - time.monotonic()):
                    self._kill(w)
                    self._reaped(w, 5.0)
                self._forget(w)
            if self.slots is not None:
                self.slots.close()
        finally:
            self.containment.close()  # whatever is left of the session ends here

    def started(self) -> list[int]:
        """Items a worker has started whose outcome has not been delivered yet.

        For the clean stop, which cancels everything next: the workers are killed
        first, so that none can begin another attempt after its slot was read."""
        for w in self.workers:
            if w is not None:
                self._kill(w)
        for w in self.workers:
            if w is not None:
                w.process.join(2.0)
        found: list[int] = []
        for w in self.workers:
            if w is None or not w.held:
                continue
            if w.inflight is not None:
                running = self._running_lanes(w)
                found.extend(
                    index
                    for index, (attempt, _) in w.inflight.items()
                    if running.get(index, (0,))[0] == attempt or self._began(index, attempt)
                )
                continue
            view = self.slots.read(w.slot)
            rest = w.unanswered()
            found.extend(rest.indices[: _started_prefix(rest, view.index, view.attempt)])
        return found

    def cancel(self) -> list[tuple[int, int, bytes]]:
        """Kill every worker mid-attempt (Ctrl-C); return what they held, unfinished."""
        lost: list[tuple[int, int, bytes]] = []
        for w in self.workers:
            if w is None:
                continue
            self._kill(w)
            self._reaped(w, 2.0)
            rest = w.take_rest()
            lost.extend(zip(rest.indices, rest.attempts, rest.lines))
        return lost

    def _kill(self, w: _Worker) -> None:
        """SIGKILL ``w`` and everything its incarnation started (it is not reaped yet).
        Once only: after that its pid and its slot's child pid may be someone else's."""
        if w.killed:
            return
        w.killed = True
        if w.process.exitcode is None and w.unit is not None:
            self.containment.end_unit(w.unit, w.pid)

    # -- dispatch --------------------------------------------------------
    def _batch_size(self, w: _Worker) -> int:
        """Items a message holds: ~``BATCH_SECONDS`` of work, and at most ``MAX_BATCH_BYTES``
        of items (100 KB items that take 50 us each would otherwise be sent 400 at a time,
        800 held per worker: 80 MB each, in the supervisor and in the worker)."""
        if w.per_item <= 0:
            return 1
        by_bytes = MAX_BATCH_BYTES // w.item_bytes if w.item_bytes else MAX_BATCH
        return max(1, min(MAX_BATCH, by_bytes, int(BATCH_SECONDS / w.per_item)))

    def _room(self, w: _Worker) -> int:
        """Items ``w`` may be sent now. Fast items keep one batch queued behind the running
        one, and go out a whole batch or more at a time: topping up a few items at a time
        as outcomes trickle back costs a message, a start record and a worker wake-up
        each (with millisecond items, batches several times smaller: NOTES.md)."""
        if w.inflight is not None:  # lanes: all busy, and as many more waiting in its queue
            return 0 if w.retiring else max(0, 2 * self.lanes - w.held)
        size = self._batch_size(w)
        if size == 1:
            return max(0, 1 - w.held)
        room = 2 * size - w.held
        return room if room >= size else 0

    def capacity(self) -> int:
        return sum(self._room(w) for w in self.workers if w is not None)

    def running(self) -> int:
        """Attempts running now, for the progress line: a worker with lanes holds up to
        2K, of which at most K run (all K while any waits: it starts one as a lane frees)."""
        cap = self.lanes if self.lanes > 1 else 1
        return sum(min(w.held, cap) for w in self.workers if w is not None)

    def submit(self, batch: Batch) -> None:
        """Hand ``batch`` out to workers with room, in order, one message per worker batch.

        Room for two batches goes out as two messages, not one: a worker answers a
        message when it has run all of it, so with one big message it would finish,
        answer and then sit idle for a whole round trip (its answer read, journaled,
        the next batch sent); with two, the second is waiting in its pipe (with no-op
        items a worker spent a large share of its time waiting: NOTES.md).

        With lanes, idle lanes are filled first, across all workers, and only then
        their queues: otherwise the first worker would take 2K items and run K of
        them while the next worker's lanes sat idle (4 slow items, 2 workers x 2
        lanes: 2 at a time, not 4)."""
        start, total = 0, len(batch)
        if self.lanes > 1:
            for w in self.workers:
                if w is None or w.inflight is None or start >= total:
                    continue
                free = min(self._room(w), self.lanes - w.held)
                if free > 0:
                    stop = min(total, start + free)
                    self._send(w, batch if stop - start == total else batch.part(start, stop))
                    start = stop
        while start < total:
            progressed = False
            for w in self.workers:
                if w is None or start >= total:
                    continue
                room = self._room(w)
                if room:
                    stop, size = min(total, start + room), self._batch_size(w)
                    for first in range(start, stop, size):
                        last = min(stop, first + size)
                        self._send(w, batch if last - first == total else batch.part(first, last))
                    start = stop
                    progressed = True
            if not progressed:
                raise RuntimeError("submit() was given more attempts than capacity()")

    def _send(self, w: _Worker, batch: Batch) -> None:
        """Queue ``batch`` for ``w`` and write as much of it as its pipe takes now.

        The supervisor never waits on a write: a worker blocked sending us its
        outcomes reads nothing until we read them, so a blocking write of a big
        batch (large items) into its full pipe would deadlock the two. What the
        pipe does not take now is written when poll says there is room."""
        header = orjson.dumps([batch.indices, batch.attempts])
        if w.inflight is not None:
            w.inflight.update(zip(batch.indices, zip(batch.attempts, batch.lines)))
        else:
            w.queued.append(batch)
        w.held += len(batch)
        message = _framed([header, b"\n", *batch.lines])  # lines end in LF
        w.item_bytes = len(message) // len(batch)
        w.outgoing.append(memoryview(message))
        self._write_out(w)

    def _write_out(self, w: _Worker) -> None:
        while w.outgoing:
            view = w.outgoing[0]
            try:
                sent = w.sock.send(view, socket.MSG_DONTWAIT)
            except BlockingIOError:
                break
            except OSError:  # it died: its sentinel fires in wait(), its batches are handed back
                w.outgoing.clear()
                break
            if sent < len(view):
                w.outgoing[0] = view[sent:]
                break
            w.outgoing.popleft()
        events = select.POLLIN | (select.POLLOUT if w.outgoing else 0)
        if events != w.poll_events:
            self._poller.modify(w.conn.fileno(), events)
            w.poll_events = events

    # -- collecting ------------------------------------------------------
    def wait(self, timeout: float) -> Outcomes:
        """Outcomes that arrived within ``timeout`` seconds (possibly none)."""
        outcomes = Outcomes()
        lost: list[_Worker] = []
        for fd, event in self._poller.poll(timeout * 1000.0):
            w, is_death = self._by_fd[fd]
            if is_death:
                lost.append(w)
                continue
            if event & select.POLLOUT:
                self._write_out(w)
            if event & ~select.POLLOUT:  # a message, or its end of file
                self._receive(w, outcomes)
        for w in lost:
            self._worker_lost(w, outcomes)
        if self.lanes > 1:
            for w in self.workers:
                if w is not None and w.retiring and not w.held and not w.outgoing:
                    self._retire(w)
        if time.monotonic() >= self._next_check:
            self._check_deadlines()
            self._next_check = time.monotonic() + 0.05
        if self._events:
            outcomes.events, self._events = self._events, []
        return outcomes

    def _receive(self, w: _Worker, outcomes: Outcomes) -> bool:
        """Read one message of ``w`` (poll said there is one): the outcomes of the next
        attempts it holds. False at end of file."""
        try:
            message = _received(w.sock)
        except (EOFError, OSError):
            return False  # it died (mid-send): _worker_lost attributes what is left
        if w.inflight is not None:
            cut = message.index(b"\n")
            head, rows = memoryview(message)[:cut], memoryview(message)[cut + 1 :]
            self._receive_lanes(w, orjson.loads(head), rows, outcomes)
            return True
        answer = Answer.decode(message)
        answer.sort(w.take_answered(answer.count), w.pid, outcomes)
        mean = answer.duration / answer.count
        w.per_item = mean if w.per_item <= 0 else 0.7 * w.per_item + 0.3 * mean
        return True

    def _receive_lanes(self, w: _Worker, head: list, rows: bytes, outcomes: Outcomes) -> None:
        """``_receive`` for a worker with lanes: its attempts end in any order, so its
        header names the successes (see worker.py, ``_lanes_message``)."""
        count, _, failures, ok, retire = head
        inflight = w.inflight
        for index, attempt, duration, error in failures:
            held_attempt, line = inflight.pop(index)
            if held_attempt != attempt:
                raise RuntimeError(f"worker {w.pid} answered attempt {attempt} of {index}")
            error["pid"] = w.pid
            outcomes.failed.append(Failure(index, attempt, line, error, duration))
        for index in ok:
            if inflight.pop(index, None) is None:
                raise RuntimeError(f"worker {w.pid} answered for item {index}, never sent")
        if ok:
            outcomes.ok.append(Successes(ok, rows))
        w.held -= count
        if retire:
            w.retiring = True

    def _retire(self, w: _Worker) -> None:
        """Stop a worker that asked to be replaced (an attempt's thread it could not stop
        runs on in it) once it holds nothing, and start a new one in its slot."""
        try:
            w.conn.send_bytes(b"")  # "exit": it ends, and the thread with it
        except OSError:
            pass
        if not self._reaped(w, 2.0):
            self._kill(w)
            self._reaped(w, 5.0)
        self._events.append(records.worker_died(w.pid, w.slot, w.process.exitcode, "retired"))
        self._forget(w)
        self._spawn(w.slot)

    def _running_lanes(self, w: _Worker) -> dict[int, tuple[int, float]]:
        """``{index: (attempt, started)}`` of what ``w``'s lanes show running."""
        running = {}
        for lane in range(self.lanes):
            view = self.slots.read(w.slot, lane)
            if view.state == RUNNING:
                running[view.index] = (view.attempt, view.started)
        return running

    def _began(self, index: int, attempt: int) -> bool:
        """Whether a worker began this attempt (unknown without a begun table: assume so)."""
        return not self._items or self.slots.began(index) == attempt

    def _worker_lost(self, w: _Worker, outcomes: Outcomes) -> None:
        """The crash path: attribute the held item, hand back the rest, replace the worker."""
        while w.conn.poll() and self._receive(w, outcomes):
            pass  # what it sent before it died
        view = self.slots.read(w.slot)
        running = self._running_lanes(w) if w.inflight is not None else {}
        self._reaped(w, 1.0)  # its death fd fired: it has exited
        code = w.process.exitcode
        if w.unit is not None:
            self.containment.end_unit(w.unit)  # what it started dies with it
        if w.inflight is not None:
            self._lanes_lost(w, code, running, outcomes)
        else:
            self._slot_lost(w, code, view, outcomes)
        self._events.append(records.worker_died(w.pid, w.slot, code, w.kill_reason))
        self._forget(w)
        self._spawn(w.slot)

    def _lanes_lost(
        self, w: _Worker, code: int | None, running: dict[int, tuple[int, float]], outcomes
    ) -> None:
        """A worker with lanes died: every attempt its lanes show running failed with it
        (exactly those: a worker holding K charges K); of the rest it held, those it had
        begun (the begun table says so) lost their outcome and take the next number,
        those it never reached run again under the same one."""
        now = time.monotonic()
        rest = w.take_rest()
        for index, attempt, line in zip(rest.indices, rest.attempts, rest.lines):
            lane = running.get(index)
            if lane is not None and lane[0] == attempt:
                error = self._death_error(w, code, index)
                outcomes.failed.append(Failure(index, attempt, line, error, now - lane[1]))
            else:
                outcomes.requeued.append(
                    HandBack(index, attempt, line, self._began(index, attempt))
                )

    def _slot_lost(self, w: _Worker, code: int | None, view, outcomes: Outcomes) -> None:
        rest = w.take_rest()
        started = _started_prefix(rest, view.index, view.attempt)
        for position, (index, attempt, line) in enumerate(
            zip(rest.indices, rest.attempts, rest.lines)
        ):
            if position == started - 1 and view.state == RUNNING:
                ran = time.monotonic() - view.started
                error = self._death_error(w, code)
                outcomes.failed.append(Failure(index, attempt, line, error, ran))
            else:  # started (its outcome died with the worker): a new attempt; else the same one
                outcomes.requeued.append(HandBack(index, attempt, line, position < started))

    def _death_error(self, w: _Worker, code: int | None, index: int = -1) -> dict[str, Any]:
        if w.kill_reason == "timeout" and index != w.kill_item and w.inflight is not None:
            message = (
                "worker killed: another of its attempts outran its timeout "
                f"by over {LANE_TIMEOUT_GRACE:g} s without yielding"
            )
            return records.error("worker_died", message, pid=w.pid)
        if w.kill_reason == "timeout":
            return records.error("timeout", f"timed out after {self._timeout:g} s", pid=w.pid)
        if w.kill_reason == "hung":
            message = f"worker hung: no heartbeat for {HUNG_AFTER:g} s"
            return records.error("hung", message, pid=w.pid)
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "?"
            msg = f"worker died: signal {-code} ({name})"
        else:
            msg = f"worker died: exit status {code}"
        return records.error(
            "worker_died", msg, pid=w.pid, signal=-code if code and code < 0 else None
        )

    def _check_deadlines(self) -> None:
        """Kill a worker whose attempt outran its timeout, or that stopped heartbeating."""
        now = time.monotonic()
        for w in self.workers:
            if w is None or w.kill_reason:
                continue
            if w.inflight is not None and self._timeout is not None:
                # Each lane's own timeout is enforced in the worker; this is the backstop
                # for one that cannot be (a blocking call inside an async def).
                for index, (_, started) in self._running_lanes(w).items():
                    if now - started > self._timeout + LANE_TIMEOUT_GRACE:
                        w.kill_reason, w.kill_item = "timeout", index
                        self._kill(w)
                        break
                if w.kill_reason:
                    continue
            view = self.slots.read(w.slot)
            if view.state == RUNNING and self._timeout is not None and w.inflight is None:
                # A command's own timeout is enforced in the worker; this is the backstop.
                grace = 0.2 if self.config.callable else 5.0
                if now - view.started > self._timeout + grace:
                    w.kill_reason = "timeout"
                    self._kill(w)
                    continue
            if view.heartbeat and now - view.heartbeat > HUNG_AFTER:
                w.kill_reason = "hung"
                self._kill(w)
