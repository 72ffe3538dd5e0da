"""Damaged state files are named, never a traceback, never wrong data.

Every test starts from real job directories written by ``mrpool run`` (one job
with four successes and a DLQ item, one with every item succeeded and a reduce
output), copies them to a scratch state dir and damages one file the way a bad
disk or an editor would. Then the real CLI must either answer exactly as it did
before the damage, or refuse with one line that names the file (and where in
it) -- exit 5, ``mrpool fsck`` pointed at -- and never print an id or a result
that was not there. ``fsck`` must agree: damaged whenever a command refused.

The fuzzer at the end flips single bytes and truncates every file of both jobs;
the default suite samples positions with a fixed seed, ``MRPOOL_STRESS=1`` (or
``scripts/fuzz_inputs.py --damage``) runs every position.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import PY, REPO, Mrpool, write_job

from mrpool.journal import read_records

pytestmark = pytest.mark.timeout(300)

MAP = """\
def work(item):
    if item["id"] == "e":
        raise ValueError("e is never allowed")
    return {"len": len(item["text"]), "q": 'quote " and \\\\ backslash'}


def total(results):
    return sum(r["len"] for r in results)
"""
TEXTS = {"a": "alpha", "b": "beta", "c": "gamma", "d": "delta", "e": "epsilon"}
FILES = ("job.json", "items.jsonl", "journal.log", "checkpoint.json", "dlq.json", "reduce.json")


# -- the pristine jobs, built once ------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    """A state dir with job ``parked`` (a-d succeeded, e in the DLQ) and job ``reduced``
    (a-d succeeded, reduce done)."""
    base = tmp_path_factory.mktemp("pristine")
    runner = Mrpool(base / "state", uuid.uuid4().hex)
    reduce_step = {"reduce": {"callable": "dmap:total"}}
    for job_id, ids in (("parked", "abcde"), ("reduced", "abcd")):
        job_file = write_job(
            base / job_id,
            [{"id": i, "text": TEXTS[i]} for i in ids],
            {"callable": "dmap:work"},
            workers=1,
            extra=reduce_step,
            files={"dmap.py": MAP},
        )
        r = runner.run("run", str(job_file), "--job-id", job_id)
        assert r.returncode == (1 if "e" in ids else 0), r.stderr
    return base / "state"


@pytest.fixture
def state(pristine, mrpool) -> Mrpool:
    """A scratch copy of the pristine state dir, run through the test's ``mrpool``."""
    shutil.copytree(pristine, mrpool.state_dir)
    return mrpool


def truth(pristine: Path) -> dict[str, dict[str, bytes]]:
    """Every read command's stdout on the undamaged jobs."""
    found = {}
    for job_id in ("parked", "reduced"):
        found[job_id] = {name: out for name, (code, out, _) in read_all(pristine, job_id).items()}
    return found


def read_all(state_dir: Path, job_id: str) -> dict[str, tuple[int, bytes, str]]:
    """``{command: (exit, stdout, stderr)}`` of every read command, run in this process
    through ``cli.main`` (the same code as the CLI, ~1000 times faster to start)."""
    commands = {
        "status": ["status", job_id],
        "status --json": ["status", job_id, "--json"],
        "status all": ["status", "--json"],
        "results": ["results", job_id],
        "results --reduce": ["results", job_id, "--reduce"],
        "dlq list": ["dlq", "list", job_id, "--json"],
        "events": ["events", job_id],
        "fsck": ["fsck", job_id],
    }
    return {name: cli(state_dir, argv) for name, argv in commands.items()}


def cli(state_dir: Path, argv: list[str]) -> tuple[int, bytes, str]:
    from mrpool.cli import main

    out, err = io.TextIOWrapper(io.BytesIO()), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(["--state-dir", str(state_dir), *argv])
        except BaseException as e:  # noqa: BLE001 - what the user would see as a traceback
            code, err = -1, io.StringIO(f"Traceback: {type(e).__name__}: {e}")
        out.flush()
    # a printed next step names the state dir it was given (pasteable): the same answer
    # for the pristine copy and a damaged one in another directory
    return code, out.buffer.getvalue().replace(bytes(state_dir), b"<STATE_DIR>"), err.getvalue()


def flip(path: Path, at: int, mask: int = 0x20) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= mask
    path.write_bytes(bytes(data))


def one_error_line(stderr: str) -> str:
    """The error a refusing command printed: its last line (earlier lines may be notes such as
    'damaged checkpoint; rebuilding'), one line, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines, "no message"
    return lines[-1]


# -- job.json -----------------------------------------------------------------------------
def test_flipped_job_json_is_one_line_naming_it_in_every_command(state):
    path = state.job_dir("parked") / "job.json"
    text = path.read_text()
    path.write_text(text.replace('"total": 5', '"total": 7'))  # valid JSON, wrong data
    for args in (
        ["status", "parked"],
        ["results", "parked"],
        ["dlq", "list", "parked"],
        ["resume", "parked"],
        ["events", "parked"],
    ):
        r = state.run(*args)
        assert r.returncode == 5, (args, r.returncode, r.stderr)
        line = one_error_line(r.stderr)
        assert "job.json" in line and "mrpool fsck parked" in line and r.stdout == "", args
    path.write_text(text.replace('"job_id"', '"job_ie"'))  # a damaged key
    r = state.run("status", "--json")  # the all-jobs table still lists every job
    assert r.returncode == 0, r.stderr
    rows = {row["job_id"]: row for row in json.loads(r.stdout)}
    assert (
        rows["parked"]["state"].startswith("unreadable") and "job.json" in rows["parked"]["state"]
    )
    assert rows["reduced"]["state"] == "completed"


# -- items.jsonl -----------------------------------------------------------------------------
def test_edited_item_byte_is_refused_and_never_runs(state):
    """An edited id ("b" -> "z") keeps the line valid JSON: the checksum refuses it, so no
    unknown id is ever printed and resume runs nothing."""
    path = state.job_dir("parked") / "items.jsonl"
    path.write_bytes(path.read_bytes().replace(b'"b"', b'"z"', 1))
    journal = state.job_dir("parked") / "journal.log"
    before = journal.read_bytes()
    r = state.run("results", "parked")
    assert r.returncode == 5 and '"z"' not in r.stdout, r.stdout
    assert "items.jsonl" in one_error_line(r.stderr) and "bytes 0-" in r.stderr
    r = state.run("resume", "parked")
    assert r.returncode == 5 and "items.jsonl" in one_error_line(r.stderr), r.stderr
    records = [rec for _, _, rec in read_records(journal)]
    assert not any(rec["k"] == "s" for rec in records[len(list(_records(before))) :])


def _records(data: bytes):
    return [line for line in data.splitlines() if line]


@pytest.mark.parametrize("damage", ["lost LF", "emptied"])
def test_lost_lf_or_emptied_items_is_named_in_results_and_events(state, damage):
    path = state.job_dir("parked") / "items.jsonl"
    data = path.read_bytes()
    path.write_bytes(data.replace(b"\n", b"", 1) if damage == "lost LF" else b"")
    for args in (["results", "parked"], ["events", "parked"], ["dlq", "list", "parked"]):
        r = state.run(*args)
        assert r.returncode == 5, (args, r.stderr)
        assert "items.jsonl" in one_error_line(r.stderr), r.stderr
        assert "StopIteration" not in r.stderr and "IndexError" not in r.stderr


# -- the journal ----------------------------------------------------------------------------
@pytest.mark.parametrize("keep", [0, 0.5])
def test_truncated_or_emptied_journal_is_reported_as_lost_acknowledged_data(state, keep):
    journal = state.job_dir("parked") / "journal.log"
    data = journal.read_bytes()
    journal.write_bytes(data[: int(len(data) * keep)])
    for args in (["status", "parked", "--json"], ["results", "parked"], ["resume", "parked"]):
        r = state.run(*args)
        assert r.returncode == 5, (args, r.stdout, r.stderr)
        line = one_error_line(r.stderr)
        assert "acknowledged records lost" in line and "journal.log" in line, line
        assert "recorded successes" in line and "successes survive" in line, line
    r = state.run("fsck", "parked")
    assert r.returncode == 5 and "acknowledged successes" in r.stdout, r.stdout


def test_mid_journal_flip_shows_in_status_with_offset_and_what_to_do(state):
    """Before the checkpoint offset: status re-checks the prefix the checkpoint covers."""
    journal = state.job_dir("parked") / "journal.log"
    entries = list(read_records(journal))
    start, _, _ = entries[len(entries) // 2]
    flip(journal, start + 12)
    for args in (["status", "parked"], ["results", "parked"], ["events", "parked"]):
        r = state.run(*args)
        assert r.returncode == 5, (args, r.stderr)
        line = one_error_line(r.stderr)
        assert f"journal.log: damaged at byte {start}" in line or f"byte {start} " in line, line
        assert "mrpool fsck parked" in line, line


def test_resume_refuses_before_running_anything_after_an_old_record_is_damaged(state):
    journal = state.job_dir("parked") / "journal.log"
    entries = list(read_records(journal))
    flip(journal, entries[3][0] + 12)
    size = journal.stat().st_size
    r = state.run("resume", "parked")
    assert r.returncode == 5 and "journal.log" in one_error_line(r.stderr), r.stderr
    assert journal.stat().st_size == size  # not one record appended: nothing ran


def test_fsck_salvage_cuts_at_the_damage_keeps_it_visible_and_resume_finishes(state):
    journal = state.job_dir("parked") / "journal.log"
    entries = list(read_records(journal))
    ok_at = next(start for start, _, rec in entries if rec["k"] == "ok")
    flip(journal, ok_at + 15)
    r = state.run("fsck", "parked")
    assert r.returncode == 5 and r.stdout.startswith("DAMAGED: journal.log"), r.stdout
    assert "acknowledged successes" in r.stdout
    r = state.run("fsck", "parked", "--salvage")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert f"cut journal.log to its first {ok_at} bytes" in r.stdout
    assert journal.stat().st_size > ok_at  # the salvage record follows the good prefix
    # The loss stays visible: in the events, and in every later fsck (as a note, exit 0).
    events = [json.loads(line) for line in state.run("events", "parked").stdout.splitlines()]
    assert any(e["event"] == "journal_salvaged" and e["cut_at"] == ok_at for e in events)
    r = state.run("fsck", "parked")
    assert r.returncode == 0 and "salvaged earlier" in r.stdout, r.stdout
    # What was lost is pending again; resume runs it and the job ends as before the damage.
    assert state.status("parked")["pending"] >= 1
    r = state.run("resume", "parked")
    assert r.returncode == 1, r.stderr  # e is parked again
    assert [row["id"] for row in state.results("parked")] == ["a", "b", "c", "d"]
    assert [row["id"] for row in state.dlq("parked")] == ["e"]


def test_fsck_of_a_sound_job_exits_0_and_of_no_job_4(state):
    for job_id in ("parked", "reduced"):
        r = state.run("fsck", job_id)
        assert r.returncode == 0 and r.stdout == "", (r.stdout, r.stderr)
        assert f"{job_id}: sound" in r.stderr
    r = state.run("fsck", "nosuch")
    assert r.returncode == 4, r.stderr


def test_fsck_salvage_waits_for_no_one_a_locked_job_is_refused_with_3(state):
    """--salvage takes the job's lock: it never races a resumer."""
    holder = subprocess.Popen(
        [PY, "-c", "import sys, time\nfrom mrpool.lock import JobLock\n"
         f"lock = JobLock({str(state.job_dir('parked'))!r}).acquire()\n"
         "print('held', flush=True)\nsys.stdin.read()\nlock.release()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=state.env(), cwd=str(REPO),
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == b"held\n"
        r = state.run("fsck", "parked", "--salvage")
        assert r.returncode == 3, (r.returncode, r.stderr)
        assert state.run("fsck", "parked").returncode == 0  # checking needs no lock
    finally:
        holder.communicate(b"", timeout=30)


def test_damaged_reduce_output_is_found_and_salvage_lets_resume_rerun_it(state):
    path = state.job_dir("reduced") / "reduce.json"
    path.write_bytes(path.read_bytes()[:-3])
    r = state.run("fsck", "reduced")
    assert r.returncode == 5 and "reduce.json" in r.stdout, r.stdout
    assert state.run("fsck", "reduced", "--salvage").returncode == 0
    r = state.run("resume", "reduced")
    assert r.returncode == 0, r.stderr
    r = state.run("results", "reduced", "--reduce")
    assert r.returncode == 0 and json.loads(r.stdout) == 5 + 4 + 5 + 5, r.stdout


# -- results memory ---------------------------------------------------------------------------
def test_results_memory_does_not_grow_with_result_size_beyond_about_a_row(mrpool, tmp_path):
    """A 60 MB command stdout: `results` peaks at about one journal record, not 7x (before:
    7.3 GB for 1 GB; then 3.4x). The row is text full of quotes and backslashes, the slow
    case for finding where a JSON string ends without decoding it."""
    size = 60 << 20
    job_file = write_job(
        tmp_path / "big",
        [{"id": "big", "n": size}, {"id": "small", "n": 8}],
        {"command": [PY, "-c", "import sys, json; n = json.load(sys.stdin)['n']; "
                     "sys.stdout.write('x\"y\\\\' * (n // 4))"]},
        workers=1,
    )  # fmt: skip
    r = mrpool.run("run", str(job_file), "--job-id", "big", timeout=240)
    assert r.returncode == 0, r.stderr
    probe = (
        "import resource, subprocess, sys\n"
        "with open(sys.argv[1], 'wb') as out:\n"
        "    code = subprocess.call([sys.executable, '-m', 'mrpool', 'results', 'big'], stdout=out)\n"
        "print(code, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)\n"
    )
    out = tmp_path / "results.jsonl"
    r = subprocess.run(
        [PY, "-c", probe, str(out)], env=mrpool.env(), capture_output=True, text=True, timeout=240
    )
    code, peak = map(int, r.stdout.split())
    assert code == 0, r.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["id"] for row in rows] == ["big", "small"]
    assert len(rows[0]["result"]) == size and rows[0]["result"][:8] == 'x"y\\x"y\\'
    row = len(out.read_bytes().split(b"\n", 1)[0])  # ~90 MB: quotes and backslashes escaped
    # the interpreter and the record read from the journal (written out as a view of it)
    assert peak < 50e6 + 1.3 * row, (
        f"results peaked at {peak / 1e6:.0f} MB for a {row / 1e6:.0f} MB row"
    )


# -- the damage fuzzer --------------------------------------------------------------------------
def damage_cases(pristine: Path, sample: int | None, seed: int = 23):
    """``(job_id, file, kind, position)``: a byte flipped (with a seeded mask) or the file cut
    there, for every file of both jobs; ``sample``: that many of them, seeded."""
    cases = []
    for job_id in ("parked", "reduced"):
        for name in FILES:
            path = pristine / "jobs" / job_id / name
            if path.exists():
                size = path.stat().st_size
                cases += [
                    (job_id, name, kind, at) for at in range(size) for kind in ("flip", "cut")
                ]
    if sample is not None and sample < len(cases):
        cases = random.Random(seed).sample(cases, sample)
    return sorted(cases)


def check_damage_case(pristine: Path, scratch: Path, expected, case) -> None:
    job_id, name, kind, at = case
    shutil.rmtree(scratch, ignore_errors=True)
    shutil.copytree(pristine, scratch)
    path = scratch / "jobs" / job_id / name
    if kind == "flip":
        flip(
            path,
            at,
            mask=random.Random(at).choice([0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80, 0xFF]),
        )
    else:
        with open(path, "r+b") as handle:
            handle.truncate(at)
    answers = read_all(scratch, job_id)
    refused = []
    for command, (code, out, err) in answers.items():
        where = (case, command, code, out[-300:], err[-500:])
        assert code != -1 and "Traceback" not in err, where
        if command == "fsck":
            assert code in (0, 5), where
            continue
        if code == 0:
            if command == "status all":
                rows = {r["job_id"]: r for r in json.loads(out)}
                if not rows[job_id]["state"].startswith("unreadable"):
                    assert out == expected[job_id][command], where
                else:
                    refused.append(command)
                continue
            assert out == expected[job_id][command], where  # exit 0: exactly the right answer
        else:
            line = one_error_line(err)
            assert any(f in line for f in FILES) or "no such job" in line or "reduce" in line, where
            if command in ("results", "events"):  # what it printed before refusing was right
                assert expected[job_id][command].startswith(out), where
            refused.append(command)
    if any(c in refused for c in ("status", "results", "dlq list", "events")):
        assert answers["fsck"][0] == 5, (case, refused, answers["fsck"])


def test_every_sampled_flip_and_cut_is_named_or_harmless(pristine, tmp_path):
    expected = truth(pristine)
    for case in damage_cases(pristine, sample=int(os.environ.get("MRPOOL_DAMAGE_CASES", "90"))):
        check_damage_case(pristine, tmp_path / "scratch", expected, case)


@pytest.mark.stress
@pytest.mark.timeout(4 * 3600)
def test_every_flip_and_cut_is_named_or_harmless(pristine, tmp_path):
    expected = truth(pristine)
    for case in damage_cases(pristine, sample=None):
        check_damage_case(pristine, tmp_path / "scratch", expected, case)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
