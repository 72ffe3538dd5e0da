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

A worker writes its slot with a few plain stores per attempt (this is on the
hot path: no call, no lock): the item's fields, then ``state``; the end
rewrites only ``state``, so the slot keeps naming the last attempt started.
The supervisor reads a slot twice and retries until both reads agree, so it
never acts on a half-written record. ``heartbeat`` is written alone by the worker's watchdog thread. Times
are ``time.monotonic()``, one clock for all processes on Linux.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .fsutil import open_private

__all__ = ["IDLE", "RUNNING", "SlotTable", "SlotView", "running_at_crash", "SLOTS_FILE"]

SLOTS_FILE = "slots.bin"

IDLE, RUNNING = 0, 1
_FIELDS = struct.Struct("<iiiiqd")
_I32 = struct.Struct("<i")
_BEGUN = struct.Struct("<iqd")  # attempt, index, started
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
        view = memoryview(self._mem)
        self._views = (view, view.cast("i"), view.cast("q"), view.cast("d"))

    # -- worker side -----------------------------------------------------
    def claim(self, slot: int, pid: int) -> None:
        _FIELDS.pack_into(self._mem, _HEADER_SIZE + slot * _SLOT_SIZE, IDLE, pid, 0, 0, -1, 0.0)
        self.beat(slot)

    def writer(self, slot: int) -> tuple[Callable[[int, int, float], None], Callable[[], None]]:
        """The worker's hot-path pair ``begin(index, attempt, started)`` / ``end()``.

        Plain stores into typed views of the mapping, ``state`` last on begin (a
        reader that sees RUNNING sees the item's fields) and alone on end (the
        slot keeps naming the item as the last one started)."""
        base = _HEADER_SIZE + slot * _SLOT_SIZE
        if sys.byteorder != "little":  # the file is little endian: pack explicitly
            mem = self._mem

            def begin_packed(index: int, attempt: int, started: float) -> None:
                _BEGUN.pack_into(mem, base + 12, attempt, index, started)
                _I32.pack_into(mem, base, RUNNING)

            return begin_packed, lambda: _I32.pack_into(mem, base, IDLE)
        _, i32, i64, f64 = self._views
        state, attempt_at, index_at, started_at = (
            base // 4,
            base // 4 + 3,
            base // 8 + 2,
            base // 8 + 3,
        )

        def begin(index: int, attempt: int, started: float) -> None:
            i64[index_at] = index
            i32[attempt_at] = attempt
            f64[started_at] = started
            i32[state] = RUNNING

        def end() -> None:
            i32[state] = IDLE

        return begin, end

    def set_child(self, slot: int, child: int) -> None:
        """The pid of the map command the running attempt started (0: none)."""
        _I32.pack_into(self._mem, _HEADER_SIZE + slot * _SLOT_SIZE + 8, child)

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
        for view in reversed(self._views):  # the casts, then the view they come from
            view.release()
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
