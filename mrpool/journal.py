"""The journal: the job's append-only, checksummed record of everything.

File format (``journal.log``, version 2)
----------------------------------------
One record per line::

    <crc32 of PAYLOAD as 8 lowercase hex digits> SP <PAYLOAD> LF

PAYLOAD is one compact JSON object written by orjson (it never holds a raw LF).
Every object has ``k`` (the kind) and ``t`` (unix time). The first record of the
file is ``{"k":"job","v":2,...}`` (``"v":1``: a journal written before tails were shared). Kinds: ``job``, ``open`` (a command started
a session), ``plan``, ``s`` (attempts started, batched), ``ok`` (successes with
their results, batched), ``f`` (one failed attempt), ``reset``, ``purge``,
``worker``, ``executor`` (the session's executor, when not local: kind, scheduler
address, workers), ``ckpt``, ``reduce``, ``close`` (a session ended cleanly),
``spec`` (``--job-file`` / ``--set`` changed the spec: ``changed`` ``{key: [old, new]}``,
``by``, and the whole new ``spec``; the last one is the spec sessions run), ``rerun``
(``b``: succeeded items made pending again by ``mrpool rerun``; a success after it is
the item's result), ``halt`` (why ``halt:`` stopped the session).

An ``f`` record holds the failure's ``kind``, ``msg``, ``tail`` (the end of stderr or
of a traceback, at most 2048 bytes), ``sig`` (its error signature, when the worker
computed it) and ``next``. In a version-2 journal it may hold ``tail_at`` instead of
``tail``: the byte offset of an earlier ``f`` record of the same journal whose ``tail``
is the same text (one bug failing 100k items stores its traceback about once a
session). A reference always points backwards, so every prefix of the journal a crash
or a salvage can leave resolves all the references it holds.

An ``s`` record names its attempts as ``b``, ``[[index, attempt], ...]``, and/or
as ``r``, ``[[first, count, attempt], ...]``: runs of consecutive items starting
the same attempt number (most of a fresh run), so that a dispatch costs no
per-item encoding; ``records.started_attempts`` reads both. What each kind's
fields are, and their constructors: records.py.

Reading
-------
Records are checked in order. A last line that is incomplete (no LF) or fails
its checksum is a *torn tail* when no valid record follows it and the file does
not end with LF: it is what a crash during an append leaves, and it is dropped
(the writer truncates it away before appending again). A bad line *followed by*
a valid record, or a whole bad last line, cannot come from a crash: it is
corruption, and reading stops with an error naming the file and byte offset
and pointing at ``mrpool fsck`` -- data is never skipped silently.

The checkpoint also records the CRC-32 of the journal bytes it covers, with the
journal's size and mtime at that moment (store.py): a reader starting from the
checkpoint re-checks the prefix it skips whenever the file has changed since,
so damage there is found by ``status`` too, not only by ``results``.

Writing (group commit)
----------------------
Only the lock holder appends. ``append`` encodes a record into a buffer;
``write`` hands the buffer to the kernel with one ``write(2)``, after which the
records survive a SIGKILL of this process; ``sync`` starts an ``fsync`` at most
every ``commit_interval`` seconds, after which they survive a power cut. That
fsync runs on a committer thread, so the supervisor goes on dispatching while
the disk works (on a busy machine one fsync can take hundreds of milliseconds, and
the workers would run dry waiting for it); a forced ``sync`` (checkpoints, the end of a session)
waits for it and fsyncs in the caller. The supervisor writes before it tells a
worker to start and right after outcomes arrive, so nothing a user can see is
only in memory.

The checkpoint and DLQ snapshot files are single records in the same codec.
"""

from __future__ import annotations

import mmap
import os
import re
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from . import failpoints
from .errors import CorruptStateError, StorageError, fsck_hint
from .fsutil import fsync_dir, open_private
from .records import VERSION

__all__ = [
    "FORMAT_VERSION",
    "JOURNAL_VERSION",
    "journal_version",
    "RecordReader",
    "encode_record",
    "decode_line",
    "read_records",
    "read_payloads",
    "result_spans",
    "scan_journal",
    "crc_of_bytes",
    "JournalWriter",
]

FORMAT_VERSION = 1
# The journal's own version, in its first record (records.job): 2 lets an ``f`` record
# name the tail of an earlier one (``tail_at``) instead of holding the same text again.
JOURNAL_VERSION = VERSION
JOURNAL_FILE = "journal.log"


def encode_record(record: dict[str, Any]) -> bytes:
    payload = orjson.dumps(record)
    return b"%08x %s\n" % (zlib.crc32(payload), payload)


def decode_line(line: bytes) -> dict[str, Any] | None:
    """The record on ``line``, or None when it is torn or fails its checksum."""
    payload = checked_payload(line)
    return None if payload is None else _decoded(payload)


def checked_payload(line: bytes) -> memoryview | None:
    """The payload of ``line`` (a view, not a copy) if its checksum holds, else None.

    The checksum field must be exactly what ``encode_record`` writes: eight lowercase
    hex digits. ``int(..., 16)`` alone also takes "A" for "a", a sign, a space or an
    underscore, so a flipped bit in the field (0x61 -> 0x41) left a record that
    verified here while the bytes no longer matched what the checkpoint's CRC of the
    journal covers: every reader refused the journal and ``fsck`` called it sound."""
    if len(line) < 11 or line[-1] != 0x0A or line[8] != 0x20:
        return None
    payload = memoryview(line)[9:-1]
    return payload if b"%08x" % zlib.crc32(payload) == line[:8] else None


def _decoded(payload: bytes) -> dict[str, Any] | None:
    try:
        record = orjson.loads(payload)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def journal_version(path: Path) -> int:
    """The version in the journal's first record (1 when it names none or is unreadable:
    the conservative answer, under which nothing newer is written into it)."""
    try:
        with open(path, "rb") as handle:
            record = decode_line(handle.readline(1 << 16))
    except FileNotFoundError:
        return 1
    version = record.get("v") if record is not None and record.get("k") == "job" else None
    return version if isinstance(version, int) else 1


class RecordReader:
    """Random access to checksummed records by their byte offset (``tail_at``, and the DLQ
    snapshot's references): ``at(offset)`` is the record that starts there, or raises
    ``CorruptStateError`` if none does. Use as a context manager."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._handle = open(path, "rb")
        size = os.fstat(self._handle.fileno()).st_size
        self._map = mmap.mmap(self._handle.fileno(), size, access=mmap.ACCESS_READ) if size else b""

    def at(self, offset: int) -> dict[str, Any]:
        data = self._map
        end = data.find(b"\n", offset) if 0 <= offset < len(data) else -1
        record = None if end < 0 else decode_line(data[offset : end + 1])
        if record is None:
            raise _corrupt(self.path, offset, "no whole record starts there")
        return record

    def close(self) -> None:
        if self._map:
            self._map.close()
        self._handle.close()

    def __enter__(self) -> RecordReader:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


_SKIPPED: dict[str, Any] = {}

_OK_HEAD = b'{"k":"ok","b":['
_ENTRY_HEAD = re.compile(rb"\[(\d+),(-?\d+),[-+.eE0-9]+,")
_SCALAR = re.compile(rb"[^,\]}]+")
_STRUCTURE = re.compile(rb'["\[\]{}]')


def result_spans(line: bytes) -> list[tuple[int, int, int]]:
    """``(index, start, end)`` of each result in the ``ok`` record on a checked journal
    ``line``: where its JSON is, found without decoding it (a 1 GB result is copied,
    not rebuilt as Python objects and encoded again). The line passed its checksum,
    so it is orjson's compact output; any other layout falls back to decoding it
    (start -1: decode the record to read the results)."""
    try:
        return _scan_ok(line)
    except (ValueError, IndexError, AttributeError):
        record = orjson.loads(memoryview(line)[9:-1])
        return [(entry[0], -1, -1) for entry in record["b"]]


def _scan_ok(payload: bytes) -> list[tuple[int, int, int]]:
    if not payload.startswith(_OK_HEAD, 9):
        raise ValueError("not the layout the supervisor writes")
    spans, at = [], 9 + len(_OK_HEAD)
    while payload[at] == 0x5B:  # "["
        head = _ENTRY_HEAD.match(payload, at)
        start = head.end()
        end = _value_end(payload, start)
        if payload[end] != 0x5D:  # "]"
            raise ValueError("an entry with more than four fields")
        spans.append((int(head.group(1)), start, end))
        at = end + 2 if payload[end + 1] == 0x2C else end + 1  # past "]," or "]"
    if payload[at] != 0x5D:
        raise ValueError("unexpected bytes after the entries")
    return spans


def _value_end(data: bytes, at: int) -> int:
    """The end of the JSON value starting at ``at`` (compact JSON, already validated)."""
    first = data[at]
    if first == 0x22:
        return _string_end(data, at)
    if first not in (0x5B, 0x7B):
        return _SCALAR.match(data, at).end()
    depth = 0
    while True:
        mark = _STRUCTURE.search(data, at)
        at = mark.start()
        char = data[at]
        if char == 0x22:
            at = _string_end(data, at)
            continue
        depth += 1 if char in (0x5B, 0x7B) else -1
        at += 1
        if depth == 0:
            return at


def _string_end(data: bytes, at: int) -> int:
    """The end of the JSON string whose opening quote is at ``at``, at C speed: the
    first quote after it when that one is not escaped (most strings), else 1 MiB
    windows in which the escapes are blanked out (two ``replace`` calls) first."""
    first = data.index(b'"', at + 1)
    if data[first - 1] != 0x5C:  # "\\"
        return first + 1
    pos = at + 1  # always at a character boundary, never inside an escape
    while True:
        window = data[pos : pos + (1 << 20)]
        if not window:
            raise ValueError("unterminated string")
        cleaned = window.replace(b"\\\\", b"..").replace(b'\\"', b"..")
        end = cleaned.find(b'"')
        if end >= 0:
            return pos + end + 1
        pos += len(window) - (1 if cleaned.endswith(b"\\") else 0)  # an escape cut in two


def _other_kind(line: bytes, own_prefix: bytes) -> bool:
    """Whether the record on ``line`` certainly is of another kind than the one whose
    payloads start with ``own_prefix``: records are written with ``k`` first."""
    return line.startswith(b'{"k":"', 9) and not line.startswith(own_prefix, 9)


def read_records(
    path: Path, start: int = 0, kind: str | None = None
) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """Yield ``(offset, end, record)`` from ``start``; stop quietly at a torn tail.

    With ``kind``, only records of that kind (the others are checksummed, not
    decoded: a reader of results need not decode every dispatch record).
    Raises ``CorruptStateError`` for a damaged record that has valid ones after it.
    """
    return _read(path, start, kind, decode=True)


def read_payloads(
    path: Path, start: int = 0, kind: str | None = None
) -> Iterator[tuple[int, int, bytes]]:
    """``read_records`` without decoding: ``(offset, end, payload)``, each checksummed."""
    return _read(path, start, kind, decode=False)


def _read(path: Path, start: int, kind: str | None, decode: bool) -> Iterator[tuple[int, int, Any]]:
    only = b'{"k":"%s"' % kind.encode() if kind is not None else None  # its payloads' start
    try:
        handle = open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        return
    with handle:
        handle.seek(start)
        offset = start
        bad_at: int | None = None
        last = b""
        for line in _lines(handle):
            end = offset + len(line)
            payload = checked_payload(line)
            if payload is None:
                record = None
            elif only is not None and _other_kind(line, only):
                record = _SKIPPED  # valid, and of no interest to this reader
            elif decode or not line.startswith(b"{", 9):
                record = _decoded(payload)
            else:
                record = line
            if record is None:
                if bad_at is None:
                    bad_at = offset
            elif bad_at is not None:
                raise _corrupt(path, bad_at, "followed by valid records")
            elif record is not _SKIPPED:
                yield offset, end, record
            offset = end
            last = line
        if bad_at is not None and last.endswith(b"\n"):
            # A crash cuts the last line short; a whole last line that fails is damage.
            raise _corrupt(path, bad_at, "a whole line, not a torn tail")


_LONG = 1 << 20


def _lines(handle) -> Iterator[bytes]:
    """The file's lines from the handle's position, LF kept (the last may lack it).

    A line longer than 1 MiB (a record holding a large result) is measured first and
    then read whole into one buffer: ``readline`` collects such a line in pieces and
    joins them, twice its size at the peak, and a reader must cost about one record."""
    while line := handle.readline(_LONG):
        if len(line) < _LONG or line[-1] == 0x0A:
            yield line
            continue
        start = handle.tell() - len(line)
        del line
        while (block := handle.read(_LONG)) and (cut := block.find(b"\n")) < 0:
            pass
        end = handle.tell() - (len(block) - cut - 1 if block else 0)
        del block
        handle.seek(start)
        yield handle.read(end - start)
        handle.seek(end)


def _corrupt(path: Path, at: int, why: str) -> CorruptStateError:
    return CorruptStateError(
        f"{path}: corrupt record at byte {at} (checksum or format mismatch, {why}); "
        f"refusing to skip data: {fsck_hint(path.parent)}"
    )


def crc_of_bytes(path: Path, start: int, stop: int, crc: int = 0) -> int:
    """``zlib.crc32`` of the file's bytes ``start`` to ``stop``, continuing ``crc``."""
    with open(path, "rb", buffering=0) as handle:
        handle.seek(start)
        left = stop - start
        while left > 0:
            block = handle.read(min(left, 1 << 20))
            if not block:
                raise CorruptStateError(f"{path}: ends before byte {stop}")
            crc = zlib.crc32(block, crc)
            left -= len(block)
    return crc


@dataclass
class JournalScan:
    """Every line of a journal, judged (for ``mrpool fsck``)."""

    size: int = 0
    good_end: int = 0  # end of the valid records before the first damage
    damaged: list[tuple[int, int]] = field(default_factory=list)  # lines that fail, [start, end)
    torn_tail: tuple[int, int] | None = None  # an unfinished last line: a crash artefact
    after: list[tuple[int, int, dict[str, Any]]] = field(default_factory=list)
    # valid records after the first damage (lost to a salvage that cuts there)


def scan_journal(path: Path) -> JournalScan:
    """Check every record of the journal; never raises for damage, describes it."""
    scan = JournalScan()
    try:
        handle = open(path, "rb", buffering=1 << 20)
    except FileNotFoundError:
        return scan
    with handle:
        offset = 0
        for line in handle:
            end = offset + len(line)
            payload = checked_payload(line)
            record = None if payload is None else _decoded(payload)
            if record is None:
                if scan.damaged and scan.damaged[-1][1] == offset:
                    scan.damaged[-1] = (scan.damaged[-1][0], end)  # one damaged run
                else:
                    scan.damaged.append((offset, end))
            elif scan.damaged:
                scan.after.append((offset, end, record))
            else:
                scan.good_end = end
            offset = end
        scan.size = offset
    if scan.damaged and scan.damaged[-1][1] == scan.size and not scan.after:
        start, end = scan.damaged[-1]
        if not _ends_whole(path, end):
            scan.torn_tail = scan.damaged.pop()
    return scan


def _ends_whole(path: Path, size: int) -> bool:
    with open(path, "rb") as handle:
        handle.seek(size - 1)
        return handle.read(1) == b"\n"


class JournalWriter:
    """Appends records with group commit. Not thread-safe; one per lock holder."""

    def __init__(self, path: Path, valid_end: int, commit_interval: float = 0.05) -> None:
        self.path = path
        self.commit_interval = commit_interval
        self._fd = open_private(path, os.O_WRONLY | os.O_CREAT)
        self._buffer: list[bytes] = []
        self._buffered = 0  # bytes in _buffer
        self._dirty = False  # written since the last fsync began
        self._last_sync = time.monotonic()
        self._committer: _Committer | None = None  # started by the first unforced commit
        try:
            size = os.fstat(self._fd).st_size
            if size > valid_end:  # a torn tail from a crash: cut it before appending
                _drop_snapshots_past(path.parent, valid_end)
                os.ftruncate(self._fd, valid_end)
                os.fsync(self._fd)
            self.offset = valid_end
            os.lseek(self._fd, valid_end, os.SEEK_SET)
        except OSError as e:
            os.close(self._fd)
            raise StorageError(f"{path}: cannot open journal: {e.strerror}") from None
        if size == 0:
            fsync_dir(path.parent)

    def append(self, record: dict[str, Any]) -> int:
        """Buffer one record; it reaches the kernel at the next ``write``. Returns the byte
        offset it will have in the file."""
        line = encode_record(record)
        at = self.offset + self._buffered
        self._buffer.append(line)
        self._buffered += len(line)
        return at

    def append_payload(self, parts: list[Any]) -> int:
        """``append`` for a record already encoded, as the pieces of its payload (compact
        JSON, ``k`` first): framed here, never copied into one object (an ``ok`` record
        of large results is written from the buffer it arrived in)."""
        crc = 0
        for part in parts:
            crc = zlib.crc32(part, crc)
        at = self.offset + self._buffered
        self._buffer += [b"%08x " % crc, *parts, b"\n"]
        self._buffered += 10 + sum(map(len, parts))
        return at

    @property
    def buffered(self) -> int:
        """Bytes appended and not yet written: the next record starts at offset + buffered."""
        return self._buffered

    def write(self) -> None:
        """Hand buffered records to the kernel: from now on they survive a SIGKILL."""
        if not self._buffer:
            return
        chunks = _coalesced(self._buffer, self._buffered)
        size = self._buffered
        self._buffer = []
        self._buffered = 0
        try:
            for chunk in chunks:
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self._fd, view) :]
            if failpoints.ENABLED:
                failpoints.hit("journal.after_write")
        except OSError as e:
            self._undo_partial_write()
            raise StorageError(f"{self.path}: cannot append to journal: {e.strerror}") from None
        self.offset += size
        self._dirty = True

    def sync(self, force: bool = False) -> bool:
        """``write``, then make the records durable: unforced, by starting an fsync on
        the committer thread if the commit interval has passed and none is running;
        forced, at once, here. True if an fsync was started or done. Raises
        ``StorageError`` if an fsync failed, here or on the thread."""
        self.write()
        committer = self._committer
        if committer is not None:
            if force:
                committer.wait_idle()
            committer.raise_failure()
        if force:
            if not self._dirty:
                return False
            _fsync(self._fd, self.path)
            self._dirty = False
            self._last_sync = time.monotonic()
            return True
        if not self._dirty or time.monotonic() - self._last_sync < self.commit_interval:
            return False
        if committer is None:
            committer = self._committer = _Committer(self._fd, self.path)
        elif committer.busy:
            return False  # a slow disk: the next commit starts when this one ends
        self._dirty = False  # the fsync about to start covers everything written so far
        self._last_sync = time.monotonic()
        committer.start_commit()
        return True

    def close(self) -> None:
        if self._fd >= 0:
            try:
                self.sync(force=True)
            finally:
                self._stop_committer()
                os.close(self._fd)
                self._fd = -1

    def abandon(self) -> None:
        """Close without writing what is buffered (after a storage error)."""
        self._buffer.clear()
        self._buffered = 0
        if self._fd >= 0:
            self._stop_committer()
            os.close(self._fd)
            self._fd = -1

    def _stop_committer(self) -> None:
        if self._committer is not None:
            self._committer.stop()
            self._committer = None

    def _undo_partial_write(self) -> None:
        """A failed write may have left part of a record: cut back to the last whole one."""
        try:
            os.ftruncate(self._fd, self.offset)
            os.lseek(self._fd, self.offset, os.SEEK_SET)
        except OSError:
            pass  # the reader treats the fragment as a torn tail


_WRITE_ALONE = 1 << 16


def _coalesced(parts: list[Any], size: int) -> list[Any]:
    """``parts`` as few buffers to write: small ones joined (one ``write`` for a batch of
    records), a large one written as it is rather than copied into the join."""
    if size < _WRITE_ALONE << 4 or len(parts) == 1:
        return [b"".join(parts)]
    chunks: list[Any] = []
    small: list[Any] = []
    for part in parts:
        if len(part) >= _WRITE_ALONE:
            if small:
                chunks.append(b"".join(small))
                small = []
            chunks.append(part)
        else:
            small.append(part)
    if small:
        chunks.append(b"".join(small))
    return chunks


def _drop_snapshots_past(job_dir: Path, valid_end: int) -> None:
    """Before a torn tail is cut away, remove the DLQ snapshot (``dlq.json``, derived) if it
    covers bytes of that tail: once new records are appended its offset would point into
    the middle of one (or, worse, at a boundary of different records)."""
    path = job_dir / "dlq.json"
    try:
        record = decode_line(path.read_bytes())
    except FileNotFoundError:
        return
    offset = record.get("journal_offset") if record else None
    if not isinstance(offset, int) or offset > valid_end:
        path.unlink(missing_ok=True)
        fsync_dir(job_dir)


def _fsync(fd: int, path: Path) -> None:
    try:
        os.fsync(fd)
        if failpoints.ENABLED:
            failpoints.hit("journal.after_fsync")
    except OSError as e:
        raise StorageError(f"{path}: cannot fsync journal: {e.strerror}") from None


class _Committer:
    """A thread that fsyncs the journal when asked, one fsync at a time.

    A failed fsync is kept and raised in the writer's thread at its next ``sync``
    (and every one after it: once an fsync has failed, nothing later is known to
    be durable)."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd, self._path = fd, path
        self._changed = threading.Condition()
        self._wanted = self._running = self._stopping = False
        self._failure: StorageError | None = None
        self._thread = threading.Thread(target=self._serve, name="mrpool-commit", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        return self._wanted or self._running

    def start_commit(self) -> None:
        with self._changed:
            self._wanted = True
            self._changed.notify_all()

    def wait_idle(self) -> None:
        with self._changed:
            while self._wanted or self._running:
                self._changed.wait()

    def raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def stop(self) -> None:
        """Finish the fsync in progress (if any), then end the thread."""
        with self._changed:
            self._stopping = True
            self._changed.notify_all()
        self._thread.join()

    def _serve(self) -> None:
        while True:
            with self._changed:
                while not self._wanted and not self._stopping:
                    self._changed.wait()
                if not self._wanted:
                    return
                self._wanted, self._running = False, True
            try:
                _fsync(self._fd, self._path)
            except StorageError as e:
                self._failure = e
            with self._changed:
                self._running = False
                self._changed.notify_all()
