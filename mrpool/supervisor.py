"""The supervisor: one session of a job, from plan to final record.

An item's journey::

    items.jsonl --plan--> ready --dispatch--> executor --> worker slot
         ^                  ^      ("s" record)                 |
         |                  |                                   v
         |               delayed <--retry-- outcome <----- result / failure
         |             (backoff)      |        |
         |                            |        +--"ok" record--> results
         +---- resume reads ----------+--"f" record (next: retry | dlq)--> DLQ

Actors:

* ``ResumePlan`` streams the items this session owes, in input order.
* ``Session._dispatch`` moves attempts to the executor as it has room,
  journaling their start first (attempt numbers survive any crash).
* ``Session._settle`` turns outcomes into journal records: a success is one
  ``ok`` record (which also takes an item out of the DLQ); a failure is one
  ``f`` record saying whether it will be retried or is parked.
* ``_interrupt`` is the stop path for SIGINT/SIGTERM: kill in-flight attempts,
  close the session, keep everything for ``resume``.

Every record goes through ``Session._record``, which appends it to the journal
and applies it to the in-memory state, so memory and disk cannot drift.
"""

from __future__ import annotations

import heapq
import os
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

from . import failpoints
from .errors import EXIT_FAILURES, EXIT_INTERRUPTED, EXIT_OK, DlqFullError
from .executor import Attempt, Executor, Outcome
from .journal import JournalWriter
from .planner import ResumePlan
from .progress import Progress
from .store import DLQ, JobState, JobStore

__all__ = ["SessionOptions", "SessionReport", "Session"]

CHECKPOINT_EVERY = 30.0


@dataclass(frozen=True)
class SessionOptions:
    retries: int = 0
    backoff: float = 0.0
    additional_retries: int | None = None  # attempts for failed/DLQ items instead of 1 + retries
    dlq_max_items: int | None = None
    dlq_on_full: str = "stop"
    progress: bool = False
    command: str = "run"


@dataclass
class SessionReport:
    job_id: str
    state: str
    exit_code: int
    counts: dict[str, int]
    plan: dict[str, int]
    message: str = ""
    reduce: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Session:
    """Runs one plan to the end (or to an interruption) against one executor."""

    def __init__(
        self,
        store: JobStore,
        state: JobState,
        journal: JournalWriter,
        plan: ResumePlan,
        executor: Executor,
        options: SessionOptions,
    ) -> None:
        self.store = store
        self.state = state
        self.journal = journal
        self.plan = plan
        self.executor = executor
        self.options = options
        self.ready: deque[Attempt] = deque()
        self.delayed: list[tuple[float, int, Attempt]] = []
        self.in_flight = 0
        self._cut: list[int] = []  # items started, not finished, when this session was stopped
        self.stop_signal: int | None = None
        self.stop_error: Exception | None = None
        self._fresh = plan.items()
        self._fresh_done = False
        self._budget_pending = 1 + options.retries
        self._budget_settled = (
            1 + options.retries
            if options.additional_retries is None
            else options.additional_retries
        )
        self._last_checkpoint = time.monotonic()
        self.progress = Progress(plan.total, enabled=options.progress)
        self.kept_failed = 0  # items not parked because the DLQ was full (keep_failed)

    # -- the loop ----------------------------------------------------------
    def run(self) -> None:
        self._record(
            {
                "k": "open",
                "cmd": self.options.command,
                "pid": os.getpid(),
                "cut": self.plan.crash_cut,
            }
        )
        self._record({"k": "plan", **self.plan.summary()})
        self._park_poison()
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.executor.start()
            self._flush_events()
            while self.stop_signal is None and self.stop_error is None:
                self._release_due_retries()
                self._dispatch()
                if self._finished():
                    break
                outcomes = self.executor.wait(self._wait_timeout())
                self._settle(outcomes)
                self._flush_events()
                self.journal.sync()
                self.progress.update(self.state)
                self._maybe_checkpoint()
            if self.stop_signal is not None or self.stop_error is not None:
                self._interrupt()
        except BaseException:
            self.executor.cancel()  # a storage error or a bug: stop every attempt now
            self.executor.shutdown(keep_slots=True)  # the next session reads who was running
            raise
        else:
            self.executor.shutdown()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.progress.close()
        self._flush_events()
        self._record({"k": "close", "reason": self._close_reason(), "cut": self._cut})
        self.journal.sync(force=True)
        self.state.offset = self.journal.offset
        self.store.write_checkpoint(self.state)

    def _finished(self) -> bool:
        return self._fresh_done and not self.ready and not self.delayed and self.in_flight == 0

    def _wait_timeout(self) -> float:
        if self.delayed:
            return max(0.0, min(0.05, self.delayed[0][0] - time.monotonic()))
        return 0.05

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum

    def _close_reason(self) -> str:
        if self.stop_signal is not None:
            return f"interrupted by {signal.Signals(self.stop_signal).name}"
        if self.stop_error is not None:
            return f"stopped: {self.stop_error}"
        return "finished"

    # -- dispatch ----------------------------------------------------------
    def _take_fresh(self, room: int) -> list[Attempt]:
        """Up to ``room`` new attempts from the plan, in input order (one tight loop)."""
        attempts, pending_budget, settled_budget = (
            self.state.attempts,
            self._budget_pending,
            self._budget_settled,
        )
        taken = [
            Attempt(
                index,
                attempts[index] + 1,
                line,
                source,
                0,
                pending_budget if source == "pending" else settled_budget,
            )
            for index, source, line in islice(self._fresh, room)
        ]
        if len(taken) < room:
            self._fresh_done = True
        return [a for a in taken if a.budget > 0] if settled_budget <= 0 else taken

    def _dispatch(self) -> None:
        room = self.executor.capacity()
        batch: list[Attempt] = []
        ready, attempts = self.ready, self.state.attempts
        while ready and len(batch) < room:  # hand-backs and due retries first
            attempt = ready.popleft()
            if attempt.attempt == 0:  # a new try (not a hand-back): next cumulative number
                attempt.attempt = attempts[attempt.index] + 1
            batch.append(attempt)
        if len(batch) < room and not self._fresh_done:
            batch.extend(self._take_fresh(room - len(batch)))
        if not batch:
            return
        self._record({"k": "s", "b": [[a.index, a.attempt] for a in batch]})
        self.journal.write()  # the start is on disk before the worker sees the item
        self.executor.submit(batch)
        self.in_flight += len(batch)
        if failpoints.ENABLED:
            failpoints.hit("supervisor.after_dispatch")

    def _release_due_retries(self) -> None:
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            self.ready.append(heapq.heappop(self.delayed)[2])

    # -- outcomes ----------------------------------------------------------
    def _settle(self, outcomes: list[Outcome]) -> None:
        successes = []
        for outcome in outcomes:
            self.in_flight -= 1
            attempt = outcome.attempt
            if outcome.requeue:
                self.ready.appendleft(attempt)  # never started: same attempt number, no charge
            elif outcome.ok:
                successes.append([attempt.index, attempt.attempt, outcome.duration, outcome.result])
            elif self.stop_signal is None:
                self._failed(attempt, outcome)
            else:  # cut short by our own Ctrl-C: it stays open (pending), its attempt counted
                self._cut.append(attempt.index)
        if successes:
            self._record({"k": "ok", "b": successes})
            self.progress.succeeded += len(successes)
        if outcomes and failpoints.ENABLED:
            self.journal.write()
            failpoints.hit("supervisor.after_outcome")
            if any(o.ok and o.attempt.source == "dlq" for o in outcomes):
                failpoints.hit("retry.after_success")

    def _failed(self, attempt: Attempt, outcome: Outcome) -> None:
        attempt.tries += 1
        error = outcome.error or {}
        record = {
            "k": "f",
            "i": attempt.index,
            "a": attempt.attempt,
            "dur": round(outcome.duration, 6),
            **{k: v for k, v in error.items() if v is not None},
        }
        if attempt.tries < attempt.budget:
            record["next"] = "retry"
            self._record(record)
            delay = self.options.backoff * 2.0 ** min(
                attempt.tries - 1, 32
            )  # no overflow at 1000s of retries
            retry = Attempt(
                attempt.index, 0, attempt.line, attempt.source, attempt.tries, attempt.budget
            )
            heapq.heappush(self.delayed, (time.monotonic() + delay, attempt.index, retry))
            return
        record["next"] = self._park_or_keep(attempt.index)
        self._record(record)
        self.progress.failed += 1

    def _park_or_keep(self, index: int) -> str:
        limit = self.options.dlq_max_items
        # an item already parked (retried from the DLQ) takes no new place in it
        parked = self.state.counts[DLQ] - (self.state.status[index] == DLQ)
        if limit is None or parked < limit:
            return "dlq"
        if self.options.dlq_on_full == "stop" and self.stop_error is None:
            self.stop_error = DlqFullError(
                f"the DLQ is full (dlq.max_items = {limit}); stopped with the item kept as failed. "
                f"Inspect with 'mrpool dlq list {self.store.job_id}', then purge or retry and resume"
            )
        self.kept_failed += 1
        return "failed"

    def _park_poison(self) -> None:
        for index in self.plan.poison:
            streak = self.state.streak[index] + 1
            self._record(
                {
                    "k": "f",
                    "i": index,
                    "a": self.state.attempts[index],
                    "kind": "crash_loop",
                    "msg": f"in flight at {streak} crashes in a row; parked as a suspected poison item",
                    "tail": "",
                    "next": "dlq",
                }
            )

    # -- the stop path -----------------------------------------------------
    def _interrupt(self) -> None:
        """Ctrl-C / SIGTERM / a fatal condition: kill what runs, keep it pending.

        The killed attempts stay *open* in the journal until the ``close`` record:
        resume runs them again, their attempt counted, without a crash streak.
        """
        self._cut.extend(self.executor.started())
        self.in_flight -= len(self.executor.cancel())

    # -- bookkeeping -------------------------------------------------------
    def _record(self, record: dict[str, Any]) -> None:
        record.setdefault("t", round(time.time(), 6))
        self.journal.append(record)
        self.state.apply(record)

    def _flush_events(self) -> None:
        events = self.executor.events
        while events:
            self._record(events.pop(0))

    def _maybe_checkpoint(self) -> None:
        if time.monotonic() - self._last_checkpoint < CHECKPOINT_EVERY:
            return
        self.journal.sync(force=True)
        self.state.offset = self.journal.offset
        self.store.write_checkpoint(self.state)
        self._record({"k": "ckpt", "off": self.state.offset})
        self._last_checkpoint = time.monotonic()

    def report(self, job_id: str) -> SessionReport:
        counts = self.state.summary()
        if self.stop_signal is not None:
            state, code = "interrupted", EXIT_INTERRUPTED
        else:
            state = self.state.finished_state()
            code = EXIT_OK if state == "completed" else EXIT_FAILURES
        message = str(self.stop_error) if self.stop_error else ""
        if not message and self.kept_failed:
            message = (
                f"the DLQ is full (dlq.max_items = {self.options.dlq_max_items}); "
                f"{self.kept_failed} item(s) kept as failed instead of parked (on_full: keep_failed)"
            )
        return SessionReport(job_id, state, code, counts, self.plan.summary(), message)
