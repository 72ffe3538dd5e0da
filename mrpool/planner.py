"""The resume planner: which items a session runs, each tagged with its source.

Sources, from the replayed ``JobState``:

* **pending** -- never settled (``status == pending``), or *open*: an attempt
  started and no outcome was recorded, i.e. in flight when the last session
  crashed. Open beats every settled place: an item that was being retried out
  of the DLQ when the host died is both in the DLQ and pending.
* **failed** -- its last attempt failed and the session ended before a retry.
* **dlq** -- parked after exhausting its attempts.

Each item is planned once, with priority pending > failed > dlq; the overlaps
are counted as ``duplicates``. An open item that a worker was running at
``crash_limit`` crashes in a row is not run again but *parked* in the DLQ as a
suspected poison item (SQS's max-receive-count), so a map that takes the whole
host down cannot loop for ever. Only crash evidence (``slots.crash_evidence``)
names the items that were running: without it no item is suspected; nor after
an abort (a storage error). The crash rules (when an attempt is charged, a
streak rises, an item is parked) are in crashes.py.

Planning reads only the compact state arrays (C-speed ``bytes.translate``); the
items themselves are streamed from ``items.jsonl`` as they are dispatched.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import compress
from pathlib import Path

from .crashes import aborted_before
from .items import iter_item_blocks
from .slots import UNKNOWN, CrashEvidence
from .store import DLQ, FAILED, PENDING, JobState

__all__ = ["PlanCursor", "PlanOptions", "ResumePlan", "PlanSummary", "plan_session", "SOURCE_NAMES"]

NONE, FROM_PENDING, FROM_FAILED, FROM_DLQ = range(4)
SOURCE_NAMES = {FROM_PENDING: "pending", FROM_FAILED: "failed", FROM_DLQ: "dlq"}


@dataclass(frozen=True)
class PlanOptions:
    include_pending: bool = True
    include_failed: bool = True
    include_dlq: bool = True
    only_indices: frozenset[int] | None = None  # dlq retry of named items
    crash_limit: int = 2


class PlanSummary(dict):
    """``ResumePlan.summary()``: the plan's counts, a plain dict (JSON as it is) that
    ``print`` shows as the sentence ``resume`` prints."""

    def __str__(self) -> str:
        return (
            f"{self['total']} item(s) to run ({self['pending']} pending, {self['failed']} "
            f"failed, {self['dlq']} from the DLQ; {self['duplicates']} duplicate(s) "
            f"collapsed; {self['poison_parked']} parked as poison)"
        )


@dataclass(repr=False)
class ResumePlan:
    """What a session will run. ``items()`` streams ``(index, source, line)``."""

    job_dir: Path
    selection: bytearray
    counts: dict[str, int]
    duplicates: int
    poison: list[int] = field(default_factory=list)
    crashes: dict[int, int] = field(default_factory=dict)  # poison item -> crashes in a row
    after_abort: bool = False  # the last session aborted (crashes.py rule 5): no crash to settle
    evidence: CrashEvidence = UNKNOWN  # what the crashed last session had begun / was running

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

    def summary(self) -> PlanSummary:
        return PlanSummary(
            **self.counts,
            duplicates=self.duplicates,
            poison_parked=len(self.poison),
            total=self.total,
        )

    def __repr__(self) -> str:  # not the selection: a byte per item of the job
        return f"<ResumePlan of {self.job_dir.name}: {self.summary()}>"


class PlanCursor:
    """The plan's items in input order, taken ``room`` at a time as slices of its chunks
    (no per-item work for a fresh run). ``pending_only``: failed and DLQ items get no
    attempt in this session (``--max-additional-retries 0``) and are skipped."""

    def __init__(self, plan: ResumePlan, pending_only: bool = False) -> None:
        self._plan = plan
        self._chunks = plan.chunks()
        self._indices: list[int] = []
        self._lines: list[bytes] = []
        self._at = 0
        self._pending_only = pending_only
        self.done = False

    def take(self, room: int) -> tuple[list[int], list[bytes]]:
        """Up to ``room`` items not taken yet; none once ``done``."""
        while True:
            while self._at >= len(self._indices):
                chunk = next(self._chunks, None)
                if chunk is None:
                    self.done = True
                    return [], []
                self._indices, self._lines = chunk
                self._at = 0
            start = self._at
            self._at = stop = start + room
            indices, lines = self._indices[start:stop], self._lines[start:stop]
            if not self._pending_only:
                return indices, lines
            kept = [k for k, i in enumerate(indices) if self._plan.source(i) == "pending"]
            if kept:
                return [indices[k] for k in kept], [lines[k] for k in kept]


def plan_session(
    job_dir: Path, state: JobState, options: PlanOptions, evidence: CrashEvidence = UNKNOWN
) -> ResumePlan:
    """Plan from ``state`` as replayed *before* this session's ``open`` record.

    ``evidence``: what the crashed last session was doing (see slots.py); only
    the open items it was running can be poison.
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
    crashes: dict[int, int] = {}
    cut = set(evidence.running)
    after_abort = state.open_count > 0 and aborted_before(job_dir)
    for index in state.open_indices():
        settled = state.status[index]
        if settled in (FAILED, DLQ):
            duplicates += 1  # in flight *and* failed/parked: planned once, as pending
        in_a_row = state.streak[index] + 1  # counting the crash this session settles
        if not after_abort and index in cut and in_a_row >= options.crash_limit:
            crashes[index] = in_a_row
            selection[index] = NONE
        elif settled in (PENDING, FAILED, DLQ) and (options.include_pending or selection[index]):
            selection[index] = FROM_PENDING
    if options.only_indices is not None:
        keep = options.only_indices
        for index, source in enumerate(selection):
            if source and index not in keep:
                selection[index] = NONE
        crashes = {i: n for i, n in crashes.items() if i in keep}
    counts = {name: selection.count(code) for code, name in SOURCE_NAMES.items()}
    return ResumePlan(
        job_dir=job_dir,
        selection=selection,
        counts=counts,
        duplicates=duplicates,
        poison=sorted(crashes),
        crashes=crashes,
        after_abort=after_abort,
        evidence=evidence,
    )
