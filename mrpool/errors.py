"""The exception hierarchy, and the one place that maps it to exit codes.

Every error a user can cause or meet is an ``MrpoolError`` subclass carrying the
exit status of the contract; the CLI prints ``str(error)`` as one line and exits
with ``error.exit_code``. Nothing else in the code base decides exit codes.
"""

from __future__ import annotations

__all__ = [
    "EXIT_OK",
    "EXIT_FAILURES",
    "EXIT_USAGE",
    "EXIT_LOCKED",
    "EXIT_NO_JOB",
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
    "ExecutorError",
]

EXIT_OK = 0
EXIT_FAILURES = 1
EXIT_USAGE = 2
EXIT_LOCKED = 3
EXIT_NO_JOB = 4
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
    """A state file is damaged beyond a torn tail: names the file and offset."""


class StorageError(MrpoolError):
    """A write that must be durable failed (ENOSPC, EIO, EFBIG ...)."""


class DlqFullError(MrpoolError):
    """Parking one more item would exceed ``dlq.max_items`` with ``on_full: stop``."""


class ExecutorError(MrpoolError):
    """The executor cannot go on (a cluster that lost every worker, a scheduler that
    would retry tasks behind the journal's back): the session ends, resumable."""
