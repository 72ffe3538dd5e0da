"""Where ``mrpool.map``'s time goes on no-op items: CPU per process, fixed and per item.

    python benchmarks/map_cost.py [--small 10000] [--large 100000] [--repeats 5]

On a shared machine wall time follows CPU time (every runnable process gets its
share of the cores), so this measures CPU, which load does not inflate: the
caller (``time.process_time``), the session process (its own rusage) and its
workers and guardian (the session's children rusage), for ``--small`` and
``--large`` items in interleaved rounds. A straight line through the two medians
gives each process's fixed cost (ms a call) and its cost per item (us), the same
for ``multiprocessing.Pool.imap`` (chunksize 100: the parent, and the pool's
workers). The caller's CPU is split further by phase: creating the job (items
encoded, content-hash ids, ``items.jsonl``, ``job.json``, the journal's header,
the lock) and forking the session process plus reading the results back from the
journal as it grows.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import statistics
import sys
import time

from _common import report, scratch
from noop_map import noop

import mrpool
import mrpool.pymap as pymap

_SESSION: list[float] = []  # [session CPU, its children's CPU] of the last call


def _cpu(who: int) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def _measured_session(*args):
    """``pymap._session_main`` that reports its CPU and its children's on stderr's pipe."""
    conn = args[4]
    real_send = conn.send

    def send(message):  # the session's last act: its CPU then, workers reaped
        real_send((message, _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)))

    conn.send = send
    return _REAL_SESSION_MAIN(*args)


_REAL_SESSION_MAIN = pymap._session_main


class _Phases:
    """CPU seconds the caller spends in ``_prepare`` (the job made) and reading results."""

    def __init__(self) -> None:
        self.prepare = self.results = 0.0
        real_prepare, real_recorded = pymap._prepare, pymap._recorded_results

        def prepare(*a, **k):
            start = time.process_time()
            try:
                return real_prepare(*a, **k)
            finally:
                self.prepare += time.process_time() - start

        def recorded(*a, **k):
            batches = real_recorded(*a, **k)
            try:
                while True:
                    start = time.process_time()
                    try:
                        batch = next(batches)
                    except StopIteration:
                        return
                    finally:
                        self.results += time.process_time() - start
                    yield batch
            finally:
                batches.close()

        pymap._prepare, pymap._recorded_results = prepare, recorded


class _Unwrap:
    """Take the session's CPU figures off its last message before pymap reads it."""

    def __init__(self) -> None:
        real_take = pymap._SessionProcess._take_message

        def take(process):
            real_take(process)
            if process.message is not None and len(process.message) == 3:
                message, own, children = process.message
                process.message = message
                _SESSION[:] = [own, children]

        pymap._SessionProcess._take_message = take


def _mrpool(n: int, work, phases: _Phases) -> dict[str, float]:
    items = list(range(n))
    state = work / f"state-{time.monotonic_ns()}"
    phases.prepare = phases.results = 0.0
    before = time.process_time()
    wall = time.perf_counter()
    mrpool.map(noop, items, job="cost", workers=2, state_dir=state, progress=False)
    wall = time.perf_counter() - wall
    caller = time.process_time() - before
    shutil.rmtree(state, ignore_errors=True)
    return {
        "wall": wall,
        "caller": caller,
        "caller: create the job": phases.prepare,
        "caller: fork + read results": phases.results,
        "caller: other": caller - phases.prepare - phases.results,
        "session": _SESSION[0],
        "workers + guardian": _SESSION[1],
    }


def _imap(n: int) -> dict[str, float]:
    items = list(range(n))
    before, children = time.process_time(), _cpu(resource.RUSAGE_CHILDREN)
    wall = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = list(pool.imap(noop, items, chunksize=100))
    wall = time.perf_counter() - wall
    assert len(results) == n
    return {
        "wall": wall,
        "caller": time.process_time() - before,
        "workers": _cpu(resource.RUSAGE_CHILDREN) - children,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    pymap._session_main = _measured_session
    _Unwrap()
    phases = _Phases()
    work = scratch()
    runs: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(args.repeats):  # interleaved: every runner and size in each round
        for n in (args.small, args.large):
            runs.setdefault(("mrpool.map", n), []).append(_mrpool(n, work, phases))
            runs.setdefault(("Pool.imap", n), []).append(_imap(n))
    rows = []
    for runner in ("mrpool.map", "Pool.imap"):
        small, large = runs[(runner, args.small)], runs[(runner, args.large)]
        for part in small[0]:
            a = statistics.median(r[part] for r in small)
            b = statistics.median(r[part] for r in large)
            per_item = (b - a) / (args.large - args.small)
            spread = [r[part] for r in large]
            rows.append(
                {
                    "runner": runner,
                    "part": part if part == "wall" else f"{part} CPU",
                    f"s at {args.large}": f"{b:.3f} [{min(spread):.3f}-{max(spread):.3f}]",
                    "fixed ms": round(1000 * (a - per_item * args.small), 1),
                    "us / item": round(1e6 * per_item, 2),
                }
            )
    load = os.getloadavg()[0]
    notes = [
        f"medians of {args.repeats} interleaved rounds at {args.small} and {args.large} "
        f"no-op items, 2 workers; fixed and per item from the line through the two medians",
        f"load average at the end: {load:.1f} on {os.cpu_count()} cores (a shared machine: "
        "wall times are inflated by the load, CPU times much less)",
    ]
    report("map_cost", rows, notes)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
