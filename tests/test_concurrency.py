"""Many attempts in flight per worker (``map.concurrency``) and the job-wide ``rate``.

Every claim is observed, not inferred: each attempt appends ``S id t`` when it
starts and ``E id t`` when it ends to a side file (one O_APPEND write each,
``time.time()``, one clock for every process), and the tests count what the
stamps show -- how many were in flight at once, which attempt a timeout ended,
how fast attempts started.

Scenarios: async tasks and threads hold 2 x 32 attempts at once, commands 2 x 8;
one attempt past its timeout fails alone among 31 neighbours (each kind: a task
cancelled, a thread abandoned and its worker replaced, a command's tree killed);
a worker SIGKILLed holding 32 items charges exactly those 32; ``rate: 50/s``
holds within 5 %, retries included (a 2 s run here, 10 s as a stress run); and a
few crash-stress trials run with ``concurrency: 8``.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import time
from pathlib import Path

import psutil
import pytest
from conftest import journal_records, wait_for, write_job
from test_resume import load_crash_stress

from mrpool.errors import JobSpecError
from mrpool.rate import parse_rate, rate_text
from mrpool.spec import spec_from_dict

MAP = """
import asyncio, os, time

SIDE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "side.log")


def stamp(kind, item):
    fd = os.open(SIDE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, f"{kind} {item['id']} {time.time():.6f} {os.getpid()}\\n".encode())
    finally:
        os.close(fd)


def gate(item):
    # hold until the test says go (a file), at most 30 s
    go = os.path.join(os.path.dirname(SIDE), "go")
    deadline = time.time() + 30
    while item.get("gate") and not os.path.exists(go) and time.time() < deadline:
        time.sleep(0.02)


async def aio(item):
    stamp("S", item)
    if item.get("fail"):  # the first attempt fails (a marker file says it was made)
        marker = f"{SIDE}.failed-{item['id']}"
        if not os.path.exists(marker):
            open(marker, "w").close()
            raise RuntimeError("first attempt fails")
    await asyncio.sleep(item.get("sleep", 0))
    while item.get("gate") and not os.path.exists(os.path.join(os.path.dirname(SIDE), "go")):
        await asyncio.sleep(0.02)
    stamp("E", item)
    return item["id"]


def sync(item):
    stamp("S", item)
    time.sleep(item.get("sleep", 0))
    gate(item)
    stamp("E", item)
    return item["id"]
"""

STAMPED_SLEEP = (
    'echo "S $MRPOOL_ITEM_ID $(date +%s.%N) $$" >> side.log; sleep "$1"; '
    'echo "E $MRPOOL_ITEM_ID $(date +%s.%N) $$" >> side.log'
)


def stamps(directory: Path) -> list[tuple[str, int, float]]:
    lines = (directory / "side.log").read_text().splitlines()
    return [(kind, int(i), float(t)) for kind, i, t, _ in (line.split() for line in lines)]


def most_at_once(marks: list[tuple[str, int, float]]) -> int:
    """The largest number of attempts between their S and E stamps at one instant."""
    events = sorted((t, 1 if kind == "S" else -1) for kind, _, t in marks)
    now = peak = 0
    for _, step in events:
        now += step
        peak = max(peak, now)
    return peak


def job(tmp_path: Path, items, map_step, workers=2, **extra) -> Path:
    return write_job(tmp_path, items, map_step, workers=workers, extra=extra, files={"m.py": MAP})


def command_step(seconds_key: str = "sleep") -> list[str]:
    return ["sh", "-c", STAMPED_SLEEP, "sh", f"{{item.{seconds_key}}}"]


# -- how many at once ---------------------------------------------------------------
@pytest.mark.parametrize("kind", ["async", "thread"])
def test_callables_hold_two_workers_times_32_attempts_at_once(mrpool, tmp_path, kind):
    items = [{"id": i, "sleep": 0.5} for i in range(128)]
    step = {"callable": "m:aio" if kind == "async" else "m:sync", "concurrency": 32}
    r = mrpool.run("run", str(job(tmp_path, items, step)))
    assert r.returncode == 0, r.stderr
    marks = stamps(tmp_path)
    assert most_at_once(marks) == 64  # 2 workers x 32 lanes, never more
    assert sorted(i for mark, i, _ in marks if mark == "E") == list(range(128))
    pids = {line.split()[3] for line in (tmp_path / "side.log").read_text().splitlines()}
    assert len(pids) == 2, "two worker processes ran them all"


def test_a_command_map_holds_8_children_per_worker(mrpool, tmp_path):
    items = [{"id": i, "sleep": 0.5} for i in range(32)]
    step = {"command": command_step(), "concurrency": 8}
    r = mrpool.run("run", str(job(tmp_path, items, step)))
    assert r.returncode == 0, r.stderr
    assert most_at_once(stamps(tmp_path)) == 16  # 2 workers x 8 child processes


def test_idle_lanes_of_every_worker_fill_before_any_queue(mrpool, tmp_path):
    # 4 slow items, 2 workers x 2 lanes: all 4 at once, not 2 run by the first worker
    # with the other 2 queued behind them while the second worker idles
    items = [{"id": i, "sleep": 0.3} for i in range(4)]
    r = mrpool.run("run", str(job(tmp_path, items, {"callable": "m:aio", "concurrency": 2})))
    assert r.returncode == 0, r.stderr
    assert most_at_once(stamps(tmp_path)) == 4
    pids = [line.split()[3] for line in (tmp_path / "side.log").read_text().splitlines()]
    assert sorted(map(pids.count, set(pids))) == [4, 4]  # 2 items (S and E stamps) each


def test_concurrency_1_runs_one_after_another_as_before(mrpool, tmp_path):
    items = [{"id": i, "sleep": 0.05} for i in range(10)]
    r = mrpool.run("run", str(job(tmp_path, items, {"callable": "m:aio"}, workers=1)))
    assert r.returncode == 0, r.stderr
    marks = stamps(tmp_path)
    assert most_at_once(marks) == 1
    assert [i for kind, i, _ in marks if kind == "S"] == list(range(10))  # input order


# -- timeouts end only their own attempt ---------------------------------------------
@pytest.mark.parametrize("kind", ["async", "thread", "command"])
def test_one_attempt_past_its_timeout_fails_alone_among_31_neighbours(mrpool, tmp_path, kind):
    """One worker, 32 lanes. Item 0 never ends; 1..31 end at ~0.8 s and 32..62 take their
    lanes until ~2.4 s, so 31 neighbours are mid-attempt when item 0 times out at 2 s
    (0.4 s of slack each side, for a loaded machine)."""
    items = [{"id": i, "sleep": 30 if i == 0 else 0.8 if i < 32 else 1.6} for i in range(63)]
    if kind == "command":
        step = {"command": command_step()}
    else:
        step = {"callable": "m:aio" if kind == "async" else "m:sync"}
    step.update(concurrency=32, timeout=2.0)
    r = mrpool.run("run", str(job(tmp_path, items, step, workers=1)), timeout=90)
    assert r.returncode == 1, r.stderr  # one item in the DLQ
    job_id = r.stdout.split()[0]
    assert "62 succeeded, 1 in the DLQ" in r.stderr, r.stderr

    marks = stamps(tmp_path)
    ended = {i for mark, i, _ in marks if mark == "E"}
    assert ended == set(range(1, 63))  # every neighbour ran to its end; item 0 never did
    records = journal_records(mrpool.job_dir(job_id))
    (failure,) = [rec for rec in records if rec.get("k") == "f"]
    assert (failure["kind"], failure["i"]) == ("timeout", 0)
    assert 2.0 <= failure["dur"] < 4.0, failure
    started_0 = min(t for mark, i, t in marks if i == 0)
    killed_at = started_0 + failure["dur"]
    spans = {}
    for mark, i, t in marks:
        spans.setdefault(i, {})[mark] = t
    across = [i for i, span in spans.items() if i and span["S"] < killed_at < span["E"]]
    assert len(across) == 31, f"{len(across)} neighbours in flight when item 0 timed out"
    died = [rec for rec in records if rec.get("k") == "worker" and rec.get("ev") == "died"]
    if kind == "thread":  # its thread ran on: the worker was replaced once it was empty
        assert [rec["reason"] for rec in died] == ["retired"]
    else:  # the task was cancelled / the command's tree killed: the worker lived on
        assert died == []


# -- a worker killed with K items charges exactly those K --------------------------------
def test_a_worker_killed_holding_32_items_charges_exactly_those_32(mrpool, tmp_path):
    items = [{"id": i, "gate": True} for i in range(64)]
    step = {"callable": "m:aio", "concurrency": 32, "retries": 1}
    proc = mrpool.start("run", str(job(tmp_path, items, step, workers=1)))
    try:
        job_id = proc.stdout.readline().decode().strip()
        side = tmp_path / "side.log"
        # Phase 1: 32 attempts start and hold (the other 32 wait in the worker's queue).
        wait_for(lambda: side.exists() and len(stamps(tmp_path)) >= 32, what="32 starts")
        time.sleep(0.3)  # nothing more starts: every lane is held
        marks = stamps(tmp_path)
        assert len(marks) == 32 and all(mark == "S" for mark, _, _ in marks)
        held = {i for _, i, _ in marks}
        worker_pid = int(side.read_text().split()[3])
        assert worker_pid in {p.pid for p in psutil.Process(proc.pid).children()}

        # Phase 2: SIGKILL it; once its death is journaled, let everything through.
        os.kill(worker_pid, signal.SIGKILL)
        wait_for(
            lambda: any(
                rec.get("k") == "worker" and rec.get("ev") == "died"
                for rec in journal_records(mrpool.job_dir(job_id))
            ),
            what="the worker's death in the journal",
        )
        (tmp_path / "go").write_text("")
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err

    # Phase 3: exactly the 32 it held failed (worker_died) and ran again; the rest ran once.
    records = journal_records(mrpool.job_dir(job_id))
    failures = [rec for rec in records if rec.get("k") == "f"]
    assert sorted(rec["i"] for rec in failures) == sorted(held)
    assert {(rec["kind"], rec["a"]) for rec in failures} == {("worker_died", 1)}
    rows = [json.loads(line) for line in mrpool.run("joblog", job_id).stdout.splitlines()]
    tries: dict[int, list[int]] = {}
    for row in rows:
        tries.setdefault(int(row["id"]), []).append(row["attempt"])
    assert all(sorted(tries[i]) == [1, 2] for i in held)
    assert all(tries[i] == [1] for i in set(range(64)) - held)  # none charged as started
    assert mrpool.status(job_id)["succeeded"] == 64


# -- the job-wide rate ----------------------------------------------------------------
def _check_rate(mrpool, tmp_path: Path, seconds: float) -> None:
    count = int(50 * seconds) + 1  # the first start is free (the bucket's one token)
    failing = set(range(0, count, 4))  # a quarter fail once: their retries count too
    first = count - len(failing)
    items = [{"id": i, "fail": i in failing} for i in range(first)]
    step = {"callable": "m:aio", "concurrency": 16, "retries": 1}
    path = job(tmp_path, items, step, workers=2, rate="50/s")
    r = mrpool.run("run", str(path), timeout=seconds * 4 + 60)
    assert r.returncode == 0, r.stderr
    starts = sorted(t for kind, _, t in stamps(tmp_path) if kind == "S")
    assert len(starts) == first + len([i for i in failing if i < first])
    # The rate over the run once the workers are up (the first 0.25 s are left out:
    # attempts sent to a worker still starting up begin together when it is; rate.py).
    steady = [t for t in starts if t >= starts[0] + 0.25]
    observed = (len(steady) - 1) / (steady[-1] - steady[0])
    assert 47.5 <= observed <= 52.5, f"{observed:.2f} starts/s for rate 50/s"
    # No one-second window holds more than a second's worth (and the bucket's 1 token).
    busiest = max(sum(1 for u in steady[k:] if u < t + 1.0) for k, t in enumerate(steady))
    assert busiest <= 51 + 1, f"{busiest} starts in one second at rate 50/s"


def test_rate_50_per_second_holds_within_5_percent_retries_included(mrpool, tmp_path):
    _check_rate(mrpool, tmp_path, seconds=2.0)


@pytest.mark.stress
def test_rate_50_per_second_over_10_seconds(mrpool, tmp_path):
    _check_rate(mrpool, tmp_path, seconds=10.0)


def test_rate_and_concurrency_options_override_and_bad_ones_are_refused(mrpool, tmp_path):
    for data, field in (
        ({"map": {"callable": "m:f", "concurrency": 0}}, "map.concurrency"),
        ({"map": {"callable": "m:f", "concurrency": True}}, "map.concurrency"),
        ({"map": {"callable": "m:f"}, "rate": "20 per second"}, "rate"),
        ({"map": {"callable": "m:f"}, "rate": "0/s"}, "rate"),
        ({"map": {"callable": "m:f"}, "rate": 20}, "rate"),
    ):
        with pytest.raises(JobSpecError, match=rf"job\.yaml: {re.escape(field)}"):
            spec_from_dict({"input": "x.jsonl", **data}, tmp_path, source="job.yaml")
    spec = spec_from_dict({"input": "x.jsonl", "map": {"callable": "m:f"}, "rate": "90/min"}, ".")
    assert (spec.rate, spec.map.concurrency) == (1.5, 1)
    assert (parse_rate("0.5/s"), parse_rate("7200/h"), rate_text(1.5)) == (0.5, 2.0, "1.5/s")

    items = [{"id": i, "sleep": 0.3} for i in range(8)]
    path = job(tmp_path, items, {"callable": "m:aio"}, workers=1)
    r = mrpool.run("run", str(path), "--rate", "fast")
    assert r.returncode == 2 and "--rate" in r.stderr, r.stderr
    assert not (mrpool.state_dir / "jobs").exists() or not any(
        (mrpool.state_dir / "jobs").iterdir()
    )
    r = mrpool.run("run", str(path), "--concurrency", "8", "--rate", "6000/min")
    assert r.returncode == 0, r.stderr
    assert most_at_once(stamps(tmp_path)) == 8
    # resume --set changes them for good, through the job's spec (and keeps the rate)
    job_id = r.stdout.split()[0]
    r = mrpool.run("resume", job_id, "--set", "map.concurrency=4", "--set", "rate=20/s")
    assert r.returncode == 0, r.stderr


# -- crash stress with lanes ------------------------------------------------------------
@pytest.mark.parametrize("kind", ["group", "worker"])
def test_crash_trials_pass_with_concurrency_8(mrpool, tmp_path, kind):
    crash_stress = load_crash_stress()
    rng = random.Random(18)
    results = [
        crash_stress.run_trial(tmp_path / f"t{n}", f"t{n}", mrpool.env(), rng, kind, concurrency=8)
        for n in range(1)
    ]
    summary = crash_stress.summarise(results)
    failed = [r for r in results if not r.ok]
    assert not failed, f"{summary}; failed trials: {failed}"
    assert (summary["lost"], summary["duplicated"], summary["re_run"]) == (0, 0, 0)
