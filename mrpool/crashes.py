"""The crash rules, in one place: what a session that ended badly costs its items.

The other modules implement these rules and point here: ``JobState._settle_open``
(store.py) settles open attempts, ``plan_session`` (planner.py) parks poison,
``Session._abort`` / ``Session._hand_back`` (supervisor.py) and
``LocalExecutor._worker_lost`` (executor.py) decide what a death means, and the
crashed session's kind of executor (``Executor.crash_evidence``: for local workers
``slots.crash_evidence``) gathers the evidence of what it was doing.

Words: an attempt is *open* from its start record (``s``) until its outcome
(``ok``/``f``) or the end of its session. A session *ends cleanly* with a ``close``
record (finished, interrupted by SIGINT/SIGTERM, or aborted); it *crashed* when the
next session's ``open`` record finds attempts still open and no abort marker
(below) says otherwise. The crash *evidence* (for local workers, from their
``slots.bin``) is written into that ``open`` record: ``began``, the open
attempts a worker had begun, and ``cut``, those it was *running* at the crash.
No evidence (no readable slot file; a Dask session, which keeps none) is written as
``began`` None: unknown.

1. **When an attempt is charged.** Its number is used up once its start is
   journaled. When its session ends with it still open, it stays charged if a
   worker had begun it (``began`` or ``cut`` names it), or if there is no
   evidence (the conservative choice: a number that may have run is never used
   again); an open attempt the evidence shows no worker began was only queued
   behind others and is given back. A clean stop charges what its own ``cut``
   names. A session that stopped by exception (*abort*, rule 5) keeps every open
   attempt charged: outcomes lost with the failed write may have run.
2. **When a streak rises.** ``streak`` counts the crashes in a row that an item
   was in flight at. Only a crash raises it, by one, for the open items a worker
   was *running* (``cut``); with no evidence no streak rises, since a supervisor's
   crash is never an item's fault. Any recorded outcome (``ok``, ``f``, parking)
   resets it to 0. A clean end (finished, interrupted, aborted) never raises it.
3. **When an item is parked as poison.** Planning happens before the new
   session's ``open`` record, so the planner counts the crash it is about to
   settle: an open item the evidence shows *running* whose ``streak + 1`` reaches
   ``crash_limit(retries)`` = ``max(2, 1 + retries)`` is parked in the DLQ as
   ``crash_loop`` ("in flight at N crashes in a row", N = that count) instead of
   being run. Never without evidence, and never after an abort.
4. **When a lost outcome counts.** A worker that dies *while running* an item
   fails that attempt (``worker_died``, or ``timeout``/``hung`` when the
   supervisor killed it): a charged, failed attempt like any other. Items it had
   finished whose outcomes died with it are handed back and run again under a
   new number, uncharged against this session's retries -- until the third loss
   of one item in one session, which counts as a failed attempt
   (``LOST_OUTCOME_LIMIT``). Items it never reached run again under the same number.
5. **An abort is not a crash.** When a session stops on an exception (a storage
   error, a bug), ``Session._abort`` stops every attempt and writes a ``close``
   record (reason ``aborted: ...``, no cut: rule 1). When the journal takes no
   more writes, it leaves an *abort marker* instead, an empty file
   ``session-aborted-at-<journal offset>`` in the job directory (a name, no
   data: it needs no free block); the next session that finds it with no later
   ``open`` record settles the open attempts as an abort, says so in its
   ``open`` record (``"after": "abort"``), and removes it.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import CorruptStateError
from .journal import JOURNAL_FILE, read_records

__all__ = ["crash_limit", "mark_aborted", "aborted_before", "clear_abort_marks"]

_MARK = "session-aborted-at-"


def crash_limit(retries: int) -> int:
    """Crashes in a row with an item in flight before it is parked as poison (rule 3)."""
    return max(2, 1 + retries)


def mark_aborted(job_dir: Path, offset: int) -> bool:
    """Leave the abort marker of a session whose journal ends at ``offset`` (rule 5).
    False if even that failed (then the next session sees a crash)."""
    try:
        fd = os.open(job_dir / f"{_MARK}{offset}", os.O_WRONLY | os.O_CREAT, 0o600)
    except OSError:
        return False
    os.close(fd)
    return True


def aborted_before(job_dir: Path) -> bool:
    """Whether the last session aborted: a marker with no ``open`` record after it."""
    offsets = _marks(job_dir)
    if not offsets:
        return False
    try:
        later = read_records(job_dir / JOURNAL_FILE, max(offsets), kind="open")
        return not any(True for _ in later)
    except CorruptStateError:  # the offset is no record boundary now: not this journal's end
        return False


def clear_abort_marks(job_dir: Path) -> None:
    """Remove the markers (the new session's ``open`` record is durable)."""
    for offset in _marks(job_dir):
        try:
            os.unlink(job_dir / f"{_MARK}{offset}")
        except FileNotFoundError:
            pass


def _marks(job_dir: Path) -> list[int]:
    try:
        names = os.listdir(job_dir)
    except FileNotFoundError:
        return []
    return [
        int(n[len(_MARK) :]) for n in names if n.startswith(_MARK) and n[len(_MARK) :].isdigit()
    ]
