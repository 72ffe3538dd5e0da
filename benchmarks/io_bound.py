"""IO-bound items: many attempts in flight per worker (map.concurrency) vs the usual peers.

    python benchmarks/io_bound.py [--items 2000] [--wait 0.2] [--workers 2] [--concurrency 64]
                                  [--repeats 3]

Every item waits ``--wait`` seconds (sleeps: an HTTP call stands in). With
``workers x concurrency`` = 128 in flight the ideal is 128 / 0.2 s = 640 items/s.
Runners, each a fresh process tree timed end to end (start-up, ingest, journal
fsyncs included for mrpool):

* mrpool ``workers: 2, concurrency: 64`` with an ``async def`` callable (event loop);
* the same with a plain callable (a pool of 64 threads per worker);
* ``concurrent.futures.ThreadPoolExecutor(max_workers=128)`` over the same function;
* ``asyncio.gather`` under ``asyncio.Semaphore(128)``;
* GNU parallel ``-j128 sleep 0.2`` (skipped with a note when not installed);
* mrpool ``workers: 128, concurrency: 1`` (one process per attempt in flight).

Each runner's memory is the peak over the run of the *sum* of the RSS of every
process in its tree (sampled every 50 ms: supervisor + workers for mrpool), and
the PSS sum (shared pages split between the processes sharing them: what the
tree really costs) sampled once mid-run. Interleaved rounds; medians with
[min-max].
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from _common import REPO, compile_bytecode, figure, make_job, report, scratch

MAP_SOURCE = """
import asyncio, time

WAIT = {wait!r}


async def aio(item):
    await asyncio.sleep(WAIT)
    return item["id"]


def sync(item):
    time.sleep(WAIT)
    return item["id"]
"""

THREADS = """
import json, sys
from concurrent.futures import ThreadPoolExecutor
sys.path.insert(0, sys.argv[1])
from iob import sync
items = [json.loads(line) for line in open(sys.argv[2])]
with ThreadPoolExecutor(max_workers=int(sys.argv[3])) as pool:
    results = list(pool.map(sync, items))
assert len(results) == len(items)
"""

GATHER = """
import asyncio, json, sys
sys.path.insert(0, sys.argv[1])
from iob import aio
items = [json.loads(line) for line in open(sys.argv[2])]

async def main(limit):
    gate = asyncio.Semaphore(limit)
    async def one(item):
        async with gate:
            return await aio(item)
    return await asyncio.gather(*(one(item) for item in items))

assert len(asyncio.run(main(int(sys.argv[3])))) == len(items)
"""


class TreeMemory:
    """Samples the summed RSS of ``pid``'s whole tree until stopped; PSS once, mid-run."""

    def __init__(self, pid: int, pss_after: float) -> None:
        self.root = psutil.Process(pid)
        self.peak_rss = 0
        self.pss = 0
        self.pss_in_flight = 0
        self._pss_after = pss_after
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _tree(self) -> list[psutil.Process]:
        try:
            return [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return []

    def _sample(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            total = 0
            tree = self._tree()
            for proc in tree:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak_rss = max(self.peak_rss, total)
            if not self.pss and time.monotonic() - started >= self._pss_after and len(tree) > 0:
                pss = 0
                for proc in tree:
                    try:
                        pss += proc.memory_full_info().pss
                    except psutil.Error:
                        pass
                self.pss = pss
            self._stop.wait(0.05)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def timed_tree(argv: list[str], env: dict[str, str], pss_after: float) -> tuple[float, int, int]:
    """Wall seconds, peak summed RSS and mid-run PSS of running ``argv``'s tree."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    memory = TreeMemory(proc.pid, pss_after)
    _, err = proc.communicate()
    elapsed = time.perf_counter() - start
    memory.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:5])} ... exited {proc.returncode}: {err.decode()}")
    return elapsed, memory.peak_rss, memory.pss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--wait", type=float, default=0.2, help="seconds each item waits")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, wait = args.items, args.wait
    flight = args.workers * args.concurrency
    work = scratch()
    (work / "iob.py").write_text(MAP_SOURCE.format(wait=wait))
    compile_bytecode()
    env = dict(os.environ, PYTHONPATH=str(REPO))

    def mrpool_job(name: str, function: str, workers: int, concurrency: int) -> Path:
        directory = work / name
        step = {"callable": f"iob:{function}", "concurrency": concurrency}
        path = make_job(directory, n, step, workers=workers)
        shutil.copy(work / "iob.py", directory / "iob.py")
        return path

    def mrpool_runner(path: Path):
        def run() -> tuple[float, int, int]:
            state = work / f"state-{time.monotonic_ns()}"
            try:
                argv = [sys.executable, "-m", "mrpool", "run", str(path), "--state-dir", str(state)]
                return timed_tree(argv, env, pss_after=1.0)
            finally:
                shutil.rmtree(state, ignore_errors=True)

        return run

    items_file = mrpool_job("items", "sync", 1, 1).parent / "items.jsonl"
    lanes = f"workers {args.workers} x concurrency {args.concurrency}"
    runners = {
        f"mrpool async, {lanes}": mrpool_runner(
            mrpool_job("async", "aio", args.workers, args.concurrency)
        ),
        f"mrpool threads, {lanes}": mrpool_runner(
            mrpool_job("threads", "sync", args.workers, args.concurrency)
        ),
        f"ThreadPoolExecutor({flight})": lambda: timed_tree(
            [sys.executable, "-c", THREADS, str(work), str(items_file), str(flight)], env, 1.0
        ),
        f"asyncio.gather, Semaphore({flight})": lambda: timed_tree(
            [sys.executable, "-c", GATHER, str(work), str(items_file), str(flight)], env, 1.0
        ),
    }
    notes = [
        f"{n} items, each waits {wait:g} s; {flight} in flight: ideal {flight / wait:,.0f} items/s; "
        f"{args.repeats} interleaved rounds, medians [min-max]; end to end (process start to "
        "exit); RSS: peak of the summed RSS of the runner's whole process tree; PSS: the "
        "tree's summed PSS 1 s into the run",
    ]
    if shutil.which("parallel"):
        plain = work / "args.txt"
        plain.write_text("".join(f"{i}\n" for i in range(n)))

        def gnu_parallel() -> tuple[float, int, int]:
            with open(plain, "rb") as handle:
                start = time.perf_counter()
                proc = subprocess.Popen(
                    ["parallel", "--will-cite", "-n0", "-j", str(flight), "sleep", f"{wait:g}"],
                    stdin=handle,
                    stdout=subprocess.DEVNULL,
                )
                memory = TreeMemory(proc.pid, 1.0)
                proc.wait()
                memory.stop()
            return time.perf_counter() - start, memory.peak_rss, memory.pss

        runners[f"GNU parallel -j{flight} sleep {wait:g}"] = gnu_parallel
    else:
        notes.append("GNU parallel not installed here: skipped (apt-get install parallel)")
    runners[f"mrpool threads, workers {flight} x concurrency 1"] = mrpool_runner(
        mrpool_job("wide", "sync", flight, 1)
    )

    rounds: dict[str, list[tuple[float, int, int]]] = {name: [] for name in runners}
    for _ in range(args.repeats):
        for name, measure in runners.items():
            rounds[name].append(measure())
    pool_name = f"ThreadPoolExecutor({flight})"
    pool_rates = [n / seconds for seconds, _, _ in rounds[pool_name]]
    rows, figures = [], []
    pool_rss = statistics.median(r for _, r, _ in rounds[pool_name]) / 1e6
    for name, measured in rounds.items():
        rates = [n / seconds for seconds, _, _ in measured]
        vs_pool = [rate / pool for rate, pool in zip(rates, pool_rates)]
        rss = [r for _, r, _ in measured]
        pss = [p for _, _, p in measured]
        rows.append(
            {
                "runner": name,
                "items/s": statistics.median(rates),
                "range": f"{min(rates):.0f}-{max(rates):.0f}",
                "% of ideal": 100 * statistics.median(rates) * wait / flight,
                "vs ThreadPool": statistics.median(vs_pool),
                "vs range": f"{min(vs_pool):.2f}-{max(vs_pool):.2f}",
                "RSS MB": statistics.median(rss) / 1e6,
                "RSS range": f"{min(rss) / 1e6:.0f}-{max(rss) / 1e6:.0f}",
                "PSS MB": statistics.median(pss) / 1e6,
            }
        )
        if (
            name.startswith("mrpool")
            and name != f"mrpool threads, workers {flight} x concurrency 1"
        ):
            figures.append(
                figure(
                    f"{n:,} items each waiting {wait:g} s, {flight} in flight, whole processes",
                    f"{name}: {statistics.median(rates):.0f} items/s "
                    f"({100 * statistics.median(rates) * wait / flight:.0f} % of ideal), "
                    f"RSS {statistics.median(rss) / 1e6:.0f} MB",
                    f"{pool_name}: {statistics.median(pool_rates):.0f} items/s, RSS {pool_rss:.0f} MB",
                    vs_pool,
                )
            )
    notes.append(
        "targets (issue 18): >= 90 % of ideal, >= 0.95x ThreadPoolExecutor(128), "
        "mrpool total RSS <= 300 MB at 128 in flight"
    )
    report("io_bound", rows, notes, figures)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
