"""`events --follow`: prints the log live and ends when the job has no live holder; every
attempt's end event says how long it ran, and for command maps how it exited."""

import json
import select
import subprocess

import orjson
import pytest
from conftest import wait_for, write_job

from mrpool import api

pytestmark = pytest.mark.timeout(120)

GATED = """
import os, time
HERE = os.path.dirname(os.path.abspath(__file__))

def work(item):
    while not os.path.exists(os.path.join(HERE, "go")):
        time.sleep(0.01)
    return item["id"]
"""


def test_follow_streams_until_the_holder_ends(mrpool, tmp_path):
    """Phases: a gated run holds the job -> follow prints the start -> open the gate -> follow ends."""
    job = write_job(
        tmp_path / "job",
        [{"id": i} for i in range(3)],
        {"callable": "gate:work"},
        files={"gate.py": GATED},
    )
    run = mrpool.start("run", str(job), "--job-id", "ev")
    # -- phase 1: the job exists and is held by the run
    assert run.stdout.readline().strip() == b"ev"
    # (PYTHONUNBUFFERED off: follow must print live into a pipe on its own)
    quiet_env = {k: v for k, v in mrpool.env().items() if k != "PYTHONUNBUFFERED"}
    follow = mrpool.start("events", "ev", "--follow", env=quiet_env)
    # -- phase 2: while the run is gated, follow keeps running and has printed the job's start
    wait_for(lambda: mrpool.status("ev")["in_flight"] > 0, what="attempts in flight")
    assert follow.poll() is None
    ready, _, _ = select.select([follow.stdout], [], [], 10)
    assert ready, "follow printed nothing while the job ran"
    first = follow.stdout.readline()
    assert json.loads(first)["event"] == "job_created"
    # -- phase 3: open the gate: the run ends, and so does follow, with the whole log
    (tmp_path / "job" / "go").touch()
    assert run.wait(timeout=60) == 0
    out = follow.stdout.read()  # (not communicate(): readline may have buffered more lines)
    assert follow.wait(timeout=30) == 0
    events = [json.loads(line)["event"] for line in (first + out).decode().splitlines()]
    assert events[0] == "job_created" and events[-1] == "session_finished"
    assert events.count("item_succeeded") == 3
    # the same log, read afterwards, is identical
    again = subprocess.run(
        follow.args[:-1], env=mrpool.env(), capture_output=True, text=True
    ).stdout
    assert [json.loads(line)["event"] for line in again.splitlines()] == events


FLAKY = """
def work(item):
    if item["id"] == "bad":
        raise ValueError("always")
    return item["id"]
"""


def test_attempt_end_events_carry_duration_and_for_commands_exit_code_and_signal(mrpool, tmp_path):
    """A callable map: duration on every end event, no exit fields. A command map:
    exit_code (0 for a success) and signal, null when not applicable."""
    job = write_job(
        tmp_path / "py",
        [{"id": "ok"}, {"id": "bad"}],
        {"callable": "flaky:work", "retries": 1},
        files={"flaky.py": FLAKY},
    )
    assert mrpool.run("run", str(job), "--job-id", "py").returncode == 1
    ends = [
        e
        for e in events(mrpool, "py")
        if e["event"].startswith("item_") and "started" not in e["event"]
    ]
    assert [(e["id"], e["event"]) for e in ends if e["id"] == "bad"] == [
        ("bad", "item_retrying"),
        ("bad", "item_parked"),
    ]
    assert all(isinstance(e["duration"], float) and e["duration"] >= 0 for e in ends)
    assert not any("exit_code" in e or "signal" in e for e in ends)
    job = write_job(
        tmp_path / "sh",
        [
            {"id": "ok", "sh": "true"},
            {"id": "seven", "sh": "exit 7"},
            {"id": "term", "sh": "kill $$"},
        ],
        {"command": ["sh", "-c", "{item.sh}"]},
    )
    assert mrpool.run("run", str(job), "--job-id", "sh").returncode == 1
    ends = {
        e["id"]: e for e in events(mrpool, "sh") if e["event"] in ("item_succeeded", "item_parked")
    }
    assert {k: (e["exit_code"], e["signal"]) for k, e in ends.items()} == {
        "ok": (0, None),
        "seven": (7, None),
        "term": (None, 15),
    }
    assert all(e["duration"] >= 0 for e in ends.values())
    # the CLI's lines, formatted from stored bytes a record at a time, are the dicts encoded
    assert mrpool.run("resume", "py", "--reset-failed").returncode == 1  # a reset, new starts
    for job_id in ("py", "sh"):
        assert mrpool.run("events", job_id).stdout.encode() == b"".join(
            orjson.dumps(e) + b"\n" for e in api.iter_events(job_id, state_dir=mrpool.state_dir)
        )


def events(mrpool, job_id):
    r = mrpool.run("events", job_id)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]
