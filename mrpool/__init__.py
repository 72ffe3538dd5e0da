"""mrpool: a local MapReduce job runner that never loses work.

The folder is the architecture, one module per concept:

    spec.py        the job file: parse and validate
    items.py       read the input once, give items identities, keep the job's copy
    journal.py     the append-only, checksummed record of everything (group commit)
    store.py       a job's directory, replayed state, checkpoint
    dlq.py         the dead letter queue: parked items, history, signatures
    lock.py        one process per job: fasteners lock + holder record + psutil
    planner.py     what a session runs: pending > failed > DLQ, deduplicated
    slots.py       per-worker shared slots (a lane per attempt held, heartbeat), begun attempts,
                   crash evidence
    worker.py      a worker process: runs command / callable attempts, K at once with lanes
    executor.py    the executor boundary; LocalExecutor = forked workers
    containment.py every process a session starts (cgroup or token) and its guardian
    supervisor.py  one session: dispatch, outcomes, retries, stop path
    rate.py        the job-wide rate limit: a token bucket of attempt starts
    reduce.py      the reduce step
    gc_policy.py   fewer collector passes in mrpool's bulk loops, none in user code
    api.py         the Python API;  cli.py  the command line
    pymap.py       mrpool.map / mrpool.imap: a durable map over a Python iterable
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
