"""Lock contention: how long a blocked `resume` takes to exit 3, and takeover after SIGKILL.

python benchmarks/lock_contention.py [--rounds 10]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time

from _common import REPO, make_job, report, scratch

from mrpool.journal import read_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    work = scratch()
    job = make_job(work / "job", 50, {"command": ["sleep", "30"]}, workers=1)
    state = work / "state"
    env = dict(os.environ, PYTHONPATH=str(REPO), MRPOOL_HOME=str(state))
    mrpool = [sys.executable, "-m", "mrpool"]
    holder = subprocess.Popen(
        [*mrpool, "run", str(job), "--job-id", "lk"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    holder.stdout.readline()  # the job exists and is locked
    journal = state / "jobs" / "lk" / "journal.log"
    blocked = []
    for _ in range(args.rounds):
        start = time.perf_counter()
        r = subprocess.run([*mrpool, "resume", "lk"], env=env, capture_output=True)
        blocked.append(time.perf_counter() - start)
        assert r.returncode == 3, r
    takeovers = []
    for _ in range(args.rounds):
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
        size = journal.stat().st_size
        start = time.perf_counter()
        holder = subprocess.Popen(
            [*mrpool, "resume", "lk"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        while not any(rec["k"] == "s" for _, _, rec in read_records(journal, size)):
            time.sleep(0.002)
        takeovers.append(time.perf_counter() - start)
    os.killpg(holder.pid, signal.SIGKILL)
    holder.wait()
    rows = [
        {
            "measure": "blocked resume -> exit 3",
            "median s": statistics.median(blocked),
            "max s": max(blocked),
        },
        {
            "measure": "SIGKILLed holder -> new resume dispatching",
            "median s": statistics.median(takeovers),
            "max s": max(takeovers),
        },
    ]
    report(
        "lock_contention",
        rows,
        [
            f"{args.rounds} rounds each; includes interpreter start-up",
            "contract: a blocked resume exits 3 within 1 s",
        ],
    )
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
