"""Scheduling efficiency with 1 ms items: achieved throughput vs the ideal (workers / duration).

    python benchmarks/efficiency.py [--items 4000] [--workers 2] [--repeats 3]

The nominal ideal is `items * 1 ms / workers`; but `time.sleep(0.001)` itself
takes longer than 1 ms (timer slack, wake-up), so a second ideal uses the item
durations the workers measured (sum / workers): the share of the session the
workers spent inside the map. Efficiency is ideal time / mrpool's time, measured in-process from dispatch of the first item
(the time from the session's `open` record to its `close` record, so start-up
and input validation are excluded -- they are in throughput.py).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time

from _common import make_job, report, scratch

from mrpool import api
from mrpool.journal import read_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n, w = args.items, args.workers
    work = scratch()
    job = make_job(work / "job", n, {"callable": "noop_map:sleep_1ms"}, workers=w)
    shutil.copy(__file__.replace("efficiency.py", "noop_map.py"), work / "job" / "noop_map.py")
    ideal = n * 0.001 / w
    spans, walls, busy = [], [], []
    for r in range(args.repeats):
        state = work / f"state-{r}"
        start = time.perf_counter()
        report_ = api.run_job(job, state_dir=state, job_id="eff")
        walls.append(time.perf_counter() - start)
        assert report_.state == "completed", report_
        records = [rec for _, _, rec in read_records(state / "jobs" / "eff" / "journal.log")]
        opened = next(rec["t"] for rec in records if rec["k"] == "open")
        closed = next(rec["t"] for rec in records if rec["k"] == "close")
        spans.append(closed - opened)
        busy.append(sum(entry[2] for rec in records if rec["k"] == "ok" for entry in rec["b"]) / w)
        shutil.rmtree(state, ignore_errors=True)
    span, wall, real = statistics.median(spans), statistics.median(walls), statistics.median(busy)
    rows = [
        {
            "measure": "session vs nominal 1 ms items",
            "seconds": span,
            "ideal seconds": ideal,
            "efficiency": ideal / span,
        },
        {
            "measure": "session vs measured item time",
            "seconds": span,
            "ideal seconds": real,
            "efficiency": real / span,
        },
        {
            "measure": "run_job end to end vs nominal",
            "seconds": wall,
            "ideal seconds": ideal,
            "efficiency": ideal / wall,
        },
    ]
    report(
        "efficiency",
        rows,
        [
            f"{n} items sleeping 1 ms, {w} workers, median of {args.repeats}",
            "target (issue 7): >= 0.95 of ideal",
        ],
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
