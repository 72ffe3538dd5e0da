"""Throughput of trivial Python callables: mrpool vs the stdlib process pools.

    python benchmarks/throughput.py [--items 100000] [--workers 2] [--repeats 5]
                                    [--result dict|int|str|none]

The map returns a small dict by default (``--result``; see noop_map.py): ``None``
is the one result mrpool's worker need not encode, so it flatters mrpool. Every
peer runs the same function on all the items (nothing is measured on a slice
and scaled), and ratios are taken round by round, reported as the median with
its range.

mrpool is timed two ways: in-process through ``mrpool.api.run_job`` (reading
and validating the input file, running, journaling every outcome durably --
the like-for-like figure, since the peers are also timed in-process, from pool
creation to the last result, with the items already in memory and nothing
recorded), and end to end through its CLI (adding interpreter start-up).
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import time
from concurrent.futures import ProcessPoolExecutor

from _common import (
    interleaved_rounds,
    make_job,
    ratio_figures,
    ratio_rows,
    report,
    scratch,
    time_mrpool_cli,
)
from noop_map import RESULTS


def _pool_imap(function, items, workers: int, chunksize: int) -> float:
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap_unordered(function, items, chunksize=chunksize):
            pass
    return time.perf_counter() - start


def _executor_map(function, items, workers: int, chunksize: int) -> float:
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as ex:
        for _ in ex.map(function, items, chunksize=chunksize):
            pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--result", choices=sorted(RESULTS), default="dict")
    args = parser.parse_args()
    n, w = args.items, args.workers
    function = RESULTS[args.result]
    work = scratch()
    job = make_job(work / "job", n, {"callable": f"noop_map:{function.__name__}"}, workers=w)
    shutil.copy(__file__.replace("throughput.py", "noop_map.py"), work / "job" / "noop_map.py")
    items = [{"id": i} for i in range(n)]

    def run_mrpool_cli() -> float:
        state = work / f"state-{time.monotonic_ns()}"
        try:
            return time_mrpool_cli(job, state)
        finally:
            shutil.rmtree(state, ignore_errors=True)

    def run_mrpool_api() -> float:
        from mrpool import api

        state = work / f"state-{time.monotonic_ns()}"
        try:
            start = time.perf_counter()
            report_ = api.run_job(job, state_dir=state, job_id="bench")
            elapsed = time.perf_counter() - start
            assert report_.state == "completed", report_
            return elapsed
        finally:
            shutil.rmtree(state, ignore_errors=True)

    rounds = interleaved_rounds(
        args.repeats,
        {
            "mrpool (durable journal)": run_mrpool_api,
            "mrpool CLI end to end": run_mrpool_cli,
            "Pool.imap_unordered chunksize=1": lambda: _pool_imap(function, items, w, 1),
            "Pool.imap_unordered chunksize=100": lambda: _pool_imap(function, items, w, 100),
            "ProcessPoolExecutor.map default": lambda: _executor_map(function, items, w, 1),
            "ProcessPoolExecutor.map chunksize=100": lambda: _executor_map(function, items, w, 100),
        },
    )
    rows = ratio_rows(rounds, "mrpool (durable journal)", n)
    notes = [
        f"{n} items, map returns {args.result} ({function.__name__}), {w} workers, "
        f"{args.repeats} interleaved rounds; ratio = peer seconds / mrpool seconds in the same "
        "round (>1: mrpool faster), median and range over rounds; every peer runs all items",
        "targets (issue 7): >= 0.5 vs imap_unordered chunksize=100, >= 20 vs ProcessPoolExecutor.map default",
    ]
    workload = f"{n // 1000}k callables returning {args.result} ({function.__name__}), {w} workers"
    peers = [name for name in rounds if not name.startswith("mrpool")]
    figures = ratio_figures(rounds, "mrpool (durable journal)", workload, peers)
    report("throughput", rows, notes, figures)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
