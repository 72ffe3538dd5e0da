"""``mrpool.map`` against the maps Python users reach for, on the same items in one run.

    python benchmarks/python_map.py [--items 100000] [--slow-items 2000] [--repeats 7]

Two workloads: ``--items`` no-op calls (the per-item overhead) and ``--slow-items``
calls sleeping 1 ms (how well the workers are kept busy). Every runner gets the
same in-memory list of ints, 2 workers, and is timed from the call to the last
result in hand: ``mrpool.map`` (a new job each time: the items streamed into the
job's copy, every start and outcome journaled, results read back from the
journal), ``multiprocessing.Pool.imap`` (chunksize 100, pool start-up included),
``joblib.Parallel(n_jobs=2, batch_size="auto")`` and
``tqdm.contrib.concurrent.process_map`` (chunksize 100, bar disabled). joblib
and tqdm are measured only when importable (``pip install joblib tqdm``; they
are not mrpool dependencies). Runners take turns within each round, and the
figure is each runner's median over the rounds.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shutil
import statistics
import time

from _common import figure, interleaved_rounds, report, scratch
from noop_map import noop, sleep_1ms

import mrpool


def _mrpool_map(fn, items, work) -> float:
    state = work / f"state-{time.monotonic_ns()}"
    try:
        start = time.perf_counter()
        results = mrpool.map(fn, items, job="bench", workers=2, state_dir=state, progress=False)
        elapsed = time.perf_counter() - start
        assert len(results) == len(items)
        return elapsed
    finally:
        shutil.rmtree(state, ignore_errors=True)


def _pool_imap(fn, items) -> float:
    start = time.perf_counter()
    with multiprocessing.get_context("fork").Pool(2) as pool:
        results = list(pool.imap(fn, items, chunksize=100))
    elapsed = time.perf_counter() - start
    assert len(results) == len(items)
    return elapsed


def _joblib(fn, items) -> float:
    from joblib import Parallel, delayed

    start = time.perf_counter()
    results = Parallel(n_jobs=2, batch_size="auto")(delayed(fn)(x) for x in items)
    elapsed = time.perf_counter() - start
    assert len(results) == len(items)
    return elapsed


def _process_map(fn, items) -> float:
    from tqdm.contrib.concurrent import process_map

    start = time.perf_counter()
    results = process_map(fn, items, max_workers=2, chunksize=100, disable=True)
    elapsed = time.perf_counter() - start
    assert len(results) == len(items)
    return elapsed


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def _runners(fn, items, work, notes: list[str]) -> dict:
    runners = {
        "mrpool.map (durable)": lambda: _mrpool_map(fn, items, work),
        "Pool.imap chunksize=100": lambda: _pool_imap(fn, items),
    }
    for module, name, measure in (
        ("joblib", "joblib.Parallel n_jobs=2 auto", _joblib),
        ("tqdm", "tqdm process_map chunksize=100", _process_map),
    ):
        if _importable(module):
            runners[name] = lambda measure=measure: measure(fn, items)
        elif f"{module} not installed" not in " ".join(notes):
            notes.append(f"{module} not installed: {name} skipped (pip install {module})")
    return runners


def _rows(workload: str, n: int, rounds: dict[str, list[float]]) -> list[dict]:
    """Median seconds with their [min-max], and the ratios taken round by round (both
    runners timed in the same round) as a median with its [min-max]."""
    ours, imap = rounds["mrpool.map (durable)"], rounds["Pool.imap chunksize=100"]

    def per_round(values: list[float]) -> str:
        return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"

    return [
        {
            "workload": workload,
            "runner": name,
            "seconds": statistics.median(times),
            "range s": f"{min(times):.3f}-{max(times):.3f}",
            "items/s": n / statistics.median(times),
            "mrpool speed vs it": per_round([t / m for t, m in zip(times, ours)]),
            "speed vs Pool.imap": per_round([i / t for i, t in zip(imap, times)]),
        }
        for name, times in rounds.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--slow-items", type=int, default=2_000)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    work = scratch()
    notes: list[str] = []
    rows: list[dict] = []
    figures: list[dict] = []
    for workload, fn, n in (
        (f"{args.items} no-op", noop, args.items),
        (f"{args.slow_items} x 1 ms", sleep_1ms, args.slow_items),
    ):
        items = list(range(n))
        rounds = interleaved_rounds(args.repeats, _runners(fn, items, work, notes))
        rows += _rows(workload, n, rounds)
        ours, imap = rounds["mrpool.map (durable)"], rounds["Pool.imap chunksize=100"]
        figures.append(
            figure(
                f"`mrpool.map`, {workload} items, 2 workers, in-process",
                f"{statistics.median(ours):.3f} s",
                f"`Pool.imap(chunksize=100)`: {statistics.median(imap):.3f} s",
                [i / m for i, m in zip(imap, ours)],
            )
        )
    notes += [
        f"2 workers each; median of {args.repeats} interleaved rounds; the same list of ints for all",
        "'mrpool speed vs it' = its seconds / mrpool's (>1: mrpool faster); "
        "'speed vs Pool.imap' = Pool.imap's seconds / its (mrpool target >= 0.7); both "
        "taken round by round, median [min-max] over the rounds",
        "mrpool.map includes creating the job (items streamed to its copy, content-hash ids), "
        "journaling every start and outcome, and reading the results back from the journal",
    ]
    report("python_map", rows, notes, figures)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
