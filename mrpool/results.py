"""Reading a job's results at disk speed (``mrpool results``, ``api.iter_result_lines``).

    journal.log --pass 1: each ok record, in file order--> first[index] = record number
                                                            runs: records that own a range
    items.jsonl --verified blocks, in input order--------> id bytes      \\
    journal.log --pass 2: records read back in input order (page cache) --> rows, a block
                                                                            per write

Pass 1 reads each ``ok`` record once, checks it (journal.py) and notes which
items' first success it holds: 4 bytes an item. A record that holds a run of
consecutive items, none with an earlier success, *owns* that run -- what the
supervisor writes (one record per worker batch), so nearly every record does --
and is noted with three slice operations instead of a step per item.

Pass 2 walks the input order: an owned run goes out whole (its ids from
``items.jsonl``, its results from the record, read back once: one more
sequential read, from the page cache, with no sort -- the runs are ordered by
their first item); any other success is looked up by item, its record read
back and kept in a small cache (16 MiB of results at most). Memory is about
one record however large one result is.

Results are copied out as the bytes the worker stored, never rebuilt as Python
objects: a record whose rows are small is decoded by orjson in one call and its
results re-encoded by orjson in one ``map`` (what orjson wrote it reads and
writes back byte for byte, cheaper than locating each small result in the
bytes); a record with large rows is cut by ``journal.result_spans`` (nothing
decoded) and its results handed out as views into the record. Rows are
formatted a run at a time; a large row is handed out as three pieces (head,
the stored result, tail), so that writing it copies nothing.
"""

from __future__ import annotations

import re
from array import array
from collections.abc import Iterable, Iterator
from pathlib import Path

import orjson

from .errors import CorruptStateError
from .journal import checked_payload, read_payloads, result_spans

__all__ = ["result_json", "result_pairs", "jsonl_blocks", "ids_of"]

SMALL_ROWS = 4096  # a record's mean bytes a row below which orjson decodes it whole
BIG_ROW = 1 << 16  # a result at least this long goes out as its own piece, uncopied
CACHE_BYTES = 1 << 24  # results read back for items outside owned runs, not yet due
CACHE_RECORDS = 64

Result = bytes | memoryview
Segment = tuple[int, list[Result]]  # (index of the first, results of consecutive items)


def result_json(journal: Path, total: int) -> Iterator[tuple[int, Result]]:
    """``(index, result as stored JSON)`` of every success, in input order, each index
    once (its first success)."""
    for start, results in _segments(journal, total):
        yield from enumerate(results, start)


def result_pairs(
    journal: Path, total: int, lines: Iterable[bytes], with_item: bool = False
) -> Iterator[tuple[bytes, Result]]:
    """``(id as stored, result as stored)`` of every success, in input order; ``lines``
    are the verified blocks of ``items.jsonl``, as bytes (exactly ``total`` lines).
    ``with_item``: the first part is ``ID,"item":ITEM`` (what follows ``{"id":`` in a
    row that carries the item)."""
    ids = _Ids(iter(lines), journal.parent / "items.jsonl", total, with_item)
    for start, results in _segments(journal, total):
        yield from zip(ids.take(start, len(results)), results)
    ids.finish()


def jsonl_blocks(
    journal: Path, total: int, lines: Iterable[bytes], with_item: bool = False
) -> Iterator[bytes | memoryview]:
    """``result_pairs`` as ``{"id":ID,"result":R}`` LF rows (``with_item``:
    ``{"id":ID,"item":ITEM,"result":R}``): a run of rows a block, a large row in three
    pieces (its stored result is not copied)."""
    ids = _Ids(iter(lines), journal.parent / "items.jsonl", total, with_item)
    for start, results in _segments(journal, total):
        raw_ids = ids.take(start, len(results))
        if max(map(len, results)) < BIG_ROW:
            yield _rows(raw_ids, results)
            continue
        for raw_id, result in zip(raw_ids, results):
            if len(result) < BIG_ROW:
                yield _rows([raw_id], [result])
                continue
            yield b'{"id":%b,"result":' % raw_id
            yield result
            yield b"}\n"
    ids.finish()


def _rows(ids: list[bytes], results: list[Result]) -> bytes:
    """``{"id":ID,"result":R}`` LF for each pair, in one join."""
    parts: list[Result] = [b'{"id":', b"", b',"result":', b"", b"}\n"] * len(ids)
    parts[1::5] = ids
    parts[3::5] = results
    return b"".join(parts)


# -- pass 1 -----------------------------------------------------------------------------
class _Index:
    """Where each item's first success is: ``first[index]`` the ``ok`` record's number
    (-1: none); ``spots[number]`` its (offset, length); ``runs`` [(start, count,
    number)] of the records that own a run, in file order.

    Not ``exact``, a record of small rows is not decoded: its first row's index,
    its last row's (after the last ``],[``) and its row count (``],[`` counted)
    are read from the bytes, and if they make a run the record is taken to own it
    -- a result holding such bytes could make that wrong, so pass 2 checks each
    run when it decodes the record, and on a mismatch (``_Mismatch``) the index is
    built again, ``exact``."""

    def __init__(self, journal: Path, total: int, exact: bool = False) -> None:
        self.first = first = array("i", [-1]) * total
        self.spots: list[tuple[int, int]] = []
        self.runs: list[tuple[int, int, int]] = []
        self.spans: dict[int, list[tuple[int, int, int]]] = {}  # of records of large rows
        reruns = False
        for offset, end, line in read_payloads(journal):
            if not line.startswith(_OK_PREFIX, 9):
                if line.startswith(_RERUN_PREFIX, 9):  # mrpool rerun: the next success counts
                    for index in orjson.loads(memoryview(line)[9:-1])["b"]:
                        if 0 <= index < total:
                            first[index] = -1
                    reruns = True
                continue
            number = len(self.spots)
            self.spots.append((offset, end - offset))
            if not exact and _small_rows(line) and self._owns_guess(line, number):
                continue
            indices = self._indices(line, number)
            del line  # before the next (possibly huge) record is read
            if indices and self._owns(indices[0], len(indices), number, indices):
                continue
            for index in indices:
                if 0 <= index < total and first[index] < 0:
                    first[index] = number
        if reruns:  # a run is owned only where no rerun took an item of it back
            self.runs = [run for run in self.runs if self._still_owned(*run)]

    def _still_owned(self, start: int, count: int, number: int) -> bool:
        return self.first[start : start + count].count(number) == count

    def _indices(self, line: bytes, number: int) -> list[int]:
        """The indices of record ``number``'s rows (of large rows: their spans kept)."""
        if _small_rows(line):
            return [row[0] for row in _rows_of(line)]
        spans = result_spans(line)
        if spans and spans[0][1] >= 0:
            self.spans[number] = spans
        return [index for index, _start, _end in spans]

    def _owns_guess(self, line: bytes, number: int) -> bool:
        head = _FIRST_ROW.match(line, 9)
        if head is None:
            return False
        start = int(head.group(1))
        last_at = line.rfind(b"],[")
        if last_at < 0:
            return self._owns(start, 1, number)
        tail = _ROW_INDEX.match(line, last_at + 3)
        count = line.count(b"],[") + 1
        return (
            tail is not None
            and int(tail.group(1)) == start + count - 1
            and (self._owns(start, count, number))
        )

    def _owns(self, start: int, count: int, number: int, indices: list[int] | None = None) -> bool:
        """Record ``number`` owns ``start`` to ``start + count`` if none of them has an
        earlier success (and ``indices``, when known, are exactly those)."""
        stop = start + count
        if start < 0 or stop > len(self.first) or self.first[start:stop].count(-1) != count:
            return False
        if indices is not None and indices != list(range(start, stop)):
            return False
        self.first[start:stop] = array("i", [number]) * count
        self.runs.append((start, count, number))
        return True


_OK_PREFIX, _RERUN_PREFIX = b'{"k":"ok"', b'{"k":"rerun"'  # records are written k first
_FIRST_ROW = re.compile(rb'\{"k":"ok","b":\[\[(\d+),')
_ROW_INDEX = re.compile(rb"(\d+),")


class _Mismatch(Exception):
    """A run guessed in pass 1 is not what its record holds."""


def _small_rows(line: bytes) -> bool:
    """Whether the ``ok`` record on ``line`` holds small rows (mean under SMALL_ROWS
    bytes): rows are ``[index,attempt,duration,result]`` joined by ``],[``, so its
    count bounds the row count from above (a result may hold the three bytes too);
    counted in the first MiB only (a record of a 1 GB row need not be searched)."""
    head = min(len(line), 1 << 20)
    return head < SMALL_ROWS * (line.count(b"],[", 0, head) + 1)


def _rows_of(line: bytes) -> list[list]:
    return orjson.loads(memoryview(line)[9:-1])["b"]


# -- pass 2 -----------------------------------------------------------------------------
def _segments(journal: Path, total: int) -> Iterator[Segment]:
    """The successes in input order, as runs of consecutive items."""
    index = _Index(journal, total)
    at = 0
    with _Records(journal, index) as records:
        try:
            for segment in _in_order(records, index, 0):
                yield segment
                at = segment[0] + len(segment[1])
        except _Mismatch:
            index = records.index = _Index(journal, total, exact=True)
            yield from _in_order(records, index, at)


def _in_order(records: _Records, index: _Index, at: int) -> Iterator[Segment]:
    """The successes of items ``at`` on."""
    first = index.first
    for start, count, number in sorted(index.runs):
        if start < at:
            continue  # (after a mismatch: gone out already)
        yield from _scattered(records, first, at, start)
        yield start, records.read_run(number, start, count)
        at = start + count
    yield from _scattered(records, first, at, len(first))


def _scattered(records: _Records, first: array, start: int, stop: int) -> Iterator[Segment]:
    """The successes of items ``start`` to ``stop`` (none in an owned run), one by one."""
    if first[start:stop].count(-1) == stop - start:
        return  # (most gaps between runs are empty)
    for index in range(start, stop):
        number = first[index]
        if number >= 0:
            yield index, [records.take(number, index)]


class _Records:
    """``ok`` records read back: whole (an owned run) or by item, through a small cache."""

    def __init__(self, journal: Path, index: _Index) -> None:
        self.journal, self.index = journal, index
        self.handle = open(journal, "rb", buffering=0)  # noqa: SIM115 - closed by __exit__
        self.cache: dict[int, dict[int, Result]] = {}
        self.cached_bytes = 0

    def __enter__(self) -> _Records:
        return self

    def __exit__(self, *exc: object) -> None:
        self.handle.close()
        self.cache.clear()

    def take(self, number: int, index: int) -> Result:
        results = self.cache.get(number)
        if results is None:
            if self.cached_bytes > CACHE_BYTES or len(self.cache) >= CACHE_RECORDS:
                self.cache.clear()  # a record dropped here is read again if needed
                self.cached_bytes = 0
            results = self.cache[number] = self.read(number)
            self.cached_bytes += sum(map(len, results.values()))
        result = results.pop(index)
        if not results:
            del self.cache[number]
        return result

    def read_run(self, number: int, start: int, count: int) -> list[Result]:
        """The results of record ``number``, which holds items ``start`` to
        ``start + count`` in order (``_Mismatch`` if it does not)."""
        line, spans = self._read(number)
        if spans is None:
            rows = _rows_of(line)
            if [row[0] for row in rows] != list(range(start, start + count)):
                raise _Mismatch()
            return list(map(orjson.dumps, [row[3] for row in rows]))
        if [index for index, _start, _end in spans] != list(range(start, start + count)):
            raise _Mismatch()
        view = memoryview(line)
        return [view[start:end] for _index, start, end in spans]

    def read(self, number: int) -> dict[int, Result]:
        """``{index: result as stored}`` of record ``number`` (its first row per index)."""
        line, spans = self._read(number)
        if spans is None:
            rows = _rows_of(line)
            encoded = list(map(orjson.dumps, [row[3] for row in rows]))
            return dict(zip(reversed([row[0] for row in rows]), reversed(encoded)))
        view = memoryview(line)
        return {index: view[start:end] for index, start, end in reversed(spans)}

    def _read(self, number: int) -> tuple[bytes, list[tuple[int, int, int]] | None]:
        """Record ``number``, checked again, and its results' spans (None: decode it)."""
        offset, length = self.index.spots[number]
        self.handle.seek(offset)
        line = self.handle.read(length)
        if len(line) != length or checked_payload(line) is None:
            raise CorruptStateError(
                f"{self.journal}: record at byte {offset} changed while reading"
            )
        return line, self.index.spans.get(number)  # (the bytes are the ones pass 1 cut)


class _Ids:
    """The stored id bytes of items by index, from ``items.jsonl``'s verified blocks
    (``items.iter_item_data``), asked for in increasing order."""

    def __init__(self, blocks: Iterator[bytes], path: Path, total: int, with_item: bool) -> None:
        self.blocks, self.path, self.total, self.with_item = blocks, path, total, with_item
        self.base = 0  # index of ids[0]
        self.ids: list[bytes] = []

    def take(self, start: int, count: int) -> list[bytes]:
        while start >= self.base + len(self.ids):
            self._next()
        at = start - self.base
        taken = self.ids[at : at + count]
        while len(taken) < count:
            self._next()
            taken += self.ids[: count - len(taken)]
        return taken

    def finish(self) -> None:
        """Read the blocks to the end: the count and the last checksums are checked."""
        for _ in iter(self._more, False):
            pass

    def _next(self) -> None:
        if not self._more():
            raise CorruptStateError(f"{self.path}: fewer lines than the {self.total} items")

    def _more(self) -> bool:
        data = next(self.blocks, None)
        if data is None:
            return False
        self.base += len(self.ids)
        self.ids = ids_of(data, self.path, self.with_item)
        return True


def ids_of(data: bytes, path: Path, with_item: bool = False) -> list[bytes]:
    """The id part of each ``id TAB item LF`` line of ``data`` (verified bytes: one TAB a
    line, which ingest writes and the reader checks of files without checksums), or
    ``with_item`` ``id,"item":item``."""
    lines = data.count(b"\n")
    if len(data) > 256 * lines and not with_item:  # long items: find each TAB, copy none
        ids, at = [], 0
        for _ in range(lines):
            tab = data.index(b"\t", at)
            ids.append(data[at:tab])
            at = data.index(b"\n", tab) + 1
        return ids
    parts = data.replace(b"\t", b"\n").split(b"\n")  # id, item, id, item, ..., b""
    if len(parts) != 2 * lines + 1:
        raise CorruptStateError(f"{path}: a line without exactly one TAB (damaged)")
    if with_item:
        return list(map(b',"item":'.join, zip(parts[0:-1:2], parts[1::2])))
    return parts[0:-1:2]
