"""Worker slots: one fixed record per worker in memory shared with the supervisor.

Each worker writes into its own slot what it holds (item index, attempt, the
pid of a map command it started), since when, and a heartbeat. The supervisor
reads the slots to attribute an item to a worker that died, to kill an attempt
past its timeout, and to notice a worker that stopped heartbeating (hung).

The memory is a shared mapping (``MAP_SHARED``) of a small file in the job
directory, ``slots.bin``, created before the workers are forked. Two reasons:

* Nothing lives in ``/dev/shm``, so nothing can leak there, and no resource
  tracker can unlink it early (the sharp edges of ``multiprocessing.
  shared_memory`` before Python 3.13). The file is removed when the session
  ends; after a crash the next session reads it and replaces it.
* It outlives a crash. Stores to a shared file mapping land in the page cache
  at once, so after a SIGKILL of the whole process group the file still says
  which item each worker was *running*. The resume planner charges an attempt
  (and a crash streak) to exactly those items -- not to items that were merely
  queued behind them in a batch and never started.

File layout: a 64-byte header (``b"MRPSLOT1"``, version u32 = 1, slot count
u32, zero padding), then one 64-byte slot per worker (little endian)::

    state i32 | pid i32 | child i32 | attempt i32 | index i64 | started f64
    | heartbeat f64 | pad 24

A worker rewrites its slot with a single ``pack_into`` per attempt start and
end (this is on the hot path: one call, no lock). The supervisor reads a slot
twice and retries until both reads agree, so it never acts on a half-written
record. ``heartbeat`` is written alone by the worker's watchdog thread. Times
are ``time.monotonic()``, one clock for all processes on Linux.
"""

from __future__ import annotations

import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from .fsutil import open_private

__all__ = ["IDLE", "RUNNING", "SlotTable", "SlotView", "running_at_crash", "SLOTS_FILE"]

SLOTS_FILE = "slots.bin"

IDLE, RUNNING = 0, 1
_FIELDS = struct.Struct("<iiiiqd")
_HEARTBEAT = struct.Struct("<d")
_HEARTBEAT_AT = _FIELDS.size
_SLOT_SIZE = 64
_HEADER = struct.Struct("<8sII")
_HEADER_SIZE = 64
_MAGIC = b"MRPSLOT1"


@dataclass(frozen=True)
class SlotView:
    state: int
    pid: int
    child: int
    index: int
    attempt: int
    started: float
    heartbeat: float


class SlotTable:
    """``n`` slots in a shared mapping (of ``path`` if given); fork workers after creating it."""

    def __init__(self, n: int, path: Path | None = None) -> None:
        self.n = n
        self.path = path
        size = _HEADER_SIZE + max(1, n) * _SLOT_SIZE
        if path is None:
            self._mem = mmap.mmap(-1, size)
        else:
            fd = open_private(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC)
            try:
                os.ftruncate(fd, size)
                self._mem = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            finally:
                os.close(fd)
        _HEADER.pack_into(self._mem, 0, _MAGIC, 1, n)

    # -- worker side -----------------------------------------------------
    def claim(self, slot: int, pid: int) -> None:
        _FIELDS.pack_into(self._mem, _HEADER_SIZE + slot * _SLOT_SIZE, IDLE, pid, 0, 0, -1, 0.0)
        self.beat(slot)

    def begin(self, slot: int, pid: int, index: int, attempt: int) -> None:
        _FIELDS.pack_into(
            self._mem,
            _HEADER_SIZE + slot * _SLOT_SIZE,
            RUNNING,
            pid,
            0,
            attempt,
            index,
            time.monotonic(),
        )

    def set_child(self, slot: int, view: SlotView, child: int) -> None:
        _FIELDS.pack_into(
            self._mem,
            _HEADER_SIZE + slot * _SLOT_SIZE,
            view.state,
            view.pid,
            child,
            view.attempt,
            view.index,
            view.started,
        )

    def end(self, slot: int, pid: int, index: int, attempt: int) -> None:
        """The attempt ended; the slot keeps naming it as the last one started."""
        _FIELDS.pack_into(
            self._mem, _HEADER_SIZE + slot * _SLOT_SIZE, IDLE, pid, 0, attempt, index, 0.0
        )

    def beat(self, slot: int) -> None:
        _HEARTBEAT.pack_into(
            self._mem, _HEADER_SIZE + slot * _SLOT_SIZE + _HEARTBEAT_AT, time.monotonic()
        )

    # -- supervisor side -------------------------------------------------
    def read(self, slot: int) -> SlotView:
        base = _HEADER_SIZE + slot * _SLOT_SIZE
        fields = _FIELDS.unpack_from(self._mem, base)
        while True:
            again = _FIELDS.unpack_from(self._mem, base)
            if again == fields:
                break
            fields = again
        state, pid, child, attempt, index, started = fields
        heartbeat = _HEARTBEAT.unpack_from(self._mem, base + _HEARTBEAT_AT)[0]
        return SlotView(state, pid, child, index, attempt, started, heartbeat)

    def reset(self, slot: int) -> None:
        """An empty slot (no worker yet, nothing started)."""
        base = _HEADER_SIZE + slot * _SLOT_SIZE
        self._mem[base : base + _SLOT_SIZE] = bytes(_SLOT_SIZE)
        _FIELDS.pack_into(self._mem, base, IDLE, 0, 0, 0, -1, 0.0)

    def close(self, remove: bool = True) -> None:
        """Unmap; remove the file (a clean end leaves nothing behind)."""
        self._mem.close()
        if remove and self.path is not None:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass


def running_at_crash(path: Path) -> list[tuple[int, int]] | None:
    """What the workers of a crashed session were running, from its ``slots.bin``.

    None when there is no readable slot file (nothing known: the caller then
    charges every open attempt, the conservative choice).
    """
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if len(data) < _HEADER_SIZE or data[:8] != _MAGIC:
        return None
    _, version, n = _HEADER.unpack_from(data, 0)
    if version != 1 or len(data) < _HEADER_SIZE + n * _SLOT_SIZE:
        return None
    found = []
    for slot in range(n):
        state, _pid, _child, attempt, index, _started = _FIELDS.unpack_from(
            data, _HEADER_SIZE + slot * _SLOT_SIZE
        )
        if state == RUNNING:
            found.append((index, attempt))
    return found
