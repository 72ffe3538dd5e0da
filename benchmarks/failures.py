"""Failure-heavy jobs: every item raises, against the same job where every item succeeds.

    python benchmarks/failures.py [--items 100000] [--workers 2] [--repeats 3]

Whole processes (``python -m mrpool run``; every outcome journaled, every
failing item parked in the DLQ with its traceback tail): run seconds and peak
RSS of each job, the state directory's bytes per item, and the time and peak
RSS of ``dlq list`` over the all-failing job.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

from _common import REPO, compile_bytecode, figure, make_job, report, scratch, timed_process


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, w = args.items, args.workers
    compile_bytecode()
    work = scratch()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    mrpool = [sys.executable, "-m", "mrpool"]
    jobs = {}
    for name, function in (("all succeed", "small_dict"), ("all raise", "always_raises")):
        jobs[name] = make_job(
            work / name.replace(" ", "-"), n, {"callable": f"noop_map:{function}"}, w
        )
        shutil.copy(Path(__file__).with_name("noop_map.py"), jobs[name].parent / "noop_map.py")
    runs: dict[str, list[tuple[float, int, int]]] = {name: [] for name in jobs}
    listing: list[tuple[float, int]] = []
    startup: list[float] = []  # `mrpool --version`: the floor any command pays
    try:
        for r in range(args.repeats):
            for name, job in jobs.items():  # interleaved: one run of each a round
                state = work / f"state-{r}-{name.replace(' ', '-')}"
                seconds, rss = timed_process(
                    [*mrpool, "run", str(job), "--state-dir", str(state), "--job-id", "f"],
                    env=env,
                    ok=(0, 1),  # 1: finished with items in the DLQ, as the all-raise job must
                )
                runs[name].append((seconds, rss, _tree_bytes(state)))
                if name == "all raise":
                    startup.append(timed_process([*mrpool, "--version"], env=env)[0])
                    listing.append(
                        timed_process(
                            [*mrpool, "dlq", "list", "f", "--state-dir", str(state)], env=env
                        )
                    )
                shutil.rmtree(state, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = statistics.median(t for t, _, _ in runs["all succeed"])
    rows = []
    for name, values in runs.items():
        seconds = [t for t, _, _ in values]
        rows.append(
            {
                "measure": f"run, {name}",
                "seconds": statistics.median(seconds),
                "range s": f"{min(seconds):.3f}-{max(seconds):.3f}",
                "x all-succeed": statistics.median(seconds) / base,
                "peak RSS MB": max(m for _, m, _ in values) / 1e6,
                "state bytes/item": statistics.median(b for _, _, b in values) / n,
            }
        )
    seconds = [t for t, _ in listing]
    rows.append(
        {
            "measure": "dlq list, all raise",
            "seconds": statistics.median(seconds),
            "range s": f"{min(seconds):.3f}-{max(seconds):.3f}",
            "x all-succeed": "",
            "peak RSS MB": max(m for _, m in listing) / 1e6,
            "state bytes/item": "",
        }
    )
    succeed, fail = runs["all succeed"], runs["all raise"]
    figures = [
        figure(
            f"{n // 1000}k callables that all raise (every one parked with its traceback), "
            f"{w} workers, via the CLI",
            f"{statistics.median(t for t, _, _ in fail):.2f} s, peak RSS "
            f"{max(m for _, m, _ in fail) / 1e6:.0f} MB, "
            f"{statistics.median(b for _, _, b in fail) / n:.0f} B/item on disk",
            f"the same job all succeeding: {base:.2f} s, "
            f"{statistics.median(b for _, _, b in succeed) / n:.0f} B/item",
            [ok[0] / bad[0] for ok, bad in zip(succeed, fail)],
        ),
        figure(
            f"`dlq list` of those {n // 1000}k parked items",
            f"{statistics.median(t for t, _ in listing):.2f} s, peak RSS "
            f"{max(m for _, m in listing) / 1e6:.0f} MB",
            f"`mrpool --version` (start-up alone): {statistics.median(startup):.2f} s",
            [up / t for up, (t, _) in zip(startup, listing)],
        ),
    ]
    report(
        "failures",
        rows,
        [
            f"{n} items, {w} workers, {args.repeats} interleaved rounds, whole processes",
            "targets (issue 26): all-raise run <= 2x all-succeed, <= 300 B/item on disk, "
            "dlq list <= 0.3 s and <= 100 MB",
            "ratios: all-succeed s / all-raise s (>= 0.5 meets the 2x target); "
            "start-up s / dlq list s",
        ],
        figures,
    )


if __name__ == "__main__":
    main()
