"""Worker slots: one fixed record per worker in memory shared with the supervisor.

Each worker writes into its own slot what it holds (item index, attempt, the
pid of a map command it started), since when, and a heartbeat. The supervisor
reads the slots to attribute an item to a worker that died, to kill an attempt
past its timeout, and to notice a worker that stopped heartbeating (hung).

The memory is an *anonymous* shared mapping (``mmap(-1, ...)``) created before
the workers are forked. It has no name, so there is nothing in ``/dev/shm`` to
leak and no resource tracker to unlink it early (the sharp edges of
``multiprocessing.shared_memory`` before Python 3.13): the kernel frees it when
the last process mapping it exits, SIGKILL included.

Slot layout (64 bytes, little endian)::

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
import struct
import time
from dataclasses import dataclass

__all__ = ["IDLE", "RUNNING", "SlotTable", "SlotView"]

IDLE, RUNNING = 0, 1
_FIELDS = struct.Struct("<iiiiqd")
_HEARTBEAT = struct.Struct("<d")
_HEARTBEAT_AT = _FIELDS.size
_SLOT_SIZE = 64


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
    """``n`` slots in one anonymous shared mapping; fork workers after creating it."""

    def __init__(self, n: int) -> None:
        self.n = n
        self._mem = mmap.mmap(-1, max(1, n) * _SLOT_SIZE)

    # -- worker side -----------------------------------------------------
    def claim(self, slot: int, pid: int) -> None:
        _FIELDS.pack_into(self._mem, slot * _SLOT_SIZE, IDLE, pid, 0, 0, -1, 0.0)
        self.beat(slot)

    def begin(self, slot: int, pid: int, index: int, attempt: int) -> None:
        _FIELDS.pack_into(self._mem, slot * _SLOT_SIZE, RUNNING, pid, 0, attempt, index, time.monotonic())

    def set_child(self, slot: int, view: SlotView, child: int) -> None:
        _FIELDS.pack_into(self._mem, slot * _SLOT_SIZE, view.state, view.pid, child, view.attempt, view.index, view.started)

    def end(self, slot: int, pid: int) -> None:
        _FIELDS.pack_into(self._mem, slot * _SLOT_SIZE, IDLE, pid, 0, 0, -1, 0.0)

    def beat(self, slot: int) -> None:
        _HEARTBEAT.pack_into(self._mem, slot * _SLOT_SIZE + _HEARTBEAT_AT, time.monotonic())

    # -- supervisor side -------------------------------------------------
    def read(self, slot: int) -> SlotView:
        base = slot * _SLOT_SIZE
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
        self._mem[slot * _SLOT_SIZE : (slot + 1) * _SLOT_SIZE] = bytes(_SLOT_SIZE)

    def close(self) -> None:
        self._mem.close()
