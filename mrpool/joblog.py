"""``mrpool joblog``: one row per attempt, like GNU parallel's ``--joblog``.

A row is made when an attempt ends, from the journal alone: its start record
(``s``) gives when it started (and the session's ``open`` record on which host),
its outcome record (``ok`` row or ``f``) how long it ran and how it ended. Rows
come in the order attempts ended, as in GNU parallel's joblog.

Fields of a row (JSONL, ``mrpool joblog JOB_ID``):

* ``id``, ``attempt`` -- the item and its cumulative attempt number;
* ``seq`` -- the item's 1-based position in the input;
* ``host`` -- the host the session ran on (null in journals written before the
  session record carried it);
* ``start`` -- unix time the attempt was journaled as started; ``duration`` --
  seconds it ran, as its worker measured (null when it never reported);
* ``exit_code``, ``signal`` -- for command maps: the command's exit status (0 for
  a success), or the signal that killed it (a timed-out command is killed with
  SIGKILL by mrpool: signal 9); null when not applicable (a callable map, an
  exception, a lost attempt);
* ``outcome`` -- ``ok``; ``failed`` (non-zero exit, signal, exception, ...; ``kind``
  says which); ``timeout``; ``interrupted`` (cut short by Ctrl-C / SIGTERM / a stop,
  kept pending); ``lost`` (its session died: SIGKILL, power cut); ``running`` (still
  running under a live holder).

``--tsv`` prints GNU parallel's columns, in its order, with a header:

    Seq  Host  Starttime  JobRuntime  Send  Receive  Exitval  Signal  Command

``Seq`` is the item's 1-based position in the input (so retries of an item share
it); ``Host`` the host (``:`` when unknown, GNU parallel's name for the local
host); ``Starttime`` / ``JobRuntime`` seconds with milliseconds (``-`` when not
known); ``Send`` / ``Receive`` 0 (mrpool transfers no files); ``Exitval`` the
exit status, 0 for a success, -1 when there is none (a signal, a timeout, an
exception, a lost attempt); ``Signal`` the signal number or 0; ``Command`` the
item id (tabs, newlines and backslashes escaped as ``\\t``, ``\\n``, ``\\\\``).

Memory stays flat in the size of the job: the journal is streamed, only the
attempts in flight at one point of it are held, and ids are read on demand from
``items.jsonl`` through a table of line offsets (8 bytes per item).
"""

from __future__ import annotations

import mmap
import os
import signal
from array import array
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from .items import ITEMS_FILE
from .journal import read_records
from .records import started_attempts, success_rows

__all__ = ["TSV_HEADER", "exit_fields", "iter_attempts", "tsv_line"]

TSV_HEADER = b"Seq\tHost\tStarttime\tJobRuntime\tSend\tReceive\tExitval\tSignal\tCommand\n"


def exit_fields(record: dict[str, Any]) -> tuple[int | None, int | None]:
    """``(exit_code, signal)`` of a command attempt's ``f`` record."""
    kind = record.get("kind")
    if kind == "exit":
        return record.get("code"), None
    if kind == "timeout":
        return None, int(signal.SIGKILL)  # mrpool kills a timed-out attempt's whole tree
    return None, record.get("signal")


def iter_attempts(
    job_dir: Path, journal_path: Path, *, command: bool, live: bool
) -> Iterator[dict[str, Any]]:
    """One row per attempt, in the order they ended; ``live``: a holder runs the job now."""
    with _Ids(job_dir) as ids:
        rows = _Rows(ids, command)
        for _, _, record in read_records(journal_path):
            yield from rows.take(record)
        yield from rows.unfinished("running" if live else "lost")


class _Rows:
    """Turns journal records into attempt rows, holding only the open attempts."""

    def __init__(self, ids: _Ids, command: bool) -> None:
        self.ids = ids
        self.command = command
        self.host: str | None = None
        # index -> (attempt, start, host) of the attempts in flight: at most what the
        # executor holds at once (two batches per worker), whatever the size of the job
        self.open: dict[int, tuple[int, float | None, str | None]] = {}

    def take(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        kind = record["k"]
        if kind == "s":
            t, host, shared = record.get("t"), self.host, {}
            for index, attempt in started_attempts(record):  # one tuple per attempt number
                entry = shared.get(attempt)
                if entry is None:
                    entry = shared[attempt] = (attempt, t, host)
                self.open[index] = entry
        elif kind == "ok":
            exit_code = 0 if self.command else None
            for index, attempt, duration, _result in success_rows(record):
                yield self._row(index, attempt, duration, exit_code, None, "ok")
        elif kind == "f":
            yield from self._failed(record)
        elif kind == "open":  # attempts the previous session left open died with it
            yield from self.unfinished("lost")
            self.host = record.get("host")
        elif kind == "close":
            finished = record.get("reason") == "finished"
            yield from self.unfinished("lost" if finished else "interrupted")

    def _failed(self, record: dict[str, Any]) -> Iterator[dict[str, Any]]:
        index = record["i"]
        if index not in self.open:  # crash_loop parking: its attempt was reported as lost
            return
        exit_code, sig = exit_fields(record) if self.command else (None, None)
        outcome = "timeout" if record.get("kind") == "timeout" else "failed"
        row = self._row(index, record.get("a"), record.get("dur"), exit_code, sig, outcome)
        row["kind"] = record.get("kind")
        yield row

    def unfinished(self, outcome: str) -> Iterator[dict[str, Any]]:
        for index in sorted(self.open):
            attempt = self.open[index][0]
            yield self._row(index, attempt, None, None, None, outcome)
        self.open.clear()

    def _row(self, index, attempt, duration, exit_code, sig, outcome) -> dict[str, Any]:
        _, start, host = self.open.pop(index, (attempt, None, self.host))
        return {
            "id": orjson.loads(self.ids.raw(index)),
            "attempt": attempt,
            "host": host,
            "start": start,
            "duration": duration,
            "exit_code": exit_code,
            "signal": sig,
            "outcome": outcome,
            "seq": index + 1,
        }


def tsv_line(row: dict[str, Any]) -> bytes:
    """A row in GNU parallel's joblog columns (see the module docstring)."""
    exit_code = row["exit_code"]
    if exit_code is None:
        exit_code = 0 if row["outcome"] == "ok" else -1
    fields = (
        str(row["seq"]),
        row["host"] or ":",
        _seconds(row["start"]),
        _seconds(row["duration"]),
        "0",
        "0",
        str(exit_code),
        str(row["signal"] or 0),
        _escaped(_id_text(row["id"])),
    )
    return ("\t".join(fields) + "\n").encode()


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _id_text(value: Any) -> str:
    return value if isinstance(value, str) else orjson.dumps(value).decode()


def _escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


class _Ids:
    """Item ids by index, read on demand: ``items.jsonl`` mapped, one offset per line."""

    def __init__(self, job_dir: Path) -> None:
        self._handle = open(Path(job_dir) / ITEMS_FILE, "rb")
        size = os.fstat(self._handle.fileno()).st_size
        self._map = mmap.mmap(self._handle.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
        self._starts = array("Q")
        position = 0
        self._handle.seek(0)
        for line in self._handle:
            self._starts.append(position)
            position += len(line)

    def raw(self, index: int) -> bytes:
        start = self._starts[index]
        return bytes(self._map[start : self._map.find(b"\t", start)])

    def __enter__(self) -> _Ids:
        return self

    def __exit__(self, *exc: object) -> None:
        if isinstance(self._map, mmap.mmap):
            self._map.close()
        self._handle.close()
