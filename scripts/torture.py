#!/usr/bin/env python3
"""Random-kill torture: run -> SIGKILL at a random instant -> resume -> ... -> check.

    python scripts/torture.py [--jobs 40] [--kills 5] [--seed 1] [--items 60]

Each job mixes items that succeed, run slowly, always fail (-> DLQ), kill their
own worker on the first attempt (-> attributed, retried), and fail once then
succeed. Each *trial* starts `run` or `resume` in its own process group and,
at a random instant, SIGKILLs one of: the supervisor alone, one worker, or the
whole group. After the kills the job is finished without interference (and
items parked as crash-loop suspects are retried, since here they are innocent).

Checks, counted over all trials and printed at the end:
  lost        an item neither succeeded nor in the DLQ at the end
  duplicated  an id listed twice by `results`
  re-run      a success recorded before a kill whose map ran again after it
  leaks       lock/holder/temp files, /dev/shm segments, or processes alive
              2 s after a supervisor was SIGKILLed (workers, map commands)
Exit status 0 only if all four are zero.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent

MAPPER = """
import os, time

HERE = os.path.dirname(os.path.abspath(__file__))

def work(item):
    with open(os.path.join(HERE, "side.log"), "a") as log:
        log.write(f"{item['id']}\\n")
    kind = item["kind"]
    if kind == "slow":
        time.sleep(item["t"])
    elif kind == "fail":
        raise RuntimeError(f"item {item['id']} always fails")
    elif kind in ("crash", "flaky"):
        marker = os.path.join(HERE, f"once-{item['id']}")
        if not os.path.exists(marker):
            open(marker, "w").close()
            if kind == "crash":
                os.kill(os.getpid(), 9)
            raise RuntimeError("flaky: first attempt fails")
    else:
        time.sleep(0.002)
    return {"id": item["id"], "kind": kind}
"""


def make_items(rng: random.Random, n: int) -> list[dict]:
    kinds = ["ok"] * 8 + ["slow"] * 5 + ["fail", "crash", "flaky"]
    return [
        {"id": i, "kind": rng.choice(kinds), "t": round(rng.uniform(0.05, 0.3), 3)}
        for i in range(n)
    ]


class Torture:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.root = Path(tempfile.mkdtemp(prefix="mrpool-torture-"))
        self.tag = uuid.uuid4().hex
        self.env = dict(
            os.environ,
            MRPOOL_HOME=str(self.root / "state"),
            MRPOOL_TEST_TAG=self.tag,
            PYTHONPATH=str(REPO),
        )
        self.env.pop("MRPOOL_FAILPOINTS", None)
        self.kills: Counter[str] = Counter()
        self.lost = self.duplicated = self.rerun = self.leaks = self.trials = 0
        self.shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()

    # -- driving mrpool -----------------------------------------------------------
    def cli(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "mrpool", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def start(self, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "mrpool", *args],
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def results(self, job_id: str) -> list:
        r = self.cli("results", job_id)
        return (
            [json.loads(line)["id"] for line in r.stdout.splitlines()] if r.returncode == 0 else []
        )

    # -- one job --------------------------------------------------------------------
    def run_job(self, number: int) -> None:
        job_dir = self.root / f"job{number}"
        job_dir.mkdir()
        (job_dir / "mapper.py").write_text(MAPPER)
        items = make_items(self.rng, self.args.items)
        with open(job_dir / "items.jsonl", "w") as handle:
            handle.writelines(json.dumps(it) + "\n" for it in items)
        spec = {
            "input": "items.jsonl",
            "workers": 2,
            "map": {"callable": "mapper:work", "retries": 1},
        }
        (job_dir / "job.json").write_text(json.dumps(spec))
        job_id = f"t{number}"
        side = job_dir / "side.log"
        self.kills_in_job = 0
        attempts = 0
        while self.kills_in_job < self.args.kills and attempts < 3 * self.args.kills:
            attempts += 1
            recorded = set(self.results(job_id))
            ran_before = len(side.read_text().split()) if side.exists() else 0
            started = (
                self.root / "state" / "jobs" / job_id
            ).is_dir()  # a run killed early left nothing
            proc = (
                self.start("resume", job_id, "--wait", "10")
                if started
                else self.start("run", str(job_dir / "job.json"), "--job-id", job_id)
            )
            time.sleep(self.rng.uniform(0.05, 1.0))
            if self.kill(proc):
                self.trials += 1
                self.kills_in_job += 1
            ran_after = [int(x) for x in side.read_text().split()] if side.exists() else []
            self.rerun += len(set(ran_after[ran_before:]) & recorded)
        self.finish(job_id, items, side)

    def kill(self, proc: subprocess.Popen) -> bool:
        """SIGKILL a random part of the running command; False if it had already ended."""
        kind = self.rng.choice(["supervisor", "worker", "group"])
        if proc.poll() is not None:
            self.kills["none (it had finished)"] += 1
            return False
        try:
            children = psutil.Process(proc.pid).children()
        except psutil.Error:
            children = []
        if kind == "worker" and children:
            victim = self.rng.choice(children)
            try:
                victim.kill()
            except psutil.Error:
                pass
            time.sleep(self.rng.uniform(0.05, 0.5))  # the supervisor should carry on...
            os.killpg(proc.pid, signal.SIGKILL)  # ...then end this trial
        elif kind == "supervisor":
            proc.kill()
            proc.wait()
            self.check_orphans_end()
        else:
            kind = "group" if kind == "group" else "group (no worker yet)"
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.kills[kind] += 1
        return True

    def check_orphans_end(self) -> None:
        """Contract: if the supervisor is SIGKILLed, workers and map commands end within 2 s."""
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            if not self.tagged_processes():
                return
            time.sleep(0.05)
        alive = self.tagged_processes()
        if alive:
            self.leaks += 1
            print(
                f"LEAK: processes alive 2 s after the supervisor died: {[p.pid for p in alive]}",
                file=sys.stderr,
            )
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass

    def tagged_processes(self) -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            try:
                if (
                    p.environ().get("MRPOOL_TEST_TAG") == self.tag
                    and p.status() != psutil.STATUS_ZOMBIE
                ):
                    found.append(p)
            except (psutil.Error, OSError):
                pass
        return found

    def finish(self, job_id: str, items: list[dict], side: Path) -> None:
        if not (self.root / "state" / "jobs" / job_id).is_dir():
            self.cli("run", str(side.parent / "job.json"), "--job-id", job_id)
        for _ in range(5):
            recorded = set(self.results(job_id))
            ran_before = len(side.read_text().split()) if side.exists() else 0
            r = self.cli("resume", job_id, "--wait", "10")
            ran = [int(x) for x in side.read_text().split()] if side.exists() else []
            self.rerun += len(set(ran[ran_before:]) & recorded)
            if r.returncode not in (0, 1):
                print(f"resume {job_id} exited {r.returncode}: {r.stderr}", file=sys.stderr)
                continue
            dlq = json.loads(self.cli("dlq", "list", job_id, "--json").stdout)
            innocent = [str(e["id"]) for e in dlq if e["kind"] in ("crash_loop", "worker_died")]
            if innocent:  # parked because killed runs cut them short: retry them
                self.cli("dlq", "retry", job_id, *innocent)
                continue
            break
        status = json.loads(self.cli("status", job_id, "--json").stdout)
        ids = self.results(job_id)
        dlq_ids = {e["id"] for e in json.loads(self.cli("dlq", "list", job_id, "--json").stdout)}
        self.duplicated += len(ids) - len(set(ids))
        lost = [it["id"] for it in items if it["id"] not in set(ids) and it["id"] not in dlq_ids]
        wrongly_parked = [
            i for i in dlq_ids if next(it for it in items if it["id"] == i)["kind"] != "fail"
        ]
        self.lost += len(lost)
        if lost or wrongly_parked or status["pending"] or status["failed"]:
            print(
                f"{job_id}: lost={lost} parked-but-should-succeed={wrongly_parked} status={status}",
                file=sys.stderr,
            )
            self.lost += len(wrongly_parked)
        job_dir = self.root / "state" / "jobs" / job_id
        stray = [n for n in os.listdir(job_dir) if n in ("lock", "holder.json") or ".tmp-" in n]
        if stray:
            self.leaks += 1
            print(f"{job_id}: files left behind: {stray}", file=sys.stderr)

    def report(self) -> int:
        time.sleep(0.5)
        if self.tagged_processes():
            self.leaks += 1
        shm_after = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
        new_shm = {n for n in shm_after - self.shm_before if "mrpool" in n or n.startswith("psm_")}
        self.leaks += len(new_shm)
        kills = ", ".join(f"{k}={v}" for k, v in sorted(self.kills.items()))
        print(f"trials={self.trials} kills: {kills}")
        print(
            f"lost={self.lost} duplicated={self.duplicated} re-run={self.rerun} leaks={self.leaks}"
        )
        shutil.rmtree(self.root, ignore_errors=True)
        return 0 if not (self.lost or self.duplicated or self.rerun or self.leaks) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument(
        "--kills", type=int, default=5, help="kills per job (trials = jobs * kills)"
    )
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    torture = Torture(args)
    start = time.monotonic()
    for number in range(args.jobs):
        torture.run_job(number)
    code = torture.report()
    print(f"elapsed={time.monotonic() - start:.1f}s")
    return code


if __name__ == "__main__":
    sys.exit(main())
