"""Fixing a job after the fact (issue 24, item 2): ``--job-file`` / ``--set`` on
``resume`` and ``dlq retry``, ``mrpool rerun`` and ``mrpool rm``.

Scenarios, all with the real CLI in subprocesses:

* a typo in the map command parks every item; ``dlq retry --set map.command=...``
  fixes the job, the change is an event, and later sessions keep it;
* the input and identities are frozen: each refusal names the key, exit 2, nothing
  recorded; ``--job-file`` with an edited file works the same way;
* a SIGKILL right after the change's record was written leaves the new spec; a record
  torn in half (what a crash inside the write leaves) leaves the old one -- never a mix;
* ``rerun`` replaces a success's result, refuses ids it cannot rerun, honours the lock;
* ``rm`` needs ``--yes``, refuses a locked job, and a crash between its rename and
  its delete leaves no job that looks valid.
"""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from conftest import journal_records, wait_for, write_job

from mrpool import cli

# A command that prints the file named by {item.path}; items name files that exist
# under their "name" key and a missing one under "path" -- the typo to fix.
CAT = ["sh", "-c", 'cat "$0"', "{item.path}"]


def _items(directory: Path, n: int) -> list[dict]:
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (directory / f"f{i}.txt").write_text(f"text {i}\n")
    return [{"id": f"i{i}", "name": f"f{i}.txt", "path": f"missing{i}.txt"} for i in range(n)]


def _events(mrpool, job: str, name: str) -> list[dict]:
    r = mrpool.run("events", job)
    assert r.returncode == 0, r.stderr
    return [e for e in map(json.loads, r.stdout.splitlines()) if e["event"] == name]


def test_dlq_retry_with_a_fixed_command_and_the_change_lasts(mrpool, tmp_path):
    # Phase 1: a typo ({item.path} for {item.name}) parks every item. (The first item has
    # "path", so the fail-fast check passes: the files it names are missing.)
    job = write_job(tmp_path / "job", _items(tmp_path / "job", 4), {"command": CAT})
    r = mrpool.run("run", str(job), "--job-id", "fix")
    assert r.returncode == 1, r.stderr
    assert mrpool.status("fix")["dlq"] == 4

    # Phase 2: fix it on the retry; the change is journaled as an event, with old and new.
    fixed = "sh -c 'cat \"$0\"' {item.name}"
    r = mrpool.run(
        "dlq", "retry", "fix", "--set", f"map.command={fixed}", "--set", "map.timeout=30"
    )
    assert r.returncode == 0, r.stderr
    assert "spec changed: map.command:" in r.stderr and "map.timeout: (unset) -> 30" in r.stderr
    assert [row["result"] for row in mrpool.results("fix")] == [f"text {i}\n" for i in range(4)]
    (event,) = _events(mrpool, "fix", "spec_changed")
    assert event["changed"]["map.command"] == [CAT, ["sh", "-c", 'cat "$0"', "{item.name}"]]
    assert event["changed"]["map.timeout"] == [None, 30.0]

    # Phase 3: later sessions run the new spec (a rerun of one item uses the fixed command).
    r = mrpool.run("rerun", "fix", "i2")
    assert r.returncode == 0, r.stderr
    assert mrpool.results("fix")[2]["result"] == "text 2\n"
    r = mrpool.run("resume", "fix", "--set", "map.timeout=30")
    assert r.returncode == 0 and "spec: nothing changed" in r.stderr, r.stderr
    assert len(_events(mrpool, "fix", "spec_changed")) == 1


def test_the_input_and_identities_are_frozen(mrpool, tmp_path, capsys):
    job = write_job(tmp_path / "job", [{"id": 1, "v": "a"}], {"command": ["echo", "{item.v}"]})
    assert mrpool.run("run", str(job), "--job-id", "frozen").returncode == 0
    before = len(journal_records(mrpool.job_dir("frozen")))
    r = mrpool.run("resume", "frozen", "--set", "id_field=v")  # one real process: exit 2
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "id_field: cannot change after run" in r.stderr
    state = ["--state-dir", str(mrpool.state_dir)]
    for assignment, message in (  # the rest in this process: the same code, cheaper
        ("input=other.jsonl", "input: cannot change after run"),
        ("json_path=$.x", "json_path: cannot change after run"),
        ("name=renamed", "name: cannot change after run"),
        ("map.timeout=-1", "map.timeout: must be a positive number"),
        ("map.timout=5", "map.timout: unknown key (did you mean 'timeout'?"),
        ("workers", "expected KEY=VALUE"),
    ):
        assert cli.main(["dlq", "retry", "frozen", "--set", assignment, *state]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    # --job-file: an edited copy elsewhere whose input names another file is refused
    data = json.loads(job.read_text())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "items.jsonl").write_text('{"id": 1, "v": "b"}\n')
    (tmp_path / "other" / "job.json").write_text(json.dumps(data))
    assert (
        cli.main(["resume", "frozen", "--job-file", str(tmp_path / "other" / "job.json"), *state])
        == 2
    )
    assert "input: cannot change after run" in capsys.readouterr().err
    assert len(journal_records(mrpool.job_dir("frozen"))) == before  # nothing recorded
    # the same job file, edited in place: the retries change, nothing else
    data["map"]["retries"] = 2
    job.write_text(json.dumps(data))
    r = mrpool.run("resume", "frozen", "--job-file", str(job))
    assert r.returncode == 0 and "spec changed: map.retries: 0 -> 2" in r.stderr, r.stderr


def test_a_crash_leaves_the_old_spec_or_the_new_one(mrpool, tmp_path):
    job = write_job(tmp_path / "job", [{"id": 1}, {"id": 2}], {"command": ["false"]})
    assert mrpool.run("run", str(job), "--job-id", "torn").returncode == 1
    journal = mrpool.job_dir("torn") / "journal.log"

    def retry_killed_after_the_change(command: str):
        """``dlq retry --set map.command=COMMAND``, SIGKILLed right after the change's
        record was written (not yet fsynced): the first journal write of the command."""
        kill = mrpool.env(MRPOOL_FAILPOINTS="journal.after_write=kill")
        return mrpool.run("dlq", "retry", "torn", "--set", f"map.command={command}", env=kill)

    # Killed once the record is written: the new spec.
    assert retry_killed_after_the_change("true").returncode == -signal.SIGKILL
    assert [e["changed"] for e in _events(mrpool, "torn", "spec_changed")] == [
        {"map.command": [["false"], ["true"]]}
    ]
    size = journal.stat().st_size
    # (a change that cannot run is refused before anything is written)
    r = retry_killed_after_the_change("nosuch-program-x")
    assert r.returncode == 2 and "'nosuch-program-x' is not an executable program" in r.stderr

    # A second change torn in half, as a crash inside its write would leave it: the old spec.
    assert retry_killed_after_the_change("echo torn").returncode == -signal.SIGKILL
    with open(journal, "r+b") as handle:
        handle.truncate(size + (journal.stat().st_size - size) // 2)
    r = mrpool.run("dlq", "retry", "torn")
    assert r.returncode == 0, r.stderr
    assert [row["result"] for row in mrpool.results("torn")] == ["", ""]  # `true`, not `echo`
    assert len(_events(mrpool, "torn", "spec_changed")) == 1


def test_rerun_replaces_a_result(mrpool, tmp_path):
    job = write_job(
        tmp_path / "job",
        [{"id": n} for n in range(4)],
        {"command": ["sh", "-c", 'echo "$MRPOOL_ITEM_ID:$MRPOOL_ATTEMPT"']},
    )
    assert mrpool.run("run", str(job), "--job-id", "again").returncode == 0
    r = mrpool.run("rerun", "again", "1", "3")
    assert r.returncode == 0, r.stderr
    # the new results only (attempt 2), once each, in input order
    assert mrpool.results("again") == [
        {"id": n, "result": f"{n}:{1 + (n in (1, 3))}\n"} for n in range(4)
    ]
    assert [e["ids"] for e in _events(mrpool, "again", "items_rerun")] == [[1, 3]]
    # ids it cannot rerun are refused naming the id, nothing recorded
    r = mrpool.run("rerun", "again", "1", "nope")
    assert r.returncode == 2 and "has no item 'nope'" in r.stderr, r.stderr
    assert mrpool.status("again")["succeeded"] == 4


def test_a_rerun_that_parks_its_item_leaves_no_stale_reduce_output(mrpool, tmp_path):
    """The reduce ran over four results; a rerun of one parks it (its second attempt
    fails). ``results --reduce`` must not print the old sum as if it described the job:
    it says there is no reduce output yet, until the job completes and the reduce runs."""
    ok_once = ["sh", "-c", '[ "$MRPOOL_ATTEMPT" = 1 ] && echo 1']
    job = write_job(
        tmp_path / "job",
        [{"id": n} for n in range(4)],
        {"command": ok_once},
        extra={"reduce": {"command": ["sh", "-c", "wc -l"]}},
    )
    assert mrpool.run("run", str(job), "--job-id", "sum").returncode == 0
    assert mrpool.run("results", "sum", "--reduce").stdout.strip() == "4"
    assert mrpool.run("rerun", "sum", "2").returncode == 1  # the item is parked
    r = mrpool.run("results", "sum", "--reduce")
    assert r.returncode == 1 and "no reduce output yet" in r.stderr, (r.stdout, r.stderr)
    assert r.stdout == ""
    assert mrpool.run("dlq", "purge", "sum", "--yes").returncode == 0
    assert mrpool.run("resume", "sum").returncode == 0  # runs the reduce over three
    assert mrpool.run("results", "sum", "--reduce").stdout.strip() == "3"


def test_rerun_and_rm_honour_the_lock(mrpool, tmp_path):
    job = write_job(tmp_path / "job", [{"id": 1}], {"command": ["sleep", "30"]}, workers=1)
    proc = mrpool.start("run", str(job), "--job-id", "busy")
    try:
        wait_for(lambda: (mrpool.job_dir("busy") / "holder.json").exists(), what="the lock")
        for args in (("rerun", "busy", "1"), ("rm", "busy", "--yes")):
            r = mrpool.run(*args)
            assert r.returncode == 3 and "is locked by" in r.stderr, r.stderr
        assert mrpool.job_dir("busy").is_dir()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=30)
    # not succeeded (pending after the interrupt): refused, naming it and what to run
    r = mrpool.run("rerun", "busy", "1")
    assert r.returncode == 2 and "'1' of job busy has not succeeded (it is pending)" in r.stderr
    assert "mrpool resume busy" in r.stderr


def test_rm(mrpool, tmp_path):
    job = write_job(tmp_path / "job", [{"id": 1}], {"command": ["true"]})
    state = str(tmp_path / "elsewhere")
    for job_id in ("a", "b"):
        assert mrpool.run("run", str(job), "--job-id", job_id, "--state-dir", state).returncode == 0
    # without --yes: refused, with the command to confirm (pasteable: it has --state-dir)
    r = mrpool.run("rm", "a", "--state-dir", state)
    assert r.returncode == 2 and f"mrpool rm a --state-dir {state} --yes" in r.stderr, r.stderr
    assert mrpool.run("rm", "zzz", "--yes", "--state-dir", state).returncode == 4

    # a crash between the rename and the delete: the job is gone for every command
    r = mrpool.run(
        "rm", "a", "--yes", "--state-dir", state,
        env=mrpool.env(MRPOOL_FAILPOINTS="rm.after_rename=kill"),
    )  # fmt: skip
    assert r.returncode == -signal.SIGKILL
    assert not (Path(state) / "jobs" / "a").exists()
    assert len(os.listdir(Path(state) / "tmp")) == 1  # the tombstone
    r = mrpool.run("status", "--json", "--state-dir", state)
    assert [row["job_id"] for row in json.loads(r.stdout)] == ["b"]
    assert mrpool.run("status", "a", "--state-dir", state).returncode == 4
    # the next rm finishes its own job and sweeps the tombstone
    r = mrpool.run("rm", "b", "--yes", "--state-dir", state)
    assert r.returncode == 0 and "removed job b" in r.stderr, r.stderr
    assert os.listdir(Path(state) / "jobs") == [] and os.listdir(Path(state) / "tmp") == []
