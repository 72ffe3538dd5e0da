#!/usr/bin/env python3
"""Power-cut crash states at length: many sampled states of every workload.

    python scripts/power_loss.py [--items 20] [--samples 10] [--seeds 3] [--workloads run,...]

For each workload and seed, the workload is recorded once under strace and every
cut point where something became durable is checked with none, all, and
``--samples`` random prefixes and tears of the un-fsynced changes (the model and
the checks are in tests/powercut.py). Prints the counts per workload and every
problem with its cut; exits 1 if there is any. Needs strace.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import powercut  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=20)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workloads", default=",".join(powercut.WORKLOADS))
    args = parser.parse_args()
    if not powercut.strace_available():
        print("power_loss: strace is not installed (apt-get install strace)", file=sys.stderr)
        return 2
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("MRPOOL_FAILPOINTS", None)
    traces = states = 0
    problems: list[str] = []
    for workload in args.workloads.split(","):
        for seed in range(args.seeds):
            work = Path(tempfile.mkdtemp(prefix="mrpool-powercut-"))
            try:
                started = time.monotonic()
                trace = powercut.record_workload(workload, work / "w", items=args.items, env=env)
                os.environ["POWERCUT_SIDE_LOG"] = str(work / "side.log")
                checked, found = powercut.explore(
                    trace, work / "states", work / "side.log", samples=args.samples, seed=seed
                )
            finally:
                shutil.rmtree(work, ignore_errors=True)
            traces += 1
            states += checked
            problems += [f"{workload} (seed {seed}): {p}" for p in found]
            print(
                f"{workload:24} seed {seed}: {checked:5} crash states, {len(found)} problems "
                f"({time.monotonic() - started:.1f} s)",
                flush=True,
            )
    print(f"\n{traces} traces, {states} crash states checked, {len(problems)} problems")
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
