"""Worker slots and the begun table: what a session's workers are doing, in a file.

Each worker writes into its own slot what it holds (item index, attempt, the
pid of a map command it started), since when, and a heartbeat; and, per item,
the attempt number it began. The supervisor reads the slots to attribute an
item to a worker that died, to kill an attempt past its timeout, and to notice a
worker that stopped heartbeating (hung). After a crash the next session reads
the whole file to settle the attempts the journal left open (``crash_evidence``).

The memory is a shared mapping (``MAP_SHARED``) of a small file in the job
directory, ``slots.bin``, created before the workers are forked. Two reasons:

* Nothing lives in ``/dev/shm``, so nothing can leak there, and no resource
  tracker can unlink it early (the sharp edges of ``multiprocessing.
  shared_memory`` before Python 3.13).
* It outlives a crash. Stores to a shared file mapping land in the page cache
  at once, so after a SIGKILL of the supervisor or of the whole process group
  the file still says which attempts the workers had *begun* and which they
  were *running*. A slot alone names only the last attempt its worker began;
  the begun table names every one, so an item that ran to completion whose
  outcome the dead supervisor never journaled is told apart from one that was
  merely queued behind it.

Life of the file (one per session, never shared by two)
-------------------------------------------------------
* A session creates it as a **new inode** (the old path unlinked first, then
  ``O_EXCL``), only once its ``open`` record -- which settles the crashed
  session's open attempts from that session's file -- has reached the journal.
  A straggler of an older session maps only its own, unlinked file: it can never
  read or write this session's slots (it once SIGKILLed the next session's map
  command through a reused ``slots.bin``). Blocks are reserved with
  ``posix_fallocate``, so a full disk is an error at creation, never a SIGBUS
  in a worker storing into a hole.
* Before the next session reads a crashed session's file, every process that
  file names is ended (``end_session``): workers are identified by pid *and*
  kernel start time (PID reuse cannot fool it), frozen with SIGSTOP so they can
  start nothing new, their whole process tree killed (command workers are
  child subreapers, so orphans of their commands are in it), then the workers
  themselves; a map command whose worker is already gone is killed when its
  start time is no later than the moment its worker recorded it. Zombies count
  as dead. Only then is anything read.
* Removed at a session's clean end (and by a session that finds nothing left to
  run, unless the journal still has open attempts). Kept after a crash: it is
  the next session's evidence. After a storage-error exit (a full disk) it is
  kept only if the journal on disk still has an open attempt -- the next
  session needs it then; otherwise the exit path removes it.

File format (versions 2 and 3, little endian)
---------------------------------------------
A 64-byte header::

    magic b"MRPSLOT1" | version u32 | slot count u32 | item count u64
    | boot id 16 bytes (/proc/sys/kernel/random/boot_id)
    | lanes u32 (version 3 only; version 2: 1) | zero padding

then one slot per worker, ``lanes`` 64-byte records each. A worker that runs up
to K attempts at once (``map.concurrency``) has K lanes, one per attempt it can
hold; the first record is the slot's head and also lane 0::

    state i32 | pid i32 | child i32 | attempt i32 | index i64 | started f64
    | heartbeat f64 | pid start u64 | child at f64 | pad 8

A further lane (1 .. K-1) uses the same layout for the attempt's fields
(``state``, ``child``, ``attempt``, ``index``, ``started``, ``child at``); its
``pid``, ``heartbeat`` and ``pid start`` are unused (zero): they are the head's.
A session with one lane a worker writes version 2, byte for byte what mrpool
wrote before lanes; with more, version 3.

then the begun table: one u32 per item, the attempt number a worker of this
session began for it (0: none). ``pid start`` is the worker's start time in
clock ticks since boot (``/proc/PID/stat`` field 22, exact, where psutil's
``create_time`` is rounded through the boot time), written by the supervisor
right after the fork, before the worker is sent anything; ``child at`` is the
``CLOCK_BOOTTIME`` at which the worker recorded ``child`` (after spawning it).

A worker writes its lane with a few plain stores per attempt (this is on the
hot path: no call, no lock): the begun-table entry, the item's fields, then
``state``; the end rewrites only ``state``, so the slot keeps naming the last
attempt started. The supervisor reads a slot twice and retries until both
reads agree, so it never acts on a half-written record. ``heartbeat`` is
written alone by the worker's watchdog thread. ``started`` and ``heartbeat``
are ``time.monotonic()``, one clock for all processes on Linux.

Version 1 (mrpool before this format): a 12-byte header (magic, version 1,
slot count) and the same first 40 bytes per slot, no start times, no begun
table. It is read conservatively: its pids are not trusted (nothing is killed),
every open attempt is charged, and only the items its slots show running get a
crash streak. A version-2 file from an earlier boot is read the same way (what
a crash left in the page cache may not have reached the disk).
"""

from __future__ import annotations

import errno
import mmap
import os
import signal
import struct
import sys
import time
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import psutil

from .errors import StorageError
from .fsutil import open_private

if TYPE_CHECKING:
    from .store import JobState

__all__ = [
    "IDLE",
    "RUNNING",
    "SLOTS_FILE",
    "CrashEvidence",
    "SlotTable",
    "SlotView",
    "UNKNOWN",
    "crash_evidence",
    "end_session",
    "process_start",
]

SLOTS_FILE = "slots.bin"
VERSION = 2  # one lane a worker; LANES_VERSION with more
LANES_VERSION = 3

IDLE, RUNNING = 0, 1
_FIELDS = struct.Struct("<iiiiqd")  # state, pid, child, attempt, index, started
_I32 = struct.Struct("<i")
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")
_F64 = struct.Struct("<d")
_BEGUN = struct.Struct("<iqd")  # attempt, index, started
_HEARTBEAT_AT = _FIELDS.size  # 32
_PID_START_AT = _HEARTBEAT_AT + 8  # 40
_CHILD_AT = _PID_START_AT + 8  # 48
_SLOT_SIZE = 64
_HEADER_V1 = struct.Struct("<8sII")
_HEADER = struct.Struct("<8sIIQ16s")
_LANES_AT = _HEADER.size  # 40: the lane count, version 3
_HEADER_SIZE = 64
_MAGIC = b"MRPSLOT1"
_TICKS = os.sysconf("SC_CLK_TCK")
_MAX_LANES = 1 << 16
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO, errno.EROFS}


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
    """``n`` slots and an ``items``-entry begun table in a shared mapping (of a new file
    at ``path`` if given: see the module doc); fork the workers after creating it."""

    def __init__(self, n: int, path: Path | None = None, items: int = 0, lanes: int = 1) -> None:
        self.n = n
        self.path = path
        self.lanes = lanes
        self._stride = lanes * _SLOT_SIZE
        self._began_at = _HEADER_SIZE + max(1, n) * self._stride
        size = self._began_at + 4 * items
        self._mem = mmap.mmap(-1, size) if path is None else _new_mapping(path, size)
        version = VERSION if lanes == 1 else LANES_VERSION
        _HEADER.pack_into(self._mem, 0, _MAGIC, version, n, items, _boot_id())
        if lanes > 1:
            _U32.pack_into(self._mem, _LANES_AT, lanes)
        view = memoryview(self._mem)
        slots = view[: self._began_at]
        began = view[self._began_at :]
        # every view, in the order made (close releases them in reverse)
        self._views = (view, slots, slots.cast("i"), slots.cast("q"), slots.cast("d"), began)
        self._began = began.cast("I")

    # -- supervisor side: naming a worker --------------------------------
    def register(self, slot: int, pid: int) -> None:
        """Name the worker just forked into ``slot`` (pid and kernel start time), before
        it is sent any work: a worker that can begin an attempt is always on record."""
        base = self._base(slot)
        _U64.pack_into(self._mem, base + _PID_START_AT, process_start(pid) or 0)
        _I32.pack_into(self._mem, base + 4, pid)

    # -- worker side -----------------------------------------------------
    def _base(self, slot: int, lane: int = 0) -> int:
        return _HEADER_SIZE + slot * self._stride + lane * _SLOT_SIZE

    def claim(self, slot: int, pid: int) -> None:
        _FIELDS.pack_into(self._mem, self._base(slot), IDLE, pid, 0, 0, -1, 0.0)
        for lane in range(1, self.lanes):
            _FIELDS.pack_into(self._mem, self._base(slot, lane), IDLE, 0, 0, 0, -1, 0.0)
        self.beat(slot)

    def writer(
        self, slot: int, lane: int = 0
    ) -> tuple[Callable[[int, int, float], None], Callable[[], None]]:
        """The worker's hot-path pair ``begin(index, attempt, started)`` / ``end()`` for
        one lane of its slot (each lane written by one thread at a time).

        Plain stores into typed views of the mapping: the item's begun-table entry
        first (an attempt is on record before it can start), then the slot, ``state``
        last on begin (a reader that sees RUNNING sees the item's fields) and alone
        on end (the slot keeps naming the item as the last one started). A table of
        no items (an executor not told the job's size) keeps no begun entries."""
        base = self._base(slot, lane)
        if sys.byteorder != "little":  # the file is little endian: pack explicitly
            mem, began_at, keep = self._mem, self._began_at, len(self._began) > 0

            def begin_packed(index: int, attempt: int, started: float) -> None:
                if keep:
                    _U32.pack_into(mem, began_at + 4 * index, attempt)
                _BEGUN.pack_into(mem, base + 12, attempt, index, started)
                _I32.pack_into(mem, base, RUNNING)

            return begin_packed, lambda: _I32.pack_into(mem, base, IDLE)
        _, _, i32, i64, f64, _ = self._views
        began = self._began
        state, attempt_at, index_at, started_at = (
            base // 4,
            base // 4 + 3,
            base // 8 + 2,
            base // 8 + 3,
        )

        def begin(index: int, attempt: int, started: float) -> None:
            began[index] = attempt
            i64[index_at] = index
            i32[attempt_at] = attempt
            f64[started_at] = started
            i32[state] = RUNNING

        def begin_untabled(index: int, attempt: int, started: float) -> None:
            i64[index_at] = index
            i32[attempt_at] = attempt
            f64[started_at] = started
            i32[state] = RUNNING

        def end() -> None:
            i32[state] = IDLE

        return (begin if len(began) else begin_untabled), end

    def set_child(self, slot: int, child: int, lane: int = 0) -> None:
        """The pid of the map command the lane's running attempt started (0: none), and
        when (its start time can be no later: how the next session recognises it)."""
        base = self._base(slot, lane)
        if child:
            _F64.pack_into(self._mem, base + _CHILD_AT, time.clock_gettime(time.CLOCK_BOOTTIME))
        _I32.pack_into(self._mem, base + 8, child)

    def beat(self, slot: int) -> None:
        _F64.pack_into(self._mem, self._base(slot) + _HEARTBEAT_AT, time.monotonic())

    # -- supervisor side -------------------------------------------------
    def read(self, slot: int, lane: int = 0) -> SlotView:
        """One lane of a slot (``pid`` and ``heartbeat``: the slot's head's)."""
        base = self._base(slot, lane)
        fields = _FIELDS.unpack_from(self._mem, base)
        while True:
            again = _FIELDS.unpack_from(self._mem, base)
            if again == fields:
                break
            fields = again
        state, pid, child, attempt, index, started = fields
        head = self._base(slot)
        if lane:
            pid = _I32.unpack_from(self._mem, head + 4)[0]
        heartbeat = _F64.unpack_from(self._mem, head + _HEARTBEAT_AT)[0]
        return SlotView(state, pid, child, index, attempt, started, heartbeat)

    def began(self, index: int) -> int:
        """The attempt number a worker of this session began for item ``index`` (0: none)."""
        return _U32.unpack_from(self._mem, self._began_at + 4 * index)[0]

    def reset(self, slot: int) -> None:
        """An empty slot, every lane (no worker yet, nothing started)."""
        for lane in range(self.lanes):
            base = self._base(slot, lane)
            self._mem[base : base + _SLOT_SIZE] = bytes(_SLOT_SIZE)
            _FIELDS.pack_into(self._mem, base, IDLE, 0, 0, 0, -1, 0.0)

    def close(self, remove: bool = True) -> None:
        """Unmap; remove the file (a clean end leaves nothing behind)."""
        self._began.release()
        for view in reversed(self._views):  # the casts, then the views they come from
            view.release()
        self._mem.close()
        if remove and self.path is not None:
            self.path.unlink(missing_ok=True)


def _new_mapping(path: Path, size: int) -> mmap.mmap:
    """A shared mapping of a new file at ``path`` (a new inode: whatever mapped the old
    file keeps the old one), its blocks reserved."""
    path.unlink(missing_ok=True)
    fd = open_private(path, os.O_RDWR | os.O_CREAT | os.O_EXCL)
    try:
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            if e.errno in _STORAGE_ERRNOS:
                path.unlink(missing_ok=True)
                raise StorageError(f"{path}: cannot create worker slots: {e.strerror}") from None
            os.ftruncate(fd, size)  # a file system without block reservation
        return mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)


def discard(job_dir: Path) -> None:
    """Remove a session's slot file (it ended cleanly, or its evidence is settled)."""
    try:
        os.unlink(Path(job_dir) / SLOTS_FILE)
    except FileNotFoundError:
        pass


# -- processes ---------------------------------------------------------------
def _boot_id() -> bytes:
    try:
        with open("/proc/sys/kernel/random/boot_id", "rb") as handle:
            return bytes.fromhex(handle.read().strip().replace(b"-", b"").decode())[:16]
    except (OSError, ValueError):
        return bytes(16)


def process_start(pid: int) -> int | None:
    """The kernel start time of live process ``pid`` in clock ticks since boot; None
    when there is no such process or it is a zombie (dead, not yet reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            stat = handle.read()
    except OSError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[19])


def _is(pid: int, start: int) -> bool:
    return pid > 0 and start > 0 and process_start(pid) == start


# -- after a crash -----------------------------------------------------------
@dataclass(frozen=True)
class _Slot:
    """One lane of a slot as a crash left it (a lane's ``pid``: its worker's)."""

    state: int
    pid: int
    child: int
    attempt: int
    index: int
    pid_start: int
    child_at: float


@dataclass(frozen=True)
class _Snapshot:
    """A slot file as a crash left it."""

    version: int
    slots: list[_Slot]
    items: int | None  # None: version 1
    this_boot: bool
    began: array | None  # the begun table; None: version 1


def _read(path: Path, with_began: bool = True) -> _Snapshot | None:
    """The slot file at ``path``, or None when there is none or it is not one."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(_HEADER_SIZE)
            if len(head) < _HEADER_SIZE or head[:8] != _MAGIC:
                return None
            _, version, n = _HEADER_V1.unpack_from(head)
            lanes = 1
            if version in (VERSION, LANES_VERSION):
                _, _, _, items, boot = _HEADER.unpack_from(head)
                if version == LANES_VERSION:
                    lanes = _U32.unpack_from(head, _LANES_AT)[0]
                    if not 1 <= lanes <= _MAX_LANES:
                        return None
            elif version == 1:
                items, boot = None, None
            else:
                return None
            body = handle.read(n * lanes * _SLOT_SIZE)
            raw = handle.read(4 * items) if with_began and items is not None else b""
    except OSError:
        return None
    if len(body) < n * lanes * _SLOT_SIZE or len(raw) < (4 * items if with_began and items else 0):
        return None
    slots = []
    for record in range(n * lanes):
        base = record * _SLOT_SIZE
        state, pid, child, attempt, index, _ = _FIELDS.unpack_from(body, base)
        if version == 1:
            pid_start, child_at = 0, 0.0
        else:
            child_at = _F64.unpack_from(body, base + _CHILD_AT)[0]
            head = base - (record % lanes) * _SLOT_SIZE  # a lane's process is its head's
            pid = _I32.unpack_from(body, head + 4)[0]
            pid_start = _U64.unpack_from(body, head + _PID_START_AT)[0]
        slots.append(_Slot(state, pid, child, attempt, index, pid_start, child_at))
    began = None
    if version != 1 and with_began:
        began = array("I")
        began.frombytes(raw)
        if sys.byteorder != "little":
            began.byteswap()
    return _Snapshot(version, slots, items, boot == _boot_id(), began)


def end_session(job_dir: Path, timeout: float = 5.0) -> None:
    """Make sure no process of the session that left ``slots.bin`` in ``job_dir`` lives.

    Called by the next session (holding the job's lock, so that session's
    supervisor is gone) before it reads anything from the file: a command worker
    notices its supervisor's death only at its watchdog's next tick, and until
    then goes on starting attempts from the batches it holds. See the module doc
    for how each process is recognised; waits up to ``timeout`` seconds for them
    to be gone (a process in uninterruptible sleep runs no more code either way:
    SIGKILL is pending)."""
    snapshot = _read(Path(job_dir) / SLOTS_FILE, with_began=False)
    if snapshot is None or snapshot.version < 2 or not snapshot.this_boot:
        return  # no pid to trust, or none that can still live
    workers = list(dict.fromkeys(s.pid for s in snapshot.slots if _is(s.pid, s.pid_start)))
    frozen = _freeze(workers, {s.pid: s.pid_start for s in snapshot.slots})
    deadline = time.monotonic() + timeout
    victims = _kill_trees_of(frozen, deadline)
    for s in snapshot.slots:
        if s.pid not in frozen and s.child > 0 and _started_by(s.child, s.child_at):
            victims |= _kill_trees_of([s.child], deadline, include_roots=True)
    for pid in frozen:
        _signal(pid, signal.SIGKILL)
    victims.update(frozen)
    while victims and time.monotonic() < deadline:
        victims = {pid for pid in victims if process_start(pid) is not None}
        if victims:
            time.sleep(0.005)


def _freeze(pids: list[int], starts: dict[int, int]) -> list[int]:
    """SIGSTOP each of ``pids``: frozen, a worker starts no new attempt or command."""
    frozen = []
    for pid in pids:
        _signal(pid, signal.SIGSTOP)
        if _is(pid, starts[pid]):
            frozen.append(pid)
        else:  # it died and the pid was reused between the check and the signal
            _signal(pid, signal.SIGCONT)
    return frozen


def _started_by(child: int, child_at: float) -> bool:
    """Whether live process ``child`` is the map command a worker recorded at boot time
    ``child_at``: a process that took its pid later (after it was reaped) started later."""
    start = process_start(child)
    return start is not None and child_at > 0 and start <= child_at * _TICKS + 1


def _kill_trees_of(roots: list[int], deadline: float, include_roots: bool = False) -> set[int]:
    """SIGKILL every live descendant of ``roots`` (and ``roots`` if ``include_roots``)
    until none is left: a frozen subreaper adopts the orphans of what is killed."""
    killed: set[int] = set()
    while time.monotonic() < deadline:
        alive = []
        for root in roots:
            try:
                proc = psutil.Process(root)
                tree = proc.children(recursive=True) + ([proc] if include_roots else [])
            except psutil.Error:
                continue
            for victim in tree:
                try:
                    if victim.status() != psutil.STATUS_ZOMBIE:
                        alive.append(victim)
                except psutil.Error:
                    pass
        if not alive:
            break
        for victim in alive:
            try:
                victim.kill()
                killed.add(victim.pid)
            except psutil.Error:
                pass
        time.sleep(0.002)
    return killed


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


@dataclass(frozen=True)
class CrashEvidence:
    """What a crashed session had done with the attempts it left open.

    ``began``: the open items whose open attempt a worker had begun -- it counts,
    the next run takes the next number; None when that is unknown (every open
    attempt counts). ``running``: those a worker was still running at the crash
    -- they also get a crash streak (a suspected poison item). An open item in
    neither was only queued: it keeps its attempt number, and no streak."""

    began: list[int] | None
    running: list[int]


UNKNOWN = CrashEvidence(began=None, running=[])  # charge every open attempt, streak none


def crash_evidence(job_dir: Path, state: JobState, *, end_stragglers: bool = True) -> CrashEvidence:
    """What the crashed session was doing with the attempts ``state`` has open.

    The one place that answers it for local workers, from the ``slots.bin`` they
    left. With ``end_stragglers`` (the caller holds the job's lock and is about
    to run) every process of that session is ended first (``end_session``), so
    that nothing it does after we read can make the answer wrong. No readable
    file (or an executor without one) gives ``UNKNOWN``: a supervisor crash is
    never an item's fault, so every open attempt is charged and none gets a streak.
    """
    if end_stragglers:
        end_session(job_dir)
    if not state.open_count:
        return CrashEvidence(began=[], running=[])
    snapshot = _read(Path(job_dir) / SLOTS_FILE)
    if snapshot is None or snapshot.items not in (None, state.total):
        return UNKNOWN
    attempts, opened, total = state.attempts, state.opened, state.total
    running = sorted(
        {
            s.index
            for s in snapshot.slots
            if s.state == RUNNING
            and 0 <= s.index < total
            and opened[s.index]
            and attempts[s.index] == s.attempt
        }
    )
    if snapshot.began is None or not snapshot.this_boot:
        return CrashEvidence(began=None, running=running)
    began = snapshot.began
    started = {index for index in state.open_indices() if began[index] == attempts[index]}
    return CrashEvidence(began=sorted(started.union(running)), running=running)
