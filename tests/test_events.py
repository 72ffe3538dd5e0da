"""`events --follow`: prints the log live and ends when the job has no live holder."""

import json
import select
import subprocess

import pytest
from conftest import wait_for, write_job

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
