"""The resume planner: which items a session runs, each tagged with its source.

Sources, from the replayed ``JobState``:

* **pending** -- never settled (``status == pending``), or *open*: an attempt
  started and no outcome was recorded, i.e. in flight when the last session
  crashed. Open beats every settled place: an item that was being retried out
  of the DLQ when the host died is both in the DLQ and pending.
* **failed** -- its last attempt failed and the session ended before a retry.
* **dlq** -- parked after exhausting its attempts.

Each item is planned once, with priority pending > failed > dlq; the overlaps
are counted as ``duplicates``. An open item that has now been in flight at
``crash_limit`` crashes in a row is not run again but *parked* in the DLQ as a
suspected poison item (SQS's max-receive-count), so a map that takes the whole
host down cannot loop for ever.

Planning reads only the compact state arrays (C-speed ``bytes.translate``); the
items themselves are streamed from ``items.jsonl`` as they are dispatched.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path

from .items import iter_item_blocks
from .store import DLQ, FAILED, PENDING, JobState

__all__ = ["PlanOptions", "ResumePlan", "plan_session", "SOURCE_NAMES"]

NONE, FROM_PENDING, FROM_FAILED, FROM_DLQ = range(4)
SOURCE_NAMES = {FROM_PENDING: "pending", FROM_FAILED: "failed", FROM_DLQ: "dlq"}


@dataclass(frozen=True)
class PlanOptions:
    include_pending: bool = True
    include_failed: bool = True
    include_dlq: bool = True
    only_indices: frozenset[int] | None = None  # dlq retry of named items
    crash_limit: int = 2


@dataclass
class ResumePlan:
    """What a session will run. ``items()`` streams ``(index, source, line)``."""

    job_dir: Path
    selection: bytearray
    counts: dict[str, int]
    duplicates: int
    poison: list[int] = field(default_factory=list)
    crash_cut: list[int] | None = None  # items running when the last session crashed

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def items(self) -> Iterator[tuple[int, str, bytes]]:
        """``(index, source, line)`` of every planned item, in input order."""
        for indices, lines in self.chunks():
            for index, line in zip(indices, lines):
                yield index, self.source(index), line

    def chunks(self) -> Iterator[tuple[list[int], list[bytes]]]:
        """The planned items as ``(indices, lines)`` runs, streamed from ``items.jsonl``
        about 1 MiB at a time (what the supervisor dispatches from: no per-item frames)."""
        selection = self.selection
        start = 0
        for lines in iter_item_blocks(self.job_dir):  # each block checksum-verified
            stop = start + len(lines)
            picked = selection[start:stop]
            skipped = picked.count(NONE)
            if skipped == 0:
                yield list(range(start, stop)), lines
            elif skipped < len(lines):
                yield list(compress(range(start, stop), picked)), list(compress(lines, picked))
            start = stop

    def source(self, index: int) -> str:
        """Where a planned item comes from: "pending", "failed" or "dlq"."""
        return SOURCE_NAMES[self.selection[index]]

    def summary(self) -> dict[str, int]:
        return {
            **self.counts,
            "duplicates": self.duplicates,
            "poison_parked": len(self.poison),
            "total": self.total,
        }


def plan_session(
    job_dir: Path, state: JobState, options: PlanOptions, crash_cut: list[int] | None = None
) -> ResumePlan:
    """Plan from ``state`` as replayed *before* this session's ``open`` record.

    ``crash_cut``: the open items a worker was running when the last session
    crashed (see slots.py); only those can be poison. None: unknown, all open.
    """
    table = bytearray(256)
    if options.include_pending:
        table[PENDING] = FROM_PENDING
    if options.include_failed:
        table[FAILED] = FROM_FAILED
    if options.include_dlq:
        table[DLQ] = FROM_DLQ
    selection = bytearray(bytes(state.status).translate(bytes(table)))
    duplicates = 0
    poison: list[int] = []
    cut = None if crash_cut is None else set(crash_cut)
    for index in state.open_indices():
        settled = state.status[index]
        if settled in (FAILED, DLQ):
            duplicates += 1  # in flight *and* failed/parked: planned once, as pending
        if (cut is None or index in cut) and state.streak[index] + 1 >= options.crash_limit:
            poison.append(index)
            selection[index] = NONE
        elif settled in (PENDING, FAILED, DLQ) and (options.include_pending or selection[index]):
            selection[index] = FROM_PENDING
    if options.only_indices is not None:
        keep = options.only_indices
        for index, source in enumerate(selection):
            if source and index not in keep:
                selection[index] = NONE
        poison = [i for i in poison if i in keep]
    counts = {name: selection.count(code) for code, name in SOURCE_NAMES.items()}
    return ResumePlan(
        job_dir=job_dir,
        selection=selection,
        counts=counts,
        duplicates=duplicates,
        poison=sorted(poison),
        crash_cut=crash_cut,
    )
