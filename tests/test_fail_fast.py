"""Fail fast (issue 24, item 3): what can be refused before any item runs is refused
then, and ``halt:`` / ``--halt`` stops a run whose items keep failing.

* a command whose program does not resolve, and a ``{item.KEY}`` the first item lacks,
  are one line each, exit 2, and leave no job (``run``) or no record (a session);
* ``--halt fail=N`` / ``fail=N%``: exit 1 with the rest pending, the reason journaled
  and shown by ``status``; ``resume`` continues.
"""

from __future__ import annotations

import json

from conftest import journal_records, write_job


def test_run_refuses_what_cannot_run_and_creates_nothing(mrpool, tmp_path):
    items = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / "plain.sh").write_text("#!/bin/sh\necho hi\n")  # not executable
    for command, message in (
        (["no-such-program-24", "{item.name}"], "map.command: 'no-such-program-24' is not an executable program on PATH"),
        (["./missing.sh"], "map.command: './missing.sh' does not exist"),
        (["./plain.sh"], "map.command: './plain.sh' is not executable"),
        (["echo", "{item.nme}"], "placeholder {item.nme} names a key the first item (id 1) does not have (did you mean 'name'?"),
    ):  # fmt: skip
        job = write_job(tmp_path / "job", items, {"command": command})
        r = mrpool.run("run", str(job))
        assert r.returncode == 2, r.stderr
        assert r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
        assert not (mrpool.state_dir / "jobs").exists()  # no job, nothing half-written
    job = write_job(
        tmp_path / "job", items, {"command": ["true"]}, extra={"reduce": {"command": ["nope-24"]}}
    )
    r = mrpool.run("run", str(job))
    assert r.returncode == 2 and "reduce.command: 'nope-24' is not an executable" in r.stderr


def test_a_session_checks_before_anything_runs(mrpool, tmp_path):
    """A job whose program vanished since ``run`` (PATH changed): resume refuses at once,
    no session is recorded."""
    job = write_job(tmp_path / "job", [{"id": 1}], {"command": ["false"]})
    assert mrpool.run("run", str(job), "--job-id", "gone").returncode == 1
    before = journal_records(mrpool.job_dir("gone"))
    r = mrpool.run("resume", "gone", env=mrpool.env(PATH="/nonexistent"))
    assert r.returncode == 2 and "'false' is not an executable program on PATH" in r.stderr
    assert journal_records(mrpool.job_dir("gone")) == before


def test_halt_stops_the_run_and_resume_continues(mrpool, tmp_path):
    # 12 items; all but the last 4 fail; one worker, so they finish in input order, and
    # 50 ms each, so that they reach the supervisor one by one (a worker reports what
    # it finished every 20 ms: outcomes that arrive together are all recorded)
    items = [{"id": n, "ok": n >= 8} for n in range(12)]
    command = ["sh", "-c", 'sleep 0.05; test "$0" = true', "{item.ok}"]
    job = write_job(tmp_path / "job", items, {"command": command}, workers=1)

    # Phase 1: fail=3 stops the run once three items were parked; the rest stay pending.
    # (Outcomes that arrive in the same batch as the third are recorded too.)
    r = mrpool.run("run", str(job), "--job-id", "halt", "--halt", "fail=3")
    assert r.returncode == 1, r.stderr
    s = mrpool.status("halt")
    parked = s["dlq"]
    assert 3 <= parked < 8 and s["succeeded"] == 0 and s["state"] == "interrupted"
    assert s["pending"] == 12 - parked and s["halted"]["rule"] == "fail=3"
    assert f"halted: {parked} of the {parked} item(s) this session finished were parked" in r.stderr
    assert "continue with: mrpool resume halt" in r.stderr
    human = mrpool.run("status", "halt").stdout
    assert "halted" in human and "halt: fail=3" in human
    events = map(json.loads, mrpool.run("events", "halt").stdout.splitlines())
    assert [e["parked"] for e in events if e["event"] == "halted"] == [parked]

    # Phase 2: the job keeps its halt (run --halt); --halt on resume replaces it for this
    # session: 20 % of the items finished, judged from the third on
    r = mrpool.run("resume", "halt", "--halt", "fail=20%", "--no-dlq")
    assert r.returncode == 1 and "(halt: fail=20%)" in r.stderr, r.stderr
    assert mrpool.status("halt")["halted"]["rule"] == "fail=20%"

    # Phase 3: without a halt the rest runs; the halt is no longer shown
    r = mrpool.run("resume", "halt", "--set", "halt=null", "--no-dlq")
    assert r.returncode == 1, r.stderr
    s = mrpool.status("halt")
    assert (s["dlq"], s["succeeded"], s["pending"], s["halted"]) == (8, 4, 0, None)
