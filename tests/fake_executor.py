"""An in-process ``Executor`` for tests of ``Session``: no fork, no pipe, no slot file.

Each submitted attempt is run at the next ``wait`` by ``behave(item, attempt)``, whose
answer decides the outcome: a value is a success with that result; an ``Exception``
instance a failure (kind ``exception``); ``LOST`` an attempt that ran but whose outcome
died with its worker (handed back as started, the way ``LocalExecutor._worker_lost``
hands back what a dead worker had finished); ``UNSTARTED`` an attempt handed back
before it began (what a dead worker never reached); ``RAISE`` makes ``wait`` itself raise
(``raising``, default a ``StorageError``), as a failing disk would in the loop. Every
attempt run is logged in ``ran`` as ``(index, attempt)``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import orjson

from mrpool import records
from mrpool.errors import StorageError
from mrpool.executor import Batch, Failure, HandBack, Outcomes, Successes
from mrpool.slots import UNKNOWN, CrashEvidence

LOST = object()
UNSTARTED = object()
RAISE = object()


class FakeExecutor:
    def __init__(
        self,
        behave: Callable[[Any, int], Any],
        room: int = 4,
        raising: BaseException | None = None,
    ) -> None:
        self.behave = behave
        self.room = room
        self.raising = raising or StorageError("journal.log: cannot append: No space left")
        self.queued: deque[tuple[int, int, bytes]] = deque()
        self.ran: list[tuple[int, int]] = []
        self.calls: list[str] = []

    @staticmethod
    def crash_evidence(job_dir, state, *, end_stragglers: bool = True) -> CrashEvidence:
        return CrashEvidence(began=[], running=[]) if not state.open_count else UNKNOWN

    @staticmethod
    def discard_evidence(job_dir) -> None:
        pass  # nothing kept

    def start(self) -> list[dict[str, Any]]:
        self.calls.append("start")
        return [records.worker_started(0, 0)]

    def capacity(self) -> int:
        return self.room - len(self.queued)

    def submit(self, batch: Batch) -> None:
        assert len(batch) <= self.capacity(), "submit() was given more than capacity()"
        assert all(line.endswith(b"\n") or b"\n" not in line for line in batch.lines)
        self.queued.extend(zip(batch.indices, batch.attempts, batch.lines))

    def wait(self, timeout: float) -> Outcomes:
        outcomes = Outcomes()
        indices: list[int] = []
        rows: list[list[Any]] = []
        while self.queued:
            index, attempt, line = self.queued.popleft()
            item = orjson.loads(line.split(b"\t", 1)[1])
            self.ran.append((index, attempt))
            verdict = self.behave(item, attempt)
            if verdict is RAISE:
                raise self.raising
            if verdict is LOST or verdict is UNSTARTED:
                outcomes.requeued.append(HandBack(index, attempt, line, verdict is LOST))
                outcomes.events.append(records.worker_died(0, 0, -9, None))
            elif isinstance(verdict, Exception):
                error = records.error("exception", f"{type(verdict).__name__}: {verdict}")
                outcomes.failed.append(Failure(index, attempt, line, error, 0.001))
            else:
                indices.append(index)
                rows.append([index, attempt, 0.001, verdict])
        if indices:
            outcomes.ok.append(Successes(indices, records.encode_rows(rows)))
        return outcomes

    def started(self) -> list[int]:
        return []  # wait() runs everything it is given: nothing is ever mid-attempt

    def cancel(self) -> list[tuple[int, int, bytes]]:
        self.calls.append("cancel")
        lost, self.queued = list(self.queued), deque()
        return lost

    def shutdown(self) -> None:
        self.calls.append("shutdown")
