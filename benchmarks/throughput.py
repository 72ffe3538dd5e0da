"""Throughput of no-op Python callables: mrpool vs the stdlib process pools.

    python benchmarks/throughput.py [--items 100000] [--workers 2] [--repeats 3]

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

from _common import interleaved_medians, make_job, report, scratch, time_mrpool_cli
from noop_map import noop


def _pool_imap(items, workers: int, chunksize: int) -> float:
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for _ in pool.imap_unordered(noop, items, chunksize=chunksize):
            pass
    return time.perf_counter() - start


def _executor_map(items, workers: int, chunksize: int) -> float:
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("fork")) as ex:
        for _ in ex.map(noop, items, chunksize=chunksize):
            pass
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--executor-items",
        type=int,
        default=None,
        help="items for ProcessPoolExecutor default (slow)",
    )
    args = parser.parse_args()
    n, w = args.items, args.workers
    work = scratch()
    job = make_job(work / "job", n, {"callable": "noop_map:noop"}, workers=w)
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

    # ProcessPoolExecutor.map with the default chunksize is slow; time a slice and scale per item.
    m = args.executor_items or min(n, 20_000)
    timings = interleaved_medians(
        args.repeats,
        {
            "mrpool (durable journal)": run_mrpool_api,
            "mrpool CLI end to end": run_mrpool_cli,
            "Pool.imap_unordered chunksize=1": lambda: _pool_imap(items, w, 1),
            "Pool.imap_unordered chunksize=100": lambda: _pool_imap(items, w, 100),
            "ProcessPoolExecutor.map default": lambda: _executor_map(items[:m], w, 1) * n / m,
            "ProcessPoolExecutor.map chunksize=100": lambda: _executor_map(items, w, 100),
        },
    )
    ours = timings["mrpool (durable journal)"]
    rows = [
        {"runner": name, "seconds": t, "items/s": n / t, "peer s / mrpool s": t / ours}
        for name, t in timings.items()
    ]
    notes = [
        f"{n} no-op items, {w} workers, median of {args.repeats} rounds (each runner once a round); ratio = peer seconds / mrpool seconds (>1: mrpool faster)",
        f"ProcessPoolExecutor.map default measured on {m} items and scaled to {n}",
        "targets (issue 7): >= 0.5 vs imap_unordered chunksize=100, >= 20 vs ProcessPoolExecutor.map default",
    ]
    report("throughput", rows, notes)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
