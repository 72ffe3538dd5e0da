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

* ``ResumePlan`` streams the items this session owes, in input order; the
  session takes them through a ``PlanCursor``, as many as the executor has room for.
* ``Session._dispatch`` moves attempts to the executor as it has room,
  journaling their start first (attempt numbers survive any crash).
* ``Session._settle`` turns outcomes into journal records: a success is one
  ``ok`` record (which also takes an item out of the DLQ); a failure is one
  ``f`` record saying whether it will be retried or is parked.
* ``_interrupt`` is the stop path for SIGINT/SIGTERM (or ``SessionOptions.stop``
  set, for a session on another thread than the main one): kill in-flight
  attempts, close the session, keep everything for ``resume``.
* ``_abort`` is the stop path for an exception (a storage error, a bug): the same,
  recorded so that the next session does not take it for a crash. What each way of
  ending costs an item (attempts, crash streaks, poison) is in crashes.py.

Every record is built by records.py and goes through the session's
``records.Recorder``, which appends it to the journal and applies it to the
in-memory state, so memory and disk cannot drift (``ok`` records too, from the
executor's encoded rows).
"""

from __future__ import annotations

import heapq
import os
import signal
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from . import failpoints, records
from .crashes import clear_abort_marks, mark_aborted
from .dlqfile import FailureLog
from .errors import (
    EXIT_FAILURES,
    EXIT_INTERRUPTED,
    EXIT_OK,
    DlqFullError,
    HaltedError,
    command_line,
)
from .executor import Batch, Executor, Failure, HandBack, Outcomes, Successes
from .journal import JOURNAL_VERSION, JournalWriter, journal_version
from .planner import PlanCursor, ResumePlan
from .progress import ProgressModel, open_progress
from .rate import TokenBucket
from .records import Recorder
from .spec import HaltSpec
from .store import DLQ, PURGED, SUCCEEDED, JobState, JobStore

__all__ = ["SessionOptions", "SessionReport", "Session"]

CHECKPOINT_EVERY = 30.0
LOST_OUTCOME_LIMIT = 3  # see Session._hand_back
SHARED_TAIL_MIN = 64  # a failure's tail at least this long is journaled once (tail_at)
SHARED_TAILS_MAX = 4096  # distinct tails remembered per session
STOPPED_BY_CALLER = 0  # stop_signal when options.stop was set (no real signal is 0)
NEXT = -1  # a ready attempt's number when it takes the next one at dispatch


@dataclass(frozen=True)
class SessionOptions:
    retries: int = 0
    backoff: float = 0.0
    additional_retries: int | None = None  # attempts for failed/DLQ items instead of 1 + retries
    dlq_max_items: int | None = None
    dlq_on_full: str = "stop"
    progress: bool | str = False  # a progress.open_progress mode (True: "tty")
    command: str = "run"
    stop: threading.Event | None = None  # set: stop like Ctrl-C (any thread can set it)
    rate: float | None = None  # attempt starts a second across the job (rate.py); None: no cap
    halt: HaltSpec | None = None  # stop once this many items were parked (halt: / --halt)


@dataclass
class SessionReport:
    job_id: str
    state: str
    exit_code: int
    counts: dict[str, int]
    plan: dict[str, int]
    message: str = ""
    reduce: dict[str, Any] | None = None


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
        self.recorder = Recorder(journal, state)
        self._record = self.recorder.record  # journal and state together (records.py)
        self._record_all = self.recorder.record_all
        # (index, attempt, line) to run before fresh items: hand-backs, and due retries;
        # attempt NEXT: one past the highest recorded when it is dispatched
        self.ready: deque[tuple[int, int, bytes]] = deque()
        self.delayed: list[tuple[float, int, tuple[int, int, bytes]]] = []  # retries in backoff
        self.tries: dict[int, int] = {}  # failed attempts per item in this session
        self.lost: dict[int, int] = {}  # outcomes per item that died with their worker
        self.in_flight = 0
        self._cut: list[int] = []  # items started, not finished, when this session was stopped
        self.stop_signal: int | None = None
        self.stop_error: Exception | None = None
        self._budget_pending = 1 + options.retries
        self._budget_settled = (
            1 + options.retries
            if options.additional_retries is None
            else options.additional_retries
        )
        self.cursor = PlanCursor(plan, pending_only=self._budget_settled <= 0)
        self._last_checkpoint = time.monotonic()
        self.progress = open_progress(
            ProgressModel(store.job_id, state.total, plan.total), options.progress
        )
        self._count_progress()
        self.bucket: TokenBucket | None = None  # options.rate's, once the workers are up
        self._rate_bound = False  # the last dispatch sent fewer than there was room for
        self.kept_failed = 0  # items not parked because the DLQ was full (keep_failed)
        # tail text -> offset of the f record holding it, so the next failure with the same
        # tail names that record instead (None: a version-1 journal, tails kept inline)
        self._tails: dict[str, int] | None = (
            {} if journal_version(journal.path) >= JOURNAL_VERSION else None
        )
        # every f record this session journals, noted as it is appended: the DLQ snapshot
        # at the end is written from it instead of reading them back (dlqfile.py)
        self.failures = FailureLog(journal.offset + journal.buffered)
        self._settled_at: float | None = None  # records.now() as the outcomes came in
        self.parked_here = 0  # items this session parked in the DLQ (for halt)
        self.finished_here = 0  # items this session settled: succeeded or parked (for halt)

    # -- the loop ----------------------------------------------------------
    def run(self) -> None:
        """Open the session, run the loop until the plan is done or a stop is asked, then
        close it. An exception ends it through ``_abort`` (and is raised)."""
        self._open()
        previous = self._install_signal_handlers()
        try:
            self._record_all(self.executor.start())
            if self.options.rate:  # from now: no tokens saved up while the workers forked
                self.bucket = TokenBucket(self.options.rate)
            self._loop()
            if self.stop_signal is not None or self.stop_error is not None:
                self._interrupt()
        except BaseException as cause:
            self._abort(cause)
            raise
        else:
            self.executor.shutdown()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._count_progress()
            self.progress.close()
        self._close()

    def _open(self) -> None:
        """The ``open`` record (settling what the last session left open, from its crash
        evidence), the plan, poison parked; written before the executor starts."""
        evidence = self.plan.evidence
        self._record(
            records.session_open(
                self.options.command,
                os.getpid(),
                socket.gethostname(),
                evidence.running,
                evidence.began,
                self.plan.after_abort,
            )
        )
        self._record(records.plan(self.plan.summary()))
        self._park_poison()
        # The open record settles the crashed session's attempts from its slot file:
        # on disk before the executor replaces that file with this session's.
        self.journal.write()
        if self.plan.after_abort:  # the marker has done its work once this open is durable
            self.journal.sync(force=True)
            clear_abort_marks(self.store.dir)

    def _loop(self) -> None:
        """Dispatch what there is room for, wait for outcomes, record them; repeat."""
        while self._stop_not_asked():
            self._release_due_retries()
            self._dispatch()
            if self._finished():
                return
            outcomes = self.executor.wait(self._wait_timeout())
            self._settle(outcomes)
            self.journal.sync()
            self._count_progress()
            self.progress.refresh()
            self._maybe_checkpoint()

    def _close(self) -> None:
        """The ``close`` record, durable, then a checkpoint. If the record cannot be
        written, the abort marker says the session ended (crashes.py, rule 5)."""
        try:
            self._record(records.close(self._close_reason(), self._cut))
            self.journal.sync(force=True)
        except Exception:
            mark_aborted(self.store.dir, self.journal.offset)
            raise
        self.state.offset = self.journal.offset
        self.store.write_checkpoint(self.state)
        self.failures.end = self.journal.offset  # the session journals nothing after this

    def _install_signal_handlers(self) -> dict[int, Any]:
        """SIGINT/SIGTERM stop the session -- when it runs on the main thread, the only
        one Python lets set handlers. On another thread the caller stops it with
        ``options.stop`` (a ``threading.Event``), and the process's signals keep
        whatever meaning the caller gave them."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    def _stop_not_asked(self) -> bool:
        stop = self.options.stop
        if stop is not None and stop.is_set() and self.stop_signal is None:
            self.stop_signal = STOPPED_BY_CALLER
        return self.stop_signal is None and self.stop_error is None

    def _finished(self) -> bool:
        return self.cursor.done and not self.ready and not self.delayed and self.in_flight == 0

    def _wait_timeout(self) -> float:
        timeout = 0.05
        if self.delayed:
            timeout = max(0.0, min(timeout, self.delayed[0][0] - time.monotonic()))
        if self._rate_bound:  # the rate held starts back: the next one is due then
            timeout = min(timeout, self.bucket.next_in())
        return timeout

    def _on_signal(self, signum: int, _frame: Any) -> None:
        self.stop_signal = signum

    def _close_reason(self) -> str:
        if self.stop_signal == STOPPED_BY_CALLER:
            return "interrupted: stopped by the caller"
        if self.stop_signal is not None:
            return f"interrupted by {signal.Signals(self.stop_signal).name}"
        if self.stop_error is not None:
            return f"stopped: {self.stop_error}"
        return "finished"

    # -- dispatch ----------------------------------------------------------
    def _budget(self, index: int) -> int:
        """Attempts an item gets in this session, by where the plan took it from."""
        return (
            self._budget_pending if self.plan.source(index) == "pending" else self._budget_settled
        )

    def _dispatch(self) -> None:
        room = self.executor.capacity()
        self._rate_bound = False
        if self.bucket is not None and room > 0:
            allowed = self.bucket.available()  # the job's rate: every start counts
            self._rate_bound = allowed < room
            room = min(room, allowed)
        if room <= 0:
            return
        indices: list[int] = []
        numbers: list[int] = []
        lines: list[bytes] = []
        ready, attempts = self.ready, self.state.attempts
        while ready and len(indices) < room:  # hand-backs and due retries first
            index, attempt, line = ready.popleft()
            indices.append(index)
            numbers.append(attempts[index] + 1 if attempt == NEXT else attempt)
            lines.append(line)
        pairs = list(zip(indices, numbers))
        runs = None
        if len(indices) < room and not self.cursor.done:
            fresh, fresh_lines = self.cursor.take(room - len(indices))
            if fresh:
                fresh_numbers, run = self._next_attempts(fresh)
                if run is not None:
                    runs = [run]
                else:
                    pairs += zip(fresh, fresh_numbers)
                indices += fresh
                numbers += fresh_numbers
                lines += fresh_lines
        if not indices:
            return
        self._record(records.starts(pairs, runs))
        self.journal.write()  # the start is on disk before the worker sees the item
        self.executor.submit(Batch(indices, numbers, lines))
        if self.bucket is not None:
            self.bucket.take(len(indices))
        self.in_flight += len(indices)
        if failpoints.ENABLED:
            failpoints.hit("supervisor.after_dispatch")

    def _next_attempts(self, fresh: list[int]) -> tuple[list[int], list[int] | None]:
        """Each fresh item's next cumulative attempt number, and the run ``[first, count,
        attempt]`` the items form when they are consecutive and share that number (in a
        new job, always: then the start record costs no per-item work)."""
        attempts, first, count = self.state.attempts, fresh[0], len(fresh)
        if fresh[-1] - first == count - 1:  # the plan yields each index once, increasing
            taken = attempts[first : first + count]
            if taken.count(taken[0]) == count:
                number = taken[0] + 1
                return [number] * count, [first, count, number]
        return [attempts[index] + 1 for index in fresh], None

    def _release_due_retries(self) -> None:
        now = time.monotonic()
        while self.delayed and self.delayed[0][0] <= now:
            self.ready.append(heapq.heappop(self.delayed)[2])

    # -- outcomes ----------------------------------------------------------
    def _settle(self, outcomes: Outcomes) -> None:
        self.in_flight -= len(outcomes)
        self._settled_at = records.now()  # the t of this batch's failure records
        self._hand_back(outcomes.requeued)
        for failure in outcomes.failed:
            if self.stop_signal is None:
                self._failed(failure)
            else:  # cut short by our own Ctrl-C: it stays open (pending), its attempt counted
                self._cut.append(failure.index)
        for done in outcomes.ok:
            self._record_successes(done)
        self._check_halt()
        if failpoints.ENABLED and len(outcomes):
            self.journal.write()
            failpoints.hit("supervisor.after_outcome")
            if any(self.plan.source(i) == "dlq" for done in outcomes.ok for i in done.indices):
                failpoints.hit("retry.after_success")
        self._record_all(outcomes.events)  # worker died / started (after what it reported)

    def _hand_back(self, requeued: list[HandBack]) -> None:
        """Attempts the executor handed back run again, first in line, uncharged -- except
        one whose outcome keeps dying with its worker (it ran, then the worker died before
        reporting: a worker that dies after every attempt of it). The third time in a
        session that counts as a failed attempt, so the session cannot loop on it forever."""
        again = []
        for back in requeued:
            index, line = back.index, back.line
            if back.started and self.stop_signal is None:
                lost = self.lost[index] = self.lost.get(index, 0) + 1
                if lost >= LOST_OUTCOME_LIMIT:
                    error = records.error(
                        "worker_died",
                        f"worker died after running it, before reporting the outcome "
                        f"({lost} times in this session)",
                    )
                    self._failed(Failure(index, self.state.attempts[index], line, error, 0.0))
                    continue
            again.append((index, NEXT if back.started else back.attempt, line))
        self.ready.extendleft(reversed(again))

    def _failed(self, failure: Failure) -> None:
        index = failure.index
        tries = self.tries[index] = self.tries.get(index, 0) + 1
        if tries < self._budget(index):
            self._record_failure(self._failed_record(failure, records.RETRY))
            self.progress.model.retries += 1
            delay = self.options.backoff * 2.0 ** min(tries - 1, 32)  # no overflow at 1000s
            retry = (index, NEXT, failure.line)
            heapq.heappush(self.delayed, (time.monotonic() + delay, index, retry))
            return
        next_ = self._park_or_keep(index)
        self._record_failure(self._failed_record(failure, next_))
        self.progress.model.session_settled += 1
        if next_ == records.PARK:
            self.parked_here += 1
            self.finished_here += 1

    def _check_halt(self) -> None:
        """``halt: {fail: N | "X%"}``: once this session parked that many items, stop it
        as a full DLQ does -- in-flight attempts cut (kept pending), exit 1 -- with a
        ``halt`` record saying why (``status`` shows it)."""
        halt = self.options.halt
        if halt is None or self.stop_error is not None or self.stop_signal is not None:
            return
        if not halt.reached(self.parked_here, self.finished_here):
            return
        reason = (
            f"halted: {self.parked_here} of the {self.finished_here} item(s) this session "
            f"finished were parked in the DLQ (halt: {halt.text()}); the rest are pending"
        )
        self.stop_error = HaltedError(reason)
        self._record(records.halt(halt.text(), self.parked_here, self.finished_here, reason))

    def _failed_record(self, failure: Failure, next_: str) -> dict[str, Any]:
        return records.failed(
            failure.index,
            failure.attempt,
            failure.error,
            next_,
            failure.duration,
            self._settled_at,
        )

    def _record_failure(self, record: dict[str, Any]) -> None:
        """Journal an ``f`` record (its tail shared, ``_share_tail``) and note it in
        ``failures``, at the offset it gets."""
        at = self.journal.offset + self.journal.buffered
        self._share_tail(record, at)
        self._record(record)
        self.failures.note(record, at)

    def _share_tail(self, record: dict[str, Any], at: int) -> None:
        """Journal a tail seen before in this session as a reference to the record that
        holds it (``tail_at``, journal.py); remember a new one as in the record appended
        at ``at``, next."""
        tails = self._tails
        tail = record.get("tail")
        if tails is None or not tail or len(tail) < SHARED_TAIL_MIN:
            return
        known = tails.get(tail)
        if known is not None:
            del record["tail"]
            record["tail_at"] = known
        elif len(tails) < SHARED_TAILS_MAX:
            tails[tail] = at

    def _park_or_keep(self, index: int) -> str:
        limit = self.options.dlq_max_items
        # an item already parked (retried from the DLQ) takes no new place in it
        parked = self.state.counts[DLQ] - (self.state.status[index] == DLQ)
        if limit is None or parked < limit:
            return records.PARK
        if self.options.dlq_on_full == "stop" and self.stop_error is None:
            self.stop_error = DlqFullError(
                f"the DLQ is full (dlq.max_items = {limit}); stopped with the item kept as failed. "
                f"Inspect with '{command_line(self.store.dir, 'dlq list')}', then purge or "
                "retry and resume"
            )
        self.kept_failed += 1
        return records.KEEP

    def _park_poison(self) -> None:
        for index in self.plan.poison:
            streak = self.plan.crashes[index]  # the planner's count, this crash included
            error = records.error(
                "crash_loop",
                f"in flight at {streak} crashes in a row; parked as a suspected poison item",
            )
            self._record_failure(
                records.failed(index, self.state.attempts[index], error, records.PARK)
            )

    # -- the stop path -----------------------------------------------------
    def _interrupt(self) -> None:
        """Ctrl-C / SIGTERM / a fatal condition: kill what runs, keep it pending.

        The killed attempts stay *open* in the journal until the ``close`` record:
        resume runs them again, their attempt counted, without a crash streak.
        """
        self._cut.extend(self.executor.started())
        self.in_flight -= len(self.executor.cancel())

    def _abort(self, cause: BaseException) -> None:
        """The end of a session stopped by an exception (a storage error, a bug): not a
        crash of its items (crashes.py, rule 5). Stop every attempt now; then record the
        end -- a ``close`` record without a cut, so every open attempt stays charged (an
        outcome lost with a failed write may have run) and no streak rises -- or, if the
        journal takes no more writes, leave the abort marker. Never masks ``cause``."""
        for step in (self.executor.cancel, self.executor.shutdown):
            try:
                step()
            except Exception:  # noqa: BLE001 - stop the rest all the same; cause is the error
                pass
        reason = f"aborted: {type(cause).__name__}: {cause}"
        try:
            self._record(records.close(reason, None))
            self.journal.write()
        except Exception:  # noqa: BLE001 - the journal is past writing: say it another way
            mark_aborted(self.store.dir, self.journal.offset)

    # -- bookkeeping -------------------------------------------------------
    def _record_successes(self, done: Successes) -> None:
        self.recorder.successes(done.indices, done.rows)
        self.progress.model.session_settled += len(done.indices)
        self.finished_here += len(done.indices)

    def _count_progress(self) -> None:
        """The job-wide counts and this session's in-flight attempts, for the display."""
        counts, shown = self.state.counts, self.progress.model
        shown.set_counts(counts[SUCCEEDED], counts[DLQ], self.state.total - counts[PURGED])
        # an executor that queues attempts ahead in its workers knows what really runs
        running = getattr(self.executor, "running", None)
        shown.in_flight = self.in_flight if running is None else running()

    def _maybe_checkpoint(self) -> None:
        if time.monotonic() - self._last_checkpoint < CHECKPOINT_EVERY:
            return
        self.journal.sync(force=True)
        self.state.offset = self.journal.offset
        self.store.write_checkpoint(self.state)
        self._record(records.checkpoint_mark(self.state.offset))
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
