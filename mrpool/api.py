"""The Python API: everything the CLI does, as functions.

    from mrpool import api
    report = api.run_job("examples/wordcount/job.yaml", on_created=print)
    api.job_status(report.job_id)["state"]          # "completed"
    for row in api.iter_results(report.job_id): ...
    plan = api.plan_resume(job_id)                    # inspect, runs nothing
    api.resume_job(job_id, max_additional_retries=3)
    api.open_dlq(job_id).stats()

Every function takes ``state_dir`` (else ``$MRPOOL_HOME``, else
``~/.local/state/mrpool``). Commands that run items hold the job's lock for
their whole life and raise ``LockedError`` if another process holds it.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import orjson

from .dlq import DeadLetterQueue
from .errors import CorruptStateError, MrpoolError, StorageError, UsageError
from .executor import LocalExecutor
from .gc_policy import fewer_collections
from .items import indices_of, ingest, iter_item_lines, read_ids
from .journal import JournalWriter, read_records, started_attempts
from .lock import JobLock, live_holder
from .planner import PlanOptions, ResumePlan, plan_session
from .reduce import read_reduce_output, run_reduce
from .slots import SLOTS_FILE, running_at_crash
from .spec import JobSpec, check_callables, load_job_file, spec_from_dict
from .store import (
    DLQ,
    FAILED,
    JobStore,
    create_job_dir,
    list_job_ids,
    state_root,
    validate_job_id,
    write_job_file,
)
from .supervisor import Session, SessionOptions, SessionReport
from .worker import WorkerConfig

__all__ = [
    "run_job",
    "resume_job",
    "retry_dlq",
    "plan_resume",
    "job_status",
    "list_jobs",
    "iter_results",
    "iter_result_lines",
    "reduce_output",
    "open_dlq",
    "purge_dlq",
    "iter_events",
    "SessionReport",
]


# -- starting and continuing work ------------------------------------------------
@fewer_collections()
def run_job(
    job: str | os.PathLike | dict[str, Any] | JobSpec,
    *,
    job_id: str | None = None,
    workers: int | None = None,
    state_dir: str | os.PathLike | None = None,
    on_created: Callable[[str], None] | None = None,
    progress: bool = False,
    base_dir: str | os.PathLike | None = None,
) -> SessionReport:
    """Create a job from a job file (path), a job dict or a ``JobSpec``, and run it.

    Everything is validated before any state exists; ``on_created(job_id)`` is
    called the moment the job exists (the CLI prints the id there).
    """
    spec = _as_spec(job, base_dir)
    if workers is not None:
        spec = _with_workers(spec, workers)
    check_callables(spec)
    job_id = validate_job_id(job_id) if job_id is not None else _new_job_id(spec.name)
    root = state_root(state_dir)
    lock = JobLock(Path("."), command=f"mrpool run {job_id}")

    def build(tmp: Path) -> None:
        report = ingest(spec, tmp)
        write_job_file(
            tmp, job_id, spec, report.total, report.duplicates, report.id_mode, report.items_table
        )
        header = {
            "k": "job",
            "v": 1,
            "t": time.time(),
            "job_id": job_id,
            "total": report.total,
            "duplicates_in_input": report.duplicates,
            "id_mode": report.id_mode,
        }
        journal = JournalWriter(tmp / "journal.log", 0)
        journal.append(header)
        journal.close()
        lock.job_dir = tmp
        lock.acquire()

    try:
        store = create_job_dir(root, job_id, build)
        lock.relocate(store.dir)
        from . import failpoints

        if failpoints.ENABLED:
            failpoints.hit("run.after_create")
        if on_created:
            on_created(job_id)
        return _run_session(store, "run", PlanOptions(), workers=None, progress=progress)
    finally:
        lock.release()


@fewer_collections()
def resume_job(
    job_id: str,
    *,
    state_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    no_dlq: bool = False,
    reset_failed: bool = False,
    max_additional_retries: int | None = None,
    wait: float = 0.0,
    progress: bool = False,
    on_plan: Callable[[ResumePlan], None] | None = None,
) -> SessionReport:
    """Run what is left of a job: pending + failed + DLQ items, each once."""
    store = JobStore.open(state_root(state_dir), job_id)
    with JobLock(store.dir, command=f"mrpool resume {job_id}").acquire(wait):
        options = PlanOptions(include_dlq=not no_dlq, crash_limit=_crash_limit(store))
        return _run_session(
            store,
            "resume",
            options,
            workers=workers,
            progress=progress,
            reset_failed=reset_failed,
            additional=max_additional_retries,
            on_plan=on_plan,
        )


@fewer_collections()
def retry_dlq(
    job_id: str,
    item_ids: list[str] | None = None,
    *,
    state_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    wait: float = 0.0,
    progress: bool = False,
    on_plan: Callable[[ResumePlan], None] | None = None,
) -> SessionReport:
    """Re-run DLQ items (all, or those named); each success leaves the DLQ."""
    store = JobStore.open(state_root(state_dir), job_id)
    with JobLock(store.dir, command=f"mrpool dlq retry {job_id}").acquire(wait):
        only = None
        if item_ids:
            state = store.load_state(store.info().total)
            only = frozenset(_indices_in_dlq(store, state, item_ids))
        options = PlanOptions(
            include_pending=False,
            include_failed=False,
            only_indices=only,
            crash_limit=_crash_limit(store),
        )
        return _run_session(
            store, "dlq retry", options, workers=workers, progress=progress, on_plan=on_plan
        )


def plan_resume(
    job_id: str, *, state_dir: str | os.PathLike | None = None, no_dlq: bool = False
) -> ResumePlan:
    """The plan ``resume`` would run now, without running (or locking) anything."""
    store = JobStore.open(state_root(state_dir), job_id)
    state = store.load_state(store.info().total)
    options = PlanOptions(include_dlq=not no_dlq, crash_limit=_crash_limit(store))
    return plan_session(store.dir, state, options, _running_at_crash(store, state))


def _run_session(
    store: JobStore,
    command: str,
    plan_options: PlanOptions,
    *,
    workers: int | None,
    progress: bool,
    reset_failed: bool = False,
    additional: int | None = None,
    on_plan: Callable[[ResumePlan], None] | None = None,
) -> SessionReport:
    store.sweep()
    info = store.info()
    spec = info.spec
    check_callables(spec)
    state = store.load_state(info.total)
    journal = JournalWriter(store.journal_path, state.offset)
    try:
        plan = plan_session(store.dir, state, plan_options, _running_at_crash(store, state))
        if on_plan:
            on_plan(plan)
        reduce_due = spec.reduce is not None and (
            state.reduce is None or not state.reduce.get("ok")
        )
        if (
            plan.total == 0
            and not plan.poison
            and not (reduce_due and state.finished_state() == "completed")
        ):
            journal.close()
            (store.dir / SLOTS_FILE).unlink(missing_ok=True)
            return _nothing_left(store.job_id, state, plan)
        if reset_failed:
            _reset_attempts(journal, state, plan)
        executor = LocalExecutor(
            WorkerConfig(
                store.job_id, spec.base_dir, spec.map.command, spec.map.callable, spec.map.timeout
            ),
            workers or spec.workers,
            slots_path=store.dir / SLOTS_FILE,
        )
        session = Session(
            store,
            state,
            journal,
            plan,
            executor,
            SessionOptions(
                retries=spec.map.retries,
                backoff=spec.map.backoff,
                additional_retries=additional,
                dlq_max_items=spec.dlq.max_items,
                dlq_on_full=spec.dlq.on_full,
                progress=progress,
                command=command,
            ),
        )
        session.run()
        report = session.report(store.job_id)
        if report.state == "completed" and spec.reduce is not None and (reduce_due or plan.total):
            report.reduce = _reduce(store, spec, info.total, state, journal)
            if not report.reduce["ok"]:
                report.exit_code = 1
                report.message = f"reduce failed: {report.reduce['error']}"
        DeadLetterQueue(store, state).save_snapshot()
    except StorageError as e:
        _close_quietly(journal)
        raise StorageError(
            f"{e}; everything recorded before it is safe: free space, then 'mrpool resume {store.job_id}'"
        ) from None
    except BaseException:
        _close_quietly(journal)
        raise
    journal.close()
    return report


def _close_quietly(journal: JournalWriter) -> None:
    """Save what can be saved after a failure, without masking the failure."""
    try:
        journal.close()
    except Exception:  # noqa: BLE001 - the original error is the one to report
        journal.abandon()


def _running_at_crash(store: JobStore, state) -> list[int] | None:
    """Open items that a worker of the crashed session was running (None: unknown)."""
    if not state.open_count:
        return []
    found = running_at_crash(store.dir / SLOTS_FILE)
    if found is None:
        return None
    return sorted(
        {
            index
            for index, attempt in found
            if 0 <= index < state.total and state.opened[index] and state.attempts[index] == attempt
        }
    )


def _nothing_left(job_id: str, state, plan: ResumePlan) -> SessionReport:
    return SessionReport(
        job_id,
        state.finished_state(),
        0,
        state.summary(),
        plan.summary(),
        message="nothing left to run",
    )


def _reset_attempts(journal: JournalWriter, state, plan: ResumePlan) -> None:
    indices = [i for i, s in enumerate(state.status) if s in (FAILED, DLQ) and plan.selection[i]]
    if indices:
        record = {"k": "reset", "t": time.time(), "b": indices}
        journal.append(record)
        state.apply(record)


def _reduce(
    store: JobStore, spec: JobSpec, total: int, state, journal: JournalWriter
) -> dict[str, Any]:
    results = [result for _, result in store.iter_results(total)]
    outcome = run_reduce(spec, results, store.dir)
    record = {"k": "reduce", "t": time.time(), "ok": outcome["ok"], "error": outcome.get("error")}
    journal.append(record)
    state.apply(record)
    journal.sync(force=True)
    state.offset = journal.offset  # the checkpoint proves the reduce record was there
    store.write_checkpoint(state)
    return outcome


def _crash_limit(store: JobStore) -> int:
    return max(2, 1 + store.info().spec.map.retries)


def _indices_in_dlq(store: JobStore, state, item_ids: list[str]) -> list[int]:
    found = indices_of(store.dir, (str(i) for i in item_ids))
    missing = [i for i in item_ids if i not in found or state.status[found[i]] != DLQ]
    if missing:
        raise UsageError(f"not in the DLQ of job {store.job_id}: {', '.join(missing)}")
    return list(found.values())


# -- reading ---------------------------------------------------------------------
def job_status(job_id: str, *, state_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Counts, state and live lock holder of one job (the ``status --json`` object)."""
    store = JobStore.open(state_root(state_dir), job_id)
    info = store.info()
    state = store.load_state(info.total)
    holder = live_holder(store.dir)
    summary = state.summary()
    return {
        "job_id": job_id,
        "name": info.name,
        "state": "running" if holder else state.finished_state(),
        **summary,
        "duplicates_in_input": info.duplicates_in_input,
        "created_at": info.created_at,
        "lock": None
        if not holder
        else {k: holder.get(k) for k in ("pid", "hostname", "acquired_at", "command")},
        "reduce": None
        if state.reduce is None
        else {"ok": state.reduce.get("ok"), "error": state.reduce.get("error")},
    }


def list_jobs(*, state_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    rows = []
    for job_id in list_job_ids(state_root(state_dir)):
        try:
            rows.append(job_status(job_id, state_dir=state_dir))
        except MrpoolError as e:
            rows.append({"job_id": job_id, "state": f"unreadable: {e}"})
    return rows


def iter_results(
    job_id: str, *, state_dir: str | os.PathLike | None = None
) -> Iterator[dict[str, Any]]:
    """``{"id", "result"}`` for every success, in input order, each id once."""
    for raw_id, result in _results_by_raw_id(job_id, state_dir):
        yield {"id": orjson.loads(raw_id), "result": orjson.loads(result)}


def iter_result_lines(
    job_id: str, *, state_dir: str | os.PathLike | None = None
) -> Iterator[bytes]:
    """``iter_results`` as JSONL bytes, ``{"id":...,"result":...}`` LF per success (what
    ``mrpool results`` prints), made from the stored bytes: neither the ids nor the
    results are decoded, so memory does not grow with a result beyond about its size."""
    for raw_id, result in _results_by_raw_id(job_id, state_dir):
        yield b'{"id":%b,"result":%b}\n' % (raw_id, result)


def _results_by_raw_id(job_id: str, state_dir) -> Iterator[tuple[bytes, bytes | memoryview]]:
    """``(id as stored: compact JSON, result as stored JSON)`` per success, in input order."""
    store = JobStore.open(state_root(state_dir), job_id)
    total = store.info().total
    store.load_state(total)  # refuses a journal that lost records or a damaged prefix
    lines = iter_item_lines(store.dir)  # checksum-verified, and exactly `total` lines
    position = 0
    for index, result in store.iter_result_json(total):
        line = next(islice(lines, index - position, None), None)
        if line is None:  # (the verified reader raises first; never a StopIteration)
            raise CorruptStateError(f"{store.dir / 'items.jsonl'}: fewer lines than items")
        position = index + 1
        yield line[: line.index(b"\t")], result


def reduce_output(job_id: str, *, state_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    store = JobStore.open(state_root(state_dir), job_id)
    if store.info().spec.reduce is None:
        raise UsageError(f"job {job_id} has no reduce step")
    output = read_reduce_output(store.dir)
    if output is None:
        raise MrpoolError(
            f"job {job_id} has no reduce output yet (it runs when every item has succeeded)"
        )
    return output


def open_dlq(job_id: str, *, state_dir: str | os.PathLike | None = None) -> DeadLetterQueue:
    return DeadLetterQueue(JobStore.open(state_root(state_dir), job_id))


def purge_dlq(
    job_id: str,
    item_ids: list[str] | None = None,
    *,
    state_dir: str | os.PathLike | None = None,
    wait: float = 0.0,
) -> int:
    """Drop DLQ items (all, or those named) for good, under the job's lock."""
    store = JobStore.open(state_root(state_dir), job_id)
    with JobLock(store.dir, command=f"mrpool dlq purge {job_id}").acquire(wait):
        state = store.load_state(store.info().total)
        indices = _indices_in_dlq(store, state, item_ids) if item_ids else None
        journal = JournalWriter(store.journal_path, state.offset)
        try:
            dlq = DeadLetterQueue(store, state)
            count = dlq.purge(indices if indices is not None else dlq.indices(), journal)
            journal.sync(force=True)
            state.offset = journal.offset  # the checkpoint proves the purge was recorded
            store.write_checkpoint(state)
            dlq.save_snapshot()
        finally:
            journal.close()
        return count


# -- events ------------------------------------------------------------------------
_EVENT_NAMES = {
    "job": "job_created",
    "open": "session_started",
    "plan": "plan",
    "close": "session_finished",
    "ckpt": "checkpoint_written",
    "reduce": "reduce_finished",
    "reset": "attempts_reset",
    "purge": "dlq_purged",
    "salvage": "journal_salvaged",
}


def iter_events(
    job_id: str, *, state_dir: str | os.PathLike | None = None, follow: bool = False
) -> Iterator[dict[str, Any]]:
    """The job's event log, one dict per event; ``follow`` tails it while a holder lives."""
    store = JobStore.open(state_root(state_dir), job_id)
    store.load_state(store.info().total)  # refuses a journal that lost records
    ids = read_ids(store.dir)
    offset = 0
    while True:
        for _, end, record in read_records(store.journal_path, offset):
            yield from _events_of(record, ids)
            offset = end
        if not follow or not live_holder(store.dir):
            if follow:  # the holder just ended: drain its last records
                for _, _end, record in read_records(store.journal_path, offset):
                    yield from _events_of(record, ids)
            return
        time.sleep(0.2)


def _events_of(record: dict[str, Any], ids: list[Any]) -> Iterator[dict[str, Any]]:
    kind, t = record["k"], record.get("t")
    if kind == "s":
        for index, attempt in started_attempts(record):
            yield {"t": t, "event": "item_started", "id": ids[index], "attempt": attempt}
    elif kind == "ok":
        for index, attempt, duration, _result in record["b"]:
            yield {
                "t": t,
                "event": "item_succeeded",
                "id": ids[index],
                "attempt": attempt,
                "duration": duration,
            }
    elif kind == "f":
        name = {"retry": "item_retrying", "dlq": "item_parked"}.get(record["next"], "item_failed")
        yield {
            "t": t,
            "event": name,
            "id": ids[record["i"]],
            "attempt": record.get("a"),
            "kind": record.get("kind"),
            "error": record.get("msg"),
            "worker_pid": record.get("pid"),
        }
    elif kind == "worker":
        yield {
            "t": t,
            "event": f"worker_{record['ev']}",
            **{k: v for k, v in record.items() if k not in ("k", "t", "ev")},
        }
    elif kind in ("reset", "purge"):
        yield {"t": t, "event": _EVENT_NAMES[kind], "ids": [ids[i] for i in record["b"]]}
    else:
        yield {
            "t": t,
            "event": _EVENT_NAMES.get(kind, kind),
            **{k: v for k, v in record.items() if k not in ("k", "t")},
        }


# -- helpers ---------------------------------------------------------------------
def _as_spec(job: Any, base_dir: Any) -> JobSpec:
    if isinstance(job, JobSpec):
        return job
    if isinstance(job, dict):
        return spec_from_dict(job, base_dir=base_dir or os.getcwd(), source="<job dict>")
    return load_job_file(job)


def _with_workers(spec: JobSpec, workers: int) -> JobSpec:
    from dataclasses import replace

    from .spec import MAX_WORKERS

    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be from 1 to {MAX_WORKERS}, got {workers}")
    return replace(spec, workers=workers)


def _new_job_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-")[:80] or "job"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
