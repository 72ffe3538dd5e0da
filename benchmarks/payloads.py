"""Large payloads: items of 100 KB and 5 MB through a callable that returns the item.

    python benchmarks/payloads.py [--cases 2000x100000,200x5000000] [--workers 2] [--repeats 3]

Whole processes on both sides, from the same JSONL file, each timed with its
peak RSS (the largest of the process and its children, from ``wait4``):

* mrpool: ``python -m mrpool run`` (ingest, run, every result journaled), then
  ``python -m mrpool results > /dev/null`` timed on its own (MB/s of results);
* the script a user would write instead: read the JSONL with orjson,
  ``Pool(workers).imap(identity, items)`` (default chunksize), drop the results.

Throughput is input MB per second; ratios are peer seconds / mrpool seconds
in the same round, median and range over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

from _common import REPO, compile_bytecode, figure, report, scratch, timed_process

POOL_SCRIPT = """
import multiprocessing, sys, orjson
sys.path.insert(0, sys.argv[3])
from noop_map import identity
def items():
    with open(sys.argv[1], "rb") as handle:
        for line in handle:
            yield orjson.loads(line)
with multiprocessing.get_context("fork").Pool(int(sys.argv[2])) as pool:
    for _ in pool.imap(identity, items()):
        pass
"""


def _make_items(path: Path, count: int, size: int) -> int:
    pad = "x" * max(0, size - 30)
    with open(path, "w") as handle:
        for i in range(count):
            handle.write(f'{{"id": {i}, "data": "{pad}"}}\n')
    return path.stat().st_size


def _case(work: Path, count: int, size: int, workers: int, repeats: int) -> list[dict]:
    case = work / f"case-{count}x{size}"
    case.mkdir()
    total = _make_items(case / "items.jsonl", count, size)
    shutil.copy(Path(__file__).with_name("noop_map.py"), case / "noop_map.py")
    job = {"input": "items.jsonl", "workers": workers, "map": {"callable": "noop_map:identity"}}
    (case / "job.json").write_text(json.dumps(job))
    env = dict(os.environ, PYTHONPATH=str(REPO))
    times: dict[str, list[float]] = {"mrpool run": [], "Pool.imap script": [], "mrpool results": []}
    rss: dict[str, list[int]] = {name: [] for name in times}
    for r in range(repeats):
        state = case / f"state-{r}"
        mrpool = [sys.executable, "-m", "mrpool"]
        t, m = timed_process([*mrpool, "run", str(case / "job.json"), "--state-dir", str(state),
                       "--job-id", "p"], env=env)  # fmt: skip
        times["mrpool run"].append(t)
        rss["mrpool run"].append(m)
        t, m = timed_process([*mrpool, "results", "p", "--state-dir", str(state)], env=env)
        times["mrpool results"].append(t)
        rss["mrpool results"].append(m)
        t, m = timed_process([sys.executable, "-c", POOL_SCRIPT, str(case / "items.jsonl"),
                       str(workers), str(case)])  # fmt: skip
        times["Pool.imap script"].append(t)
        rss["Pool.imap script"].append(m)
        shutil.rmtree(state, ignore_errors=True)
    ratios = [p / mine for p, mine in zip(times["Pool.imap script"], times["mrpool run"])]

    def measured(name: str) -> str:
        seconds = statistics.median(times[name])
        return f"{seconds:.2f} s, {total / 1e6 / seconds:.0f} MB/s, peak RSS {max(rss[name]) / 1e6:.0f} MB"

    figures = [
        figure(
            f"{count} x {size // 1000} KB items, a callable returning the item, {workers} workers",
            f"run: {measured('mrpool run')}",
            f"`Pool.imap` script: {measured('Pool.imap script')}",
            ratios,
        )
    ]
    rows = []
    for name, values in times.items():
        peer = times["Pool.imap script"] if name == "mrpool run" else None
        ratios = [p / mine for p, mine in zip(peer, values)] if peer else None
        rows.append(
            {
                "case": f"{count} x {size // 1000} KB",
                "runner": name,
                "seconds": statistics.median(values),
                "range s": f"{min(values):.3f}-{max(values):.3f}",
                "MB/s": total / 1e6 / statistics.median(values),
                "peak RSS MB": max(rss[name]) / 1e6,
                "Pool s / mrpool s": statistics.median(ratios) if ratios else "",
                "ratio range": f"{min(ratios):.2f}-{max(ratios):.2f}" if ratios else "",
            }
        )
    return rows, figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="2000x100000,200x5000000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    compile_bytecode()
    work = scratch()
    rows: list[dict] = []
    figures: list[dict] = []
    try:
        for case in args.cases.split(","):
            count, size = (int(part) for part in case.split("x"))
            case_rows, case_figures = _case(work, count, size, args.workers, args.repeats)
            rows += case_rows
            figures += case_figures
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(
        "payloads",
        rows,
        [
            f"{args.workers} workers, {args.repeats} interleaved rounds; whole processes from "
            "the same JSONL; peak RSS = largest process of the tree (wait4)",
            "targets (issue 26): mrpool run >= 1.0x the Pool.imap script, peak RSS <= 150 MB, "
            "results >= 500 MB/s",
        ],
        figures,
    )


if __name__ == "__main__":
    main()
