"""The helper a cluster executor's engine task hands its slice of attempts to.

A cluster engine (Dask; Ray next) runs one engine task per slice of a ``Batch``.
The task does not run attempts itself: it hands the slice to a *helper*, a plain
child process of the engine's worker process that runs mrpool's own
``LocalExecutor`` with one worker. So timeouts, heartbeats, ``kill_tree``, the
command protocol and per-attempt attribution work on a cluster node exactly as
on one machine, and the engine's worker survives whatever an attempt does.
Nothing here knows about Dask.

The helper is started with ``posix_spawn`` (``subprocess``), never with
``multiprocessing``: engine worker processes are daemonic (Dask's nanny spawns
them), and a daemonic process may not start ``multiprocessing`` children. The
helper itself is an ordinary process, so its ``LocalExecutor`` forks as usual.

Protocol on the helper's stdin / stdout (each message: a 4-byte big-endian
length, then that many bytes):

* engine -> helper, first: ``orjson(WorkerConfig fields)``; the helper answers
  ``{"ready": pid}``, or ``{"error": text}`` when it cannot run this job here
  (the callable does not import, the job's directory does not exist), and exits.
* engine -> helper: a slice, ``orjson([indices, attempts]) LF`` and the items'
  lines (each ending in LF). An empty message: exit.
* helper -> engine while a slice runs: ``{"running": [index, attempt]}`` when
  the attempt running changes (at most every ``NOTE_EVERY`` seconds); at the end
  ``orjson({"ok", "failed", "requeued", "secs"}) LF rows`` (see ``_run_slice``);
  ``requeued`` rows are ``[index, attempt, started]`` (``executor.HandBack``).

The helper exits, killing what it runs, when the engine's worker process dies
(its stdin reaches end of file) or when it is killed (``Helper.kill``: the whole
process tree).
"""

from __future__ import annotations

import os
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import orjson
import psutil

from .slots import RUNNING
from .worker import WorkerConfig

__all__ = ["Helper", "HelperError", "HelperGone", "lost_slice", "join_rows", "serve"]

NOTE_EVERY = 0.05
READY_TIMEOUT = 120.0  # a cold start on a loaded node: python, mrpool, the user's module
_LENGTH = struct.Struct("!I")
_PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class HelperError(Exception):
    """The helper cannot run this job on this node (its message says why)."""


class HelperGone(Exception):
    """The helper died (or was killed) mid-slice; ``running`` is the attempt it last
    said it was running, or None."""

    def __init__(self, running: tuple[int, int] | None) -> None:
        super().__init__("helper process died")
        self.running = running


# -- framing ---------------------------------------------------------------------
def _write_message(fd: int, data: bytes) -> None:
    view = memoryview(_LENGTH.pack(len(data)) + data)
    while view:
        view = view[os.write(fd, view) :]


def _read_exactly(fd: int, size: int) -> bytes | None:
    parts, need = [], size
    while need:
        chunk = os.read(fd, min(need, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        need -= len(chunk)
    return b"".join(parts)


def _read_message(fd: int) -> bytes | None:
    """The next message, or None at end of file."""
    head = _read_exactly(fd, _LENGTH.size)
    if head is None:
        return None
    (size,) = _LENGTH.unpack(head)
    return _read_exactly(fd, size) if size else b""


def join_rows(parts: list[bytes]) -> bytes:
    """JSON arrays of rows (``Successes.rows``) as one array, without decoding them."""
    inner = [part[1:-1] for part in parts if len(part) > 2]
    return b"[" + b",".join(inner) + b"]"


def lost_slice(
    indices: list[int], attempts: list[int], running: tuple[int, int] | None, error: dict
) -> tuple[list[list[Any]], list[list[Any]]]:
    """``(failed, requeued)`` rows for a slice whose outcomes died with whoever ran it.

    ``running`` is the attempt last reported running: it is failed with ``error``
    (it was running when its runner died). Every other attempt of the slice comes
    back as started, "it may have run: give it the next number": those before
    it ran and their outcomes are lost; those after it may have started since the
    report. Never the same number again for an attempt that might have run."""
    failed: list[list[Any]] = []
    requeued: list[list[Any]] = []
    for index, attempt in zip(indices, attempts):
        if running is not None and (index, attempt) == tuple(running):
            failed.append([index, attempt, 0.0, dict(error)])
        else:
            requeued.append([index, attempt, True])
    return failed, requeued


# -- the engine's side ---------------------------------------------------------------
class Helper:
    """One helper process, driven from an engine task thread (one slice at a time)."""

    def __init__(self, config: WorkerConfig) -> None:
        env = dict(os.environ)
        path = env.get("PYTHONPATH")
        env["PYTHONPATH"] = _PACKAGE_ROOT + (os.pathsep + path if path else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from mrpool.remote_helper import serve; serve()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            close_fds=True,
        )
        self._in = self.proc.stdin.fileno()
        self._out = self.proc.stdout.fileno()
        _write_message(self._in, orjson.dumps(asdict(config)))
        answer = self._next(READY_TIMEOUT, lambda: False)
        if answer is None:
            self.kill()
            raise HelperError("the mrpool helper process did not start")
        reply = orjson.loads(answer)
        if "error" in reply:
            self.proc.wait(5)
            self._close_pipes()
            raise HelperError(reply["error"])
        self.pid = self.proc.pid

    def run(
        self,
        indices: list[int],
        attempts: list[int],
        body: bytes,
        on_running: Callable[[int, int], None],
        stopped: Callable[[], bool],
    ) -> tuple[dict[str, Any], bytes]:
        """Run a slice; ``(summary, rows)``. Raises ``HelperGone`` if the helper dies
        or ``stopped()`` turns true (then it is killed)."""
        running: tuple[int, int] | None = None
        try:
            _write_message(self._in, orjson.dumps([indices, attempts]) + b"\n" + body)
        except OSError:
            raise HelperGone(None) from None
        while True:
            message = self._next(None, stopped)
            if message is None:
                self.kill()
                raise HelperGone(running)
            if message.startswith(b'{"running":'):
                index, attempt = orjson.loads(message)["running"]
                running = (index, attempt)
                on_running(index, attempt)
                continue
            head, _, rows = message.partition(b"\n")
            return orjson.loads(head), rows

    def _next(self, timeout: float | None, stopped: Callable[[], bool]) -> bytes | None:
        """The helper's next message; None if it died, or ``stopped()``, or ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            readable, _, _ = select.select([self._out], [], [], 0.1)
            if readable:
                try:
                    return _read_message(self._out)
                except OSError:
                    return None
            if stopped() or self.proc.poll() is not None:
                return None
            if deadline is not None and time.monotonic() > deadline:
                return None

    def ask_to_exit(self) -> None:
        """Tell the helper to exit (it stops its worker); ``close`` waits for it."""
        try:
            _write_message(self._in, b"")
        except OSError:
            pass

    def close(self) -> None:
        """Ask the helper to exit, then make sure it did."""
        self.ask_to_exit()
        try:
            self.proc.wait(2.0)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close_pipes()

    def kill(self) -> None:
        """SIGKILL the helper, then what it started. The helper alone first: its guardian
        (containment.py) sees it die, ends its session's cgroups and processes and
        removes the cgroups; killing the whole tree at once killed the guardian before
        it could, and left an empty cgroup behind for every killed helper. Whatever is
        still alive after that (a guardian that could not finish) is killed then."""
        try:
            under = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            under = []
        try:
            self.proc.kill()
            self.proc.wait(5.0)
        except (OSError, subprocess.TimeoutExpired):
            pass
        _, alive = psutil.wait_procs(under, timeout=5.0)
        for process in alive:
            try:
                process.kill()
            except psutil.Error:
                pass
        self._close_pipes()

    def _close_pipes(self) -> None:
        for pipe in (self.proc.stdin, self.proc.stdout):
            try:
                pipe.close()
            except OSError:
                pass


# -- the helper process --------------------------------------------------------------
def serve() -> None:
    """The helper's main: answer slices until told to exit or orphaned."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides what Ctrl-C means
    proto_in, proto_out = os.dup(0), os.dup(1)
    os.set_inheritable(proto_in, False)
    os.set_inheritable(proto_out, False)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.dup2(2, 1)  # what the user's code prints goes to the log, never into the protocol
    os.close(devnull)
    parent = os.getppid()
    first = _read_message(proto_in)
    if not first:
        os._exit(0)
    config = WorkerConfig(**orjson.loads(first))
    problem = _cannot_run(config)
    if problem:
        _write_message(proto_out, orjson.dumps({"error": problem}))
        os._exit(0)
    from .executor import LocalExecutor

    executor = LocalExecutor(config, 1)
    executor.start()
    _write_message(proto_out, orjson.dumps({"ready": os.getpid()}))
    while True:
        message = _read_message(proto_in)
        if not message:
            break
        header, _, body = message.partition(b"\n")
        indices, attempts = orjson.loads(header)
        lines = [line + b"\n" for line in body.split(b"\n")[:-1]]
        answer = _run_slice(executor, indices, attempts, lines, proto_in, proto_out, parent)
        if answer is None:  # orphaned mid-slice
            executor.cancel()
            break
        _write_message(proto_out, answer)
    executor.shutdown()
    os._exit(0)


def _cannot_run(config: WorkerConfig) -> str | None:
    """Why this node cannot run the job's map step, or None."""
    if not os.path.isdir(config.base_dir):
        return (
            f"the job's directory {config.base_dir} does not exist on this node "
            "(commands run there, callables import from there: it must be on a shared filesystem)"
        )
    if config.callable:
        from .spec import import_callable

        try:
            import_callable(config.callable, config.base_dir)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - any import-time error is the user's to see
            detail = " ".join(f"{type(e).__name__}: {e}".split())
            return f"cannot import {config.callable!r} from {config.base_dir}: {detail}"
    return None


def _run_slice(executor, indices, attempts, lines, proto_in, proto_out, parent) -> bytes | None:
    """Run a slice through ``executor`` (which takes a few attempts at a time); the answer
    message, or None if the engine's worker process died meanwhile."""
    from .executor import Batch

    batch = Batch(indices, attempts, lines)
    started = time.monotonic()
    ok_indices: list[int] = []
    ok_rows: list[bytes] = []
    failed: list[list[Any]] = []
    requeued: list[list[Any]] = []
    sent = outstanding = 0
    reported: tuple[int, int] | None = None
    last_note = 0.0
    watch = select.poll()
    watch.register(proto_in, select.POLLIN)  # a message mid-slice only comes as end of file
    while sent < len(batch) or outstanding:
        room = executor.capacity()
        if room and sent < len(batch):
            stop = min(len(batch), sent + room)
            executor.submit(batch.part(sent, stop))
            outstanding += stop - sent
            sent = stop
        outcomes = executor.wait(0.05)
        outstanding -= len(outcomes)
        for done in outcomes.ok:
            ok_indices += done.indices
            ok_rows.append(done.rows)
        for failure in outcomes.failed:
            failed.append([failure.index, failure.attempt, failure.duration, failure.error])
        requeued += [[back.index, back.attempt, back.started] for back in outcomes.requeued]
        now = time.monotonic()
        if now - last_note >= NOTE_EVERY:
            last_note = now
            view = executor.slots.read(0)
            current = (view.index, view.attempt)
            if view.state == RUNNING and current != reported:
                reported = current
                _write_message(proto_out, orjson.dumps({"running": list(current)}))
            if watch.poll(0) or os.getppid() != parent:
                return None
    summary = {
        "ok": ok_indices,
        "failed": failed,
        "requeued": requeued,
        "secs": time.monotonic() - started,
    }
    return orjson.dumps(summary) + b"\n" + join_rows(ok_rows)
