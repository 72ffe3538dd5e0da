"""End to end as a user times it: ``mrpool run`` + ``mrpool results > file`` against the
ten-line script they would write instead.

    python benchmarks/end_to_end.py [--sizes 200000,1000000] [--workers 2] [--repeats 5]

Both sides are whole processes (interpreter start-up, imports, reading the input,
writing the output), read the same JSONL file (``{"id": i, "v": "x"}`` per line),
run ``builtins:len`` on each item and write the same rows, ``{"id":..,"result":..}``
per line, in input order, to a file; the output files are compared byte for byte.

* mrpool: ``python -m mrpool run job.yaml`` (ingest, run, journal, fsyncs), then
  ``python -m mrpool results ID > out.jsonl``;
* the script: read the JSONL with orjson, ``Pool(workers).imap(len, items,
  chunksize=100)``, write each row with orjson.

Rounds are interleaved (one run of each per round); the ratio is script seconds /
mrpool seconds in the same round (higher is better for mrpool; 1.0 = as fast),
median with its range; "cpu s" is the user + system CPU of every process of each
side (workers included), and "cpu ratio" script CPU / mrpool CPU: on a shared machine
the figure a busy neighbour moves least. Also ``results`` alone against ``cat`` of a file of the
same size (the output file itself), to /dev/null.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
from pathlib import Path

from _common import (
    REPO,
    compile_bytecode,
    figure,
    report,
    scratch,
    timed_process,
    timed_process_cpu,
)

SCRIPT = """
import sys, orjson
from multiprocessing import Pool
with open(sys.argv[1], "rb") as handle:
    items = [orjson.loads(line) for line in handle]
with Pool(int(sys.argv[3])) as pool, open(sys.argv[2], "wb") as out:
    for item, result in zip(items, pool.imap(len, items, chunksize=100)):
        out.write(orjson.dumps({"id": item["id"], "result": result}) + b"\\n")
"""


def write_input(directory: Path, n: int, workers: int) -> Path:
    import orjson

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "items.jsonl", "wb") as handle:
        for start in range(0, n, 100_000):
            stop = min(n, start + 100_000)
            handle.write(
                b"".join(orjson.dumps({"id": i, "v": "x"}) + b"\n" for i in range(start, stop))
            )
    job = directory / "job.yaml"
    job.write_text(
        f"name: e2e\ninput: items.jsonl\nworkers: {workers}\nmap:\n  callable: builtins:len\n"
    )
    return job


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="200000,1000000")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    compile_bytecode()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rows, notes, figures = [], [], []
    for n in [int(s) for s in args.sizes.split(",")]:
        work = scratch()
        try:
            measured, headline = measure(work, n, args.workers, args.repeats, env)
            rows += measured
            figures.append(headline)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    notes.append(
        f"{args.repeats} interleaved rounds, {args.workers} workers; machine: "
        f"{os.cpu_count()} CPUs (shared unless stated)"
    )
    report("end_to_end", rows, notes, figures)


def measure(work: Path, n: int, workers: int, repeats: int, env: dict) -> tuple[list[dict], dict]:
    """The rows of one size, and its README figure (the whole-process ratio)."""
    job = write_input(work / "job", n, workers)
    script = work / "script.py"
    script.write_text(SCRIPT)
    py = sys.executable
    times: dict[str, list[float]] = {"mrpool": [], "script": [], "run": [], "results": []}
    alone: dict[str, list[float]] = {"results > /dev/null": [], "cat > /dev/null": []}
    peaks: dict[str, list[int]] = {"run": [], "results": [], "script": []}
    cpu: dict[str, list[float]] = {name: [] for name in times}  # all processes, user + sys
    for round_no in range(repeats):
        state = work / f"state{round_no}"
        mine_out, theirs_out = work / "mine.jsonl", work / "theirs.jsonl"
        run_s, run_rss, run_cpu = timed_process_cpu(
            [py, "-m", "mrpool", "run", str(job), "--state-dir", str(state), "--job-id", "e2e"],
            env=env,
        )
        with open(mine_out, "wb") as out:
            results_s, results_rss, results_cpu = timed_process_cpu(
                [py, "-m", "mrpool", "results", "e2e", "--state-dir", str(state)],
                env=env,
                stdout=out,
            )
        script_s, script_rss, script_cpu = timed_process_cpu(
            [py, str(script), str(job.parent / "items.jsonl"), str(theirs_out), str(workers)],
            env=env,
        )
        if mine_out.read_bytes() != theirs_out.read_bytes():
            raise SystemExit("mrpool's results and the script's output differ")
        times["run"].append(run_s)
        times["results"].append(results_s)
        times["mrpool"].append(run_s + results_s)
        times["script"].append(script_s)
        peaks["run"].append(run_rss)
        peaks["results"].append(results_rss)
        peaks["script"].append(script_rss)
        cpu["run"].append(run_cpu)
        cpu["results"].append(results_cpu)
        cpu["mrpool"].append(run_cpu + results_cpu)
        cpu["script"].append(script_cpu)
        with open("/dev/null", "wb") as null:
            alone["results > /dev/null"].append(
                timed_process(
                    [py, "-m", "mrpool", "results", "e2e", "--state-dir", str(state)],
                    env=env,
                    stdout=null,
                )[0]
            )
            alone["cat > /dev/null"].append(
                timed_process(["cat", str(mine_out)], env=env, stdout=null)[0]
            )
        shutil.rmtree(state)
    size = (work / "mine.jsonl").stat().st_size
    ratios = [s / m for s, m in zip(times["script"], times["mrpool"])]
    cpu_ratios = [s / m for s, m in zip(cpu["script"], cpu["mrpool"])]
    rows = []
    for name, values in times.items():
        rows.append(
            {
                "items": n,
                "measure": {"mrpool": "run + results > file", "script": "Pool script"}.get(
                    name, f"  {name}"
                ),
                "seconds": statistics.median(values),
                "range s": f"{min(values):.3f}-{max(values):.3f}",
                "peak MB": statistics.median(peaks[name]) / 1e6 if name in peaks else "",
                "cpu s": statistics.median(cpu[name]),
                "cpu ratio": statistics.median(cpu_ratios) if name == "mrpool" else "",
                "MB/s": "",
                "script s / mrpool s": statistics.median(ratios) if name == "mrpool" else "",
                "ratio range": f"{min(ratios):.2f}-{max(ratios):.2f}" if name == "mrpool" else "",
            }
        )
    for name, values in alone.items():
        rows.append(
            {
                "items": n,
                "measure": f"{name} ({size / 1e6:.0f} MB)",
                "seconds": statistics.median(values),
                "range s": f"{min(values):.3f}-{max(values):.3f}",
                "peak MB": "",
                "cpu s": "",
                "cpu ratio": "",
                "MB/s": size / statistics.median(values) / 1e6,
                "script s / mrpool s": "",
                "ratio range": "",
            }
        )
    headline = figure(
        f"{n:,} items, `run` + `results > file`, whole processes",
        f"{statistics.median(times['mrpool']):.2f} s, peak RSS "
        f"{max(peaks['run'] + peaks['results']) / 1e6:.0f} MB",
        f"read + `Pool({workers}).imap(len, chunksize=100)` + write script: "
        f"{statistics.median(times['script']):.2f} s, peak RSS {max(peaks['script']) / 1e6:.0f} MB",
        ratios,
    )
    return rows, headline


if __name__ == "__main__":
    main()
