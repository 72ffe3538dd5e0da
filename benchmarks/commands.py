"""Throughput of a trivial map command (`true`): mrpool vs GNU parallel --joblog vs xargs -P.

    python benchmarks/commands.py [--items 2000] [--workers 2] [--repeats 3]

GNU parallel is skipped with a note when it is not installed
(`apt-get install parallel` or `brew install parallel`). Every runner forks
one `true` per item with the same argv, `true <id>` (coreutils `true` given an
argument loads the locale, ~0.1 ms more than a bare `true`, so both sides must
pass one); mrpool also journals every outcome durably.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time

from _common import (
    interleaved_rounds,
    make_job,
    ratio_figures,
    ratio_rows,
    report,
    scratch,
    time_mrpool_cli,
)


def _xargs(items_file, workers: int) -> float:
    start = time.perf_counter()
    with open(items_file, "rb") as handle:
        subprocess.run(["xargs", "-P", str(workers), "-n", "1", "true"], stdin=handle, check=True)
    return time.perf_counter() - start


def _parallel(items_file, workers: int, joblog) -> float:
    start = time.perf_counter()
    with open(items_file, "rb") as handle:
        subprocess.run(
            ["parallel", "--will-cite", "-j", str(workers), "--joblog", str(joblog), "true", "{}"],
            stdin=handle,
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, w = args.items, args.workers
    work = scratch()
    job = make_job(work / "job", n, {"command": ["true", "{item.id}"]}, workers=w)
    plain = work / "args.txt"
    plain.write_text("".join(f"{i}\n" for i in range(n)))

    def run_mrpool() -> float:
        state = work / f"state-{time.monotonic_ns()}"
        try:
            return time_mrpool_cli(job, state)
        finally:
            shutil.rmtree(state, ignore_errors=True)

    notes = [
        f"{n} items, each runner spawns `true <id>`, {w} workers, {args.repeats} interleaved "
        "rounds; ratio = peer seconds / mrpool seconds in the same round (>1: mrpool faster), "
        "median and range over rounds"
    ]
    runners = {"mrpool (durable journal)": run_mrpool}
    if shutil.which("parallel"):
        runners["GNU parallel --joblog"] = lambda: _parallel(plain, w, work / "joblog")
    else:
        notes.append("GNU parallel not installed: skipped (apt-get install parallel)")
    runners["xargs -P"] = lambda: _xargs(plain, w)
    rounds = interleaved_rounds(args.repeats, runners)
    rows = ratio_rows(rounds, "mrpool (durable journal)", n)
    notes.append("targets (issue 7): >= 5 vs GNU parallel --joblog, >= 0.8 vs xargs -P")
    workload = f"{n} `true <id>` commands, {w} workers, via the CLI"
    report("commands", rows, notes, ratio_figures(rounds, "mrpool (durable journal)", workload))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
