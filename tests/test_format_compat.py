"""State written by format version 1 stays readable.

``tests/data/v1_state`` is a real state directory written by mrpool 0.1.0
(format version 1): a 6-item job with 4 successes and 2 items in the DLQ. A
future format change must keep these reads working (or migrate them).
"""

import json
import shutil

import pytest
from conftest import REPO

from mrpool.journal import decode_line, read_records

FIXTURE = REPO / "tests" / "data" / "v1_state"


@pytest.fixture
def v1(tmp_path, mrpool):
    """A copy of the v1 state dir (reads must not need to write, but never risk the fixture)."""
    shutil.copytree(FIXTURE, mrpool.state_dir)
    return mrpool


def test_v1_files_carry_their_version():
    """The fixture is what it claims: every versioned file says v1."""
    job_dir = FIXTURE / "jobs" / "v1job"
    assert json.loads((job_dir / "job.json").read_text())["v"] == 1
    first = next(iter(read_records(job_dir / "journal.log")))[2]
    assert first["k"] == "job" and first["v"] == 1
    for derived in ("checkpoint.json", "dlq.json"):  # one checksummed record each
        record = decode_line((job_dir / derived).read_bytes())
        assert record["v"] == 1, derived


def test_v1_status_results_and_dlq_read(v1):
    """status, results, dlq list/show/stats and events all read a v1 job."""
    status = v1.status("v1job")
    assert (status["total"], status["succeeded"], status["dlq"], status["state"]) == (
        6,
        4,
        2,
        "completed_with_failures",
    )
    assert v1.results("v1job") == [
        {"id": "a", "result": {"len": 5}},
        {"id": "b", "result": {"len": 4}},
        {"id": "d", "result": {"len": 5}},
        {"id": "f", "result": {"len": 4}},
    ]
    dlq = v1.dlq("v1job")
    assert [(e["id"], e["attempts"], e["error"]) for e in dlq] == [
        ("c", 2, "ValueError: bad item c at offset 17"),
        ("e", 2, "ValueError: bad item e at offset 17"),
    ]
    assert dlq[0]["signature"] == dlq[1]["signature"]
    shown = json.loads(v1.run("dlq", "show", "v1job", "e").stdout)
    assert shown["item"] == {"id": "e", "text": "epsilon"} and [
        h["attempt"] for h in shown["history"]
    ] == [1, 2]
    events = [json.loads(line)["event"] for line in v1.run("events", "v1job").stdout.splitlines()]
    assert (
        events[0] == "job_created"
        and events.count("item_parked") == 2
        and events[-1] == "session_finished"
    )


def test_v1_without_derived_files_reads_the_same(v1):
    """checkpoint.json and dlq.json are derived: without them the answers are identical."""
    before = (v1.status("v1job"), v1.dlq("v1job"))
    for name in ("checkpoint.json", "dlq.json"):
        (v1.job_dir("v1job") / name).unlink()
    assert (v1.status("v1job"), v1.dlq("v1job")) == before
