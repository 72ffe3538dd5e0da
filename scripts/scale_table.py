#!/usr/bin/env python3
"""The same job at growing sizes: does every cost grow linearly or better?

    python scripts/scale_table.py [--sizes 10000,100000,1000000,10000000] [--workers 2]
                                  [--dir DIR] [--json FILE]

Each size: ``{"id": i, "v": "x"}`` items through ``builtins:len`` with ``mrpool run``,
then ``status --json`` and ``results > /dev/null``, each a whole process. Reported:
``run`` wall seconds, the supervisor's own peak RSS (``getrusage(RUSAGE_SELF)`` of
the ``run`` process at its exit: workers are not counted), state-dir bytes per
item (the job's directory after the run), ``status --json`` seconds and
``results > /dev/null`` seconds, and each per item relative to the smallest size
(1.0 = linear; below 1.0 = better). Needs about 100 bytes of disk an item (10M:
~1 GB; check ``df -h`` first). The 10M row takes minutes; it is a script, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from end_to_end import write_input  # noqa: E402  (the same job as benchmarks/end_to_end.py)

RUN = """
import resource, sys
from mrpool.cli import main
code = main(sys.argv[1:])
sys.stderr.write("peak_rss %d\\n" % (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024))
sys.exit(code)
"""


def timed(argv: list[str], env: dict, stdout=subprocess.DEVNULL) -> tuple[float, str]:
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=stdout, stderr=subprocess.PIPE, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv[:5])} exited {proc.returncode}: {proc.stderr}")
    return elapsed, proc.stderr


def measure(work: Path, n: int, workers: int, env: dict) -> dict:
    job = write_input(work / f"in{n}", n, workers)
    state = work / f"state{n}"
    py = sys.executable
    run_s, err = timed(
        [py, "-c", RUN, "run", str(job), "--state-dir", str(state), "--job-id", "scale"], env
    )
    peak = int(next(line for line in err.splitlines() if line.startswith("peak_rss")).split()[1])
    job_dir = state / "jobs" / "scale"
    size = sum(p.stat().st_size for p in job_dir.iterdir() if p.is_file())
    status_s, _ = timed(
        [py, "-m", "mrpool", "status", "scale", "--json", "--state-dir", str(state)], env
    )
    results_s, _ = timed([py, "-m", "mrpool", "results", "scale", "--state-dir", str(state)], env)
    shutil.rmtree(state)
    shutil.rmtree(job.parent)
    return {
        "items": n,
        "run s": run_s,
        "supervisor peak MB": peak / 1e6,
        "state bytes/item": size / n,
        "status --json s": status_s,
        "results > /dev/null s": results_s,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000,10000000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temp dir)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args()
    import compileall

    compileall.compile_dir(REPO / "mrpool", quiet=1)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    work = Path(tempfile.mkdtemp(prefix="mrpool-scale-", dir=args.dir))
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            rows.append(measure(work, n, args.workers, env))
            base = rows[0]
            row = rows[-1]
            row["run s/item vs first"] = (row["run s"] / n) / (base["run s"] / base["items"])
            row["results s/item vs first"] = (row["results > /dev/null s"] / n) / (
                base["results > /dev/null s"] / base["items"]
            )
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(_cell(row[k]) for k in keys) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


def _cell(value) -> str:
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.2f}" if value >= 1 else f"{value:.3f}"


if __name__ == "__main__":
    sys.exit(main())
