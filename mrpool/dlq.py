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

``dlq.json`` (version 2) is a derived, atomically replaced snapshot that keeps
``dlq`` commands fast on long journals: one journal-codec record
``{"k":"dlq","v":2,"journal_offset":N,"records":{"<index>":[offset, ...]}}``
naming, for every item that was failed or parked at offset N, the byte offsets
of its ``f`` records in the journal (its failure history) -- references, not
copies: a failure's text is stored once, in the journal. Readers load it, replay
the ``f`` records after N, and read the records they show by offset (one checked
record each: ``dlq list`` reads an item's first and last). A snapshot whose
reference does not lead to that item's ``f`` record, or that is damaged, is
ignored and rebuilt from the journal. Version 1 (``"histories"``: each item's
history copied in, tails and all) is still read.

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
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from . import records
from .errors import CorruptStateError, StateRebuiltWarning, UsageError
from .fsutil import atomic_write
from .isotime import with_iso
from .items import identity_text, indices_of, iter_item_lines, split_line
from .journal import RecordReader, decode_line, encode_record, read_payloads
from .records import Recorder
from .store import DLQ, FAILED, JobState, JobStore

__all__ = ["DlqEntry", "DeadLetterQueue", "error_signature", "normalise_message", "matches"]

SNAPSHOT_FILE = "dlq.json"
SNAPSHOT_VERSION = 2
_FAILURE_PREFIX = b'{"k":"f",'  # an f record's payload as orjson writes it (k first)
_INDEX_AT = 9 + len(b'{"k":"f","i":')  # where records.failed puts the index, "i" next
_NORMALISERS = [
    (
        re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"),
        "<uuid>",
    ),
    (re.compile(r"0x[0-9a-fA-F]+"), "<addr>"),
    (re.compile(r"(?:[A-Za-z]:)?(?:[\\/][\w.\-]+)+[\\/]?"), "<path>"),
    (re.compile(r"\b[0-9a-fA-F]{12,}\b"), "<hex>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),
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
    for pattern, token in _NORMALISERS:
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


class DeadLetterQueue:
    """The DLQ of one job. Reading needs nothing; ``purge`` needs the job lock."""

    def __init__(self, store: JobStore, state: JobState | None = None) -> None:
        self.store = store
        self.info = store.info()
        self.state = state or store.load_state(self.info.total)

    # -- reading -----------------------------------------------------------
    def indices(self) -> list[int]:
        status = self.state.status
        return [i for i in range(self.state.total) if status[i] == DLQ]

    def entries(self, only: Iterable[int] | None = None, detail: bool = True) -> list[DlqEntry]:
        """DLQ items in input order (all, or the given indices that are parked). Without
        ``detail`` (``dlq list``, ``stats``), an entry holds what ``brief`` shows: its
        item is not decoded (None) and its history is not read (empty)."""
        wanted = set(
            self.indices() if only is None else (i for i in only if self.state.status[i] == DLQ)
        )
        if not wanted:
            return []
        histories = self._histories(wanted)  # replayed first: the reader maps all it names
        with RecordReader(self.store.journal_path) as reader:
            try:
                return self._entries(wanted, histories, reader, detail)
            except _StaleSnapshot as e:
                _warn_damaged(self.store.dir / SNAPSHOT_FILE, str(e))
        histories, _ = self._replay(({}, 0), want=wanted)
        with RecordReader(self.store.journal_path) as reader:
            return self._entries(wanted, histories, reader, detail)

    def _entries(self, wanted, histories, reader: RecordReader, detail: bool) -> list[DlqEntry]:
        entries = []
        for index, line in self._lines(wanted):
            refs = histories.get(index, [])
            if detail:
                history = [_history_entry(_resolved(reader, index, ref), reader) for ref in refs]
            else:
                history = [_resolved(reader, index, ref) for ref in refs[:1] + refs[1:][-1:]]
            entries.append(self._entry(index, line, history, detail))
        return entries

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

    def save_snapshot(self) -> None:
        """Rewrite ``dlq.json`` as of the end of the journal.

        With nothing failed or parked there is no history to keep, so the journal
        is not replayed (a clean run of a million items ends without reading it)."""
        counts = self.state.counts
        if counts[FAILED] == 0 and counts[DLQ] == 0:
            keep, offset = {}, self.store.journal_path.stat().st_size
        else:
            histories, offset = self._replay(self._load_snapshot(), want=None)
            keep = {i: h for i, h in histories.items() if self.state.status[i] in (FAILED, DLQ)}
            if any(type(ref) is not int for refs in keep.values() for ref in refs):
                histories, offset = self._replay(({}, 0), want=None)  # a v1 snapshot's copies
                keep = {i: h for i, h in histories.items() if self.state.status[i] in (FAILED, DLQ)}
        record = {
            "k": "dlq",
            "v": SNAPSHOT_VERSION,
            "journal_offset": offset,
            "records": {str(i): h for i, h in keep.items()},
        }
        atomic_write(self.store.dir / SNAPSHOT_FILE, encode_record(record), failpoint="dlq")

    # -- internals ---------------------------------------------------------
    def _histories(self, wanted: set[int]) -> dict[int, list[int | dict[str, Any]]]:
        histories, _ = self._replay(self._load_snapshot(), want=wanted)
        return histories

    def _load_snapshot(self) -> tuple[dict[int, list[int | dict[str, Any]]], int]:
        """``({index: [reference, ...]}, journal offset)`` from ``dlq.json``: a reference is
        an ``f`` record's offset (version 2) or the record's fields (version 1)."""
        path = self.store.dir / SNAPSHOT_FILE
        try:
            record = decode_line(path.read_bytes())
        except FileNotFoundError:
            return {}, 0
        try:
            if record is None or record.get("k") != "dlq":
                raise ValueError("checksum or format mismatch")
            offset = int(record["journal_offset"])
            if offset > self.store.journal_path.stat().st_size:
                raise ValueError("points past the end of the journal")
            if record.get("v") == 1:
                return {int(i): h for i, h in record["histories"].items()}, offset
            if record.get("v") != SNAPSHOT_VERSION:
                raise ValueError(f"unknown version {record.get('v')!r}")
            refs = record["records"]
            if not all(type(r) is int for rs in refs.values() for r in rs):
                raise ValueError("a reference is not a byte offset")
            return {int(i): rs for i, rs in refs.items()}, offset
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            _warn_damaged(path, str(e))
            return {}, 0

    def _replay(
        self, snapshot, want: set[int] | None
    ) -> tuple[dict[int, list[int | dict[str, Any]]], int]:
        """The snapshot's histories extended with the journal's ``f`` records after it, as
        their offsets. Only ``f`` records are decoded: a success or a purge ends an item's
        history, but nothing fails after either, and every reader keeps only the
        histories of items still failed or parked."""
        histories, start_at = snapshot
        if want is not None:
            histories = {i: h for i, h in histories.items() if i in want}
        offset = start_at
        for start, end, record in read_payloads(self.store.journal_path, start_at):
            offset = end
            if type(record) is bytes:  # undecoded (checksummed): only its index is needed
                if not record.startswith(_FAILURE_PREFIX, 9):
                    continue
                index = _index_of(record)
            elif record.get("k") != "f":
                continue
            else:
                index = record["i"]
            if want is None or index in want:
                histories.setdefault(index, []).append(start)
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
        self, index: int, line: bytes, history: list[dict[str, Any]], detail: bool = True
    ) -> DlqEntry:
        item_id, item_json = split_line(line)
        last = history[-1] if history else {"kind": "unknown", "msg": "(no failure record)"}
        signature = last.get("sig")
        if not isinstance(signature, str):
            signature, _ = error_signature(
                last.get("kind", "unknown"), last.get("msg", ""), identity_text(item_id)
            )
        history_out = (
            [{("attempt" if k == "a" else k): v for k, v in h.items()} for h in history]
            if detail
            else []
        )
        return DlqEntry(
            id=item_id,
            index=index,
            item=orjson.loads(item_json) if detail else None,
            attempts=self.state.attempts[index],
            first_failure=history[0].get("t") if history else None,
            last_failure=last.get("t"),
            error=last.get("msg", ""),
            kind=last.get("kind", "unknown"),
            signature=signature,
            history=history_out,
        )


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
