"""Named failpoints: make the process die, or a write fail, at an exact spot.

Switched on by the environment variable ``MRPOOL_FAILPOINTS``, a comma-separated
list of ``NAME=ACTION[@N]``:

* ``kill``   -- SIGKILL this process (a crash between two syscalls);
* ``eio`` / ``enospc`` / ``efbig`` -- raise that ``OSError`` (a failing disk);
* ``skip``   -- leave out the step the point guards, from the N-th hit on (a
  deliberately broken build, to prove a checker catches it; only points that
  say so take it);
* ``@N``     -- fire on the N-th time the point is reached (default: the first).

Example: ``MRPOOL_FAILPOINTS=journal.after_write=kill@3``.

When the variable is unset ``ENABLED`` is False and call sites guard with
``if failpoints.ENABLED:``, so a disabled failpoint costs one global lookup.
The names in use are listed in ``POINTS``; an unknown name is refused so that a
typo in a test cannot silently test nothing.
"""

from __future__ import annotations

import errno
import os
import signal

__all__ = ["ENABLED", "POINTS", "hit"]

POINTS = {
    "journal.after_write": "journal bytes written, not yet fsynced",
    "journal.after_fsync": "journal batch durable, caller not yet told",
    "checkpoint.before_replace": "checkpoint temp file written and fsynced, not yet renamed",
    "checkpoint.after_replace": "checkpoint renamed, directory not yet fsynced",
    "dlq.before_replace": "DLQ snapshot temp file written, not yet renamed",
    "dlq.after_replace": "DLQ snapshot renamed, directory not yet fsynced",
    "supervisor.after_dispatch": "attempt starts journaled and sent to a worker",
    "supervisor.after_outcome": "an outcome batch journaled",
    "worker.before_send": "a worker ran attempts; their outcomes are not yet sent (they die with it)",
    "retry.after_success": "a DLQ item's success written to the journal (= left the DLQ), snapshot not yet rewritten",
    "run.after_create": "job directory created and locked, id not yet printed",
    "fsutil.fsync_dir": "a directory is about to be fsynced (skip: it is not; power-cut tests)",
    "dlq.purge.after_lock": "dlq purge holds the job's lock, nothing purged yet",
    "lock.after_holder_unlink": "a release removed holder.json, not yet the lock file",
    "rm.after_rename": "mrpool rm moved the job out of jobs/ (a tombstone in tmp/), not yet deleted",
    "extend.after_items": "an extension's rows appended to items.jsonl and fsynced; job.json still the old one",
    "extend.before_replace": "the extended job.json written to its temp file, not yet renamed",
    "extend.after_replace": "the extended job.json renamed (the commit), directory not yet fsynced",
    "extend.before_record": "the extension committed; its journal record not yet written",
}

_ERRNOS = {"eio": errno.EIO, "enospc": errno.ENOSPC, "efbig": errno.EFBIG}


def _parse(spec: str) -> dict[str, tuple[str, int]]:
    points: dict[str, tuple[str, int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        name, _, action = part.partition("=")
        action, _, nth = action.partition("@")
        if name not in POINTS:
            raise SystemExit(f"MRPOOL_FAILPOINTS: unknown failpoint {name!r}")
        if action not in ("kill", "skip", *_ERRNOS):
            raise SystemExit(f"MRPOOL_FAILPOINTS: unknown action {action!r} for {name}")
        points[name] = (action, int(nth or 1))
    return points


_ACTIVE = _parse(os.environ.get("MRPOOL_FAILPOINTS", ""))
_HITS: dict[str, int] = {}
ENABLED = bool(_ACTIVE)


def hit(name: str) -> bool:
    """Fire failpoint ``name`` if it is armed and this is its N-th hit. True when the
    caller must leave out the step the point guards (action ``skip``)."""
    armed = _ACTIVE.get(name)
    if armed is None:
        return False
    action, nth = armed
    _HITS[name] = count = _HITS.get(name, 0) + 1
    if action == "skip":
        return count >= nth
    if count != nth:
        return False
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    code = _ERRNOS[action]
    raise OSError(code, f"{os.strerror(code)} (failpoint {name})")
