"""Journal records: one constructor per kind, the readers' accessors, one recorder.

journal.py says how a record is framed on disk (checksum, line, torn tail); this
module says what is *in* one. Every record is one JSON object, ``k`` (the kind)
first -- the readers that skip kinds without decoding rely on it -- and ``t``
(unix time) added by whoever records it. Records are plain dicts on the wire and
in memory (the hot ones, ``s`` and ``ok``, are built per batch and must cost a
few list operations); the functions below are their only constructors, so each
kind's fields are named in one place.

Field table (version 2; ``?`` = optional, absent when not applicable)
--------------------------------------------------------------------
=========  ======================================================================
kind       fields
=========  ======================================================================
job        ``v`` format version (2; 1: no ``tail_at``), ``job_id``, ``total`` items,
           ``duplicates_in_input``, ``id_mode``. The first record of every journal.
open       a session began: ``cmd`` (run / resume / dlq retry / map), ``pid``,
           ``host``; the crash evidence of the session before it (crashes.py):
           ``cut`` items a worker was running, ``began`` open items a worker had
           begun (null: unknown); ``after`` "abort"? when the last session aborted.
plan       the plan's counts (``pending``, ``failed``, ``dlq``, ...),
           ``duplicates``, ``poison_parked``, ``total``.
executor   the session's executor when not local: ``kind``, ``address``,
           ``cluster``, ``workers``, ``threads``.
worker     ``ev`` "started" (``pid``, ``slot``) or "died" (``pid``, ``slot``,
           ``exitcode``, ``reason``; a Dask task: ``task``, ``error``).
s          attempts started: ``b`` ``[[index, attempt], ...]``? and/or ``r``
           ``[[first, count, attempt], ...]``? (runs of consecutive items).
ok         attempts succeeded: ``b`` ``[[index, attempt, duration, result], ...]``,
           written as ``{"k":"ok","b":[...`` (journal.result_spans reads results
           without decoding them).
f          one failed attempt: ``i`` index, ``a`` attempt, ``dur``? seconds, the
           failure's ``kind``, ``msg``, ``tail`` (at most 2048 bytes) or, version 2,
           ``tail_at``? (the offset of an earlier ``f`` record with the same tail),
           ``sig``? (its error signature, computed by the worker), ``pid``?,
           ``code``? (exit status), ``signal``?; ``next``: "retry", "dlq" (parked)
           or "failed" (kept: the DLQ was full).
reset      ``b`` indices whose attempt numbers restart at 1 (``--reset-failed``).
purge      ``b`` indices dropped from the DLQ for good.
ckpt       ``off``: a checkpoint was written covering the journal up to it.
reduce     ``ok`` true/false, ``error`` (null when ok).
close      a session ended cleanly: ``reason``, ``cut`` items whose attempt was
           cut short and counts (null: every open attempt counts).
salvage    ``mrpool fsck --salvage`` cut the journal: ``cut_at``, ``size_was``,
           ``damaged`` ``[[start, end], ...]``, ``summary``.
spec       ``--job-file`` / ``--set`` changed the job's spec: ``changed``
           ``{"map.timeout": [old, new], ...}``, ``by`` (the options), ``spec`` the
           whole new ``JobSpec.to_dict()``; the last one is the spec sessions run.
rerun      ``b`` succeeded indices made pending again (``mrpool rerun``); an
           item's result is its first success after the last rerun naming it.
halt       ``halt:`` stopped the session: ``rule`` ("fail=5", "fail=5%"),
           ``parked``, ``finished`` (this session's counts), ``reason``.
extend     ``mrpool.map(..., extend=True)`` added items: ``from`` the item count the
           last ``job`` / ``extend`` record named, ``total`` now (job.json's),
           ``added``, ``duplicates_in_input`` now. Written after job.json's
           replacement (the commit), or by the next session if a crash came between.
=========  ======================================================================

A failure (``error`` of ``executor.Failure``, the fields an ``f`` record carries
from it) is ``{"kind", "msg", "tail", "pid"?, "code"?, "signal"?}``: see ``error``.

Who records
-----------
``Recorder.record`` appends a record to the journal and applies it to the
in-memory ``JobState`` in one step, so memory and disk cannot drift: the
supervisor's session, the set-up and the end of a session in api.py (resets,
a remote crash's close, the reduce) and the DLQ's purge all go through it.
Only the ``job`` record, written before any state exists, and fsck's rewrite of
a damaged journal append without a state.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import orjson

__all__ = [
    "Record",
    "job",
    "session_open",
    "plan",
    "executor",
    "worker_started",
    "worker_died",
    "task_lost",
    "starts",
    "successes",
    "successes_payload",
    "encode_rows",
    "failed",
    "error",
    "reset",
    "purge",
    "checkpoint_mark",
    "reduce",
    "close",
    "salvage",
    "spec_change",
    "rerun",
    "halt",
    "extend",
    "started_attempts",
    "success_rows",
    "succeeded_indices",
    "failure_history",
    "RETRY",
    "PARK",
    "KEEP",
    "Recorder",
]

Record = dict[str, Any]
VERSION = 2  # journal.JOURNAL_VERSION: the job record carries it

# ``next`` of an ``f`` record: what becomes of the item
RETRY, PARK, KEEP = "retry", "dlq", "failed"

# the fields of an ``f`` record that a DLQ entry's history keeps
_HISTORY_KEYS = ("a", "t", "kind", "msg", "tail", "dur", "pid", "code", "signal")


def now() -> float:
    return round(time.time(), 6)


# -- constructors --------------------------------------------------------------
def job(
    job_id: str, total: int, duplicates: int, id_mode: str, *, t: float | None = None
) -> Record:
    return {
        "k": "job",
        "v": VERSION,
        "t": time.time() if t is None else t,
        "job_id": job_id,
        "total": total,
        "duplicates_in_input": duplicates,
        "id_mode": id_mode,
    }


def session_open(
    command: str,
    pid: int,
    host: str,
    cut: list[int] | None,
    began: list[int] | None,
    after_abort: bool = False,
) -> Record:
    record: Record = {"k": "open", "cmd": command, "pid": pid, "host": host, "cut": cut}
    record["began"] = began
    if after_abort:
        record["after"] = "abort"
    return record


def plan(summary: dict[str, int]) -> Record:
    return {"k": "plan", **summary}


def executor(kind: str, address: str, cluster: str, workers: int, threads: int) -> Record:
    return {
        "k": "executor",
        "kind": kind,
        "address": address,
        "cluster": cluster,
        "workers": workers,
        "threads": threads,
    }


def worker_started(pid: int, slot: int) -> Record:
    return {"k": "worker", "ev": "started", "pid": pid, "slot": slot}


def worker_died(pid: int, slot: int, exitcode: int | None, reason: str | None) -> Record:
    return {"k": "worker", "ev": "died", "pid": pid, "slot": slot, "exitcode": exitcode,
            "reason": reason}  # fmt: skip


def task_lost(task: str, problem: str) -> Record:
    """A Dask task whose worker died (the ``worker`` record of a remote executor)."""
    return {"k": "worker", "ev": "died", "task": task, "error": problem}


def starts(pairs: list[Any] | None = None, runs: list[list[int]] | None = None) -> Record:
    """Attempts started: ``pairs`` ``[(index, attempt), ...]``, ``runs`` ``[[first, count,
    attempt], ...]`` (either may be None)."""
    record: Record = {"k": "s"}
    if pairs:
        record["b"] = pairs
    if runs:
        record["r"] = runs
    return record


def successes(rows: bytes, t: float | None = None) -> Record:
    """An ``ok`` record around ``rows``, already encoded by ``encode_rows`` (copied into
    the journal as they are, never decoded)."""
    return {"k": "ok", "b": orjson.Fragment(rows), "t": now() if t is None else t}


def successes_payload(rows: bytes | memoryview, t: float | None = None) -> list[Any]:
    """The payload of ``successes(rows, t)``, byte for byte, as the pieces around
    ``rows`` (for ``JournalWriter.append_payload``: the rows are not copied)."""
    return [_OK_OPEN, rows, b',"t":%s}' % orjson.dumps(now() if t is None else t)]


_OK_OPEN = b'{"k":"ok","b":'


def encode_rows(rows: list[Any]) -> bytes:
    """``[[index, attempt, duration, result], ...]`` encoded as an ``ok`` record's ``b``."""
    return orjson.dumps(rows)


def error(kind: str, msg: str, tail: str = "", **extra: Any) -> dict[str, Any]:
    """A failure: ``kind`` (worker_died, timeout, hung, exit, exception, crash_loop, ...),
    ``msg``, ``tail`` (of stderr), and ``pid``, ``code``, ``signal`` when known."""
    return {"kind": kind, "msg": msg, "tail": tail, **extra}


def failed(
    index: int,
    attempt: int,
    failure: dict[str, Any],
    next_: str,
    duration: float | None = None,
    t: float | None = None,
) -> Record:
    """An ``f`` record: ``failure`` (see ``error``; None values left out), and what
    becomes of the item (``RETRY``, ``PARK``, ``KEEP``); ``t``: when (None: when it is
    recorded)."""
    record: Record = {"k": "f", "i": index, "a": attempt}
    if duration is not None:
        record["dur"] = round(duration, 6)
    for key, value in failure.items():
        if value is not None:
            record[key] = value
    record["next"] = next_
    if t is not None:
        record["t"] = t
    return record


def reset(indices: list[int]) -> Record:
    return {"k": "reset", "b": indices}


def purge(indices: list[int]) -> Record:
    return {"k": "purge", "b": indices}


def checkpoint_mark(offset: int) -> Record:
    return {"k": "ckpt", "off": offset}


def reduce(ok: bool, problem: str | None) -> Record:
    return {"k": "reduce", "ok": ok, "error": problem}


def close(reason: str, cut: list[int] | None) -> Record:
    return {"k": "close", "reason": reason, "cut": cut}


def salvage(cut_at: int, size_was: int, damaged: list[Any], summary: str) -> Record:
    return {"k": "salvage", "cut_at": cut_at, "size_was": size_was, "damaged": damaged,
            "summary": summary}  # fmt: skip


def spec_change(changed: dict[str, list[Any]], by: str, spec: dict[str, Any]) -> Record:
    return {"k": "spec", "changed": changed, "by": by, "spec": spec}


def rerun(indices: list[int]) -> Record:
    return {"k": "rerun", "b": indices}


def halt(rule: str, parked: int, finished: int, reason: str) -> Record:
    return {"k": "halt", "rule": rule, "parked": parked, "finished": finished, "reason": reason}


def extend(journal_total: int, total: int, duplicates: int) -> Record:
    return {"k": "extend", "from": journal_total, "total": total,
            "added": total - journal_total, "duplicates_in_input": duplicates}  # fmt: skip


# -- readers -------------------------------------------------------------------
def started_attempts(record: Record) -> Iterator[tuple[int, int]]:
    """``(index, attempt)`` of each attempt an ``s`` record starts, runs expanded."""
    for first, count, attempt in record.get("r", ()):
        for index in range(first, first + count):
            yield index, attempt
    for index, attempt in record.get("b", ()):
        yield index, attempt


def success_rows(record: Record) -> list[list[Any]]:
    """``[index, attempt, duration, result]`` of each success in an ``ok`` record."""
    return record["b"]


def succeeded_indices(record: Record) -> list[int]:
    return [row[0] for row in record["b"]]


def named_indices(record: Record) -> list[int]:
    """The items a ``reset``, ``purge`` or ``rerun`` record names."""
    return record["b"]


def failure_history(record: Record) -> dict[str, Any]:
    """What a DLQ entry's history keeps of an ``f`` record."""
    return {k: record[k] for k in _HISTORY_KEYS if k in record}


# -- the recorder --------------------------------------------------------------
class _Journal(Protocol):
    def append(self, record: Record) -> Any: ...

    def append_payload(self, parts: list[Any]) -> Any: ...


class _State(Protocol):
    def apply(self, record: Record) -> None: ...

    def succeeded(self, indices: list[int]) -> None: ...


class Recorder:
    """Records go to the journal and into the state together, or not at all here.

    ``journal`` None: applied in memory only (a plan that runs nothing, to show what
    the next session would settle). Appending only buffers: the caller decides when
    the journal is written and synced."""

    __slots__ = ("journal", "state")

    def __init__(self, journal: _Journal | None, state: _State) -> None:
        self.journal = journal
        self.state = state

    def record(self, record: Record) -> Record:
        record.setdefault("t", now())
        if self.journal is not None:
            self.journal.append(record)
        self.state.apply(record)
        return record

    def record_all(self, records: Iterable[Record]) -> None:
        for record in records:
            self.record(record)

    def successes(self, indices: list[int], rows: bytes) -> None:
        """An ``ok`` record whose rows arrive encoded: the journal takes them as they are,
        the state the indices that came with them (never decoding the results)."""
        if self.journal is not None:
            self.journal.append_payload(successes_payload(rows))
        self.state.succeeded(indices)
