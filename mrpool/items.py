"""Work items: read the user's input once, give each item its identity, store it.

``ingest`` streams the input (``.jsonl`` line by line, or a ``.json`` document
with an optional JSONPath), validates every item *before* any job state exists,
collapses duplicate identities (first wins, the rest are counted) and writes the
job's own copy, ``items.jsonl``. Everything later -- dispatch, resume, results,
the DLQ -- reads that copy, so editing or deleting the input after ``run`` can
never change what a job means.

``items.jsonl`` format (one line per unique item, in input order; the line
number is the item's *index*, the key the journal uses):

    <id as compact JSON> TAB <item as compact JSON> LF

The id part is orjson output and so never contains a raw TAB; the supervisor
forwards lines to workers without parsing them.

The copy is written once, except that ``mrpool.map(..., extend=True)`` appends
the rows of new items (``append_rows``) before ``job.json`` is replaced with the
longer checksum table; until then readers read only the bytes the old table
covers (checksums.py), so the job is the old one or the extended one, whole.
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import signal
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .checksums import ChunkedCrcWriter, verified_item_blocks, verified_item_data
from .errors import CorruptStateError, InputError, JobSpecError, StorageError, fsck_hint
from .fsutil import NotRegularFileError, open_private, open_regular_file
from .spec import JobSpec, printable

__all__ = [
    "IngestReport",
    "ingest",
    "iter_item_lines",
    "split_line",
    "identity_text",
    "read_ids",
    "raw_ids_at",
    "indices_of",
    "append_rows",
    "items_table_of",
]

ITEMS_FILE = "items.jsonl"


@dataclass(frozen=True)
class IngestReport:
    total: int
    duplicates: int
    id_mode: str  # "field:<name>" or "content-hash"
    items_table: dict[str, Any] | None = None  # items.jsonl's checksums (checksums.py)


class _NeedContentHash(Exception):
    """Default id mode met an item without an ``id``: start over hashing content."""


def identity_text(value: Any) -> str:
    """The text an id is compared by: 7 and "7" are one identity."""
    return value if isinstance(value, str) else str(value)


def content_id(item: Any) -> str:
    canonical = orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


def ingest(spec: JobSpec, dest_dir: Path) -> IngestReport:
    """Validate the whole input and write ``dest_dir/items.jsonl`` (fsynced)."""
    try:
        return _ingest_with_identity(spec, dest_dir)
    except OSError as e:
        if e.filename is not None or isinstance(e, FileNotFoundError):
            raise
        raise StorageError(
            f"{dest_dir / ITEMS_FILE}: cannot write the job's copy of the items: {e.strerror}"
        ) from None


def _ingest_with_identity(spec: JobSpec, dest_dir: Path) -> IngestReport:
    if spec.id_field:
        return _ingest(spec, dest_dir, id_field=spec.id_field, strict=True)
    try:
        return _ingest(spec, dest_dir, id_field="id", strict=False)
    except _NeedContentHash:
        return _ingest(spec, dest_dir, id_field=None, strict=False)


def _ingest(spec: JobSpec, dest_dir: Path, id_field: str | None, strict: bool) -> IngestReport:
    with open(dest_dir / ITEMS_FILE, "wb", buffering=1 << 20, opener=_private) as out:
        summed = ChunkedCrcWriter(out)
        run = _IngestRun(spec, summed, id_field, strict)
        helpers = _start_helpers(spec, dest_dir, id_field) if id_field else []
        try:
            for chunk in _read_input(spec, stop=helpers[0].start if helpers else None):
                run.take(chunk)
            for helper in helpers:
                run.take_part(helper)
        except InputError:
            if run.refused is not None:
                raise run.refused from None  # report the first problem in the file
            raise
        finally:
            for helper in helpers:
                helper.finish()
        out.flush()
        os.fsync(out.fileno())
    if run.refused is not None:
        raise run.refused
    if run.total == 0:
        raise InputError(f"{spec.input}: the input holds no items")
    mode = f"field:{id_field}" if id_field else "content-hash"
    return IngestReport(
        total=run.total,
        duplicates=run.duplicates,
        id_mode=mode,
        items_table=summed.table(run.total),
    )


class _IngestRun:
    """One pass over the input, in input order: validates, dedups and writes each chunk."""

    def __init__(self, spec: JobSpec, out, id_field: str | None, strict: bool) -> None:
        self.spec, self.out, self.id_field, self.strict = spec, out, id_field, strict
        self.seen = _Identities()
        self.total = self.duplicates = 0
        self.next_line = 1  # .jsonl: the line number the next chunk starts at
        # default id mode: a bad id only counts if every item has one
        self.refused: InputError | None = None

    def take(self, chunk: _Chunk) -> None:
        if chunk.lines is not None:
            self.next_line = chunk.first + len(chunk.lines)
        id_field, seen, out = self.id_field, self.seen, self.out
        rows = _clean_chunk_rows(chunk, id_field, seen) if id_field else None
        if rows is not None:  # the common case: a few C-speed passes over the chunk
            out.write(rows[1])
            self.total += rows[0]
            return
        for n, item, raw in chunk.each():
            if id_field is None:
                raw_id: Any = content_id(item)
            else:
                try:
                    raw_id = _item_id(_where(self.spec, n), item, id_field, self.strict)
                except InputError as e:
                    if self.strict:
                        raise
                    self.refused = self.refused or e  # unless a later item has no id at all
                    continue
            if not seen.add(raw_id):
                self.duplicates += 1
                continue
            out.write(orjson.dumps(raw_id) + b"\t" + (raw or orjson.dumps(item)) + b"\n")
            self.total += 1

    def take_part(self, helper: _Helper) -> None:
        """The next part of the input: the helper's rows if it found the part clean and
        none of its ids was seen before; otherwise the part, validated here as usual."""
        done = helper.result()
        if done is not None:
            count, ids = done
            if (
                self.seen.add_packed(*ids)
                if isinstance(ids, tuple)
                else self.seen.add_all_new(ids, set(map(type, ids)))
            ):
                helper.copy_rows(self.out)
                self.total += count
                self.next_line += count  # a clean part has no blank line: one item a line
                return
        for chunk in _read_input(self.spec, helper.start, helper.stop, self.next_line):
            self.take(chunk)


# -- validating a large .jsonl input on every core ----------------------------
MAX_PARTS = 4
MIN_PART_BYTES = 1 << 19


def _start_helpers(spec: JobSpec, dest_dir: Path, id_field: str) -> list[_Helper]:
    """Helpers for the parts of a large ``.jsonl`` input after the first, one per core.

    Validation is most of a new job's start-up and it is single-core work, so
    with N cores the input is cut at line starts into N parts and a forked helper
    runs the fast path (``_clean_chunk_rows``) over each part but the first,
    writing its rows to a file beside ``items.jsonl``, while this process does
    the first. The parts are then taken *in input order* (``take_part``): a
    helper's rows are kept only if its part was clean and none of its ids was
    seen earlier in the file; otherwise this process validates that part itself,
    as if there had been no helper -- so errors, their order and duplicate
    counts are exactly those of the plain pass.
    """
    path = Path(spec.input)
    if path.suffix != ".jsonl":
        return []
    try:
        size = path.stat().st_size
    except OSError:
        return []  # the plain pass reports it
    parts = min(MAX_PARTS, _cores(), size // MIN_PART_BYTES)
    if parts < 2:
        return []
    try:
        starts = _line_starts(path, [size * k // parts for k in range(1, parts)], size)
    except OSError:
        return []  # the plain pass reports it
    helpers: list[_Helper] = []
    try:
        for k, (start, stop) in enumerate(zip(starts, [*starts[1:], size]), 1):
            helpers.append(_Helper(path, start, stop, id_field, dest_dir / f".part{k}.tmp"))
    except OSError:  # no process to be had (EAGAIN): the plain pass does it all
        for helper in helpers:
            helper.finish()
        return []
    return helpers


def _cores() -> int:
    """The cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1


def _line_starts(path: Path, offsets: list[int], size: int) -> list[int]:
    """The start of the first line after each offset (increasing, before ``size``)."""
    starts: list[int] = []
    with open_regular_file(path) as handle:
        for offset in offsets:
            handle.seek(max(offset - 1, starts[-1] if starts else 0))
            handle.readline()
            at = handle.tell()
            if at < size and (not starts or at > starts[-1]):
                starts.append(at)
    return starts


class _Helper:
    """A forked process validating the input's bytes ``start`` to ``stop``."""

    def __init__(self, path: Path, start: int, stop: int, id_field: str, rows_path: Path) -> None:
        import multiprocessing  # (here: commands that only read items need none of it)

        self.path, self.start, self.stop, self.rows_path = path, start, stop, rows_path
        ctx = multiprocessing.get_context("fork")
        self._receiver, sender = ctx.Pipe(duplex=False)
        self._process = ctx.Process(
            target=_validate_part,
            args=(path, start, stop, id_field, rows_path, sender, os.getpid()),
            name="mrpool-ingest",
            daemon=True,
        )
        try:
            self._process.start()
        except BaseException:
            self._receiver.close()
            raise
        finally:
            sender.close()

    def result(self) -> tuple[int, list[Any] | tuple[bytes, int, int]] | None:
        """``(item count, ids)`` of a clean part, or None (not clean, or the helper died);
        ids: a list, or ``(packed, lowest, highest)`` (``_Identities.packed``)."""
        try:
            message = self._receiver.recv_bytes()
            if not message:
                return None
            done = orjson.loads(message)
            if len(done) == 3:
                return done[0], (self._receiver.recv_bytes(), done[1], done[2])
        except (EOFError, OSError):
            return None
        return done[0], done[1]

    def copy_rows(self, out) -> None:
        with open(self.rows_path, "rb") as rows:
            shutil.copyfileobj(rows, out, 1 << 20)

    def finish(self) -> None:
        """End the helper (it may still be running if the pass stopped early) and
        remove its rows file."""
        if self._process.is_alive():
            self._process.kill()
        self._process.join()
        self._process.close()
        self._receiver.close()
        self.rows_path.unlink(missing_ok=True)


def _validate_part(
    path: Path, start: int, stop: int, id_field: str, rows_path: Path, conn, parent: int
) -> None:
    """In a helper: the fast path over one part; sends ``[count, ids]``, or b"" at the
    first doubt (the parent then validates the part itself and names any error).
    If the parent dies (SIGKILL mid-ingest), the helper stops at its next chunk."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    try:
        seen, count = _Identities(), 0
        with open_regular_file(path) as handle, open(rows_path, "wb", opener=_private) as out:
            handle.seek(start)
            for chunk in _read_jsonl(path, handle, stop):
                rows = _clean_chunk_rows(chunk, id_field, seen)
                if rows is None or os.getppid() != parent:
                    conn.send_bytes(b"")
                    return
                out.write(rows[1])
                count += rows[0]
        packed = seen.packed()
        if packed is None:
            conn.send_bytes(orjson.dumps([count, seen.all()]))
        else:  # rising int ids: 8 bytes each, not a JSON list the parent decodes
            conn.send_bytes(orjson.dumps([count, packed[1], packed[2]]))
            conn.send_bytes(packed[0])
    except Exception:  # noqa: BLE001 - whatever it is, the parent's own pass will meet it
        pass


class _Identities:
    """The identities seen so far, compared as text (7 and "7" are one identity).

    They are kept as ints for as long as every id has been an int (two ints are
    one identity exactly when their texts are), because turning each into text
    is a cost per item on the ingest hot path; the first id that is not an int
    turns them all into text, once.

    While the int ids come in rising batches -- each batch unique and above every
    id before it, as ``range``-like ids do -- no set is needed to know that none
    repeats: they are kept packed (``array('q')``, 8 bytes an id instead of ~64
    in a set, which at 10M items was 640 MB), with the highest so far. The first
    batch that is not above it (or an int past 64 bits) turns them into a set."""

    def __init__(self) -> None:
        self._ints: set[int] = set()
        self._texts: set[str] = set()
        self._rising: array | None = array("q")
        self._low: int | None = None  # the lowest and highest rising id so far
        self._top: int | None = None

    def add(self, raw_id: Any) -> bool:
        """Record one id; False if it was seen before (a duplicate)."""
        if type(raw_id) is int and not self._texts:
            if self._rising_batch([raw_id], raw_id, raw_id):
                return True
            known, key = self._as_set(), raw_id
        else:
            known, key = self._as_texts(), identity_text(raw_id)
        if key in known:
            return False
        known.add(key)
        return True

    def add_all_new(self, ids: list[Any], kinds: set[type]) -> bool:
        """Record ids of ``kinds`` (str and int only) if none repeats; else change nothing."""
        if not ids:
            return True
        if kinds == {int} and not self._texts:
            if len(set(ids)) != len(ids):
                return False
            if self._rising_batch(ids, min(ids), max(ids)):
                return True
            known, keys = self._as_set(), ids
        else:
            known = self._as_texts()
            keys = ids if kinds == {str} else [i if type(i) is str else str(i) for i in ids]
            if len(set(keys)) != len(keys):
                return False
        if not known.isdisjoint(keys):
            return False
        known.update(keys)
        return True

    def add_packed(self, packed: bytes, low: int, top: int) -> bool:
        """``add_all_new`` of another ``_Identities``' rising ids (``packed()``: unique)."""
        ids = array("q")
        ids.frombytes(packed)
        if not self._texts and self._rising_batch(ids, low, top):
            return True
        return self.add_all_new(ids.tolist(), {int})

    def packed(self) -> tuple[bytes, int, int] | None:
        """The rising ids, packed, with their lowest and highest; None if not rising."""
        if self._rising is None or self._texts or self._ints or self._low is None:
            return None
        return self._rising.tobytes(), self._low, self._top

    def all(self) -> list[Any]:
        """Every id recorded (ints while all have been ints, else texts)."""
        return list(self._texts or self._as_set())

    def _rising_batch(self, ids, low: int, top: int) -> bool:
        """Record unique ``ids`` (lowest ``low``, highest ``top``) if they are all above
        every id so far and the ids are still kept packed; else change nothing."""
        rising = self._rising
        if rising is None or (self._top is not None and low <= self._top):
            return False
        if not (-(2**63) <= low and top < 2**63):
            return False  # past what 'q' holds
        rising.extend(ids)
        self._top = top
        self._low = low if self._low is None else self._low
        return True

    def _as_set(self) -> set[int]:
        if self._rising is not None:
            self._ints.update(self._rising)
            self._rising = None
        return self._ints

    def _as_texts(self) -> set[str]:
        ints = self._as_set()
        if ints:
            self._texts.update(map(str, ints))
            ints.clear()
        return self._texts


def _clean_chunk_rows(chunk: _Chunk, id_field: str, seen: _Identities) -> tuple[int, bytes] | None:
    """``(count, items.jsonl rows)`` of a chunk with nothing unusual in it, else None.

    "Nothing unusual": every line parses, every item is an object whose id is a
    string or an integer, no id repeats, and the user's bytes can be kept. Any
    doubt returns None *before* ``seen`` changes, and the caller redoes the chunk
    item by item, where every error is found and named exactly as before. This
    is the ingest hot path: about half the time per item of the item-by-item
    loop, most of what is left being orjson's parse (benchmarks/NOTES.md).
    """
    items = chunk.items
    if items is None:  # .jsonl: parse the chunk's lines in one comprehension
        if chunk.unclean:
            return None
        try:
            items = [orjson.loads(line) for line in chunk.lines]
        except orjson.JSONDecodeError:
            return None  # a blank or invalid line
    try:
        ids = [item[id_field] for item in items]
    except (KeyError, TypeError, IndexError):
        return None  # not an object, or no id: the slow path decides (error or content hash)
    kinds = set(map(type, ids))
    if chunk.items is not None and str in kinds and _any_nul(ids):
        return None  # (.jsonl: such a chunk is unclean) the slow path refuses it
    if not kinds <= {str, int} or not seen.add_all_new(ids, kinds):
        return None  # an id of another type, or duplicates: the slow path names or counts them
    dumps = orjson.dumps
    raws = map(bytes.strip, chunk.lines) if chunk.items is None else map(dumps, items)
    if kinds == {int} and chunk.items is None:
        return len(ids), _rows_with_int_ids(ids, raws)
    return len(ids), b"\n".join(map(b"\t".join, zip(map(dumps, ids), raws))) + b"\n"


def _any_nul(ids: list[Any]) -> bool:
    return any("\0" in i for i in ids if i.__class__ is str)


def _rows_with_int_ids(ids: list[int], raws: Iterable[bytes]) -> bytes:
    """``id TAB raw LF`` rows, the ints encoded in one call and split at its commas.

    (Not for encoded items: each orjson output keeps a large buffer, and holding
    thousands of them at once costs page faults; the join in _clean_chunk_rows
    consumes them one by one.)"""
    rows = [b"\t"] * (4 * len(ids))
    rows[0::4] = orjson.dumps(ids)[1:-1].split(b",")
    rows[2::4] = raws
    rows[3::4] = [b"\n"] * len(ids)
    return b"".join(rows)


def _private(path: str, flags: int) -> int:
    return open_private(path, flags)


def _where(spec: JobSpec, n: int) -> str:
    """Name an item for an error message: file and line (.jsonl) or position (.json)."""
    if spec.input.endswith(".jsonl"):
        return f"{spec.input}:{n}"
    return f"{spec.input}{' at ' + printable(spec.json_path) if spec.json_path else ''} item {n}"


def _item_id(where: str, item: Any, id_field: str, strict: bool) -> Any:
    if not isinstance(item, dict) or id_field not in item:
        if not strict:
            raise _NeedContentHash()
        what = "is not an object" if not isinstance(item, dict) else f"has no {id_field!r} field"
        raise InputError(f"{where}: item {what} (id_field is {id_field!r})")
    value = item[id_field]
    if isinstance(value, str) and "\0" in value:
        raise InputError(
            f"{where}: field {id_field!r} holds a NUL character (\\u0000); "
            "an id is passed in the environment, which cannot hold one"
        )
    if isinstance(value, float) and value.is_integer() and abs(value) >= 2**63:
        # orjson reads an integer past 64 bits as a float (its digits already lost); any
        # in-range integer would be an int, so such a float is (almost surely) one of those
        raise InputError(
            f"{where}: field {id_field!r} is an integer out of range (beyond 64 bits); "
            "give such an id as a string"
        )
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        kind = "null" if value is None else type(value).__name__
        kind = {"bool": "boolean", "dict": "object", "list": "array"}.get(kind, kind)
        raise InputError(
            f"{where}: field {id_field!r} is {kind}; an id must be a string or an integer"
        )
    return value


CHUNK_BYTES = 1 << 20  # validated a chunk at a time: C-speed per chunk, ~25 MB of objects at most
CHUNK_ITEMS = 16384


@dataclass
class _Chunk:
    """A run of consecutive input entries: ``.jsonl`` lines (LF removed) or ``.json`` items."""

    path: Path
    first: int  # the line (.jsonl) or position (.json) of the first entry, for error messages
    lines: list[bytes] | None
    items: list[Any] | None = None
    # a line holds a TAB or CR (the user's bytes cannot be kept as they are) or a \u0000
    # escape (an id may hold a NUL, which must be refused): the item-by-item path decides
    unclean: bool = False

    def each(self) -> Iterator[tuple[int, Any, bytes | None]]:
        """``(n, item, raw)`` one by one; ``raw`` is the item's own one-line JSON when it
        can be kept as is. Blank lines are skipped; an invalid one is an ``InputError``."""
        if self.items is not None:
            for offset, item in enumerate(self.items):
                yield self.first + offset, item, None
            return
        for offset, line in enumerate(self.lines):
            try:
                item = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                if not line.strip():
                    continue  # blank lines (a trailing newline, say) are not items
                raise InputError(
                    f"{self.path}:{self.first + offset}: invalid JSON: {e.msg}"
                ) from None
            raw = line.strip()
            yield self.first + offset, item, (None if b"\t" in raw or b"\r" in raw else raw)


def _read_input(
    spec: JobSpec, start: int = 0, stop: int | None = None, first_line: int = 1
) -> Iterator[_Chunk]:
    """The input in chunks, streamed (``.jsonl``: from byte ``start``, line number
    ``first_line``, up to byte ``stop`` if given) or from the parsed document (``.json``)."""
    path = Path(spec.input)
    try:
        handle = open_regular_file(path)
    except FileNotFoundError:
        raise InputError(f"{path}: no such input file") from None
    except NotRegularFileError as e:
        raise InputError(
            f"{path}: input is {e.kind}, expected a regular .jsonl or .json file"
        ) from None
    except OSError as e:
        raise InputError(f"{path}: cannot read input: {e.strerror}") from None
    with handle:
        if path.suffix == ".jsonl":
            handle.seek(start)
            yield from _read_jsonl(path, handle, stop, first_line)
        else:
            yield from _read_json(spec, path, handle.read())


def _read_jsonl(path: Path, handle, stop: int | None = None, lineno: int = 1) -> Iterator[_Chunk]:
    """Chunks of whole lines from the handle's position up to byte ``stop`` (a line
    start) or the end; ``lineno`` is the number of the first line."""
    at = handle.tell()
    while block := handle.read(CHUNK_BYTES if stop is None else min(CHUNK_BYTES, stop - at)):
        if block[-1:] != b"\n" and (stop is None or at + len(block) < stop):
            block += handle.readline()  # whole lines only
        at += len(block)
        lines = block.split(b"\n")
        if not lines[-1]:
            lines.pop()  # the block ended with LF
        # (memchr for a backslash first: the substring search is far slower, NOTES.md)
        unclean = b"\t" in block or b"\r" in block or (b"\\" in block and b"\\u0000" in block)
        yield _Chunk(path, lineno, lines, unclean=unclean)
        lineno += len(lines)


def _read_json(spec: JobSpec, path: Path, data: bytes) -> Iterator[_Chunk]:
    try:
        document = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise InputError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    if spec.json_path:
        from jsonpath_ng.ext import parse

        try:
            items = [m.value for m in parse(spec.json_path).find(document)]
        except Exception as e:  # noqa: BLE001 - jsonpath-ng raises assorted types
            detail = " ".join(str(e).split())
            raise JobSpecError(
                f"{spec.source}: json_path: cannot apply {spec.json_path!r}: {detail}"
            ) from None
    elif isinstance(document, list):
        items = document
    else:
        raise InputError(f"{path}: the document must be a JSON array of items (or set json_path)")
    for first in range(0, len(items), CHUNK_ITEMS):
        yield _Chunk(path, first, None, items[first : first + CHUNK_ITEMS])


def split_line(line: bytes) -> tuple[Any, bytes]:
    """``(id value, item JSON bytes)`` of one ``items.jsonl`` line."""
    raw_id, _, item = line.rstrip(b"\n").partition(b"\t")
    return orjson.loads(raw_id), item


def iter_item_lines(job_dir: Path) -> Iterator[bytes]:
    """Stream the lines of a job's ``items.jsonl``; the n-th line is index n."""
    for block in iter_item_blocks(job_dir):
        yield from block


def iter_item_blocks(job_dir: Path) -> Iterator[list[bytes]]:
    """The lines of ``items.jsonl`` about 1 MiB at a time, each block checked against
    the checksums in ``job.json`` before it is handed out (see checksums.py)."""
    for data in iter_item_data(job_dir):
        yield io.BytesIO(data).readlines()


def iter_item_data(job_dir: Path) -> Iterator[bytes]:
    """``iter_item_blocks`` as the bytes of each block's whole lines."""
    from .store import JOB_FILE, read_job_file

    if not (job_dir / JOB_FILE).exists():  # a job being built (commands refuse a job without it)
        yield from verified_item_data(job_dir / ITEMS_FILE, None, None, "")
        return
    info = read_job_file(job_dir)
    yield from verified_item_data(
        job_dir / ITEMS_FILE, info.items_table, info.total, fsck_hint(job_dir)
    )


def indices_of(job_dir: Path, item_ids: Iterable[str]) -> dict[str, int]:
    """The index of each item whose id, compared as text, is one of ``item_ids``."""
    wanted = set(item_ids)
    found: dict[str, int] = {}
    for index, raw in enumerate(read_ids(job_dir)):
        text = identity_text(raw)
        if text in wanted:
            found[text] = index
    return found


def raw_ids_at(job_dir: Path, indices: list[int]) -> list[bytes]:
    """The stored id bytes (JSON) of the items at ``indices`` (increasing), from the
    verified blocks of ``items.jsonl``: each block's ids split out at once."""
    from .results import ids_of

    found: list[bytes] = []
    base, at, path = 0, 0, job_dir / ITEMS_FILE
    for data in iter_item_data(job_dir):
        if at == len(indices):
            break
        ids = ids_of(data, path)
        stop = base + len(ids)
        upto = bisect_left(indices, stop, at)
        if upto - at == len(ids):  # every line of the block
            found += ids
        else:
            found += [ids[index - base] for index in indices[at:upto]]
        at, base = upto, stop
    if at < len(indices):
        raise CorruptStateError(f"{path}: fewer lines than item {indices[at]} needs")
    return found


def read_ids(job_dir: Path) -> list[Any]:
    """Every item's id value, by index (for commands that show ids)."""
    return [orjson.loads(line[: line.index(b"\t")]) for line in iter_item_lines(job_dir)]


# -- extending a job (mrpool.map(..., extend=True)) --------------------------------
class _NoOutput:
    def write(self, data) -> int:
        return len(data)


def items_table_of(job_dir: Path, total: int) -> dict[str, Any]:
    """The checksum table of the first ``total`` lines of a job's ``items.jsonl`` (a
    job written without one: mrpool <= 0.1), read once."""
    path = job_dir / ITEMS_FILE
    summed, lines = ChunkedCrcWriter(_NoOutput()), 0
    for block in verified_item_blocks(path, None, None, fsck_hint(job_dir)):
        block = block[: total - lines]
        summed.write(b"".join(block))
        lines += len(block)
        if lines == total:
            break
    if lines != total:
        raise CorruptStateError(
            f"{path}: holds {lines} lines, expected {total}; {fsck_hint(job_dir)}"
        )
    return summed.table(total)


def append_rows(job_dir: Path, table: dict[str, Any], rows: bytes, total: int) -> dict[str, Any]:
    """Append ``rows`` (whole ``items.jsonl`` lines) right after the bytes ``table``
    covers, cutting first what a crashed extension left past them, and fsync; return
    the table of the ``total`` lines the file then holds. ``job.json`` still names
    the old table: replacing it is the caller's commit (checksums.py)."""
    path = job_dir / ITEMS_FILE
    try:
        with open(path, "r+b", buffering=1 << 20) as out:
            out.truncate(table["size"])
            out.seek(table["size"])
            summed = ChunkedCrcWriter(out, table)
            summed.write(rows)
            out.flush()
            os.fsync(out.fileno())
    except OSError as e:
        raise StorageError(f"{path}: cannot add the new items: {e.strerror}") from None
    return summed.table(total)
