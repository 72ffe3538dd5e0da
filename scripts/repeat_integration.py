#!/usr/bin/env python3
"""Run the resume/DLQ/lock integration suite N times in a row; print runs, failures, slowest.

    python scripts/repeat_integration.py            # 50 runs
    python scripts/repeat_integration.py --runs 5 --stop-on-failure

Each run is a fresh ``pytest`` subprocess over
``tests/test_resume_dlq_lock_integration.py``. A failing run's output tail is
printed (and the run is counted); the exit status is 1 if any run failed.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SUITE = "tests/test_resume_dlq_lock_integration.py"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="how many runs (default 50)")
    parser.add_argument(
        "--stop-on-failure", action="store_true", help="stop at the first failed run"
    )
    parser.add_argument("pytest_args", nargs="*", help="extra arguments for pytest (after --)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be >= 1")

    failures: list[int] = []
    durations: list[float] = []
    for run in range(1, args.runs + 1):
        started = time.monotonic()
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                SUITE,
                *args.pytest_args,
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        elapsed = time.monotonic() - started
        durations.append(elapsed)
        last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        print(f"run {run:3}/{args.runs}: {status:18} {elapsed:6.1f} s  {last}", flush=True)
        if proc.returncode != 0:
            failures.append(run)
            print("\n".join((proc.stdout + proc.stderr).splitlines()[-60:]), flush=True)
            if args.stop_on_failure:
                break

    slowest = max(range(len(durations)), key=durations.__getitem__)
    print()
    print(f"runs:     {len(durations)}")
    print(
        f"failures: {len(failures)}"
        + (f" (runs {', '.join(map(str, failures))})" if failures else "")
    )
    print(f"slowest:  run {slowest + 1}, {durations[slowest]:.1f} s")
    print(f"mean:     {sum(durations) / len(durations):.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
