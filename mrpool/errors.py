"""The exception hierarchy, and the one place that maps it to exit codes.

Every error a user can cause or meet is an ``MrpoolError`` subclass carrying the
exit status of the contract; the CLI prints ``str(error)`` as one line and exits
with ``error.exit_code``. Nothing else in the code base decides exit codes.
"""

from __future__ import annotations

import os

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURES",
    "EXIT_USAGE",
    "EXIT_LOCKED",
    "EXIT_NO_JOB",
    "EXIT_DAMAGED",
    "EXIT_INTERRUPTED",
    "MrpoolError",
    "UsageError",
    "JobSpecError",
    "InputError",
    "JobExists",
    "LockedError",
    "NoSuchJob",
    "CorruptStateError",
    "StorageError",
    "DlqFullError",
    "HaltedError",
    "ExecutorError",
    "StateRebuiltWarning",
    "fsck_hint",
    "command_line",
]

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_NO_JOB = 4
EXIT_DAMAGED = 5  # a state file is damaged (see mrpool fsck); no contract code meant that
EXIT_INTERRUPTED = 130


class MrpoolError(Exception):
    """Base class; ``str()`` is the one-line message shown to the user."""

    exit_code = EXIT_FAILURES


class UsageError(MrpoolError):
    """A bad command line, option value or job id."""

    exit_code = EXIT_USAGE


class JobSpecError(UsageError):
    """The job file is malformed: names the file and the field or line."""


class InputError(UsageError):
    """The input file is malformed: names the file and the line."""


class JobExists(UsageError):
    """``run`` was given a job id that already exists."""


class LockedError(MrpoolError):
    """Another live process holds the job's lock."""

    exit_code = EXIT_LOCKED


class NoSuchJob(MrpoolError):
    exit_code = EXIT_NO_JOB


class CorruptStateError(MrpoolError):
    """A state file is damaged beyond a torn tail: names the file and offset.

    Exit 5, not 1: 1 means "the run finished with items in the DLQ", a normal
    outcome a script may accept; damage never is, and must not look like it."""

    exit_code = EXIT_DAMAGED


def fsck_hint(job_dir) -> str:
    """What a user can do about a damaged file of the job in ``job_dir``."""
    return f"run '{command_line(job_dir, 'fsck')}' to see what is affected and salvage the rest"


def command_line(job_dir, command: str, *args: str) -> str:
    """``mrpool COMMAND JOB_ID ARGS`` for the job in ``job_dir``, to paste as is: with
    ``--state-dir`` when its state dir is not the one the same environment finds by
    default (``$MRPOOL_HOME``, ...), so a hint never sends a user to "no such job"."""
    import shlex

    from .store import state_root  # (store imports this module)

    job_dir = os.path.abspath(job_dir)
    words = ["mrpool", *command.split(), os.path.basename(job_dir), *args]
    root = os.path.dirname(os.path.dirname(job_dir))
    try:
        default = str(state_root(None))
    except (RuntimeError, KeyError, OSError):  # no home directory to find it in
        default = None
    if os.path.realpath(root) != default:
        words += ["--state-dir", root]
    return shlex.join(words)


class StorageError(MrpoolError):
    """A write that must be durable failed (ENOSPC, EIO, EFBIG ...)."""


class DlqFullError(MrpoolError):
    """Parking one more item would exceed ``dlq.max_items`` with ``on_full: stop``."""


class HaltedError(MrpoolError):
    """``halt:`` / ``--halt``: a session parked as many items as it allows (exit 1, the
    rest pending: ``resume`` continues)."""


class ExecutorError(MrpoolError):
    """The executor cannot go on (a cluster that lost every worker, a scheduler that
    would retry tasks behind the journal's back): the session ends, resumable."""


class StateRebuiltWarning(UserWarning):
    """A derived file (the checkpoint, the DLQ snapshot) was damaged and is rebuilt from
    the journal: nothing is lost, it only costs a replay. Library code says so with
    ``warnings.warn``; the CLI shows it as one ``mrpool: ...`` line on stderr."""
