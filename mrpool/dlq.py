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

``dlq.json`` (version 1) is a derived, atomically replaced snapshot that keeps
``dlq`` commands fast on long journals: one journal-codec record
``{"k":"dlq","v":1,"journal_offset":N,"histories":{"<index>":[attempt, ...]}}``
holding the failure history of every item that was failed or parked at offset
N. Readers load it and replay the journal after N; a damaged snapshot is
ignored and rebuilt from the journal.

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
from .errors import StateRebuiltWarning, UsageError
from .fsutil import atomic_write
from .isotime import with_iso
from .items import identity_text, indices_of, iter_item_lines, split_line
from .journal import FORMAT_VERSION, decode_line, encode_record, read_records
from .records import Recorder
from .store import DLQ, FAILED, JobState, JobStore

__all__ = ["DlqEntry", "DeadLetterQueue", "error_signature", "normalise_message", "matches"]

SNAPSHOT_FILE = "dlq.json"
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
    if item_id and not item_id.isdigit():
        message = re.sub(rf"(?<!\w){re.escape(item_id)}(?!\w)", "<id>", message)
    for pattern, token in _NORMALISERS:
        message = pattern.sub(token, message)
    return " ".join(message.split())


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

    def entries(self, only: Iterable[int] | None = None) -> list[DlqEntry]:
        """DLQ items in input order (all, or the given indices that are parked)."""
        wanted = set(
            self.indices() if only is None else (i for i in only if self.state.status[i] == DLQ)
        )
        if not wanted:
            return []
        histories = self._histories(wanted)
        return [
            self._entry(index, line, histories.get(index, []))
            for index, line in self._lines(wanted)
        ]

    def select(
        self,
        signature: str | None = None,
        kind: str | None = None,
        only: Iterable[int] | None = None,
    ) -> list[DlqEntry]:
        """``entries(only)`` that pass the filters (see ``matches``)."""
        return [e for e in self.entries(only) if matches(e, signature, kind)]

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
        for entry in self.entries():
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
        record = {
            "k": "dlq",
            "v": FORMAT_VERSION,
            "journal_offset": offset,
            "histories": {str(i): h for i, h in keep.items()},
        }
        atomic_write(self.store.dir / SNAPSHOT_FILE, encode_record(record), failpoint="dlq")

    # -- internals ---------------------------------------------------------
    def _histories(self, wanted: set[int]) -> dict[int, list[dict[str, Any]]]:
        histories, _ = self._replay(self._load_snapshot(), want=wanted)
        return histories

    def _load_snapshot(self) -> tuple[dict[int, list[dict[str, Any]]], int]:
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
            return {int(i): h for i, h in record["histories"].items()}, offset
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            message = f"{path}: damaged DLQ snapshot ({e}); rebuilding from the journal"
            warnings.warn(message, StateRebuiltWarning, stacklevel=2)
            return {}, 0

    def _replay(
        self, snapshot, want: set[int] | None
    ) -> tuple[dict[int, list[dict[str, Any]]], int]:
        histories, offset = snapshot
        if want is not None:
            histories = {i: h for i, h in histories.items() if i in want}
        for _, end, record in read_records(self.store.journal_path, offset):
            kind = record["k"]
            if kind == "f":
                index = record["i"]
                if want is None or index in want:
                    histories.setdefault(index, []).append(records.failure_history(record))
            elif kind == "ok":
                for index in records.succeeded_indices(record):
                    histories.pop(index, None)
            elif kind == "purge":
                for index in record["b"]:
                    histories.pop(index, None)
            offset = end
        return histories, offset

    def _lines(self, wanted: set[int]) -> Iterator[tuple[int, bytes]]:
        remaining = len(wanted)
        for index, line in enumerate(iter_item_lines(self.store.dir)):
            if index in wanted:
                yield index, line
                remaining -= 1
                if not remaining:
                    return

    def _entry(self, index: int, line: bytes, history: list[dict[str, Any]]) -> DlqEntry:
        item_id, item_json = split_line(line)
        last = history[-1] if history else {"kind": "unknown", "msg": "(no failure record)"}
        signature, _ = error_signature(
            last.get("kind", "unknown"), last.get("msg", ""), identity_text(item_id)
        )
        history_out = [{("attempt" if k == "a" else k): v for k, v in h.items()} for h in history]
        return DlqEntry(
            id=item_id,
            index=index,
            item=orjson.loads(item_json),
            attempts=self.state.attempts[index],
            first_failure=history[0].get("t") if history else None,
            last_failure=last.get("t"),
            error=last.get("msg", ""),
            kind=last.get("kind", "unknown"),
            signature=signature,
            history=history_out,
        )
