"""``dlq.json``: the DLQ snapshot, and the failure histories it is made of.

An item's failure history is its ``f`` records in the journal; the snapshot is a
derived, atomically replaced file that spares readers the journal. Format
(version 3), one journal-codec record (checksummed line)::

    {"k":"dlq","v":3,"journal_offset":N,"journal_crc":C,"items":K,
     "brief":PACKED,"refs":PACKED}

``N``: the snapshot covers the journal's bytes before it; ``C``: their CRC-32. A
reader trusts the snapshot only if the journal's first ``N`` bytes still have that
CRC (so a journal cut, salvaged or swapped since is never read through a stale
snapshot), then replays the ``f`` records after ``N``. ``PACKED`` is
base64(zlib(JSON)), as in ``checkpoint.json``:

* ``brief``: columns over the ``K`` items failed or parked at ``N``, ascending
  ``index``: ``group`` (a position in ``groups``, ``[kind, sig or null]`` of the
  item's last ``f`` record) and ``msg`` (the last record's). What ``dlq list`` and
  ``stats`` show, without reading one journal record.
* ``times``: ``2K`` little-endian doubles, packed the same way: the ``t`` of each
  item's first ``f`` record, then of each one's last (NaN: none recorded).
* ``refs``: each item's ``f`` record offsets, oldest first (what ``show``,
  ``export`` and ``retry`` read; each is checked to be that item's ``f`` record).

The journal text of a failure is stored once, in the journal; the snapshot holds
its message again (~40 bytes an item, compressed with the rest). Versions 2
(``"records":{"<index>":[offset, ...]}``: references only) and 1
(``"histories"``: each history copied in) are still read; their briefs are read
from the journal.

A session does not replay the journal to write the snapshot at its end: it notes
each ``f`` record it journals in a ``FailureLog`` (offset and brief, a few array
appends), and ``save_snapshot`` replays only what lies outside that log.
"""

from __future__ import annotations

import base64
import sys
import zlib
from array import array
from itertools import compress
from typing import Any

import orjson

from .errors import CorruptStateError
from .journal import crc_of_bytes, decode_line, encode_record

__all__ = ["Brief", "Histories", "FailureLog", "encode", "decode", "brief_of", "journal_crc"]

VERSION = 3
# (first t, last t, kind, sig or None, msg): what a listing shows of an item's history
Brief = tuple
UNREAD = "unread"  # a brief's first t when the first record has yet to be read
NO_RECORD = (None, None, "unknown", None, "(no failure record)")


def brief_of(record: dict[str, Any], first: Any) -> Brief:
    """The brief of a history whose last ``f`` record is ``record``."""
    sig = record.get("sig")
    return (
        first,
        record.get("t"),
        record.get("kind", "unknown"),
        sig if isinstance(sig, str) else None,
        record.get("msg", ""),
    )


class Histories:
    """Failed or parked items' histories: ``refs`` (index -> ``f`` record offsets, or a
    version-1 snapshot's copies) and ``briefs`` (index -> ``Brief``, when known).
    ``refs`` is decoded from a snapshot only when asked for: a listing needs briefs."""

    def __init__(self, refs: dict[int, list[Any]] | None = None, packed: str | None = None):
        self._refs = refs if refs is not None else ({} if packed is None else None)
        self._packed = packed
        self._order: list[int] = []  # the snapshot's indices, for decoding ``refs`` late
        self._briefs: dict[int, Brief] | None = {}
        self._columns: tuple | None = None  # a snapshot's brief columns, while untouched

    @property
    def briefs(self) -> dict[int, Brief]:
        if self._briefs is None:  # the columns become a dict once a brief is looked up
            order, first, last, group, groups, msg = self._columns
            self._briefs = {
                index: (f, t, *groups[g], m)
                for index, f, t, g, m in zip(order, first, last, group, msg)
            }
            self._columns = None
        return self._briefs

    @briefs.setter
    def briefs(self, value: dict[int, Brief]) -> None:
        self._briefs, self._columns = value, None

    def columns(self, order: list[int]) -> tuple[list, ...] | None:
        """``(first, last, kind, sig, msg)`` columns of the items ``order`` (increasing),
        straight from the snapshot's columns when nothing touched them, else None."""
        if self._columns is None:
            return None
        have, first, last, group, groups, msg = self._columns
        if have != order:
            at = {index: position for position, index in enumerate(have)}
            picked = [at.get(index) for index in order]
            if None in picked:
                return None
            first, last, group, msg = ([c[p] for p in picked] for c in (first, last, group, msg))
        kinds = [groups[g][0] for g in group]
        sigs = [groups[g][1] for g in group]
        return first, last, kinds, sigs, msg

    @property
    def refs(self) -> dict[int, list[Any]]:
        if self._refs is None:
            refs = _unpack(self._packed)
            if len(refs) != len(self._order) or not all(type(r) is int for rs in refs for r in rs):
                raise CorruptStateError("dlq.json: references that are not byte offsets")
            self._refs = dict(zip(self._order, refs))
            self._packed = None
        return self._refs

    def known(self, index: int) -> bool:
        """Whether ``index`` has a history (without decoding ``refs`` when a brief says so)."""
        return index in self.briefs or index in self.refs

    def add(self, index: int, ref: Any, record: dict[str, Any]) -> None:
        """One more ``f`` record of ``index``, at ``ref``."""
        old = self.briefs.get(index)
        first = old[0] if old is not None else UNREAD if self.known(index) else record.get("t")
        self.briefs[index] = brief_of(record, first)
        self.refs.setdefault(index, []).append(ref)

    def columns_whole(self, wanted) -> tuple[list, ...]:
        """``(index, first, last, group, groups, msg, refs)`` columns of the items for which
        ``wanted(index)`` is true, in input order (each brief complete: ``first`` read),
        ``group`` a position in ``groups``, the ``(kind, sig)`` pairs."""
        order = sorted(filter(wanted, self.refs))
        if not order:
            return [], [], [], [], [], [], []
        first, last, kinds, sigs, msg = map(list, zip(*map(self.briefs.__getitem__, order)))
        groups: dict[tuple[str, Any], int] = {}
        group = [groups.setdefault(pair, len(groups)) for pair in zip(kinds, sigs)]
        refs = list(map(self.refs.__getitem__, order))
        return order, first, last, group, list(groups), msg, refs


class FailureLog:
    """The ``f`` records one session journaled, noted as it appends them (columns: a few
    appends a failure), so that ``save_snapshot`` need not read them back: those at or
    after ``start`` and before ``end`` (the journal's offsets) are exactly these."""

    __slots__ = ("start", "end", "index", "offset", "t", "group", "msg", "groups")

    def __init__(self, start: int) -> None:
        self.start = self.end = start
        self.index, self.offset, self.t = array("q"), array("q"), array("d")
        self.group = array("I")
        self.msg: list[str] = []
        self.groups: dict[tuple[str, str | None], int] = {}

    def note(self, record: dict[str, Any], offset: int) -> None:
        self.index.append(record["i"])
        self.offset.append(offset)
        self.t.append(record["t"])
        sig = record.get("sig")
        key = (record.get("kind", "unknown"), sig if isinstance(sig, str) else None)
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = len(self.groups)
        self.group.append(group)
        self.msg.append(record.get("msg", ""))

    def columns(self, kept: bytes) -> tuple[list, ...] | None:
        """``Histories.columns_whole`` of these records alone (``kept``: a byte per item,
        true for those to keep), straight from the log's columns without an object a
        record, or None unless every item failed once only."""
        indices = self.index
        if len(set(indices)) != len(indices):
            return None
        positions = sorted(range(len(indices)), key=indices.__getitem__)
        order = list(map(indices.__getitem__, positions))
        flags = list(map(kept.__getitem__, order))
        if not all(flags):
            positions, order = list(compress(positions, flags)), list(compress(order, flags))
        first = list(map(self.t.__getitem__, positions))
        return (
            order,
            first,
            first,
            list(map(self.group.__getitem__, positions)),
            list(self.groups),
            list(map(self.msg.__getitem__, positions)),
            [[offset] for offset in map(self.offset.__getitem__, positions)],
        )

    def add_to(self, histories: Histories) -> None:
        """``histories.add`` of every noted record, in the order they were journaled."""
        groups = list(self.groups)
        refs, briefs = histories.refs, histories.briefs
        for index, offset, t, group, msg in zip(
            self.index, self.offset, self.t, self.group, self.msg
        ):
            had = refs.get(index)
            if had is None:  # the common case: its first failure
                refs[index] = [offset]
                briefs[index] = (t, t, *groups[group], msg)
            else:
                had.append(offset)
                old = briefs.get(index)
                briefs[index] = (UNREAD if old is None else old[0], t, *groups[group], msg)


# -- the file ----------------------------------------------------------------------
def encode(columns: tuple[list, ...], journal_offset: int, journal_crc: int) -> bytes:
    """The snapshot of ``columns`` (``Histories.columns_whole`` or ``FailureLog.columns``)
    as of ``journal_offset``, whose journal prefix has CRC ``journal_crc``."""
    order, first, last, group, groups, msg, refs = columns
    brief = {"index": order, "group": group, "groups": groups, "msg": msg}
    times = _little(_doubles(first + last)).tobytes()
    return encode_record(
        {
            "k": "dlq",
            "v": VERSION,
            "journal_offset": journal_offset,
            "journal_crc": journal_crc,
            "items": len(order),
            "brief": _pack(brief),
            "times": _pack_bytes(times),
            "refs": _pack(refs),
        }
    )


def decode(data: bytes, journal_path, state, need_refs: bool = True) -> tuple[Histories, int]:
    """``(histories, journal offset)`` of a snapshot file's bytes; ``ValueError`` (and
    its kin) when it is damaged or does not belong to this journal. Without
    ``need_refs`` a version-3 snapshot's references are decoded only if asked for."""
    record = decode_line(data)
    if record is None or record.get("k") != "dlq":
        raise ValueError("checksum or format mismatch")
    offset = int(record["journal_offset"])
    if offset > journal_path.stat().st_size:
        raise ValueError("points past the end of the journal")
    version = record.get("v")
    if version == 1:
        return Histories({int(i): h for i, h in record["histories"].items()}), offset
    if version == 2:
        refs = record["records"]
        if not all(type(r) is int for rs in refs.values() for r in rs):
            raise ValueError("a reference is not a byte offset")
        return Histories({int(i): rs for i, rs in refs.items()}), offset
    if version != VERSION:
        raise ValueError(f"unknown version {version!r}")
    if record["journal_crc"] != journal_crc(journal_path, offset, state):
        raise ValueError("the journal it describes has changed")
    histories = _decode_v3(record)
    if need_refs:
        histories.refs  # noqa: B018 - decoded now, where damage is a ValueError
    return histories, offset


def _decode_v3(record: dict[str, Any]) -> Histories:
    brief = _unpack(record["brief"])
    order, groups = brief["index"], [tuple(g) for g in brief["groups"]]
    times = array("d")
    times.frombytes(zlib.decompress(base64.b64decode(record["times"])))
    _little(times)
    if len(times) != 2 * len(order):
        raise ValueError("times of different length")
    columns = (order, _Times(times, 0, len(order)), _Times(times, len(order), len(times)),
               brief["group"], brief["msg"])  # fmt: skip
    if order != sorted(order):
        raise ValueError("indices out of order")
    if any(len(column) != record["items"] for column in columns):
        raise ValueError("columns of different lengths")
    group = brief["group"]
    if group and (set(map(type, group)) != {int} or min(group) < 0 or max(group) >= len(groups)):
        raise ValueError("a brief names no group")
    histories = Histories(packed=record["refs"])
    histories._order = order
    histories._briefs, histories._columns = (
        None,
        (*columns[:3], brief["group"], groups, brief["msg"]),
    )
    return histories


def journal_crc(journal_path, offset: int, state) -> int:
    """CRC-32 of the journal's first ``offset`` bytes, continuing the one the
    checkpoint proved (``state.crc``, of ``state.crc_offset`` bytes) when it can."""
    if state.crc is not None and state.crc_offset <= offset:
        return crc_of_bytes(journal_path, state.crc_offset, offset, state.crc)
    return crc_of_bytes(journal_path, 0, offset)


class _Times:
    """A column of epoch times, decoded from the packed doubles when first iterated or
    indexed (a table of the DLQ shows none)."""

    def __init__(self, packed: array, start: int, stop: int) -> None:
        self.packed, self.start, self.stop = packed, start, stop
        self._list: list[float | None] | None = None

    def _values(self) -> list[float | None]:
        if self._list is None:
            self._list = [None if t != t else t for t in self.packed[self.start : self.stop]]
        return self._list

    def __len__(self) -> int:
        return self.stop - self.start

    def __iter__(self):
        return iter(self._values())

    def __getitem__(self, position):
        return self._values()[position]


_NO_TIME = float("nan")  # a time not recorded (no t is NaN)


def _doubles(times: list[float | None]) -> array:
    try:
        return array("d", times)
    except TypeError:  # a None among them
        return array("d", [_NO_TIME if t is None else t for t in times])


def _little(values: array) -> array:
    """``values`` in little-endian order (swapped in place on a big-endian machine)."""
    if sys.byteorder == "big":
        values.byteswap()
    return values


def _pack(value: Any) -> str:
    return _pack_bytes(orjson.dumps(value))


def _pack_bytes(data: bytes) -> str:
    return base64.b64encode(zlib.compress(data, 1)).decode()


def _unpack(text: str) -> Any:
    return orjson.loads(zlib.decompress(base64.b64decode(text)))
