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
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from .errors import InputError, JobSpecError, StorageError
from .fsutil import open_private
from .spec import JobSpec, printable

__all__ = [
    "IngestReport",
    "ingest",
    "iter_item_lines",
    "split_line",
    "identity_text",
    "read_ids",
    "indices_of",
]

ITEMS_FILE = "items.jsonl"


@dataclass(frozen=True)
class IngestReport:
    total: int
    duplicates: int
    id_mode: str  # "field:<name>" or "content-hash"


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
    seen = _Identities()
    total = duplicates = 0
    refused: InputError | None = None  # default id mode: a bad id only counts if every item has one
    with open(dest_dir / ITEMS_FILE, "wb", buffering=1 << 20, opener=_private) as out:
        try:
            for chunk in _read_input(spec):
                rows = _clean_chunk_rows(chunk, id_field, seen) if id_field else None
                if rows is not None:  # the common case: a few C-speed passes over the chunk
                    out.write(rows[1])
                    total += rows[0]
                    continue
                for n, item, raw in chunk.each():
                    if id_field is None:
                        raw_id: Any = content_id(item)
                    else:
                        try:
                            raw_id = _item_id(_where(spec, n), item, id_field, strict)
                        except InputError as e:
                            if strict:
                                raise
                            refused = refused or e  # unless a later item has no id at all
                            continue
                    if not seen.add(raw_id):
                        duplicates += 1
                        continue
                    out.write(orjson.dumps(raw_id) + b"\t" + (raw or orjson.dumps(item)) + b"\n")
                    total += 1
        except InputError:
            if refused is not None:
                raise refused from None  # report the first problem in the file
            raise
        out.flush()
        os.fsync(out.fileno())
    if refused is not None:
        raise refused
    if total == 0:
        raise InputError(f"{spec.input}: the input holds no items")
    mode = f"field:{id_field}" if id_field else "content-hash"
    return IngestReport(total=total, duplicates=duplicates, id_mode=mode)


class _Identities:
    """The identities seen so far, compared as text (7 and "7" are one identity).

    They are kept as ints for as long as every id has been an int (two ints are
    one identity exactly when their texts are), because turning each into text
    costs ~0.2 us an item; the first id that is not an int turns them all into
    text, once."""

    def __init__(self) -> None:
        self._ints: set[int] = set()
        self._texts: set[str] = set()

    def add(self, raw_id: Any) -> bool:
        """Record one id; False if it was seen before (a duplicate)."""
        if type(raw_id) is int and not self._texts:
            known, key = self._ints, raw_id
        else:
            known, key = self._as_texts(), identity_text(raw_id)
        if key in known:
            return False
        known.add(key)
        return True

    def add_all_new(self, ids: list[Any], kinds: set[type]) -> bool:
        """Record ids of ``kinds`` (str and int only) if none repeats; else change nothing."""
        if kinds == {int} and not self._texts:
            known, keys = self._ints, ids
        else:
            known = self._as_texts()
            keys = ids if kinds == {str} else [i if type(i) is str else str(i) for i in ids]
        if len(set(keys)) != len(keys) or not known.isdisjoint(keys):
            return False
        known.update(keys)
        return True

    def _as_texts(self) -> set[str]:
        if self._ints:
            self._texts.update(map(str, self._ints))
            self._ints.clear()
        return self._texts


def _clean_chunk_rows(chunk: _Chunk, id_field: str, seen: _Identities) -> tuple[int, bytes] | None:
    """``(count, items.jsonl rows)`` of a chunk with nothing unusual in it, else None.

    "Nothing unusual": every line parses, every item is an object whose id is a
    string or an integer, no id repeats, and the user's bytes can be kept. Any
    doubt returns None *before* ``seen`` changes, and the caller redoes the chunk
    item by item, where every error is found and named exactly as before. This
    is the ingest hot path: about half the time per item of the item-by-item
    loop (100k items: ~230 ms with string ids, ~140 ms with int ids, instead of
    ~400 ms; most of it orjson's parse).
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
    if not kinds <= {str, int} or not seen.add_all_new(ids, kinds):
        return None  # an id of another type, or duplicates: the slow path names or counts them
    dumps = orjson.dumps
    raws = map(bytes.strip, chunk.lines) if chunk.items is None else map(dumps, items)
    if kinds == {int} and chunk.items is None:
        return len(ids), _rows_with_int_ids(ids, raws)
    return len(ids), b"\n".join(map(b"\t".join, zip(map(dumps, ids), raws))) + b"\n"


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
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        kind = "null" if value is None else type(value).__name__
        kind = {"bool": "boolean", "dict": "object", "list": "array"}.get(kind, kind)
        raise InputError(
            f"{where}: field {id_field!r} is {kind}; an id must be a string or an integer"
        )
    return value


CHUNK_BYTES = 1 << 22  # input is validated a chunk at a time: streaming, yet C-speed per chunk
CHUNK_ITEMS = 16384


@dataclass
class _Chunk:
    """A run of consecutive input entries: ``.jsonl`` lines (LF removed) or ``.json`` items."""

    path: Path
    first: int  # the line (.jsonl) or position (.json) of the first entry, for error messages
    lines: list[bytes] | None
    items: list[Any] | None = None
    unclean: bool = False  # a line holds a TAB or CR: the user's bytes cannot be kept as they are

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


def _read_input(spec: JobSpec) -> Iterator[_Chunk]:
    """The input in chunks, streamed (``.jsonl``) or from the parsed document (``.json``)."""
    path = Path(spec.input)
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        raise InputError(f"{path}: no such input file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: input is a directory, expected a .jsonl or .json file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read input: {e.strerror}") from None
    with handle:
        if path.suffix == ".jsonl":
            yield from _read_jsonl(path, handle)
        else:
            yield from _read_json(spec, path, handle.read())


def _read_jsonl(path: Path, handle) -> Iterator[_Chunk]:
    lineno = 1
    while block := handle.read(CHUNK_BYTES):
        if block[-1:] != b"\n":
            block += handle.readline()  # whole lines only
        lines = block.split(b"\n")
        if not lines[-1]:
            lines.pop()  # the block ended with LF
        yield _Chunk(path, lineno, lines, unclean=b"\t" in block or b"\r" in block)
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
    with open(job_dir / ITEMS_FILE, "rb", buffering=1 << 20) as handle:
        yield from handle


def indices_of(job_dir: Path, item_ids: Iterable[str]) -> dict[str, int]:
    """The index of each item whose id, compared as text, is one of ``item_ids``."""
    wanted = set(item_ids)
    found: dict[str, int] = {}
    for index, raw in enumerate(read_ids(job_dir)):
        text = identity_text(raw)
        if text in wanted:
            found[text] = index
    return found


def read_ids(job_dir: Path) -> list[Any]:
    """Every item's id value, by index (for commands that show ids)."""
    return [orjson.loads(line[: line.index(b"\t")]) for line in iter_item_lines(job_dir)]
