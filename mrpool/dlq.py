"""The dead letter queue: items whose attempts are exhausted, with their history.

Verbs: ``entries`` (list), ``get``, ``stats``, ``export``, ``purge``, and
``save_snapshot``. The CLI and the planner use these and never touch files.

Where it lives
--------------
An item is *in* the DLQ exactly when the journal's last settling record for it
is an ``f`` record with ``"next": "dlq"`` (``JobState.status == DLQ``). Parking
and leaving are therefore single journal appends: a success recorded by
``resume`` or ``dlq retry`` *is* the removal from the DLQ, so no crash can leave
an item both succeeded and parked, or lose the success.

``dlq.json`` is a derived, atomically replaced snapshot that keeps ``dlq``
commands fast on long journals (format: dlqfile.py): each failed or parked item's
``f`` record offsets (references, not copies: a failure's text is stored once, in
the journal) and what ``dlq list`` shows of it, as columns. Readers load it, replay
the ``f`` records after it, and read the records they show by offset (``show``,
``export``, ``retry``); ``list`` and ``stats`` read none. A snapshot that is
damaged, describes another journal, or whose reference does not lead to that
item's ``f`` record is ignored and rebuilt from the journal.

A failure's ``tail`` is at most 2048 bytes (``worker.TAIL_BYTES``); an ``f``
record may name an earlier one's instead (``tail_at``, journal.py), which is
resolved when a history is shown.

Error signatures
----------------
``signature`` groups failures that differ only in numbers, paths, addresses,
UUIDs, hex tokens or the item's own id: ``kind`` plus the normalised message,
hashed to 12 hex digits. ``stats`` shows one line per signature with an example.
"""

from __future__ import annotations

import hashlib
import re
import warnings
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from itertools import compress
from typing import Any

import orjson

from . import records
from .dlqfile import NO_RECORD, UNREAD, Brief, FailureLog, Histories, brief_of, journal_crc
from .dlqfile import decode as decode_snapshot
from .dlqfile import encode as encode_snapshot
from .errors import CorruptStateError, StateRebuiltWarning, UsageError
from .fsutil import atomic_write
from .isotime import with_iso
from .items import identity_text, indices_of, iter_item_lines, raw_ids_at, split_line
from .journal import RecordReader, read_payloads
from .records import Recorder
from .store import DLQ, FAILED, JobState, JobStore

__all__ = [
    "DlqEntry",
    "Listing",
    "DeadLetterQueue",
    "FailureLog",
    "error_signature",
    "normalise_message",
    "matches",
]

SNAPSHOT_FILE = "dlq.json"
_FAILURE_PREFIX = b'{"k":"f",'  # an f record's payload as orjson writes it (k first)
_INDEX_AT = 9 + len(b'{"k":"f","i":')  # where records.failed puts the index, "i" next
# (pattern, token, a substring every match holds -- None: no cheap test): a message
# without it skips the pattern (the path pattern alone was ~5 us of a worker's ~12 us
# signature of a short message; benchmarks/NOTES.md)
_NORMALISERS = [
    (
        re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"),
        "<uuid>",
        ("-",),
    ),
    (re.compile(r"0x[0-9a-fA-F]+"), "<addr>", ("0x",)),
    (re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.\-]+)+[\\/]?"), "<path>", ("/", "\\")),
    (re.compile(r"\b[0-9a-fA-F]{12,}\b"), "<hex>", None),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>", None),
]


@dataclass
class DlqEntry:
    id: Any
    index: int
    item: Any
    attempts: int
    first_failure: float | None
    last_failure: float | None
    error: str
    kind: str
    signature: str
    history: list[dict[str, Any]]

    def brief(self) -> dict[str, Any]:
        """``dlq list --json``: epoch times with their ISO-8601 twins (isotime.py)."""
        brief = {
            "id": self.id,
            "attempts": self.attempts,
            "error": self.error,
            "kind": self.kind,
            "signature": self.signature,
            "first_failure": self.first_failure,
            "last_failure": self.last_failure,
        }
        return with_iso(brief, "first_failure", "last_failure")

    def full(self) -> dict[str, Any]:
        """``dlq show`` / ``export``: the item and its history, times as in ``brief``."""
        full = with_iso(asdict(self), "first_failure", "last_failure")
        full["history"] = [with_iso(h, "t") for h in self.history]
        return full


def matches(entry: DlqEntry, signature: str | None = None, kind: str | None = None) -> bool:
    """The filters of ``dlq list`` / ``dlq retry``: the entry's error signature starts with
    ``signature`` (the whole 12 digits, or a prefix), and its failure kind is ``kind``."""
    return (signature is None or entry.signature.startswith(signature.lower())) and (
        kind is None or entry.kind == kind
    )


def normalise_message(message: str, item_id: str | None = None) -> str:
    # Whole tokens only, and not numeric ids (numbers become <n> anyway): a bare
    # substring replace of id "5" turned "errno 5" / "offset 20480" into different labels.
    if item_id and not item_id.isdigit() and item_id in message:
        message = _replace_token(message, item_id, "<id>")
    for pattern, token, needs in _NORMALISERS:
        if needs is None or needs[0] in message or needs[-1] in message:
            message = pattern.sub(token, message)
    return " ".join(message.split())


def _replace_token(text: str, token: str, by: str) -> str:
    """``text`` with each whole-token occurrence of ``token`` (no word character on either
    side, as ``(?<!\\w)token(?!\\w)``) replaced without a regex compiled per id (every id
    is new to ``re``'s cache: benchmarks/NOTES.md)."""
    parts, at = [], 0
    while True:
        found = text.find(token, at)
        if found < 0:
            break
        after = found + len(token)
        before_ok = found == 0 or not _is_word(text[found - 1])
        after_ok = after == len(text) or not _is_word(text[after])
        if before_ok and after_ok:
            parts += [text[at:found], by]
            at = after
        else:
            parts.append(text[at : found + 1])
            at = found + 1
    parts.append(text[at:])
    return "".join(parts)


def _is_word(char: str) -> bool:
    return char.isalnum() or char == "_"


def error_signature(kind: str, message: str, item_id: str | None = None) -> tuple[str, str]:
    """``(signature hash, normalised label)`` for grouping similar failures."""
    label = f"{kind}: {normalise_message(message, item_id)}"
    return hashlib.sha1(label.encode()).hexdigest()[:12], label


@dataclass
class Listing:
    """``dlq list``'s columns, one position per parked item, in input order (a table of
    100k rows is built from columns, not from 100k entries)."""

    ids: list[Any]
    attempts: list[int]
    errors: list[str]
    kinds: list[str]
    signatures: list[str]
    first: list[float | None]
    last: list[float | None]

    def __len__(self) -> int:
        return len(self.ids)

    def briefs(self) -> list[dict[str, Any]]:
        """``DlqEntry.brief`` of each item (``dlq list --json``)."""
        keys = ("id", "attempts", "error", "kind", "signature", "first_failure", "last_failure")
        columns = (self.ids, self.attempts, self.errors, self.kinds, self.signatures)
        return [
            with_iso(dict(zip(keys, row)), "first_failure", "last_failure")
            for row in zip(*columns, self.first, self.last)
        ]


_KEPT = bytes(s in (FAILED, DLQ) for s in range(256))  # status -> kept in the snapshot


class DeadLetterQueue:
    """The DLQ of one job. Reading needs nothing; ``purge`` needs the job lock."""

    def __init__(self, store: JobStore, state: JobState | None = None) -> None:
        self.store = store
        self.info = store.info()
        self.state = state or store.load_state(self.info.total)

    # -- reading -----------------------------------------------------------
    def indices(self) -> list[int]:
        return list(compress(range(self.state.total), map(DLQ.__eq__, self.state.status)))

    def entries(self, only: Iterable[int] | None = None, detail: bool = True) -> list[DlqEntry]:
        """DLQ items in input order (all, or the given indices that are parked). Without
        ``detail`` (``stats``), an entry holds what ``brief`` shows: its item is not
        decoded (None) and its history is not read (empty)."""
        wanted = self._wanted(only)
        if not wanted:
            return []
        return self._read_through(wanted, detail, self._entries)

    def listing(self, signature: str | None = None, kind: str | None = None) -> Listing:
        """The parked items that pass the filters (see ``matches``), as ``dlq list``
        shows them: from the snapshot's briefs, no journal record read for an item
        the snapshot covers."""
        wanted = self._wanted(None)
        if not wanted:
            return Listing([], [], [], [], [], [], [])
        order = sorted(wanted)
        first, last, kinds, sigs, msgs = self._read_through(wanted, False, self._columns)
        ids = orjson.loads(b"[%s]" % b",".join(raw_ids_at(self.store.dir, order)))
        if None in sigs:  # a failure the worker did not sign (a crash, a timeout, ...)
            sigs = [
                s if s is not None else error_signature(k, m, identity_text(i))[0]
                for s, k, m, i in zip(sigs, kinds, msgs, ids)
            ]
        columns = [ids, list(map(self.state.attempts.__getitem__, order)), msgs, kinds, sigs]
        columns += [first, last]
        if signature is not None or kind is not None:
            prefix = signature.lower() if signature is not None else ""
            keep = [
                p
                for p, (s, k) in enumerate(zip(sigs, kinds))
                if s.startswith(prefix) and (kind is None or k == kind)
            ]
            columns = [[column[p] for p in keep] for column in columns]
        return Listing(*columns)

    def _wanted(self, only: Iterable[int] | None) -> set[int]:
        status = self.state.status
        return set(self.indices() if only is None else (i for i in only if status[i] == DLQ))

    def _read_through(self, wanted: set[int], detail: bool, read):
        """``read(wanted, histories, reader, detail)`` from the snapshot and the journal
        after it, or, if the snapshot proves stale on the way, from the journal alone."""
        histories = self._histories(wanted, need_refs=detail)
        with RecordReader(self.store.journal_path) as reader:
            try:
                return read(wanted, histories, reader, detail)
            except _StaleSnapshot as e:
                _warn_damaged(self.store.dir / SNAPSHOT_FILE, str(e))
        histories, _ = self._replay(Histories(), 0, want=wanted)
        with RecordReader(self.store.journal_path) as reader:
            return read(wanted, histories, reader, detail)

    def _entries(self, wanted, histories: Histories, reader, detail: bool) -> list[DlqEntry]:
        entries = []
        for index, line in self._lines(wanted):
            if detail:
                found = [_resolved(reader, index, r) for r in histories.refs.get(index, [])]
                brief = brief_of(found[-1], found[0].get("t")) if found else NO_RECORD
                history = [_history_entry(record, reader) for record in found]
            else:
                brief, history = _brief(index, histories, reader), []
            entries.append(self._entry(index, line, brief, history, detail))
        return entries

    def _columns(self, wanted, histories: Histories, reader, _detail: bool) -> tuple[list, ...]:
        """The ``Brief`` fields of the ``wanted`` items as columns, in input order."""
        order = sorted(wanted)
        columns = histories.columns(order)
        if columns is None:
            briefs = [_brief(index, histories, reader) for index in order]
            columns = tuple(map(list, zip(*briefs)))
        return columns

    def select(
        self,
        signature: str | None = None,
        kind: str | None = None,
        only: Iterable[int] | None = None,
        detail: bool = True,
    ) -> list[DlqEntry]:
        """``entries(only, detail)`` that pass the filters (see ``matches``)."""
        return [e for e in self.entries(only, detail) if matches(e, signature, kind)]

    def get(self, item_id: str) -> DlqEntry:
        index = self.find(item_id)
        if index is None or self.state.status[index] != DLQ:
            raise UsageError(f"item {item_id!r} is not in the DLQ of job {self.store.job_id}")
        return self.entries([index])[0]

    def find(self, item_id: str) -> int | None:
        """The index of the item whose id (compared as text) is ``item_id``."""
        return indices_of(self.store.dir, [item_id]).get(item_id)

    def stats(self) -> list[dict[str, Any]]:
        """Counts by error signature, largest group first."""
        groups: dict[str, dict[str, Any]] = {}
        counter: Counter[str] = Counter()
        for entry in self.entries(detail=False):
            counter[entry.signature] += 1
            group = groups.setdefault(
                entry.signature,
                {
                    "signature": entry.signature,
                    "kind": entry.kind,
                    "example": entry.error,
                    "ids": [],
                },
            )
            if len(group["ids"]) < 5:
                group["ids"].append(entry.id)
        return [{**groups[sig], "count": n} for sig, n in counter.most_common()]

    def export(self) -> Iterator[bytes]:
        for entry in self.entries():
            yield orjson.dumps(entry.full()) + b"\n"

    # -- writing (lock holder only) ------------------------------------------
    def purge(self, indices: Iterable[int], recorder: Recorder) -> int:
        """Drop parked items for good: one ``purge`` record, through ``recorder`` (this
        DLQ's state and the job's journal; the caller makes it durable). Returns how many."""
        victims = sorted(i for i in set(indices) if self.state.status[i] == DLQ)
        if victims:
            recorder.record(records.purge(victims))
        return len(victims)

    def save_snapshot(self, written: FailureLog | None = None) -> None:
        """Rewrite ``dlq.json`` as of the end of the journal.

        ``written``: the ``f`` records a session just journaled, noted as it wrote them;
        only the journal outside them is replayed. With nothing failed or parked there
        is no history to keep, and the journal is not read at all."""
        end = self.store.journal_path.stat().st_size
        counts = self.state.counts
        kept = self.state.status.translate(_KEPT)  # a byte an item: failed or parked
        if counts[FAILED] == 0 and counts[DLQ] == 0:
            columns = Histories().columns_whole(kept.__getitem__)
        else:
            histories, written = self._current(written, end)
            columns = None
            if written is not None and not any(map(kept.__getitem__, histories.refs)):
                columns = written.columns(kept)  # the session's records alone: the fast way
            if columns is None:
                columns = self._completed(histories, written).columns_whole(kept.__getitem__)
        crc = journal_crc(self.store.journal_path, end, self.state)
        atomic_write(
            self.store.dir / SNAPSHOT_FILE, encode_snapshot(columns, end, crc), failpoint="dlq"
        )

    def _completed(self, histories: Histories, written: FailureLog | None) -> Histories:
        """``histories`` with ``written`` added and every brief complete (read from the
        journal where the snapshot had none: a version 1 or 2 snapshot, a crash)."""
        if written is not None:
            written.add_to(histories)
        briefs = histories.briefs
        with RecordReader(self.store.journal_path) as reader:
            for index in histories.refs:
                brief = briefs.get(index)
                if brief is None or brief[0] == UNREAD:
                    briefs[index] = _brief(index, histories, reader)
        return histories

    # -- internals ---------------------------------------------------------
    def _current(self, written: FailureLog | None, end: int) -> tuple[Histories, FailureLog | None]:
        """Every failed or parked item's history as of ``end``: the snapshot's and the
        journal's ``f`` records outside ``written``, and ``written`` (None: the journal
        was replayed whole, ``written``'s records included), for the caller to add."""
        histories, offset = self._load_snapshot(need_refs=True)
        if any(type(r) is not int for refs in histories.refs.values() for r in refs):
            histories, offset = Histories(), 0  # a v1 snapshot's copies: rebuilt as offsets
        if written is None or offset > written.start:
            return self._replay(histories, offset)[0], None
        histories, _ = self._replay(histories, offset, stop=written.start)
        histories, _ = self._replay(histories, written.end, stop=end)
        return histories, written

    def _histories(self, wanted: set[int], need_refs: bool) -> Histories:
        histories, offset = self._load_snapshot(need_refs)
        return self._replay(histories, offset, want=wanted)[0]

    def _load_snapshot(self, need_refs: bool) -> tuple[Histories, int]:
        """``(histories, journal offset)`` from ``dlq.json`` (dlqfile.py); a damaged one
        warns and counts as none."""
        path = self.store.dir / SNAPSHOT_FILE
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return Histories(), 0
        try:
            return decode_snapshot(data, self.store.journal_path, self.state, need_refs)
        except (
            ValueError,
            KeyError,
            TypeError,
            AttributeError,
            zlib.error,
            CorruptStateError,
        ) as e:
            _warn_damaged(path, str(e))
            return Histories(), 0

    def _replay(
        self, histories: Histories, start_at: int, want: set[int] | None = None,
        stop: int | None = None,
    ) -> tuple[Histories, int]:  # fmt: skip
        """``histories`` extended with the journal's ``f`` records from ``start_at`` (to
        ``stop``), as their offsets and briefs. Only ``f`` records are decoded: a success
        or a purge ends an item's history, but nothing fails after either, and every
        reader keeps only the histories of items still failed or parked."""
        offset = start_at
        for start, end, record in read_payloads(self.store.journal_path, start_at):
            if stop is not None and start >= stop:
                break
            offset = end
            if type(record) is bytes:  # undecoded (checksummed): its index decides
                if not record.startswith(_FAILURE_PREFIX, 9):
                    continue
                index = _index_of(record)
                if want is not None and index not in want:
                    continue
                record = orjson.loads(memoryview(record)[9:])  # (a trailing LF is fine)
            elif record.get("k") != "f":
                continue
            index = record["i"]
            if want is None or index in want:
                histories.add(index, start, record)
        return histories, offset

    def _lines(self, wanted: set[int]) -> Iterator[tuple[int, bytes]]:
        remaining = len(wanted)
        for index, line in enumerate(iter_item_lines(self.store.dir)):
            if index in wanted:
                yield index, line
                remaining -= 1
                if not remaining:
                    return

    def _entry(
        self, index: int, line: bytes, brief: Brief, history: list[dict[str, Any]], detail: bool
    ) -> DlqEntry:
        item_id, item_json = split_line(line)
        first, last, kind, signature, msg = brief
        if signature is None:
            signature, _ = error_signature(kind, msg, identity_text(item_id))
        return DlqEntry(
            id=item_id,
            index=index,
            item=orjson.loads(item_json) if detail else None,
            attempts=self.state.attempts[index],
            first_failure=first,
            last_failure=last,
            error=msg,
            kind=kind,
            signature=signature,
            history=[{("attempt" if k == "a" else k): v for k, v in h.items()} for h in history],
        )


def _brief(index: int, histories: Histories, reader: RecordReader) -> Brief:
    """The item's brief: known, or read from its first and last ``f`` records."""
    brief = histories.briefs.get(index)
    if brief is not None and brief[0] != UNREAD:
        return brief
    refs = histories.refs.get(index)
    if not refs:
        return NO_RECORD
    if brief is None:
        last = _resolved(reader, index, refs[-1])
        first = last if len(refs) == 1 else _resolved(reader, index, refs[0])
        return brief_of(last, first.get("t"))
    return (_resolved(reader, index, refs[0]).get("t"), *brief[1:])


def _index_of(line: bytes) -> int:
    """The item index of the checksummed ``f`` record on ``line``, read where
    ``records.failed`` writes it, else by decoding the record."""
    if line.startswith(b'"i":', _INDEX_AT - 4):
        end = line.find(b",", _INDEX_AT, _INDEX_AT + 24)
        if end > _INDEX_AT:
            digits = line[_INDEX_AT:end]
            if digits.isdigit():
                return int(digits)
    return orjson.loads(memoryview(line)[9:-1])["i"]


class _StaleSnapshot(CorruptStateError):
    """A ``dlq.json`` reference that does not lead to its item's ``f`` record (met again
    after a rebuild from the journal alone, it is the journal's damage: exit 5)."""


def _warn_damaged(path, why: str) -> None:
    message = f"{path}: damaged DLQ snapshot ({why}); rebuilding from the journal"
    warnings.warn(message, StateRebuiltWarning, stacklevel=3)


def _resolved(reader: RecordReader, index: int, ref: int | dict[str, Any]) -> dict[str, Any]:
    """The ``f`` record a history reference stands for (a v1 snapshot's copy as it is)."""
    if type(ref) is not int:
        return ref
    try:
        record = reader.at(ref)
    except CorruptStateError as e:
        raise _StaleSnapshot(str(e)) from None
    if record.get("k") != "f" or record.get("i") != index:
        raise _StaleSnapshot(f"byte {ref} is not a failure record of item {index}")
    return record


def _history_entry(record: dict[str, Any], reader: RecordReader) -> dict[str, Any]:
    """One attempt of a shown history: the record's fields, its tail resolved."""
    entry = records.failure_history(record)
    at = record.get("tail_at")
    if "tail" not in entry and type(at) is int:
        source = reader.at(at)  # damage here is the journal's: CorruptStateError, fsck's part
        entry["tail"] = source.get("tail", "")
    return entry
