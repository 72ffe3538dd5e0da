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
import shutil
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from . import records
from .crashes import crash_limit
from .dlq import DeadLetterQueue
from .errors import MrpoolError, StorageError, UsageError, command_line
from .fsutil import atomic_write_chunks, fsync_dir, make_private_dir
from .gc_policy import fewer_collections
from .isotime import iso, with_iso
from .items import indices_of, ingest, iter_item_data, iter_item_lines, split_line
from .joblog import exit_fields, iter_attempts
from .journal import JournalWriter, read_records
from .lock import JobLock, clear_stale, live_holder, unlock
from .progress import mode_of
from .records import PARK, RETRY, Recorder, started_attempts, success_rows
from .reduce import read_reduce_output, run_reduce
from .results import jsonl_blocks, result_pairs
from .spec import (
    ExecutorSpec,
    HaltSpec,
    JobSpec,
    changed_spec,
    check_callables,
    check_commands,
    check_placeholders,
    executor_from_option,
    halt_from_option,
    load_job_file,
    replace_spec,
    spec_from_dict,
    with_stored_changes,
)
from .store import (
    DLQ,
    FAILED,
    PENDING,
    PURGED,
    SUCCEEDED,
    JobStore,
    create_job_dir,
    list_job_ids,
    state_root,
    sweep_stale_build_dirs,
    validate_job_id,
    write_job_file,
)

if TYPE_CHECKING:  # the running side is imported by the functions that run items: reading
    # commands (status, results, events, dlq list) need neither the executor nor psutil
    from .planner import PlanOptions, ResumePlan
    from .supervisor import SessionOptions, SessionReport

__all__ = [
    "run_job",
    "resume_job",
    "retry_dlq",
    "plan_resume",
    "job_status",
    "list_jobs",
    "iter_results",
    "iter_result_lines",
    "iter_result_blocks",
    "reduce_output",
    "open_dlq",
    "export_dlq",
    "purge_dlq",
    "iter_events",
    "iter_event_lines",
    "iter_joblog",
    "unlock_job",
    "change_spec",
    "rerun_items",
    "remove_job",
    "SessionReport",
]


def __getattr__(name: str):
    """``api.SessionReport``: imported with the running side, on first use."""
    if name == "SessionReport":
        from .supervisor import SessionReport

        return SessionReport
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- starting and continuing work ------------------------------------------------
@fewer_collections()
def run_job(
    job: str | os.PathLike | dict[str, Any] | JobSpec,
    *,
    job_id: str | None = None,
    workers: int | None = None,
    concurrency: int | None = None,
    rate: str | None = None,
    state_dir: str | os.PathLike | None = None,
    on_created: Callable[[str], None] | None = None,
    progress: bool | str = False,
    base_dir: str | os.PathLike | None = None,
    executor: str | None = None,
    stop: threading.Event | None = None,
    halt: str | HaltSpec | None = None,
) -> SessionReport:
    """Create a job from a job file (path), a job dict or a ``JobSpec``, and run it.

    Everything is validated before any state exists; ``on_created(job_id)`` is
    called the moment the job exists (the CLI prints the id there). ``stop``: see
    ``resume_job``. ``concurrency`` and ``rate`` (``"20/s"``) replace the job
    file's ``map.concurrency`` and ``rate``, and are stored with the job like it.
    ``halt`` ("fail=5", "fail=5%", a ``HaltSpec``) is kept with the job, as the job
    file's ``halt:``, which it overrides. ``progress``: ``True`` draws a live line on stderr when it is a
    terminal; ``"auto"`` (the CLI's default) also writes a heartbeat line every
    ``$MRPOOL_PROGRESS_SECONDS`` when it is not; ``"always"`` draws the line anyway
    (mrpool/progress.py).
    """
    from .planner import PlanOptions

    _progress_mode(progress)
    spec = _as_spec(job, base_dir)
    if workers is not None:
        spec = _with_workers(spec, workers)
    if concurrency is not None:
        spec = replace(spec, map=replace(spec.map, concurrency=_checked_concurrency(concurrency)))
    if rate is not None:
        spec = replace(spec, rate=_rate_option(rate))
    if halt is not None:
        spec = replace_spec(spec, halt=_halt_choice(halt))
    choice = _executor_choice(spec, executor)  # a bad --executor fails before the job exists
    check_callables(spec)
    if choice.kind == "local":
        check_commands(spec)
    job_id = validate_job_id(job_id) if job_id is not None else _new_job_id(spec.name)
    root = state_root(state_dir)
    held: list[JobLock] = []  # taken in the build directory; follows it when it is renamed

    def build(tmp: Path) -> None:
        report = ingest(spec, tmp)
        _check_first_item(spec, tmp)  # a placeholder typo is refused before the job exists
        write_job_file(
            tmp, job_id, spec, report.total, report.duplicates, report.id_mode, report.items_table
        )
        journal = JournalWriter(tmp / "journal.log", 0)
        journal.append(records.job(job_id, report.total, report.duplicates, report.id_mode))
        journal.close()
        held.append(JobLock(tmp, command=f"mrpool run {job_id}").acquire())

    try:
        store = create_job_dir(root, job_id, build)
        held[0].relocate(store.dir)
        from . import failpoints

        if failpoints.ENABLED:
            failpoints.hit("run.after_create")
        if on_created:
            on_created(job_id)
        return _run_session(
            store,
            "run",
            PlanOptions(),
            workers=None,
            progress=progress,
            executor=executor,
            stop=stop,
        )
    finally:
        for lock in held:
            lock.release()


@fewer_collections()
def resume_job(
    job_id: str,
    *,
    state_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    concurrency: int | None = None,
    rate: str | None = None,
    no_dlq: bool = False,
    reset_failed: bool = False,
    max_additional_retries: int | None = None,
    wait: float = 0.0,
    progress: bool | str = False,
    on_plan: Callable[[ResumePlan], None] | None = None,
    executor: str | None = None,
    stop: threading.Event | None = None,
    job_file: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    halt: str | HaltSpec | None = None,
    on_spec_change: Callable[[dict[str, list[Any]]], None] | None = None,
) -> SessionReport:
    """Run what is left of a job: pending + failed + DLQ items, each once.

    ``job_file`` / ``overrides`` (``["map.timeout=60", ...]``, the CLI's ``--set``)
    change the job's spec for this and every later session (see ``change_spec``);
    ``on_spec_change(changes)`` is told what changed. ``halt`` ("fail=5", "fail=5%")
    applies to this session only.

    ``executor`` ("local", "dask", "dask://HOST:PORT") overrides the job file's for
    this session (a cluster's address may change between sessions); so do
    ``workers``, ``concurrency`` and ``rate`` (``"20/s"``).

    Any thread may call this (and ``run_job``, ``retry_dlq``), one job per thread. On
    the main thread SIGINT/SIGTERM stop the session; on another thread Python cannot
    take signals, so set ``stop`` (a ``threading.Event``, from any thread) instead: the
    session stops as on Ctrl-C -- attempts killed, kept pending, report state
    ``"interrupted"`` -- and ``resume`` continues it later.
    """
    from .planner import PlanOptions

    store = JobStore.open(state_root(state_dir), job_id)
    with JobLock(store.dir, command=f"mrpool resume {job_id}").acquire(wait):
        _change_spec_held(store, job_file, overrides, executor, on_spec_change)
        options = PlanOptions(include_dlq=not no_dlq)
        return _run_session(
            store,
            "resume",
            options,
            workers=workers,
            concurrency=concurrency,
            rate=rate,
            progress=progress,
            reset_failed=reset_failed,
            additional=max_additional_retries,
            on_plan=on_plan,
            executor=executor,
            stop=stop,
            halt=halt,
        )


@fewer_collections()
def retry_dlq(
    job_id: str,
    item_ids: list[str] | None = None,
    *,
    signature: str | None = None,
    kind: str | None = None,
    state_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    concurrency: int | None = None,
    rate: str | None = None,
    wait: float = 0.0,
    progress: bool | str = False,
    on_plan: Callable[[ResumePlan], None] | None = None,
    executor: str | None = None,
    stop: threading.Event | None = None,
    job_file: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    halt: str | HaltSpec | None = None,
    on_spec_change: Callable[[dict[str, list[Any]]], None] | None = None,
) -> SessionReport:
    """Re-run DLQ items (all, or those named), narrowed to an error ``signature`` (or a
    prefix of one) and a failure ``kind`` when given; each success leaves the DLQ. Filters
    that match nothing run nothing and say so (``stop``, ``job_file``, ``overrides``,
    ``halt``: see ``resume_job``)."""
    from .planner import PlanOptions

    store = JobStore.open(state_root(state_dir), job_id)
    with JobLock(store.dir, command=f"mrpool dlq retry {job_id}").acquire(wait):
        _change_spec_held(store, job_file, overrides, executor, on_spec_change)
        only = _retry_selection(store, item_ids, signature, kind)
        options = PlanOptions(include_pending=False, include_failed=False, only_indices=only)
        report = _run_session(
            store,
            "dlq retry",
            options,
            workers=workers,
            concurrency=concurrency,
            rate=rate,
            progress=progress,
            on_plan=on_plan,
            executor=executor,
            stop=stop,
            halt=halt,
        )
        if only is not None and not only:
            report.message = (
                f"no item in the DLQ of job {job_id} matches {_filters(signature, kind)}"
            )
        return report


def _retry_selection(
    store: JobStore, item_ids: list[str] | None, signature: str | None, kind: str | None
) -> frozenset[int] | None:
    """The indices ``dlq retry`` may run: the named items (each must be in the DLQ),
    narrowed by the filters; None: the whole DLQ."""
    if not item_ids and signature is None and kind is None:
        return None
    state = store.load_state(store.info().total)
    named = _indices_in_dlq(store, state, item_ids) if item_ids else None
    if signature is None and kind is None:
        return frozenset(named or ())
    return frozenset(e.index for e in DeadLetterQueue(store, state).select(signature, kind, named))


def _filters(signature: str | None, kind: str | None) -> str:
    words = []
    if signature is not None:
        words.append(f"--signature {signature}")
    if kind is not None:
        words.append(f"--kind {kind}")
    return " ".join(words)


def plan_resume(
    job_id: str, *, state_dir: str | os.PathLike | None = None, no_dlq: bool = False
) -> ResumePlan:
    """The plan ``resume`` would run now, without running (or locking) anything."""
    from .planner import PlanOptions, plan_session

    store = JobStore.open(state_root(state_dir), job_id)
    info = store.info()
    state = store.load_state(info.total)
    spec = with_stored_changes(info.spec, state.spec)
    options = PlanOptions(include_dlq=not no_dlq, crash_limit=crash_limit(spec.map.retries))
    evidence = _last_executor(state).crash_evidence(store.dir, state, end_stragglers=False)
    # (no lock: end_stragglers=False touches nothing)
    return plan_session(store.dir, state, options, evidence)


def run_held_session(
    store: JobStore,
    command: str,
    *,
    include_dlq: bool = True,
    workers: int | None = None,
    concurrency: int | None = None,
    progress: bool | str = False,
) -> SessionReport:
    """One session of a job whose lock is already held for it -- by ``mrpool.map``'s
    calling process, which runs this in a forked child (a POSIX lock is not inherited,
    so the child cannot take it, and must not need to)."""
    from .planner import PlanOptions

    options = PlanOptions(include_dlq=include_dlq)
    return _run_session(
        store, command, options, workers=workers, concurrency=concurrency, progress=progress
    )


def _run_session(
    store: JobStore,
    command: str,
    plan_options: PlanOptions,
    *,
    workers: int | None,
    progress: bool | str,
    concurrency: int | None = None,
    rate: str | None = None,
    reset_failed: bool = False,
    additional: int | None = None,
    on_plan: Callable[[ResumePlan], None] | None = None,
    executor: str | None = None,
    stop: threading.Event | None = None,
    halt: str | HaltSpec | None = None,
) -> SessionReport:
    """Plan, run the map phase, then the reduce step and the DLQ snapshot, all under the
    lock the caller holds. A storage error comes out with what to do about it."""
    from .planner import plan_session
    from .supervisor import Session

    _progress_mode(progress)
    store.sweep()
    info = store.info()
    state = store.load_state(info.total)
    spec = with_stored_changes(info.spec, state.spec)  # job.json's, or the last --set/--job-file
    if concurrency is not None:  # this session's, not stored
        spec = replace(spec, map=replace(spec.map, concurrency=_checked_concurrency(concurrency)))
    per_second = _rate_option(rate) if rate is not None else spec.rate
    choice = _executor_choice(spec, executor)
    halt_spec = _halt_choice(halt) if halt is not None else spec.halt
    check_callables(spec)
    _check_fail_fast(store, spec, choice)
    plan_options = replace(plan_options, crash_limit=crash_limit(spec.map.retries))
    previous = _last_executor(state)  # what it left open is settled by its evidence
    journal = JournalWriter(store.journal_path, state.offset)
    try:
        if state.journal_total < info.total:  # an extension's record lost to a crash
            extension = records.extend(state.journal_total, info.total, info.duplicates_in_input)
            Recorder(journal, state).record(extension)
        plan = plan_session(
            store.dir, state, plan_options, previous.crash_evidence(store.dir, state)
        )
        if on_plan:
            on_plan(plan)
        if _nothing_to_do(spec, state, plan):
            journal.close()
            if not state.open_count:  # else a later session still needs the crash evidence
                previous.discard_evidence(store.dir)
            return _nothing_left(store.job_id, state, plan)
        if reset_failed:
            _reset_attempts(journal, state, plan)
        options = _session_options(spec, command, additional, progress, stop, halt_spec, per_second)
        runner = _new_executor(store, spec, workers or spec.workers, choice, info.total)
        session = Session(store, state, journal, plan, runner, options)
        session.run()
        previous.discard_evidence(store.dir)  # settled by this session's open record
        report = session.report(store.job_id)
        _reduce_if_due(store, spec, info.total, state, journal, plan, report)
        DeadLetterQueue(store, state).save_snapshot(session.failures)
    except StorageError as e:
        _close_quietly(journal)
        _discard_evidence_unless_needed(store, info.total, previous)
        raise StorageError(
            f"{e}; everything recorded before it is safe: free space, then '{command_line(store.dir, 'resume')}'"
        ) from None
    except BaseException:
        _close_quietly(journal)
        raise
    journal.close()
    return report


# -- changing a job after the fact: --job-file / --set, rerun, rm --------------------
def change_spec(
    job_id: str,
    *,
    job_file: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    state_dir: str | os.PathLike | None = None,
    wait: float = 0.0,
) -> dict[str, list[Any]]:
    """Change a job's spec under its lock, for this and every later session, and return
    what changed (``{"map.timeout": [30.0, 60.0]}``; empty: nothing). ``job_file``: a
    job file to take the spec from; ``overrides``: ``KEY=VALUE`` assignments applied on
    top of it (or of the job's spec). The map and reduce steps, timeout, retries, backoff,
    workers, dlq, executor and halt may change; the input and the items' identities
    (``spec.FROZEN_KEYS``) may not (``JobSpecError``/``UsageError``, exit 2, naming the
    key). The change is one journal record (a ``spec_changed`` event): a crash leaves the
    old spec or the new one, never a mix."""
    store = JobStore.open(state_root(state_dir), job_id)
    with JobLock(store.dir, command=f"mrpool change {job_id}").acquire(wait):
        return _change_spec_held(store, job_file, overrides, None, None)


def _change_spec_held(
    store: JobStore,
    job_file: str | os.PathLike | None,
    overrides: list[str] | None,
    executor: str | None,
    on_change: Callable[[dict[str, list[Any]]], None] | None,
) -> dict[str, list[Any]]:
    """``change_spec`` for a caller that holds the job's lock."""
    if job_file is None and not overrides:
        return {}
    info = store.info()
    state = store.load_state(info.total)
    current = with_stored_changes(info.spec, state.spec)
    new, changes = changed_spec(current, job_file=job_file, sets=list(overrides or ()))
    if changes:  # refused whole, before it is recorded, if it cannot run
        check_callables(new)
        _check_fail_fast(store, new, _executor_choice(new, executor))
        how = ([f"--job-file {job_file}"] if job_file is not None else []) + [
            f"--set {o}" for o in overrides or ()
        ]
        _record_durably(store, state, records.spec_change(changes, " ".join(how), new.to_dict()))
    if on_change:
        on_change(changes)
    return changes


def _record_durably(store: JobStore, state, record: dict[str, Any]) -> None:
    """One record, journaled and fsynced before the caller goes on (a lock holder's)."""
    journal = JournalWriter(store.journal_path, state.offset)
    try:
        Recorder(journal, state).record(record)
        journal.sync(force=True)
    finally:
        journal.close()


def _check_fail_fast(store: JobStore, spec: JobSpec, choice: ExecutorSpec) -> None:
    """What can be refused before any item runs: a command program that does not
    resolve (attempts on this machine only), a placeholder the first item lacks."""
    if choice.kind == "local":
        check_commands(spec)
    _check_first_item(spec, store.dir)


def _check_first_item(spec: JobSpec, job_dir: Path) -> None:
    if not spec.map.command or not any("{item." in arg for arg in spec.map.command):
        return
    line = next(iter_item_lines(job_dir), None)
    if line is not None:
        raw_id, item = split_line(line)
        check_placeholders(spec, orjson.loads(item), raw_id)


def _halt_choice(halt: str | HaltSpec) -> HaltSpec:
    if isinstance(halt, HaltSpec):
        return halt
    try:
        return halt_from_option(halt)
    except ValueError as e:
        raise UsageError(f"--halt: {e}") from None


@fewer_collections()
def rerun_items(
    job_id: str,
    item_ids: list[str],
    *,
    state_dir: str | os.PathLike | None = None,
    workers: int | None = None,
    wait: float = 0.0,
    progress: bool | str = False,
    on_plan: Callable[[ResumePlan], None] | None = None,
    executor: str | None = None,
    stop: threading.Event | None = None,
    job_file: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    halt: str | HaltSpec | None = None,
    on_spec_change: Callable[[dict[str, list[Any]]], None] | None = None,
) -> SessionReport:
    """Run succeeded items again on purpose (``mrpool rerun``), under the job's lock.

    A ``rerun`` record (an ``items_rerun`` event) first makes them pending: from then
    on ``results`` no longer shows their old result, and their next success is the one
    it shows. A crash after it leaves them pending for ``resume``. An id the job does
    not have, or of an item that has not succeeded, is refused (exit 2) naming it.
    Other options as for ``resume_job``."""
    from .planner import PlanOptions

    if not item_ids:
        raise UsageError("rerun: name the item(s) to run again")
    store = JobStore.open(state_root(state_dir), job_id)
    with JobLock(store.dir, command=f"mrpool rerun {job_id}").acquire(wait):
        _change_spec_held(store, job_file, overrides, executor, on_spec_change)
        state = store.load_state(store.info().total)
        indices = _indices_succeeded(store, state, [str(i) for i in item_ids])
        _record_durably(store, state, records.rerun(indices))
        options = PlanOptions(
            include_failed=False, include_dlq=False, only_indices=frozenset(indices)
        )
        return _run_session(
            store,
            "rerun",
            options,
            workers=workers,
            progress=progress,
            on_plan=on_plan,
            executor=executor,
            stop=stop,
            halt=halt,
        )


_PLACES = {PENDING: "pending", FAILED: "failed", DLQ: "in the DLQ", PURGED: "purged"}


def _indices_succeeded(store: JobStore, state, item_ids: list[str]) -> list[int]:
    found = indices_of(store.dir, item_ids)
    for item_id in item_ids:
        if item_id not in found:
            raise UsageError(f"job {store.job_id} has no item {item_id!r}")
        place = state.status[found[item_id]]
        if place != SUCCEEDED:
            where = _PLACES[place]
            then = "dlq retry" if place == DLQ else "resume"
            raise UsageError(
                f"item {item_id!r} of job {store.job_id} has not succeeded (it is {where}); "
                f"rerun runs succeeded items again"
                + ("" if place == PURGED else f" -- run it with: {command_line(store.dir, then)}")
            )
    return sorted(set(found[item_id] for item_id in item_ids))


def remove_job(
    job_id: str, *, state_dir: str | os.PathLike | None = None, wait: float = 0.0
) -> Path:
    """Delete a job's state (``mrpool rm``): refused (``LockedError``, exit 3) while a live
    process holds its lock. Crash-safe: under the lock, one rename moves the job directory
    out of ``jobs/`` into ``tmp/`` as a dead process's build dir -- from that instant the
    job no longer exists for any command -- and only then is it deleted; what a crash
    leaves there is swept like a killed ``run``'s leftovers. Returns the job's old path."""
    root = state_root(state_dir)
    store = JobStore.open(root, job_id)
    lock = JobLock(store.dir, command=f"mrpool rm {job_id}").acquire(wait)
    try:
        tmp_root = make_private_dir(root / "tmp")
        sweep_stale_build_dirs(tmp_root)
        tomb = tmp_root / f"{os.getpid()}-{secrets.token_hex(4)}"
        os.rename(store.dir, tomb)
        fsync_dir(store.dir.parent)
        fsync_dir(tmp_root)
        lock.relocate(tomb)
        from . import failpoints

        if failpoints.ENABLED:
            failpoints.hit("rm.after_rename")
    finally:
        lock.release()
    shutil.rmtree(tomb)
    fsync_dir(tmp_root)
    return store.dir


def _reduce_due(spec: JobSpec, state) -> bool:
    return spec.reduce is not None and (state.reduce is None or not state.reduce.get("ok"))


def _nothing_to_do(spec: JobSpec, state, plan: ResumePlan) -> bool:
    """No item to run, no poison to park, and no reduce step owed by a completed job."""
    owed = _reduce_due(spec, state) and state.finished_state() == "completed"
    return plan.total == 0 and not plan.poison and not owed


def _session_options(
    spec: JobSpec,
    command: str,
    additional: int | None,
    progress: bool | str,
    stop,
    halt: HaltSpec | None = None,
    rate: float | None = None,
) -> SessionOptions:
    from .supervisor import SessionOptions

    return SessionOptions(
        retries=spec.map.retries,
        backoff=spec.map.backoff,
        additional_retries=additional,
        dlq_max_items=spec.dlq.max_items,
        dlq_on_full=spec.dlq.on_full,
        progress=progress,
        command=command,
        stop=stop,
        halt=halt,
        rate=rate,
    )


def _reduce_if_due(
    store: JobStore,
    spec: JobSpec,
    total: int,
    state,
    journal: JournalWriter,
    plan,
    report: SessionReport,
) -> None:
    """After a completed map phase: the reduce step, if it has not succeeded yet or this
    session ran items (a session records no ``reduce`` record: due before is due now)."""
    if report.state != "completed" or spec.reduce is None:
        return
    if not (_reduce_due(spec, state) or plan.total):
        return
    report.reduce = _reduce(store, spec, total, state, journal)
    if not report.reduce["ok"]:
        report.exit_code = 1
        report.message = f"reduce failed: {report.reduce['error']}"


def _progress_mode(progress: bool | str) -> str:
    try:
        return mode_of(progress)
    except ValueError as e:
        raise UsageError(str(e)) from None


def _executor_choice(spec: JobSpec, option: str | None) -> ExecutorSpec:
    """The executor of this session: ``--executor`` if given, else the job file's. Asking
    for Dask without the extra installed is a usage error naming the extra."""
    if option is not None:
        try:
            choice = executor_from_option(option)
        except ValueError as e:
            raise UsageError(f"--executor: {e}") from None
    else:
        choice = spec.executor
    if choice.kind != "local" and spec.map.concurrency > 1:  # before the job exists, on run
        raise UsageError(
            f"map.concurrency ({spec.map.concurrency}) applies to the local executor only; "
            "a Dask cluster runs as many attempts at once as it has worker threads"
        )
    if choice.kind == "dask":
        try:
            import distributed  # noqa: F401 - the extra's package; the executor imports it too
        except ImportError:
            raise UsageError(
                "the Dask executor needs the 'dask' extra: pip install 'mrpool[dask]'"
            ) from None
    return choice


def _new_executor(store: JobStore, spec: JobSpec, workers: int, choice: ExecutorSpec, items: int):
    from .executor import LocalExecutor
    from .slots import SLOTS_FILE
    from .worker import WorkerConfig

    config = WorkerConfig(
        store.job_id,
        spec.base_dir,
        spec.map.command,
        spec.map.callable,
        spec.map.timeout,
        spec.map.concurrency,
    )
    if choice.kind == "dask":
        from .dask_executor import DaskExecutor

        return DaskExecutor(config, workers, choice.address)
    return LocalExecutor(config, workers, slots_path=store.dir / SLOTS_FILE, items=items)


def _last_executor(state) -> type:
    """The kind of executor the job's last session ran on (its ``executor`` record;
    none: local), which answers what that session left behind (``crash_evidence``)."""
    if (state.executor or {}).get("kind", "local") == "dask":
        from .dask_executor import DaskExecutor

        return DaskExecutor
    from .executor import LocalExecutor

    return LocalExecutor


def _close_quietly(journal: JournalWriter) -> None:
    """Save what can be saved after a failure, without masking the failure."""
    try:
        journal.close()
    except Exception:  # noqa: BLE001 - the original error is the one to report
        journal.abandon()


def _discard_evidence_unless_needed(store: JobStore, total: int, previous: type) -> None:
    """After a storage error (a full disk): the slot file stays only if the journal on
    disk still has an open attempt, which the next session settles from it. (What is
    in memory may be ahead of the disk: the failed write's records are lost.)"""
    try:
        still_open = store.load_state(total).open_count
    except (MrpoolError, OSError):
        return  # unreadable now: keep the evidence, the next session decides
    if not still_open:
        previous.discard_evidence(store.dir)


def _nothing_left(job_id: str, state, plan: ResumePlan) -> SessionReport:
    from .supervisor import SessionReport

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
        Recorder(journal, state).record(records.reset(indices))


def _reduce(
    store: JobStore, spec: JobSpec, total: int, state, journal: JournalWriter
) -> dict[str, Any]:
    results = [result for _, result in store.iter_results(total)]
    outcome = run_reduce(spec, results, store.dir)
    Recorder(journal, state).record(records.reduce(outcome["ok"], outcome.get("error")))
    journal.sync(force=True)
    state.offset = journal.offset  # the checkpoint proves the reduce record was there
    store.write_checkpoint(state)
    return outcome


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
    clear_stale(store.dir)  # a SIGKILLed holder's files go with the first look at the job
    holder = live_holder(store.dir)
    summary = state.summary()
    return {
        "job_id": job_id,
        "name": info.name,
        "state": "running" if holder else state.finished_state(),
        **summary,
        "duplicates_in_input": info.duplicates_in_input,
        "created_at": info.created_at,
        "created_at_iso": iso(info.created_at),
        "lock": None
        if not holder
        else with_iso(
            {k: holder.get(k) for k in ("pid", "hostname", "acquired_at", "command")},
            "acquired_at",
        ),
        "has_reduce": with_stored_changes(info.spec, state.spec).reduce is not None,
        "reduce": None
        if state.reduce is None
        else {"ok": state.reduce.get("ok"), "error": state.reduce.get("error")},
        "executor": state.executor or {"kind": "local"},
        "halted": state.halt,  # null, or why the last session halted (halt: / --halt)
    }


def list_jobs(*, state_dir: str | os.PathLike | None = None) -> list[dict[str, Any]]:
    rows = []
    for job_id in list_job_ids(state_root(state_dir)):
        try:
            rows.append(job_status(job_id, state_dir=state_dir))
        except MrpoolError as e:
            rows.append({"job_id": job_id, "state": f"unreadable: {e}"})
    return rows


def iter_result_lines(
    job_id: str, *, state_dir: str | os.PathLike | None = None, with_item: bool = False
) -> Iterator[bytes]:
    """``iter_results`` as JSONL bytes, ``{"id":...,"result":...}`` LF per success (what
    ``mrpool results`` prints; ``with_item``: ``{"id":...,"item":...,"result":...}``),
    made from the stored bytes: neither the ids nor the results are decoded, so memory
    does not grow with a result beyond about its size."""
    source = _results_source(job_id, state_dir)
    for raw_id, result in result_pairs(*source, with_item=with_item):
        yield b'{"id":%b,"result":%b}\n' % (raw_id, result)


def iter_result_blocks(
    job_id: str, *, state_dir: str | os.PathLike | None = None, with_item: bool = False
) -> Iterator[bytes | memoryview]:
    """``iter_result_lines`` in pieces to write one after another: blocks of whole rows,
    and a large row as three pieces (its result is a view of the stored bytes, not a
    copy). What ``mrpool results`` writes; memory stays about one journal record."""
    return jsonl_blocks(*_results_source(job_id, state_dir), with_item=with_item)


def iter_results(
    job_id: str, *, state_dir: str | os.PathLike | None = None, with_item: bool = False
) -> Iterator[dict[str, Any]]:
    """``{"id", "result"}`` for every success, in input order, each id once;
    ``with_item``: ``{"id", "item", "result"}``, the item as the job holds it."""
    for line in iter_result_lines(job_id, state_dir=state_dir, with_item=with_item):
        yield orjson.loads(line)


def _results_source(job_id: str, state_dir) -> tuple[Path, int, Iterator[bytes]]:
    """What results.py reads: the journal, the item count and items.jsonl's verified
    blocks; the job's state is loaded first, which refuses a journal that lost records
    or whose prefix is damaged."""
    store = JobStore.open(state_root(state_dir), job_id)
    total = store.info().total
    store.load_state(total)
    return store.journal_path, total, iter_item_data(store.dir)


def reduce_output(job_id: str, *, state_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The reduce step's last output. None until a reduce has run over the current
    results: a ``rerun`` or an ``extend`` clears the journal's reduce record,
    and the ``reduce.json`` left from before describes results that no longer stand."""
    store = JobStore.open(state_root(state_dir), job_id)
    info = store.info()
    state = store.load_state(info.total)
    if with_stored_changes(info.spec, state.spec).reduce is None:
        raise UsageError(f"job {job_id} has no reduce step")
    output = read_reduce_output(store.dir) if state.reduce is not None else None
    if output is None:
        raise MrpoolError(
            f"job {job_id} has no reduce output yet (it runs when every item has succeeded)"
        )
    return output


def open_dlq(job_id: str, *, state_dir: str | os.PathLike | None = None) -> DeadLetterQueue:
    return DeadLetterQueue(JobStore.open(state_root(state_dir), job_id))


def export_dlq(
    job_id: str, output: str | os.PathLike, *, state_dir: str | os.PathLike | None = None
) -> int:
    """Write the DLQ as JSONL to ``output``: a new file, 0600 (it holds item data), put
    in place whole by one rename, so a reader never sees half an export. ``output`` may
    be a symlink to a file (the file is replaced); anything else that is not a regular
    file is refused. Returns how many items were written."""
    dlq = open_dlq(job_id, state_dir=state_dir)
    target = Path(os.path.realpath(output))
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise UsageError(f"{output}: cannot write the export: {e.strerror}") from None
    if mode is not None and not stat.S_ISREG(mode):
        raise UsageError(
            f"{output}: not a regular file; -o writes one (leave -o out to print to stdout)"
        )
    count = 0

    def blocks() -> Iterator[bytes]:
        nonlocal count
        block: list[bytes] = []
        for line in dlq.export():
            block.append(line)
            count += 1
            if len(block) == 1024:
                yield b"".join(block)
                block.clear()
        yield b"".join(block)

    atomic_write_chunks(target, blocks())
    return count


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
        from . import failpoints

        if failpoints.ENABLED:
            failpoints.hit("dlq.purge.after_lock")
        state = store.load_state(store.info().total)
        indices = _indices_in_dlq(store, state, item_ids) if item_ids else None
        journal = JournalWriter(store.journal_path, state.offset)
        try:
            dlq = DeadLetterQueue(store, state)
            victims = indices if indices is not None else dlq.indices()
            count = dlq.purge(victims, Recorder(journal, state))
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
    "spec": "spec_changed",
    "rerun": "items_rerun",
    "halt": "halted",
    "extend": "job_extended",
}


def iter_events(
    job_id: str, *, state_dir: str | os.PathLike | None = None, follow: bool = False
) -> Iterator[dict[str, Any]]:
    """The job's event log, one dict per event (``t`` epoch seconds, then ``t_iso``);
    ``follow`` tails it while a holder lives."""
    for record, ids, command in _event_records(job_id, state_dir, follow):
        for event in _events_of(record, ids, command):
            yield with_iso(event, "t")


def iter_event_lines(
    job_id: str, *, state_dir: str | os.PathLike | None = None, follow: bool = False
) -> Iterator[bytes]:
    """``iter_events`` as JSONL (what ``mrpool events`` prints), a record's events at a
    time: the events of attempts started and succeeded -- nearly all of them -- are
    formatted from the stored id bytes a run at a time, not built as dicts and encoded
    one by one; the bytes are what encoding ``iter_events``' dicts gives."""
    for record, ids, command in _event_records(job_id, state_dir, follow):
        kind = record["k"]
        if kind == "s" or kind == "ok":
            yield _attempt_lines(record, ids.raw, command)
        else:
            yield b"".join(
                orjson.dumps(with_iso(e, "t")) + b"\n" for e in _events_of(record, ids, command)
            )


def _event_records(job_id: str, state_dir, follow: bool) -> Iterator[tuple[dict, _Ids, bool]]:
    store = JobStore.open(state_root(state_dir), job_id)
    store.load_state(store.info().total)  # refuses a journal that lost records
    ids = _Ids([line[: line.index(b"\t")] for line in iter_item_lines(store.dir)])
    command = store.info().spec.map.command is not None
    offset = 0
    while True:
        for _, end, record in read_records(store.journal_path, offset):
            yield record, ids, command
            offset = end
        if not follow or not live_holder(store.dir):
            if follow:  # the holder just ended: drain its last records
                for _, _end, record in read_records(store.journal_path, offset):
                    yield record, ids, command
            return
        time.sleep(0.2)


class _Ids:
    """Item ids by index, kept as their stored bytes (compact JSON), decoded when asked."""

    def __init__(self, raw: list[bytes]) -> None:
        self.raw = raw

    def __getitem__(self, index: int) -> Any:
        return orjson.loads(self.raw[index])


def _attempt_lines(record: dict[str, Any], ids: list[bytes], command: bool) -> bytes:
    """The events of an ``s`` or ``ok`` record as JSONL, exactly as ``_events_of`` gives
    them encoded: ``{"t":..,"event":..,"id":..,"attempt":..[,"duration":..,..]}``."""
    t = record.get("t")
    stamp = orjson.dumps(t)
    if isinstance(t, (int, float)) and not isinstance(t, bool):  # isotime.with_iso's twin
        stamp += b',"t_iso":' + orjson.dumps(iso(t))
    head = b'{"t":%b,"event":"item_%b","id":' % (
        stamp,
        b"started" if record["k"] == "s" else b"succeeded",
    )
    if record["k"] == "s":
        parts = []
        for first, count, attempt in record.get("r", ()):
            tail = b',"attempt":%d}\n' % attempt
            parts.append(head + (tail + head).join(ids[first : first + count]) + tail)
        parts += [b'%b%b,"attempt":%d}\n' % (head, ids[i], a) for i, a in record.get("b", ())]
        return b"".join(parts)
    ended = b',"exit_code":0,"signal":null}\n' if command else b"}\n"
    rows = success_rows(record)
    if not rows:
        return b""
    indices, attempts, durations, _results = zip(*rows)
    parts = [head, b"", b',"attempt":', b"", b',"duration":', b"", ended] * len(rows)
    parts[1::7] = [ids[i] for i in indices]
    parts[3::7] = orjson.dumps(attempts)[1:-1].split(b",")  # (what orjson writes of each)
    parts[5::7] = orjson.dumps(durations)[1:-1].split(b",")
    return b"".join(parts)


def _events_of(
    record: dict[str, Any], ids: list[Any], command: bool = False
) -> Iterator[dict[str, Any]]:
    """The events of one journal record. An attempt's end (``item_succeeded``,
    ``item_retrying`` / ``item_parked`` / ``item_failed``) has ``duration`` (seconds,
    null when it never reported), and for a command map ``exit_code`` and ``signal``
    (see joblog.py: null when not applicable)."""
    kind, t = record["k"], record.get("t")
    if kind == "s":
        for index, attempt in started_attempts(record):
            yield {"t": t, "event": "item_started", "id": ids[index], "attempt": attempt}
    elif kind == "ok":
        ended = {"exit_code": 0, "signal": None} if command else {}
        for index, attempt, duration, _result in success_rows(record):
            yield {
                "t": t,
                "event": "item_succeeded",
                "id": ids[index],
                "attempt": attempt,
                "duration": duration,
                **ended,
            }
    elif kind == "f":
        name = {RETRY: "item_retrying", PARK: "item_parked"}.get(record["next"], "item_failed")
        yield {
            "t": t,
            "event": name,
            "id": ids[record["i"]],
            "attempt": record.get("a"),
            "kind": record.get("kind"),
            "error": record.get("msg"),
            "worker_pid": record.get("pid"),
            "duration": record.get("dur"),
            **(dict(zip(("exit_code", "signal"), exit_fields(record))) if command else {}),
        }
    elif kind == "worker":
        yield {
            "t": t,
            "event": f"worker_{record['ev']}",
            **{k: v for k, v in record.items() if k not in ("k", "t", "ev")},
        }
    elif kind == "spec":  # what changed and how; the whole new spec stays in the journal
        yield {"t": t, "event": "spec_changed", "changed": record["changed"], "by": record["by"]}
    elif kind in ("reset", "purge", "rerun"):
        yield {"t": t, "event": _EVENT_NAMES[kind], "ids": [ids[i] for i in records.named_indices(record)]}
    else:
        yield {
            "t": t,
            "event": _EVENT_NAMES.get(kind, kind),
            **{k: v for k, v in record.items() if k not in ("k", "t")},
        }


def unlock_job(
    job_id: str,
    *,
    state_dir: str | os.PathLike | None = None,
    force: bool = False,
    on_remove: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any] | None:
    """Remove the lock files of a holder that is gone (``mrpool unlock``; lock.unlock).

    Returns the holder record removed (``{}``: a lock file without one), None if there
    were no lock files. Raises ``LockedError`` (exit 3) if a live process holds the job,
    or the holder is on another host and not ``force``."""
    store = JobStore.open(state_root(state_dir), job_id)
    return unlock(store.dir, force=force, on_remove=on_remove)


def iter_joblog(
    job_id: str, *, state_dir: str | os.PathLike | None = None
) -> Iterator[dict[str, Any]]:
    """One row per attempt, in the order they ended (``mrpool joblog``; fields in
    joblog.py): id, attempt, host, start, duration, exit_code, signal, outcome."""
    store = JobStore.open(state_root(state_dir), job_id)
    command = store.info().spec.map.command is not None
    live = live_holder(store.dir) is not None
    return iter_attempts(store.dir, store.journal_path, command=command, live=live)


# -- helpers ---------------------------------------------------------------------
def _as_spec(job: Any, base_dir: Any) -> JobSpec:
    if isinstance(job, JobSpec):
        return job
    if isinstance(job, dict):
        return spec_from_dict(job, base_dir=base_dir or os.getcwd(), source="<job dict>")
    return load_job_file(job)


def _checked_concurrency(concurrency: int) -> int:
    from .spec import MAX_CONCURRENCY

    if not 1 <= concurrency <= MAX_CONCURRENCY:
        raise UsageError(f"--concurrency must be from 1 to {MAX_CONCURRENCY}, got {concurrency}")
    return concurrency


def _rate_option(text: str) -> float:
    from .rate import parse_rate

    try:
        return parse_rate(text)
    except ValueError as e:
        raise UsageError(f"--rate {e}") from None


def _with_workers(spec: JobSpec, workers: int) -> JobSpec:
    from .spec import MAX_WORKERS

    if not 1 <= workers <= MAX_WORKERS:
        raise UsageError(f"--workers must be from 1 to {MAX_WORKERS}, got {workers}")
    return replace(spec, workers=workers)


def _new_job_id(name: str) -> str:
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".-")[:80] or "job"
    return f"{slug}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
