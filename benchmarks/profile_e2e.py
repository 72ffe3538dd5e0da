"""Where the time of ``mrpool run`` and ``mrpool results`` goes, phase by phase.

    python benchmarks/profile_e2e.py [--items 200000] [--workers 2]

Runs each command in a fresh process (``python -c``) with a few of mrpool's
functions wrapped by a timer (wall and this process's CPU, per phase; no
profiler overhead), and prints one line per phase. A phase inside another is
indented; "rest" is what no wrapped phase covers (interpreter exit, argument
parsing, the job lock, the printing of the summary). The figures for
benchmarks/NOTES.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys

from _common import REPO, compile_bytecode, scratch
from end_to_end import write_input

PROBE = r"""
import json, os, sys, time
t0 = time.perf_counter(); c0 = time.process_time()
marks = []
def wrap(owner, name, label, depth):
    inner = getattr(owner, name)
    def timed(*args, **kwargs):
        w, c = time.perf_counter(), time.process_time()
        try:
            return inner(*args, **kwargs)
        finally:
            marks.append((label, depth, time.perf_counter() - w, time.process_time() - c))
    setattr(owner, name, timed)
from mrpool import cli
import mrpool.api as api, mrpool.items as items, mrpool.store as store, mrpool.results as results
marks.append(("imports (cli, api)", 0, time.perf_counter() - t0, time.process_time() - c0))
wrap(api, "load_job_file", "job file + callable check", 1)
wrap(api, "check_callables", "  check_callables", 2)
wrap(api, "ingest", "ingest (validate + copy + fsync)", 1)
wrap(api, "write_job_file", "job.json (fsync)", 1)
wrap(api, "create_job_dir", "build + publish the job dir", 0)
wrap(api, "_run_session", "session", 0)
import mrpool.supervisor as supervisor, mrpool.executor as executor
wrap(supervisor.Session, "run", "  supervisor loop (open..close)", 1)
wrap(executor.LocalExecutor, "start", "  workers started (fork)", 2)
wrap(api.DeadLetterQueue, "save_snapshot", "  dlq snapshot", 1)
wrap(results, "_Index", "pass 1: index the ok records", 1)
wrap(results._Records, "read_run", "pass 2: records read back", 2)
wrap(results, "_ids_of", "ids from items.jsonl", 2)
wrap(store.JobStore, "load_state", "load_state", 1)
wrap(cli, "_write_blocks", "results: stream to stdout", 0)
code = cli.main(sys.argv[1:])
marks.append(("total (before exit)", 0, time.perf_counter() - t0, time.process_time() - c0))
sys.stdout.flush()
os.write(2, ("MARKS" + json.dumps(marks) + "\n").encode())
sys.exit(code)
"""


def phases(argv: list[str], env: dict, stdout) -> list[tuple[str, int, float, float]]:
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], env=env, stdout=stdout, stderr=subprocess.PIPE
    )
    line = next(x for x in proc.stderr.decode().splitlines() if x.startswith("MARKS"))
    return json.loads(line[5:])


def summed(marks: list) -> list[tuple[str, int, float, float]]:
    """Calls of one phase added up, in order of their first end."""
    order, totals = [], {}
    for label, depth, wall, cpu in marks:
        if label not in totals:
            order.append(label)
            totals[label] = [depth, 0.0, 0.0, 0]
        totals[label][1] += wall
        totals[label][2] += cpu
        totals[label][3] += 1
    return [(label, *totals[label]) for label in order]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=200_000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    compile_bytecode()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    work = scratch()
    try:
        job = write_input(work / "job", args.items, args.workers)
        state = str(work / "state")
        for argv, out in (
            (["run", str(job), "--state-dir", state, "--job-id", "p", "--quiet"], None),
            (["results", "p", "--state-dir", state], open(os.devnull, "wb")),  # noqa: SIM115
        ):
            print(f"== mrpool {argv[0]}, {args.items:,} items: wall ms / cpu ms")
            for label, depth, wall, cpu, calls in summed(
                phases(argv, env, out or subprocess.DEVNULL)
            ):
                times = f" (x{calls})" if calls > 1 else ""
                print(f"{'  ' * depth}{label}{times}: {wall * 1e3:,.0f} / {cpu * 1e3:,.0f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
