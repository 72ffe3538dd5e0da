"""A worker process: runs the attempts the supervisor sends, one after another (or K at once).

Protocol on the worker's own pipe (``multiprocessing`` Connection, bytes):

* supervisor -> worker: a *batch*: ``orjson([indices, attempts]) LF`` then
  the items' lines from ``items.jsonl`` in the same order. An empty message
  means "exit".
* worker -> supervisor: the outcomes of the next attempts of what it was sent,
  in order: ``orjson([count, duration, failures]) LF orjson(successes)``.
  ``count`` attempts ended, taking ``duration`` seconds in all; ``failures``
  holds a ``[index, attempt, duration, failure]`` row for each that failed
  (``failure`` is ``{"kind", "msg", "tail", "code"?, "signal"?}``), and
  ``successes`` is the array of ``[index, attempt, duration, result]`` rows of
  the others -- the very rows the journal's ``ok`` record stores, which the
  supervisor journals as they are, without decoding them. Outcomes are sent
  when a batch ends or 20 ms after the previous send, so fast items travel in
  bulk and a slow item is reported the moment it ends.
* With ``concurrency`` K > 1 (``_Lanes``) a worker runs up to K attempts at
  once, one per lane of its slot, and they end in any order: its header is
  ``[count, duration, failures, ok, retire]``, ``ok`` the successes' indices in
  the order of their rows, ``retire`` true once it asks to be replaced (an
  attempt's thread it could not stop runs on in it).

Before each attempt the worker writes the item into its shared slot, and a
watchdog thread heartbeats every 0.1 s; if the supervisor disappears (its pid
is no longer our parent), the watchdog kills everything the worker started and
exits, so nothing runs on unsupervised.

First thing after the fork a worker enters its containment (containment.py:
its own cgroup, or the session's token in its environment) and becomes a child
subreaper, so whatever its attempts leave running in the background is its
child, killed after each command attempt and when the worker exits.
"""

from __future__ import annotations

import codecs
import ctypes
import functools
import inspect
import linecache
import mmap
import os
import select
import shutil
import signal
import struct
import sys
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass
from operator import itemgetter
from typing import Any

import orjson
import psutil

from . import failpoints, gc_policy
from .containment import Unit
from .containment import die_with_parent as _die_with_parent  # even mid C call holding the GIL
from .dlq import error_signature
from .items import identity_text
from .records import encode_rows
from .slots import SlotTable
from .spec import argv_renderer, resolve_callable

__all__ = ["WorkerConfig", "worker_main", "kill_tree"]

TAIL_BYTES = 2048  # of stderr, or of a callable's traceback, kept per failed attempt
# Linux limits one environment string ("NAME=value" and its NUL) to 32 pages, 128 KiB:
# a larger item is given on stdin only, without MRPOOL_ITEM.
ENV_ITEM_MAX = 32 * 4096 - len("MRPOOL_ITEM=") - 1
FLUSH_EVERY = 0.02
_PR_SET_CHILD_SUBREAPER = 36
_duration = itemgetter(2)


@dataclass(frozen=True)
class WorkerConfig:
    job_id: str
    base_dir: str
    command: list[str] | None
    callable: str | None
    timeout: float | None
    concurrency: int = 1  # attempts run at once (lanes); 1: one after another, in order


def worker_main(
    config: WorkerConfig,
    slots: SlotTable,
    slot: int,
    conn,
    parent_pid: int,
    unit: Unit | None = None,
) -> None:
    """Entry point of a forked worker process."""
    if unit is not None:  # before anything runs: all it starts is contained
        unit.enter(forks_die_with_worker=unit.cgroup is None and bool(config.callable))
    _adopt_orphans()
    gc_policy.for_user_code()
    signal.signal(signal.SIGINT, _ignore)  # the supervisor decides what Ctrl-C means
    signal.signal(signal.SIGTERM, lambda *_: _exit_now())
    pid = os.getpid()
    slots.claim(slot, pid)
    if config.callable:
        _die_with_parent()
    threading.Thread(target=_watchdog, args=(slots, slot, parent_pid), daemon=True).start()
    outbox = _Outbox(conn, lanes=config.concurrency)
    threading.Thread(target=outbox.send_every_interval, daemon=True).start()
    if config.concurrency > 1:
        _Lanes(config, slots, slot, outbox).serve(conn)
        outbox.send()
        _end_descendants()
        os._exit(0)
    run_batch = _batch_runner(config, slots, slot, outbox)
    while True:
        try:
            message = conn.recv_bytes()
        except (EOFError, OSError):
            break
        if not message:
            break
        header, _, body = message.partition(b"\n")
        indices, attempts = orjson.loads(header)
        run_batch(indices, attempts, body)
        outbox.send()
    _end_descendants()  # a clean finish: what a callable forked ends with the job
    os._exit(0)


class _Outbox:
    """Rows of finished attempts on their way to the supervisor.

    The hot loop appends to ``rows``, with no lock: successes whose result cannot
    change after return (``_KEPT_AS_IS``) as ``[index, attempt, duration, result]``,
    encoded with their whole message in one ``orjson.dumps``; failures as
    ``[index, attempt, duration, failure, 1]``; and successes whose result could
    change after return (a dict, a list), encoded at return by ``add_encoded`` into
    a shared buffer, as ``(buffer, start, end, duration)``. Messages go out when a
    batch ends, when the loop sees ``FLUSH_EVERY`` has passed, or from a thread
    every ``FLUSH_EVERY`` while a slow attempt runs -- so fast items travel in bulk
    and a slow item's predecessors are reported without waiting for it. The sender
    takes a prefix of ``rows`` (the loop only ever appends) and gives the loop a new
    buffer; a row already pointing into the old one stays valid."""

    def __init__(self, conn, lanes: int = 1) -> None:
        self.conn = conn
        self.rows: list[Any] = []
        self.buffer = bytearray()
        self.last_send = time.monotonic()
        self._sending = threading.Lock()
        self.lanes = lanes
        self.retire = False  # lanes: an attempt's thread could not be stopped (see _Lanes)

    def add_encoded(
        self, index: int, attempt: int, duration: float, result: Any
    ) -> dict[str, Any] | None:
        """Record a success whose result is encoded now, as it is at return; if it is not
        JSON, nothing is recorded and the failure to record instead is returned."""
        try:
            row = orjson.dumps([index, attempt, duration, result])
        except TypeError as e:  # orjson.JSONEncodeError
            return _not_json(e)
        buffer = self.buffer  # the sender may swap in a new one at any moment: use this one
        start = len(buffer)
        buffer += row  # copied: a batch of orjson's own outputs would cost a page fault each
        end = len(buffer)
        buffer.append(0x2C)  # ",": rows side by side in the buffer form an array's elements
        self.rows.append((buffer, start, end, duration))
        return None

    def send(self) -> None:
        with self._sending:
            if self.lanes > 1:  # lanes: rows in the order they ended (see _lanes_message)
                n = len(self.rows)
                if n:
                    if failpoints.ENABLED:
                        failpoints.hit("worker.before_send")
                    rows = self.rows[:n]
                    self.conn.send_bytes(_lanes_message(rows, self.retire))
                    del self.rows[:n]
            else:
                self._send_waiting()
            self.last_send = time.monotonic()

    def send_alone(self, index: int, attempt: int, duration: float, result: bytearray) -> None:
        """Send what waits, then one message for this success, whose result is already
        JSON (a large command output, ``_Encoded``): framed around it, never copied."""
        with self._sending:
            self._send_waiting()
            head = b"%s\n[%s," % (
                orjson.dumps([1, duration, []]),
                orjson.dumps([index, attempt, duration])[:-1],
            )
            result += b"]]"
            if failpoints.ENABLED:
                failpoints.hit("worker.before_send")
            _send_framed(self.conn, [head, result])
            self.last_send = time.monotonic()

    def _send_waiting(self) -> None:
        rows = self.rows  # the main loop appends meanwhile: send and drop only this prefix
        n = len(rows)
        if n:
            if failpoints.ENABLED:
                failpoints.hit("worker.before_send")
            taken = rows[:n]
            del rows[:n]
            if len(self.buffer):
                self.buffer = bytearray()
            self.conn.send_bytes(_outcomes_message(taken))

    def send_every_interval(self) -> None:
        while True:
            time.sleep(FLUSH_EVERY)
            try:
                self.send()
            except OSError:
                return


def _send_framed(conn, parts: list[Any]) -> None:
    """``parts`` as one message on ``conn``, in the framing ``Connection.recv_bytes`` reads
    (see executor._framed), each written as it is."""
    size = sum(map(len, parts))
    prefix = struct.pack("!i", size) if size <= 0x7FFFFFFF else struct.pack("!iQ", -1, size)
    fd = conn.fileno()
    for part in (prefix, *parts):
        view = memoryview(part)
        while view:
            view = view[os.write(fd, view) :]


def _encoded_rows(rows: list[Any]) -> tuple[bytes | memoryview, list[list[Any]], float]:
    """``(successes, failures, duration)`` of the outbox ``rows`` (see ``_Outbox``): the
    successes as JSON array elements without the brackets, the scalar ones encoded in
    one ``dumps`` a run; a success whose result turns out not to be JSON (a huge int, a
    lone surrogate) becomes its own attempt's failure."""
    kinds = set(map(type, rows))
    if tuple not in kinds:
        return _encoded_lists(rows)
    if list not in kinds:
        first, last = rows[0], rows[-1]
        if first[0] is last[0]:  # one buffer, appended in this order: one slice of it
            return first[0][first[1] : last[2]], [], sum(map(_encoded_duration, rows))
    duration = sum(row[3] if type(row) is tuple else row[2] for row in rows)
    parts: list[Any] = []
    failures: list[list[Any]] = []
    run: list[list[Any]] = []
    for row in rows:
        if type(row) is tuple:
            if run:
                body, failed, _ = _encoded_lists(run)
                parts.append(body)
                failures += failed
                run = []
            parts.append(row[0][row[1] : row[2]])
        else:
            run.append(row)
    if run:
        body, failed, _ = _encoded_lists(run)
        parts.append(body)
        failures += failed
    return b",".join(part for part in parts if part), failures, duration


def _encoded_duration(row: tuple) -> float:
    return row[3]


def _encoded_lists(rows: list[list[Any]]) -> tuple[bytes | memoryview, list[list[Any]], float]:
    """``_encoded_rows`` for rows that are all lists (no result encoded at return)."""
    duration = sum(map(_duration, rows))
    if sum(map(len, rows)) == 4 * len(rows):  # no failures: the common case
        failures: list[list[Any]] = []
        successes = rows
    else:
        failures = [row[:4] for row in rows if len(row) == 5]
        successes = [row for row in rows if len(row) == 4]
    try:
        # the journal's ok-record rows (records.py), journaled as sent
        return memoryview(encode_rows(successes))[1:-1], failures, duration
    except TypeError:
        pass
    parts = []
    for row in successes:
        try:
            parts.append(orjson.dumps(row))
        except TypeError as e:
            failures.append([*row[:3], _not_json(e)])
    return b",".join(parts), failures, duration


def _outcomes_message(rows: list[list[Any]]) -> bytes:
    """The message for ``rows`` alone (see ``_encoded_rows``, and the module doc)."""
    body, failures, duration = _encoded_rows(rows)
    return b"%s\n[%s]" % (orjson.dumps([len(rows), duration, failures]), body)


def _lanes_message(rows: list[list[Any]], retire: bool) -> bytes:
    """The message of a worker with lanes: as ``_outcomes_message``, its attempts in the
    order they ended (not the order sent), so the header also lists the successes'
    indices, and says whether the worker asks to be replaced (``retire``)."""
    duration = sum(map(_duration, rows))
    failures = [row[:4] for row in rows if len(row) == 5]
    successes = [row for row in rows if len(row) == 4]
    ok = [row[0] for row in successes]
    return b"%s\n%s" % (
        orjson.dumps([len(rows), duration, failures, ok, retire]),
        orjson.dumps(successes),
    )


class _Lanes:
    """Up to K attempts at once (``map.concurrency``), each in a lane of this worker's slot.

    An event loop on the main thread starts attempts as lanes free up, from the
    items the supervisor sent (a reader thread hands its messages over); each
    attempt is written into its lane before it starts and cleared after its row
    is in the outbox, as a single-lane worker does with its slot. Per kind:

    * ``async def`` callable: a task on the loop; past ``timeout`` it is
      cancelled and fails as ``timeout`` (its result, if it ever comes, is dropped).
    * plain callable: a thread of a pool of K. Python cannot stop a thread, so an
      attempt past ``timeout`` fails as ``timeout`` at once, its thread is
      abandoned (a fresh pool takes new attempts, the late result is dropped) and
      the worker asks to be replaced (``retire``): the supervisor sends it nothing
      more, lets its other attempts finish, then stops it -- which ends the thread.
    * command: a child process per attempt, spawned and waited for on a pool
      thread, in its own process group; past ``timeout`` its tree and its group
      are killed and it fails as ``timeout``; nothing else is touched. What a
      finished attempt left running (an orphan adopted by this subreaper, in no
      running attempt's group) is killed when the attempt ends.

    A blocking call inside an ``async def`` stalls the whole loop: the
    supervisor's backstop then kills the worker ``timeout`` + 5 s after the
    attempt started, and its attempts fail with it."""

    def __init__(self, config: WorkerConfig, slots: SlotTable, slot: int, outbox: _Outbox) -> None:
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        self._asyncio = asyncio
        self._pool_class = ThreadPoolExecutor
        self.config = config
        self.timeout = config.timeout
        self.outbox = outbox
        self.loop = asyncio.new_event_loop()
        self.writers = [slots.writer(slot, lane) for lane in range(config.concurrency)]
        self.free = list(range(config.concurrency - 1, -1, -1))  # lane 0 first
        self.waiting: deque[tuple[int, int, bytes]] = deque()
        self.running = 0
        self.closing = False
        self.pool = ThreadPoolExecutor(config.concurrency, thread_name_prefix="mrpool-lane")
        if config.command:
            self.kind = "command"
            self.run_command = _command_runner(config, slots, slot, lanes=config.concurrency)
        else:
            function = resolve_callable(config.callable, config.base_dir)
            self.function = function
            self.kind = "async" if inspect.iscoroutinefunction(function) else "thread"

    def serve(self, conn) -> None:
        """Run attempts until the supervisor says "exit" (or is gone) and none runs."""
        threading.Thread(target=self._read, args=(conn,), daemon=True).start()
        try:
            self.loop.run_forever()
        finally:
            self.pool.shutdown(wait=False)

    def _read(self, conn) -> None:
        while True:
            try:
                message = conn.recv_bytes()
            except (EOFError, OSError):
                message = b""
            self.loop.call_soon_threadsafe(self._received, message)
            if not message:
                return

    def _received(self, message: bytes) -> None:
        if not message:
            self.closing = True
        else:
            header, _, body = message.partition(b"\n")
            indices, attempts = orjson.loads(header)
            self.waiting.extend(zip(indices, attempts, body.split(b"\n")))
        self._start_more()

    def _start_more(self) -> None:
        monotonic = time.monotonic
        while self.waiting and self.free:
            lane = self.free.pop()
            index, attempt, line = self.waiting.popleft()
            started = monotonic()
            self.writers[lane][0](index, attempt, started)  # on record before it starts
            self.running += 1
            self.loop.create_task(self._attempt(lane, index, attempt, line, started))
        if self.closing and not self.running and not self.waiting:
            self.loop.stop()

    async def _attempt(self, lane: int, index: int, attempt: int, line: bytes, started: float):
        try:
            ok, payload = await self._outcome(lane, index, attempt, line)
        except Exception as e:  # noqa: BLE001 - ours, not the map's: still only this attempt
            ok, payload = False, _exception_failure(e)
        now = time.monotonic()
        if ok:
            ok, payload = _lane_result(payload)
        if ok:
            self.outbox.rows.append([index, attempt, now - started, payload])
        else:
            self.outbox.rows.append([index, attempt, now - started, payload, 1])
        self.writers[lane][1]()
        self.running -= 1
        self.free.append(lane)
        self._start_more()

    async def _outcome(self, lane: int, index: int, attempt: int, line: bytes):
        asyncio = self._asyncio
        if self.kind == "command":
            return await self.loop.run_in_executor(
                self.pool, self.run_command, index, attempt, line, lane
            )
        item = orjson.loads(line[line.index(b"\t") + 1 :])
        if self.kind == "async":
            work = asyncio.ensure_future(_awaited(self.function, item))
        else:
            work = self.loop.run_in_executor(self.pool, _called, self.function, item)
        done, _ = await asyncio.wait({work}, timeout=self.timeout)
        if done:
            return work.result()
        work.cancel()  # a task: cancelled; a thread's future: only its result is dropped
        work.add_done_callback(_drop_result)
        if self.kind == "thread":  # that thread runs on: replace the pool, then the worker
            self.outbox.retire = True
            self.pool.shutdown(wait=False)
            self.pool = self._pool_class(self.config.concurrency, thread_name_prefix="mrpool-lane")
        how = "cancelled" if self.kind == "async" else "its thread abandoned"
        return False, _failure("timeout", f"timed out after {self.timeout:g} s ({how})")


async def _awaited(function, item: Any) -> tuple[bool, Any]:
    try:
        result = await function(item)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a map's failure is data
        return False, _exception_failure(e)
    return _lane_result(result)


def _called(function, item: Any) -> tuple[bool, Any]:
    """One attempt of a plain callable on a lane's thread (the traceback is this thread's)."""
    try:
        result = function(item)
    except (Exception, SystemExit) as e:  # noqa: BLE001 - a map's failure is data
        return False, _exception_failure(e)
    return _lane_result(result)


def _drop_result(future) -> None:
    """Read a timed-out attempt's late end, so that nothing reports it unread."""
    if not future.cancelled():
        future.exception()


def _batch_runner(config: WorkerConfig, slots: SlotTable, slot: int, outbox: _Outbox):
    """``run_batch(indices, attempts, body)``: run a batch's attempts in order, each one
    announced in the slot before it starts, its row in the outbox when it ends."""
    begin, end = slots.writer(slot)
    if config.command:
        run_one = _command_runner(config, slots, slot)
    else:
        function = resolve_callable(config.callable, config.base_dir)  # mrpool.map: no import
        if inspect.iscoroutinefunction(function):  # one attempt at a time, on a loop of its own
            function = _on_own_loop(function)
        run_one = _callable_runner(function)

    def run_each(indices: list[int], attempts: list[int], body: bytes) -> None:
        rows, monotonic = outbox.rows, time.monotonic
        for index, attempt, line in zip(indices, attempts, body.split(b"\n")):
            started = monotonic()
            begin(index, attempt, started)
            ok, payload = run_one(index, attempt, line)
            now = monotonic()
            if not ok:
                _signed(payload, line)
            _record(rows, outbox, index, attempt, now - started, ok, payload)
            end()
            if now - outbox.last_send >= FLUSH_EVERY:
                outbox.send()

    def run_callables(indices: list[int], attempts: list[int], body: bytes) -> None:
        """The hot loop for callables: one decode for the batch, and per attempt only the
        user's function, the slot's begin/end, one clock read and the row."""
        items = _decoded_items(body, len(indices))
        if items is None:
            run_each(indices, attempts, body)
            return
        append, add_encoded, monotonic = outbox.rows.append, outbox.add_encoded, time.monotonic
        line_of: dict[int, bytes] | None = None  # made at the batch's first failure
        now = monotonic()
        for index, attempt, item in zip(indices, attempts, items):
            started = now  # the previous attempt's end: one clock read an attempt
            begin(index, attempt, started)
            try:
                result = function(item)
            except (Exception, SystemExit) as e:  # noqa: BLE001 - a map's failure is data
                failure = _exception_failure(e)
                if line_of is None:
                    line_of = dict(zip(indices, body.split(b"\n")))
                _signed(failure, line_of[index])
                now = monotonic()
                append([index, attempt, now - started, failure, 1])
            else:
                now = monotonic()
                if type(result) in _KEPT_AS_IS:
                    append([index, attempt, now - started, result])
                else:
                    failure = add_encoded(index, attempt, now - started, result)
                    if failure is not None:
                        append([index, attempt, now - started, failure, 1])
            end()
            if now - outbox.last_send >= FLUSH_EVERY:
                outbox.send()

    return run_each if config.command else run_callables


def _signed(failure: dict[str, Any], line: bytes) -> None:
    """Add the failure's error signature (dlq.py), computed here, off the supervisor, for
    the item on ``line``: ``dlq list`` then reads it instead of computing one per item."""
    try:
        item_id = orjson.loads(line[: line.index(b"\t")])
    except ValueError:  # not a line ingest wrote: the reader computes it
        return
    failure["sig"] = error_signature(failure["kind"], failure["msg"], identity_text(item_id))[0]


def _record(
    rows: list, outbox: _Outbox, index: int, attempt: int, duration: float, ok: bool, payload: Any
) -> None:
    """The row of one finished attempt (``run_each``'s part of the hot loop above)."""
    if not ok:
        rows.append([index, attempt, duration, payload, 1])
    elif type(payload) in _KEPT_AS_IS:
        rows.append([index, attempt, duration, payload])
    elif type(payload) is _Encoded:
        outbox.send_alone(index, attempt, duration, payload.data)
    else:
        failure = outbox.add_encoded(index, attempt, duration, payload)
        if failure is not None:
            rows.append([index, attempt, duration, failure, 1])


# Results that cannot change after return: they wait for the send as they are, and
# are encoded with the whole message in one dumps. (One that cannot be encoded -- an
# int past 64 bits, a lone surrogate -- is found then and fails its own attempt.)
# Anything else (a dict, a list, ...) may be changed by later calls, so it is
# encoded at return (``_Outbox.add_encoded``).
_KEPT_AS_IS = frozenset({type(None), bool, float, int, str, orjson.Fragment})


def _lane_result(result: Any) -> tuple[bool, Any]:
    """A lane's result made safe to hold until its message is sent (lanes run attempts
    side by side, so nothing is encoded into a shared buffer): encoded now unless it is
    None, a bool or a float; an unencodable one fails its own attempt."""
    if type(result) is _Encoded:
        return True, orjson.Fragment(bytes(result.data))
    if type(result) in (type(None), bool, float, orjson.Fragment):
        return True, result
    try:
        return True, orjson.Fragment(orjson.dumps(result))
    except TypeError as e:
        return False, _not_json(e)


def _on_own_loop(function):
    """An ``async def`` map callable as a plain one: each call runs on one event loop."""
    import asyncio

    loop = asyncio.new_event_loop()
    return lambda item: loop.run_until_complete(function(item))


_WHOLE_BATCH_DECODE_MAX = 1 << 20


def _decoded_items(body: bytes, count: int) -> list[Any] | None:
    """The items of a batch's ``items.jsonl`` lines, decoded in one call, or None.

    Ingest writes each line as ``id TAB item``, the id being orjson output and
    the item holding no raw TAB, so with exactly one TAB a line, turning TABs and
    LFs into "," makes the batch one flat JSON array ``[id, item, id, item,
    ...]`` (flat: no list per item, which costs time and collector work). A
    further TAB (whitespace inside an item, in a file ingest did not write)
    fails the count, and would leave invalid JSON anyway; then, and for a batch
    over 1 MiB (not worth holding decoded at once), the caller decodes line by
    line. (Only a file damaged twice over -- one line's TAB gone, another line
    split into three values -- could pass both checks; items.jsonl carries no
    checksum against damage of its items either way.)"""
    if len(body) > _WHOLE_BATCH_DECODE_MAX or body.count(b"\t") != count:
        return None
    joined = body.rstrip(b"\n").replace(b"\t", b",").replace(b"\n", b",")
    try:
        flat = orjson.loads(b"[" + joined + b"]")
    except orjson.JSONDecodeError:
        return None
    return flat[1::2] if len(flat) == 2 * count else None


def _ignore(*_: object) -> None:
    """A no-op handler, not SIG_IGN: exec() resets it, so map commands still get Ctrl-C."""


def _exit_now() -> None:
    _end_descendants()
    os._exit(143)


def _adopt_orphans() -> None:
    """Linux: become a child subreaper, so what a map command or a callable's fork leaves
    running in the background is re-parented to this worker (and can be killed) rather
    than to init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1)
    except (OSError, AttributeError):
        pass


def _kill_strays(pid: int) -> None:
    """Kill and reap whatever a finished attempt left behind (adopted orphans).

    A worker's only children are its map commands and the orphans they leave,
    so when ``waitpid`` finds no child at all (the common case) there is nothing
    to look for, and the far dearer ``/proc`` read is skipped."""
    try:
        os.waitpid(-1, os.WNOHANG)  # reaps at most one exited stray; the rest are read below
    except ChildProcessError:
        return
    for stray in _main_thread_children(pid):
        kill_tree(stray)
        try:
            os.waitpid(stray, 0)
        except ChildProcessError:
            pass


def _main_thread_children(pid: int) -> list[int]:
    """The children of ``pid``'s main thread (as a subreaper, the orphans it adopted).
    Raw os calls: this runs after every attempt, and open() is much dearer."""
    try:
        fd = os.open(f"/proc/{pid}/task/{pid}/children", os.O_RDONLY | os.O_CLOEXEC)
        try:
            return [int(p) for p in os.read(fd, 1 << 16).split()]
        finally:
            os.close(fd)
    except (OSError, ValueError):
        return []


def _kill_orphans(pid: int, live: set[int]) -> None:
    """``_kill_strays`` for a worker with lanes: kill and reap the orphans its commands
    left (adopted by its main thread, the subreaper's first thread), except those in a
    running attempt's process group. The commands themselves are children of the pool
    threads that spawned them, never listed here."""
    for stray in _main_thread_children(pid):
        try:
            if os.getpgid(stray) in live:
                continue  # a running attempt's helper: it ends with that attempt
        except ProcessLookupError:
            pass
        kill_tree(stray)
        try:
            os.waitpid(stray, 0)
        except ChildProcessError:
            pass


def _watchdog(slots: SlotTable, slot: int, parent_pid: int) -> None:
    while True:
        slots.beat(slot)
        if os.getppid() != parent_pid:
            _end_descendants()
            os._exit(70)
        time.sleep(0.1)


def _end_descendants() -> None:
    """Kill every process this worker started that still runs: its children (of any of
    its threads), which as a subreaper include every orphan its attempts left, and
    theirs. (Not reaped: the worker is about to exit.)"""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children", "rb") as f:
                children = [int(p) for p in f.read().split()]
        except (OSError, ValueError):
            continue
        for child in children:
            kill_tree(child)


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and all its descendants (a map command may start its own)."""
    try:
        proc = psutil.Process(pid)
        victims = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return
    for victim in victims:
        try:
            victim.kill()
        except psutil.Error:
            pass


# -- running one attempt -----------------------------------------------------
def _failure(kind: str, msg: str, tail: str = "", **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "msg": _text(msg), "tail": _last_bytes(tail), **extra}


def _last_bytes(text: str) -> str:
    """The end of ``text``, at most ``TAIL_BYTES`` bytes of UTF-8 (a character cut in two
    is dropped; a lone surrogate becomes "?")."""
    if len(text) * 4 <= TAIL_BYTES:  # certainly short enough
        return _text(text)
    data = text.encode("utf-8", "replace")
    return data[-TAIL_BYTES:].decode("utf-8", "ignore")


def _text(s: str) -> str:
    """``s`` as valid text: a lone surrogate (an exception message may hold one) would
    make the outcome unencodable and take the worker down with it; it becomes "?"."""
    try:
        s.encode()
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode()
    return s


def _callable_runner(function):
    """Run one attempt of the map callable on an ``items.jsonl`` line."""

    def run(index: int, attempt: int, line: bytes) -> tuple[bool, Any]:
        try:
            result = function(orjson.loads(line[line.index(b"\t") + 1 :]))
        except (Exception, SystemExit) as e:  # noqa: BLE001 - a map's failure is data, not our crash
            return False, _exception_failure(e)
        return True, result

    return run


def _exception_failure(e: BaseException) -> dict[str, Any]:
    try:
        text = str(e)
    except Exception:  # noqa: BLE001 - a broken __str__ is the map's bug, not the worker's
        text = "<str() of the exception failed>"
    message = _one_line(f"{type(e).__name__}: {text}")
    whole = "\n" not in text and len(message) < _ONE_LINE_MAX and not hasattr(e, "__notes__")
    return _failure("exception", message, _traceback_text(e, whole))


_MAX_FRAMES = 30
_MAX_CHAIN = 5


def _traceback_text(e: BaseException, said: bool) -> str:
    """The traceback of a map's exception, cheaply: as Python prints it, but without the
    worker's own frame (the call of the map), without the column carets (3.11 finds
    them by parsing each frame's source line: most of a failure's cost) and, when ``said``
    (the failure's ``msg`` holds it whole), without the exception's own last line. So
    the tails of one bug's failures are the same text, which the journal stores once
    (supervisor.py). Chained exceptions come first, as Python prints them; at most
    ``_MAX_FRAMES`` frames of each."""
    tb = e.__traceback__
    if tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    parts = _chain_text(e, _MAX_CHAIN)
    parts.append("Traceback (most recent call last):\n")
    parts += _frames_text(tb)
    if not said or isinstance(e, SyntaxError):
        parts += traceback.format_exception_only(type(e), e)
    return "".join(parts).rstrip("\n")


def _chain_text(e: BaseException, depth: int) -> list[str]:
    """What Python prints before ``e``'s own traceback: its cause or context, each in
    full (they are rare), and the line that links them."""
    if e.__cause__ is not None:
        earlier, link = e.__cause__, traceback._cause_message  # type: ignore[attr-defined]
    elif e.__context__ is not None and not e.__suppress_context__:
        earlier, link = e.__context__, traceback._context_message  # type: ignore[attr-defined]
    else:
        return []
    if depth <= 0:
        return ["(earlier chained exceptions omitted)\n", link]
    parts = _chain_text(earlier, depth - 1)
    parts.append("Traceback (most recent call last):\n")
    parts += _frames_text(earlier.__traceback__)
    parts += traceback.format_exception_only(type(earlier), earlier)
    parts.append(link)
    return parts


def _frames_text(tb: Any) -> list[str]:
    frames = list(traceback.walk_tb(tb))
    lines = []
    if len(frames) > _MAX_FRAMES:
        lines.append(f"  ... {len(frames) - _MAX_FRAMES} earlier frames omitted\n")
        frames = frames[-_MAX_FRAMES:]
    known = _FRAME_TEXT
    for frame, lineno in frames:
        key = (frame.f_code, lineno)
        text = known.get(key)
        if text is None:
            text = _frame_text(*key)
            if len(known) < _FRAME_TEXTS_MAX:
                known[key] = text
        lines.append(text)
    return lines


# (code object, line number) -> the frame's lines: a map that keeps failing fails in the
# same few places, and formatting a frame (its source line looked up) is most of the cost
_FRAME_TEXT: dict[tuple[Any, int], str] = {}
_FRAME_TEXTS_MAX = 4096


def _frame_text(code: Any, lineno: int) -> str:
    text = f'  File "{code.co_filename}", line {lineno}, in {code.co_name}\n'
    source = linecache.getline(code.co_filename, lineno).strip()
    return f"{text}    {source}\n" if source else text


def _not_json(e: Exception) -> dict[str, Any]:
    return _failure("exception", f"result is not JSON-serializable: {e}")


def _command_runner(config: WorkerConfig, slots: SlotTable, slot: int, lanes: int = 1):
    """Run each attempt as ``posix_spawn`` of the map command, in the job file's directory.

    Cheaper than ``subprocess.Popen`` (a third less per attempt for a trivial
    command): the worker moves into the job directory once, and the command's
    stdin, stdout and stderr are anonymous memory files -- stdin holds the item,
    stdout and stderr are read once the command has exited. Nothing can block
    on a full pipe, and a background child that keeps stdout open cannot hold
    the attempt up (it is killed with the attempt, see ``_kill_strays``).

    With ``lanes`` (several attempts at once, on pool threads: see ``_Lanes``) each
    command gets its own process group, its pid goes into its lane, and what is
    killed after an attempt spares the running attempts (``_kill_orphans``)."""
    os.chdir(config.base_dir)
    _no_inherited_fds()
    base_env = dict(os.environb)  # bytes: posix_spawn need not encode ~40 variables an attempt
    base_env[b"MRPOOL_JOB_ID"] = os.fsencode(config.job_id)
    worker_pid = os.getpid()
    program = functools.lru_cache(maxsize=64)(_program)
    render_argv = argv_renderer(config.command)

    live: set[int] = set()  # with lanes: the running commands (each its own group)
    live_lock = threading.Lock()

    def started(path: str | None, argv: list[str], env: dict[bytes, bytes], fds) -> int:
        if lanes == 1:
            return _spawn(path, argv, env, fds)
        with live_lock:  # never seen by _kill_orphans before it is on record
            pid = _spawn(path, argv, env, fds, own_group=True)
            live.add(pid)
            return pid

    def cleaned(pid: int) -> None:
        if lanes == 1:
            _kill_strays(worker_pid)
            return
        with live_lock:
            live.discard(pid)
            _kill_orphans(worker_pid, live)

    def run(index: int, attempt: int, line: bytes, lane: int = 0) -> tuple[bool, Any]:
        raw_id, _, item_json = line.partition(b"\t")
        item = orjson.loads(item_json)
        try:
            argv = render_argv(item)
        except KeyError as e:
            return False, _failure(
                "template",
                f"item has no key {e.args[0]!r} used by {{item.{e.args[0]}}} in map.command",
            )
        item_id = orjson.loads(raw_id)
        env = base_env.copy()
        env[b"MRPOOL_ITEM_ID"] = (item_id if isinstance(item_id, str) else str(item_id)).encode()
        env[b"MRPOOL_ATTEMPT"] = b"%d" % attempt
        if len(item_json) <= ENV_ITEM_MAX:  # else E2BIG: the item is on stdin only
            env[b"MRPOOL_ITEM"] = item_json
        stdin, stdout, stderr = _memory_file(item_json), _memory_file(), _memory_file()
        try:
            try:
                pid = started(program(argv[0]), argv, env, (stdin, stdout, stderr))
            except OSError as e:
                return False, _failure("exec", f"cannot run {argv[0]!r}: {e.strerror}")
            except ValueError as e:  # an argument filled from the item holds a NUL byte
                return False, _failure("exec", f"cannot run {argv[0]!r}: {e}")
            slots.set_child(slot, pid, lane)
            try:
                code = _wait_for(pid, config.timeout, own_group=lanes > 1)
            finally:
                slots.set_child(slot, 0, lane)  # reaped: its pid may be reused, never kill it
            cleaned(pid)  # nothing an attempt started outlives it
            if code == 0:
                return True, _command_result(stdout)
            err = _tail(stderr)
            if code is None:
                return False, _failure("timeout", f"timed out after {config.timeout:g} s", err)
            if code < 0:
                name = _signal_name(-code)
                return False, _failure(
                    "signal", f"killed by signal {-code} ({name})", err, signal=-code
                )
            return False, _failure("exit", f"exit status {code}: {_last_line(err)}", err, code=code)
        finally:
            for fd in (stdin, stdout, stderr):
                os.close(fd)

    return run


def _program(name: str) -> str | None:
    """Where ``name`` is run from: itself if it holds a "/", else its PATH lookup (None:
    not found). Cached per worker, as a shell hashes commands: ``posix_spawnp`` would
    search PATH again for every attempt, trying each directory before the right one
    (a visible share of a short command: benchmarks/NOTES.md)."""
    return name if "/" in name else shutil.which(name)


def _spawn(
    path: str | None,
    argv: list[str],
    env: dict[bytes, bytes],
    fds: tuple[int, int, int],
    own_group: bool = False,
) -> int:
    """``posix_spawn`` of ``argv`` with ``fds`` as its stdin, stdout and stderr (in a
    process group of its own if ``own_group``). A program not found, or gone since it
    was looked up, is left to ``posix_spawnp``, whose error is the one to report."""
    options: dict[str, Any] = {
        "file_actions": [(_DUP2, fd, target) for target, fd in enumerate(fds)],
        "setsigdef": _DEFAULT_SIGNALS,
    }
    if own_group:
        options["setpgroup"] = 0
    if path is not None:
        try:
            return os.posix_spawn(path, argv, env, **options)
        except OSError:
            pass
    return os.posix_spawnp(argv[0], argv, env, **options)


_DUP2 = os.POSIX_SPAWN_DUP2
# Python ignores these; a command must start with the defaults (as Popen's restore_signals).
_DEFAULT_SIGNALS = [
    getattr(signal, name) for name in ("SIGPIPE", "SIGXFSZ") if hasattr(signal, name)
]


def _memory_file(data: bytes = b"") -> int:
    """An anonymous in-memory file (close-on-exec) holding ``data``, positioned at 0."""
    try:
        fd = os.memfd_create("mrpool", os.MFD_CLOEXEC)
    except OSError:  # no memfd (an old kernel): an unnamed file in the temp directory
        import tempfile  # only here: importing it slows every start-up

        fd = os.open(tempfile.gettempdir(), os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, 0o600)
    if data:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _tail(fd: int) -> str:
    size = os.fstat(fd).st_size
    start = max(0, size - TAIL_BYTES)
    return os.pread(fd, size - start, start).decode("utf-8", errors="replace")


def _wait_for(pid: int, timeout: float | None, own_group: bool = False) -> int | None:
    """The command's exit status (negative: killed by that signal), or None when it ran
    past ``timeout`` seconds -- then it and everything it started (its process group
    too, if it has its own) are killed and reaped."""
    if timeout is not None and not _exits_within(pid, timeout):
        kill_tree(pid)
        if own_group:
            try:
                os.killpg(pid, signal.SIGKILL)
            except OSError:
                pass
        os.waitpid(pid, 0)
        return None
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def _exits_within(pid: int, timeout: float) -> bool:
    """Whether child ``pid`` exits within ``timeout`` seconds (it is not reaped)."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:  # a kernel before 5.3: poll for it (waitid with WNOWAIT reaps nothing)
        deadline = time.monotonic() + timeout
        while os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.005)
        return True
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        return bool(poller.poll(timeout * 1000.0))
    finally:
        os.close(pidfd)


def _no_inherited_fds() -> None:
    """Descriptors this worker inherited from whoever started mrpool must not reach the
    map commands (``posix_spawn`` passes every inheritable one on)."""
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass  # the directory listing's own descriptor, closed by now


LARGE_OUTPUT = 1 << 20  # stdout past this many bytes is not decoded and encoded again
_CHUNK = 1 << 20
_BLANKS = b" \t\r\n"


class _Encoded:
    """A command's result already encoded as JSON (a large stdout), sent as it is."""

    __slots__ = ("data",)

    def __init__(self, data: bytearray) -> None:
        self.data = data


def _command_result(fd: int) -> Any:
    """The result of a command whose stdout is in ``fd``: its JSON value, else its text.

    Past ``LARGE_OUTPUT`` bytes the output is not turned into objects to be encoded again
    (a large output was held several times over that way): it becomes the
    result's JSON directly (``_large_result``)."""
    size = os.fstat(fd).st_size
    if not size:
        return ""  # no output (the common case for side-effect commands): not JSON, empty text
    if size > LARGE_OUTPUT:
        return _large_result(fd, size)
    out = os.pread(fd, size, 0)
    try:
        return orjson.loads(out)
    except orjson.JSONDecodeError:
        return out.decode("utf-8", errors="replace")


def _large_result(fd: int, size: int) -> _Encoded:
    """A large stdout as the JSON of its result, built in one buffer: valid JSON is kept
    as the command wrote it, less its line breaks and tabs (outside strings, where JSON
    allows them: a string cannot hold them raw) and the blanks around it; anything else
    becomes a JSON string of its text, escaped a chunk at a time. Held at once: that
    buffer, plus, while a JSON output is checked, the output mapped and what orjson
    builds of it."""
    head = os.pread(fd, min(size, 64), 0).lstrip(_BLANKS)
    if head[:1] in _JSON_STARTS and _is_json(fd, size):
        start, stop = _stripped_bounds(fd, size)
        out = bytearray()
        for at in range(start, stop, _CHUNK):
            out += os.pread(fd, min(_CHUNK, stop - at), at).translate(None, b"\t\r\n")
        return _Encoded(out)
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace").decode
    out = bytearray(b'"')
    for at in range(0, size, _CHUNK):
        text = decode(os.pread(fd, _CHUNK, at), final=at + _CHUNK >= size)
        out += memoryview(orjson.dumps(text))[1:-1]
    out += b'"'
    return _Encoded(out)


_JSON_STARTS = frozenset(b'{["-0123456789tfn'[k : k + 1] for k in range(17))


def _stripped_bounds(fd: int, size: int) -> tuple[int, int]:
    """Where the output starts and ends without the blanks around it."""
    start = 0
    while True:
        block = os.pread(fd, 4096, start)
        kept = block.lstrip(_BLANKS)
        start += len(block) - len(kept)
        if kept or not block:
            break
    stop = size
    while stop > start:
        block = os.pread(fd, min(4096, stop - start), max(start, stop - 4096))
        kept = block.rstrip(_BLANKS)
        stop -= len(block) - len(kept)
        if kept:
            break
    return start, stop


def _is_json(fd: int, size: int) -> bool:
    """Whether the output is one JSON value (orjson's judgement, as for a small output),
    read in place through a mapping: only what orjson builds while checking is held,
    and dropped at once."""
    with mmap.mmap(fd, size, access=mmap.ACCESS_READ) as data, memoryview(data) as view:
        try:
            orjson.loads(view)
        except orjson.JSONDecodeError:
            return False
    return True


def _last_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    return _one_line(lines[-1]) if lines else "(no stderr)"


_ONE_LINE_MAX = 500


def _one_line(text: str) -> str:
    return " ".join(text.split())[:_ONE_LINE_MAX]


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


if sys.platform == "win32":  # pragma: no cover
    raise ImportError("mrpool workers need fork() and POSIX signals")
