"""mrpool: a local MapReduce job runner that never loses work.

The folder is the architecture, one module per concept:

    spec.py        the job file: parse and validate
    items.py       read the input once, give items identities, keep the job's copy
    checksums.py   checksums of the files a job is made of (job.json, items.jsonl)
    journal.py     the append-only, checksummed record of everything (group commit)
    records.py     journal records: one constructor per kind, readers' accessors, one recorder
    store.py       a job's directory, replayed state, checkpoint
    results.py     reading a job's results at disk speed (mrpool results)
    dlq.py         the dead letter queue: parked items, history, signatures
    dlqfile.py     dlq.json, the DLQ snapshot: failure histories by reference, list columns
    lock.py        one process per job: fasteners lock + holder record + psutil
    planner.py     what a session runs: pending > failed > DLQ, deduplicated
    slots.py       per-worker shared slots (a lane per attempt held, heartbeat), begun attempts,
                   crash evidence
    worker.py      a worker process: runs command / callable attempts, K at once with lanes
    executor.py    the executor boundary; LocalExecutor = forked workers
    dask_executor.py  the map phase on a Dask cluster (the 'dask' extra), with remote_helper.py
    crashes.py     the crash rules: what a session that ended badly costs its items
    containment.py every process a session starts (cgroup or token) and its guardian
    supervisor.py  one session: dispatch, outcomes, retries, stop path
    rate.py        the job-wide rate limit: a token bucket of attempt starts
    reduce.py      the reduce step
    fsck.py        check every file of a job, salvage what a damage leaves
    joblog.py      one row per attempt, like GNU parallel's --joblog
    progress.py    the live progress line, or a heartbeat line when not on a terminal
    gc_policy.py   fewer collector passes in mrpool's bulk loops, none in user code
    api.py         the Python API;  cli.py  the command line
    pymap.py       mrpool.map / mrpool.imap: a durable map over a Python iterable
    errors.py      the exception hierarchy and its exit codes
    fsutil.py      crash-safe file primitives (every write that matters goes through here)
    isotime.py     epoch seconds as ISO-8601 text
    failpoints.py  named crash/IO-error points for tests
"""

__version__ = "0.1.0"

# The API's names, listed here so that ``import mrpool`` stays cheap and a
# submodule import (``from . import failpoints``) never triggers the API import.
# tests/test_run.py checks this list against ``mrpool.api.__all__``.
API_NAMES = (
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
)
# ``mrpool.map`` and friends (mrpool/pymap.py), imported on first use like the API.
MAP_NAMES = ("map", "imap", "MapFailures", "Failed")
__all__ = ["__version__", *API_NAMES, *MAP_NAMES]


def __getattr__(name: str):
    """``mrpool.run_job``, ``mrpool.map`` etc.: imported on first use."""
    if name in API_NAMES:
        from . import api

        return getattr(api, name)
    if name in MAP_NAMES:
        from . import pymap

        return getattr(pymap, name)
    raise AttributeError(f"module 'mrpool' has no attribute {name!r}")
