"""Resume at scale: time from `resume` start to first dispatch, and supervisor peak RSS.

    python benchmarks/resume_scale.py [--sizes 10000,100000,1000000]

For each size a job is built with mrpool's own store and journal code in the
state a crash leaves it in: half the items succeeded, 10% parked in the DLQ
(with a failure record each), an attempt open (in flight) on a few, the rest
pending. Then `python -m mrpool resume` starts in a subprocess; we record the
time until the journal holds its first `s` (attempts started) record and the
supervisor's peak RSS (VmHWM) until one second after that, then SIGKILL it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from _common import REPO, report, scratch

from mrpool.items import ingest
from mrpool.journal import JournalWriter, read_records
from mrpool.spec import spec_from_dict
from mrpool.store import create_job_dir, write_job_file


def build_crashed_job(work: Path, n: int) -> Path:
    src = work / f"src-{n}"
    src.mkdir()
    with open(src / "items.jsonl", "w") as handle:
        for i in range(n):
            handle.write(json.dumps({"id": i, "payload": f"item-{i}"}) + "\n")
    (src / "noop_map.py").write_text("def noop(item):\n    return None\n")
    spec = spec_from_dict(
        {"input": "items.jsonl", "workers": 2, "map": {"callable": "noop_map:noop"}}, base_dir=src
    )
    state = work / f"state-{n}"

    def build(tmp: Path) -> None:
        rep = ingest(spec, tmp)
        write_job_file(tmp, "scale", spec, rep.total, rep.duplicates, rep.id_mode)
        journal = JournalWriter(tmp / "journal.log", 0)
        journal.append(
            {"k": "job", "v": 1, "t": time.time(), "job_id": "scale", "total": rep.total}
        )
        journal.append({"k": "open", "t": time.time(), "cmd": "run", "pid": 1})
        half, tenth = n // 2, n // 10
        for lo in range(0, half, 500):  # the succeeded half, in dispatch-sized batches
            batch = range(lo, min(lo + 500, half))
            journal.append({"k": "s", "t": time.time(), "b": [[i, 1] for i in batch]})
            journal.append({"k": "ok", "t": time.time(), "b": [[i, 1, 0.001, None] for i in batch]})
        for i in range(half, half + tenth):  # 10% in the DLQ
            journal.append({"k": "s", "t": time.time(), "b": [[i, 1]]})
            journal.append(
                {
                    "k": "f",
                    "t": time.time(),
                    "i": i,
                    "a": 1,
                    "kind": "exit",
                    "msg": f"exit status 1: bad input {i}",
                    "tail": "Traceback...\nValueError: bad input\n",
                    "dur": 0.01,
                    "pid": 4242,
                    "code": 1,
                    "next": "dlq",
                }
            )
        journal.append(
            {
                "k": "s",
                "t": time.time(),
                "b": [[i, 1] for i in range(half + tenth, half + tenth + 4)],
            }
        )
        journal.close()

    create_job_dir(state, "scale", build)
    return state


def measure_resume(state: Path) -> tuple[float, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    journal = state / "jobs" / "scale" / "journal.log"
    before = journal.stat().st_size
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mrpool", "resume", "scale", "--state-dir", str(state)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    peak = 0
    first_dispatch = None
    try:
        while first_dispatch is None and proc.poll() is None:
            peak = max(peak, _hwm(proc.pid))
            for _, _, record in read_records(journal, before):
                if record["k"] == "s":
                    first_dispatch = time.perf_counter() - start
                    break
            time.sleep(0.005)
        settle = time.perf_counter() + 1.0  # keep watching RSS while it runs for a second
        while time.perf_counter() < settle and proc.poll() is None:
            peak = max(peak, _hwm(proc.pid))
            time.sleep(0.02)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass  # a small job can finish first
        proc.wait()
    if first_dispatch is None and any(r["k"] == "s" for _, _, r in read_records(journal, before)):
        first_dispatch = time.perf_counter() - start  # finished between two polls: an upper bound
    if first_dispatch is None:
        raise SystemExit("resume ended before dispatching anything")
    return first_dispatch, peak


def _hwm(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000")
    args = parser.parse_args()
    work = scratch()
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        build_start = time.perf_counter()
        state = build_crashed_job(work, n)
        built = time.perf_counter() - build_start
        seconds, peak = measure_resume(state)
        rows.append(
            {
                "items": n,
                "to first dispatch s": seconds,
                "peak RSS MB": peak / 2**20,
                "build s": built,
            }
        )
        shutil.rmtree(state, ignore_errors=True)
        print(rows[-1], flush=True)
    notes = [
        "job killed at 50% done, 10% in the DLQ; resume = `python -m mrpool resume` (interpreter start-up included)",
        "targets (issue 7): <= 2 s to first dispatch and <= 250 MB peak RSS at 1M items, linear growth or better",
    ]
    report("resume_scale", rows, notes)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
