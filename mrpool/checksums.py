"""Checksums of the files a job is made of: ``job.json`` and ``items.jsonl``.

The journal checks itself record by record (journal.py); these two files are
written once, at ``run``, and read by every later command, so a flipped byte in
them would otherwise change what a job *means* without anyone noticing.

``job.json`` carries ``"checksum": "crc32:XXXXXXXX"``, the CRC-32 of its other
fields as canonical JSON (orjson, sorted keys): whitespace may change, nothing
else. A ``job.json`` without it is from mrpool <= 0.1 and must hold exactly the
fields those versions wrote (so a flip in the word "checksum" cannot pass it
off as an old file).

``items.jsonl`` is checksummed in fixed 1 MiB chunks of its bytes, computed
while ingest writes it (one pass of ``zlib.crc32`` over data already in hand:
no second read, no per-line work) and kept in ``job.json`` as
``"items": {"chunk": 1048576, "size": BYTES, "lines": N, "crc": [crc, ...]}``.
Readers stream the file a chunk at a time and check each chunk before they
hand out any line of it, then check the size and line count at the end: a
reader never acts on an unverified item, and a lost LF, a cut or an emptied
file are named, not met as a missing line deep inside a command.

The file may be longer than the table's ``size``: ``mrpool.map(..., extend=True)``
appends the new items' rows (fsynced) *before* it replaces ``job.json`` with the
longer table, so a crash in between leaves rows no ``job.json`` names. Readers
read only the ``size`` bytes the table covers -- the job is the old one, whole --
and the next extension cuts the stray bytes before it appends (items.py).
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson

from .errors import CorruptStateError

__all__ = [
    "ITEMS_CHUNK",
    "ChunkedCrcWriter",
    "job_checksum",
    "verified_item_blocks",
    "verified_item_data",
]

ITEMS_CHUNK = 1 << 20


def job_checksum(fields: dict[str, Any]) -> str:
    """The checksum ``job.json`` carries of its other ``fields``."""
    body = {k: v for k, v in fields.items() if k != "checksum"}
    return f"crc32:{zlib.crc32(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)):08x}"


class ChunkedCrcWriter:
    """A write-only file wrapper that checksums what passes through, chunk by chunk."""

    def __init__(self, out, table: dict[str, Any] | None = None) -> None:
        """``table``: go on from the end of a file already checksummed by it (an
        extension appends to ``items.jsonl``): its last, partial chunk is continued."""
        self.out = out
        self.size = 0
        self._crcs: list[int] = []
        self._crc = 0
        self._fill = 0  # bytes of the current chunk so far
        if table is not None:
            if table["chunk"] != ITEMS_CHUNK:
                raise ValueError(f"a checksum table of {table['chunk']}-byte chunks")
            self.size, self._fill = table["size"], table["size"] % ITEMS_CHUNK
            self._crcs = list(table["crc"])
            if self._fill:
                self._crc = self._crcs.pop()

    def write(self, data) -> int:
        self.out.write(data)
        view = memoryview(data)
        n = len(view)
        while view:
            piece = view[: ITEMS_CHUNK - self._fill]
            self._crc = zlib.crc32(piece, self._crc)
            self._fill += len(piece)
            view = view[len(piece) :]
            if self._fill == ITEMS_CHUNK:
                self._crcs.append(self._crc)
                self._crc = self._fill = 0
        self.size += n
        return n

    def table(self, lines: int) -> dict[str, Any]:
        """What ``job.json`` records as ``items``."""
        crcs = self._crcs + ([self._crc] if self._fill else [])
        return {"chunk": ITEMS_CHUNK, "size": self.size, "lines": lines, "crc": crcs}


def verified_item_blocks(
    path: Path, table: dict[str, Any] | None, lines: int | None, hint: str
) -> Iterator[list[bytes]]:
    """The lines of ``items.jsonl`` (LF kept) in blocks, each block's bytes verified
    against ``table`` before it is yielded, and only the ``size`` bytes it covers
    (see the module docstring); ``table`` None (a job from mrpool <= 0.1):
    unverified, but the shape (whole lines, their count unless ``lines`` is None) is
    still checked.
    Raises ``CorruptStateError`` naming the file, the bytes and the line."""
    for data in verified_item_data(path, table, lines, hint):
        yield io.BytesIO(data).readlines()


def verified_item_data(
    path: Path, table: dict[str, Any] | None, lines: int | None, hint: str
) -> Iterator[bytes]:
    """``verified_item_blocks`` as the bytes of each block's whole lines."""
    chunk = table["chunk"] if table else ITEMS_CHUNK
    crcs = table["crc"] if table else None
    try:
        handle = open(path, "rb", buffering=0)
    except FileNotFoundError:
        raise CorruptStateError(f"{path}: missing; {hint}") from None
    with handle:
        carry, at, seen, number = b"", 0, 0, 0
        end = table["size"] if table else None
        while block := handle.read(chunk if end is None else min(chunk, end - at)):
            if crcs is not None and (number >= len(crcs) or zlib.crc32(block) != crcs[number]):
                raise CorruptStateError(
                    f"{path}: damaged at bytes {at}-{at + len(block) - 1} (from about line "
                    f"{seen + 1}): checksum mismatch; {hint}"
                )
            at += len(block)
            number += 1
            data = carry + block if carry else block
            cut = data.rfind(b"\n") + 1
            carry = data[cut:]
            if cut:
                whole = data[:cut] if cut < len(data) else data
                if crcs is None and not all(b"\t" in line for line in io.BytesIO(whole)):
                    raise CorruptStateError(
                        f"{path}: a line near line {seen + 1} has no TAB (damaged); {hint}"
                    )
                seen += whole.count(b"\n")
                if lines is not None and seen > lines:
                    break
                yield whole
    if table is not None and (at != table["size"] or number != len(crcs)):
        raise CorruptStateError(
            f"{path}: {at} bytes, but {table['size']} were written (cut); {hint}"
        )
    if carry or (lines is not None and seen != lines):
        raise CorruptStateError(
            f"{path}: holds {seen}{' whole' if carry else ''} lines, expected {lines}; {hint}"
        )
