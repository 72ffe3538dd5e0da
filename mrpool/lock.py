"""The job lock: one process at a time runs a job (``run``, ``resume``, ``dlq retry``).

What it guarantees
------------------
* Of any number of processes on one host trying to take a job, exactly one
  succeeds; the rest get ``LockedError`` naming the holder (pid, host, since
  when, command) at once, or wait with ``wait=``.
* A holder that died never blocks anyone: the lock is a POSIX record lock
  (``fasteners.InterProcessLock``, ``lockf``), which the kernel drops when the
  process dies, however it dies.
* Any thread may take it: the registry below makes threads of one process
  compete like processes (one wins, the others get ``LockedError``).
* After ``release`` nothing is left: no ``lock`` file, no ``holder.json``.
  What a SIGKILLed holder leaves (both files, or the ``lock`` file alone when
  the kill fell inside acquire or between release's two unlinks) goes with the
  next command that takes the lock, or looks at the job (``clear_stale``, from
  ``status``), once the kernel lock is free and the record provably dead.
* ``unlock`` (``mrpool unlock``) removes a dead holder's files on demand, and
  with ``force`` one recorded on another host -- never while the kernel lock is
  held, never a holder alive on this host.

Why each guard exists (the sharp edges)
---------------------------------------
* POSIX locks belong to the *process*: a second lock object in the same
  process would also "acquire", and closing any descriptor of the file drops the
  lock. So a process-wide registry refuses a second acquire of the same job
  from this process (another thread, another ``JobLock``), and nothing else in
  mrpool ever opens the lock file.
* Removing the lock file on release opens a race: a waiter that opened the old
  file acquires it after we unlink it, while a newcomer locks a fresh file at
  the same path. So after acquiring we check that the path still names the
  inode we locked, and retry if it does not.
* ``holder.json`` is informative, the kernel lock is the truth. A holder record
  is *live* only if on this host its pid exists, is not a zombie and has the
  recorded start time (PIDs are reused). A record from another host cannot be
  checked from here: it is reported and never broken, except by ``unlock
  --force`` (the message of a refusal says so).
* A refused ``fasteners`` acquire leaves its descriptor open; we close it at
  once rather than when the garbage collector does (safe: the registry proves
  this process holds no lock on that file).
* The lock file is created 0600 without following symlinks; after locking we
  check the locked descriptor is a regular file at that very path.

What it does not guarantee
--------------------------
Exclusion across hosts sharing a network file system depends on that file
system's ``lockf`` support; a holder record from another host makes us refuse.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from . import failpoints
from .errors import LockedError, NoSuchJob, command_line
from .fsutil import atomic_write, fsync_dir, open_private

if TYPE_CHECKING:  # imported where used: a job without lock files (what status and
    # results mostly see) needs neither
    import fasteners

__all__ = ["JobLock", "live_holder", "describe_holder", "clear_stale", "unlock", "UnlockRefused"]

LOCK_FILE = "lock"
HOLDER_FILE = "holder.json"
_HOSTNAME = socket.gethostname()
_REGISTRY: dict[str, JobLock] = {}
_REGISTRY_GUARD = threading.RLock()  # re-entrant: _is_live runs under it


class JobLock:
    """Exclusive, self-cleaning lock on one job directory; a context manager."""

    def __init__(self, job_dir: str | os.PathLike, command: str = "mrpool") -> None:
        self.job_dir = Path(job_dir)
        self.command = command
        self._lock: fasteners.InterProcessLock | None = None
        self.holder: dict[str, Any] | None = None

    # -- taking ----------------------------------------------------------
    def acquire(self, wait: float = 0.0) -> JobLock:
        """Take the lock, waiting up to ``wait`` seconds; raise ``LockedError`` if held."""
        deadline = time.monotonic() + max(0.0, wait)
        # A fresh holder may not have written holder.json yet: wait a little (within the
        # contract's "exit 3 within a second") to name it, rather than refuse namelessly.
        grace = time.monotonic() + 0.5
        while True:
            try:
                holder = self._try_once()
            except FileNotFoundError:
                if self.job_dir.exists():
                    raise
                # removed (mrpool rm) while we waited: a job that is gone, not an I/O error
                raise NoSuchJob(f"no such job: {self.job_dir.name} (it was removed)") from None
            if holder is None:
                return self
            now = time.monotonic()
            if now >= deadline and (holder or now >= grace):
                raise LockedError(_locked_message(self.job_dir, holder))
            time.sleep(0.02 if not holder else 0.05)

    def _try_once(self) -> dict[str, Any] | None:
        """None when acquired; else the holder record ({} if not yet readable)."""
        key = str(self.job_dir.resolve())
        with _REGISTRY_GUARD:
            other = _REGISTRY.get(key)
            if other is not None:
                return other.holder or {"pid": os.getpid(), "hostname": _HOSTNAME}
            lock = _lock_now(self.job_dir)
            if lock is None:
                # A dead holder's record lingers until the new holder replaces it: not the holder.
                holder = read_holder(self.job_dir)
                if holder and holder.get("hostname") == _HOSTNAME and not _is_live(holder):
                    return {}
                return holder or {}
            foreign = read_holder(self.job_dir)
            if foreign and (foreign.get("hostname") != _HOSTNAME or _is_live(foreign)):
                lock.release()  # never break a record we cannot prove dead
                return foreign
            self._lock = lock
            self.holder = self._write_holder()
            _REGISTRY[key] = self
            return None

    def _write_holder(self) -> dict[str, Any]:
        import psutil

        me = psutil.Process()
        holder = {
            "v": 1,
            "pid": me.pid,
            "hostname": _HOSTNAME,
            "create_time": me.create_time(),
            "acquired_at": time.time(),
            "command": self.command,
        }
        # Informative only (the kernel lock is the truth), and read by every loser within
        # milliseconds: atomic, but not fsynced -- an fsync can stall for 100s of ms.
        atomic_write(self.job_dir / HOLDER_FILE, orjson.dumps(holder), durable=False)
        return holder

    # -- giving back -----------------------------------------------------
    def release(self) -> None:
        """Remove holder.json and the lock file, then drop the lock. Idempotent."""
        lock, self._lock = self._lock, None
        if lock is None:
            return
        with _REGISTRY_GUARD:
            _remove_files(self.job_dir)
            lock.release()
            _REGISTRY.pop(str(self.job_dir.resolve()), None)
            _REGISTRY.pop(str(self.job_dir), None)
        self.holder = None

    def relocate(self, new_dir: Path) -> None:
        """Follow the job directory after ``run`` publishes it with a rename."""
        with _REGISTRY_GUARD:
            for key, value in list(_REGISTRY.items()):
                if value is self:
                    del _REGISTRY[key]
            self.job_dir = Path(new_dir)
            if self._lock is not None:
                self._lock.path = str(self.job_dir / LOCK_FILE)
                _REGISTRY[str(self.job_dir.resolve())] = self

    @property
    def held(self) -> bool:
        return self._lock is not None

    def __enter__(self) -> JobLock:
        return self if self.held else self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _remove_files(job_dir: Path) -> None:
    """Unlink holder.json, then the lock file (call holding the kernel lock)."""
    for name in (HOLDER_FILE, LOCK_FILE):
        try:
            os.unlink(job_dir / name)
        except FileNotFoundError:
            pass
        if failpoints.ENABLED and name == HOLDER_FILE:
            failpoints.hit("lock.after_holder_unlink")
    try:
        fsync_dir(job_dir)
    except OSError:
        pass


def clear_stale(job_dir: str | os.PathLike) -> bool:
    """Remove a ``lock``/``holder.json`` that a dead holder left; True if it did.

    A SIGKILL can land anywhere in a holder's life, also between its release's two
    unlinks, and no later command need take the lock (``dlq purge`` killed after its
    record, on a job that is then complete). So read commands call this: it takes the
    kernel lock for a few microseconds, only when it is free, removes the files only
    when the record is missing or provably dead on this host, and never touches a
    record from another host (that is ``unlock --force``). A command that wants the
    lock meanwhile sees a holder without a record and retries within its grace.
    """
    try:
        return _unlock(Path(job_dir), force=False, only_if_stale=True) is not None
    except OSError:  # a read-only look (no write access, say) must not fail for this
        return False


class UnlockRefused(LockedError):
    """``unlock`` will not remove this holder (it is live, or on another host)."""


def unlock(
    job_dir: str | os.PathLike,
    *,
    force: bool = False,
    on_remove: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any] | None:
    """Remove the job's lock and holder files when no live process holds it.

    Returns the holder record removed (``{}``: a lock file without one; None: there was
    nothing to remove). Removes a holder provably dead on this host; one from another
    host only with ``force`` (it cannot be checked from here). Raises ``UnlockRefused``
    when the kernel lock is held right now or the holder is alive on this host, or is
    on another host and not ``force``. ``on_remove(record)`` is told what is about to go.
    """
    return _unlock(Path(job_dir), force=force, only_if_stale=False, on_remove=on_remove)


def _unlock(
    job_dir: Path, *, force: bool, only_if_stale: bool, on_remove=None
) -> dict[str, Any] | None:
    """``unlock``, or with ``only_if_stale`` ``clear_stale`` (None instead of a refusal)."""
    lock_path = job_dir / LOCK_FILE
    if not (lock_path.exists() or (job_dir / HOLDER_FILE).exists()):
        return None
    with _REGISTRY_GUARD:
        had_lock_file = lock_path.exists()
        mine = _REGISTRY.get(str(job_dir.resolve()))
        lock = None if mine is not None else _lock_now(job_dir)
        holder = mine.holder if mine is not None else read_holder(job_dir)
        holder = holder or {}
        try:
            refusal = _why_kept(Path(job_dir), holder, lock is not None, force)
            if refusal is not None:
                if lock is not None and not had_lock_file:  # the one _lock_now just made
                    lock_path.unlink(missing_ok=True)
                if only_if_stale:
                    return None
                raise UnlockRefused(refusal)
            if on_remove is not None:
                on_remove(holder)
            _remove_files(job_dir)
        finally:
            if lock is not None:
                lock.release()
    return holder


def _why_kept(job_dir: Path, holder: dict[str, Any], locked_by_us: bool, force: bool) -> str | None:
    """Why ``unlock`` must leave this holder alone, or None when it may remove it."""
    job_id = job_dir.name
    if not locked_by_us:
        return f"job {job_id} is locked right now ({describe_holder(holder)}); nothing removed"
    foreign = bool(holder) and holder.get("hostname") != _HOSTNAME
    if foreign and not force:
        return (
            f"job {job_id} is held by {describe_holder(holder)}, another host, which cannot be "
            f"checked from here; if that process is gone, run "
            f"'{command_line(job_dir, 'unlock', '--force')}'"
        )
    if _is_live(holder):
        return (
            f"job {job_id} is held by {describe_holder(holder)}, which is alive on this host; "
            "nothing removed (stop it, or wait for it)"
        )
    return None


def _lock_now(job_dir: Path) -> fasteners.InterProcessLock | None:
    """The kernel lock on ``job_dir/lock`` if it is free right now, else None.

    Call under ``_REGISTRY_GUARD`` and only when the registry says this process does
    not hold the job: on a refusal the descriptor is closed at once (not left for the
    garbage collector), which would drop a lock this process held on that file.
    """
    import fasteners

    path = job_dir / LOCK_FILE
    os.close(open_private(path, os.O_RDWR | os.O_CREAT))
    lock = fasteners.InterProcessLock(str(path))
    if not lock.acquire(blocking=False):
        lock.lockfile.close()
        lock.lockfile = None
        return None
    if not _same_file(lock, path):  # unlinked by the previous holder's release
        lock.release()
        return None
    return lock


def _same_file(lock: fasteners.InterProcessLock, path: Path) -> bool:
    try:
        held = os.fstat(lock.lockfile.fileno())
        there = os.lstat(path)
    except (OSError, AttributeError):
        return False
    return stat.S_ISREG(there.st_mode) and (held.st_dev, held.st_ino) == (
        there.st_dev,
        there.st_ino,
    )


def read_holder(job_dir: Path) -> dict[str, Any] | None:
    try:
        raw = (Path(job_dir) / HOLDER_FILE).read_bytes()
        holder = orjson.loads(raw)
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_live(holder: dict[str, Any]) -> bool:
    """True only if the recorded holder provably still runs on this host."""
    if holder.get("hostname") != _HOSTNAME:
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int):
        return False
    if pid == os.getpid():
        with _REGISTRY_GUARD:
            return any(lock.holder == holder for lock in _REGISTRY.values())
    import psutil

    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - float(holder.get("create_time", -1))) < 0.01
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError, TypeError):
        return False


def live_holder(job_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The holder record if a live process holds the job, else None (never a dead one).

    A record from another host cannot be checked and is returned as is, marked
    ``"unverified": true``.
    """
    holder = read_holder(Path(job_dir))
    if not holder:
        return None
    if holder.get("hostname") != _HOSTNAME:
        return {**holder, "unverified": True}
    return holder if _is_live(holder) else None


def describe_holder(holder: dict[str, Any]) -> str:
    if not holder.get("pid"):
        return "another process (its holder record is not written yet)"
    since = holder.get("acquired_at")
    when = datetime.fromtimestamp(since).isoformat(sep=" ", timespec="seconds") if since else "?"
    return f"pid {holder['pid']} on {holder.get('hostname', '?')} since {when} ({holder.get('command', '?')})"


def _locked_message(job_dir: Path, holder: dict[str, Any]) -> str:
    job_id = job_dir.name
    if holder.get("hostname") not in (None, _HOSTNAME):
        return (
            f"job {job_id} is locked by {describe_holder(holder)}, another host, which cannot be "
            f"checked from here; wait for it, or, if that process is gone, "
            f"run '{command_line(job_dir, 'unlock', '--force')}'"
        )
    return (
        f"job {job_id} is locked by {describe_holder(holder)}; wait for it, or pass --wait SECONDS"
    )


if sys.platform == "win32":  # pragma: no cover - POSIX only, say so plainly
    raise ImportError("mrpool's job lock needs POSIX record locks")
