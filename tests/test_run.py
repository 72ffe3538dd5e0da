"""``mrpool run``: the core of issue 2, exercised through real processes only.

Every test starts the real CLI (``python -m mrpool``) in a subprocess; maps are
real commands or real callables imported in forked workers. Nothing is mocked.
The tests prove what a user relies on: every item's result arrives exactly once
and in input order; a worker that dies or hangs is attributed, retried or parked
while every other item finishes; item values never reach a shell; the map
command protocol (stdin, environment, cwd, JSON-or-text stdout) holds; identity,
duplicates and ``.json`` inputs behave per the contract; Ctrl-C / SIGTERM exit
130 and ``resume`` finishes; and nothing (processes, /dev/shm, temp files) is
left behind. The autouse ``no_leftovers`` fixture checks the latter after every
test as well.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import textwrap
import time
from pathlib import Path
from typing import Any

import psutil
import pytest
from conftest import (
    PY,
    REPO,
    kill_group,
    mrpool_shm,
    shm_entries,
    tagged_processes,
    wait_for,
    write_job,
)

pytestmark = pytest.mark.timeout(120)


# -- helpers -----------------------------------------------------------------------
# Callables the map and reduce steps import (the job file's directory is on sys.path).
MAPMOD = textwrap.dedent(
    """
    import os, signal, time
    from pathlib import Path

    HERE = Path(__file__).resolve().parent  # callables do not get the job dir as cwd

    def square(item):
        return {"sq": item["n"] * item["n"]}

    def value(item):
        return item.get("v")

    def identity(item):
        return item

    def pid(item):
        return os.getpid()

    def kill_once(item):
        # SIGKILL our own worker on the first attempt of the item marked "die".
        with open(HERE / "runs.log", "a") as log:  # one line per run of an item
            print(item["id"], file=log)
        if item.get("die") and not (HERE / "died.marker").exists():
            (HERE / "died.marker").write_text(str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return {"sq": item["n"] * item["n"]}

    def kill_always(item):
        if item.get("die"):
            os.kill(os.getpid(), signal.SIGKILL)
        return item["n"]

    def hang(item):
        if item.get("hang"):
            (HERE / "hang.started").write_text(str(os.getpid()))
            time.sleep(100)
        return item["n"]

    def total(results):
        return {"sum": sum(r["sq"] for r in results), "order": [r["sq"] for r in results]}
    """
)


def events(mrpool, job_id: str) -> list[dict[str, Any]]:
    """The job's event log (``mrpool events``), parsed."""
    r = mrpool.run("events", job_id)
    assert r.returncode == 0, r.stderr
    return [json.loads(line) for line in r.stdout.splitlines()]


def run_ok(mrpool, job: Path, *args: str, expect: int = 0) -> str:
    """Run a job to the end, check the exit status, return its id (stdout's first line)."""
    r = mrpool.run("run", str(job), *args)
    assert r.returncode == expect, f"exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    return r.stdout.splitlines()[0]


# -- big jobs: every result, exactly once, in input order ----------------------------
def test_200_items_through_a_command_map_leave_nothing_behind(mrpool, tmp_path):
    """250 items through ``expr`` (a real command per item): every result right, exit 0, clean."""
    # Phase 1: a command map that computes n*n from an argv placeholder.
    items = [{"id": f"i{n:03d}", "n": n} for n in range(1, 251)]
    job = write_job(
        tmp_path / "job", items, {"command": ["expr", "{item.n}", "*", "{item.n}"]}, workers=2
    )
    shm_before = shm_entries()

    # Phase 2: run it.
    job_id = run_ok(mrpool, job, "--job-id", "big-cmd")
    assert job_id == "big-cmd"

    # Phase 3: every result, one line per id, input order; status agrees.
    results = mrpool.results(job_id)
    assert [r["id"] for r in results] == [it["id"] for it in items]
    assert [r["result"] for r in results] == [it["n"] * it["n"] for it in items]
    status = mrpool.status(job_id)
    assert (status["state"], status["total"], status["succeeded"]) == ("completed", 250, 250)
    assert (status["dlq"], status["failed"], status["pending"], status["lock"]) == (0, 0, 0, None)

    # Phase 4: explicitly, nothing is left: no process, no shm segment, no lock/temp file.
    assert not tagged_processes(mrpool.tag)
    new_shm = mrpool_shm(shm_entries() - shm_before)
    assert not new_shm
    job_dir = mrpool.job_dir(job_id)
    leftovers = [n for n in os.listdir(job_dir) if n in ("lock", "holder.json") or ".tmp-" in n]
    assert not leftovers
    tmp_root = mrpool.state_dir / "tmp"
    assert not tmp_root.exists() or not os.listdir(tmp_root)


def test_200_items_through_a_callable_map_start_in_input_order(mrpool, tmp_path):
    """250 items through a callable: every result right, exit 0, items started in input order."""
    # Phase 1: a callable map over integer ids.
    items = [{"id": n, "n": n} for n in range(250)]
    job = write_job(
        tmp_path / "job", items, {"callable": "mapmod:square"}, files={"mapmod.py": MAPMOD}
    )

    # Phase 2: run it.
    job_id = run_ok(mrpool, job)

    # Phase 3: results: one line per id, input order, all correct.
    results = mrpool.results(job_id)
    assert results == [{"id": n, "result": {"sq": n * n}} for n in range(250)]
    assert mrpool.status(job_id)["state"] == "completed"

    # Phase 4: the event log: items first started in input order, each succeeded once.
    log = events(mrpool, job_id)
    first_starts: list[Any] = []
    for e in log:
        if e["event"] == "item_started" and e["id"] not in first_starts:
            first_starts.append(e["id"])
    assert first_starts == list(range(250))
    succeeded = [e["id"] for e in log if e["event"] == "item_succeeded"]
    assert sorted(succeeded) == list(range(250))


# -- workers that die or hang --------------------------------------------------------
def test_large_items_with_large_results_in_bulk_never_deadlock_supervisor_and_workers(
    mrpool, tmp_path
):
    """Fast items of a few KB with results as large: batches and outcome messages both
    outgrow the pipes. Neither side may wait on a full pipe the other one cannot drain."""
    # Phase 1: 3000 items of ~16 KB, a map that returns as much at once.
    items = [{"id": n, "pad": f"{n:06d}" + "x" * 16000} for n in range(3000)]
    job = write_job(
        tmp_path / "job",
        items,
        {"callable": "echo_map:echo"},
        files={"echo_map.py": "def echo(item):\n    return item['pad'][::-1]\n"},
    )

    # Phase 2: run it (it used to hang after the first batches: the timeout is the failure).
    job_id = run_ok(mrpool, job)

    # Phase 3: every result, whole, in input order.
    rows = mrpool.results(job_id)
    assert [row["id"] for row in rows] == list(range(3000))
    assert all(row["result"] == item["pad"][::-1] for row, item in zip(rows, items))


def test_worker_sigkilled_mid_item_is_attributed_retried_and_the_job_completes(mrpool, tmp_path):
    """A callable that SIGKILLs its own worker once: blamed on that item, retried, job completes."""
    # Phase 1: 40 items, the 11th kills its worker on its first attempt only.
    items = [{"id": f"k{n}", "n": n, **({"die": True} if n == 10 else {})} for n in range(40)]
    job = write_job(
        tmp_path / "job",
        items,
        {"callable": "mapmod:kill_once", "retries": 1},
        files={"mapmod.py": MAPMOD},
    )

    # Phase 2: run; the marker proves the kill really happened.
    job_id = run_ok(mrpool, job)
    assert (tmp_path / "job" / "died.marker").exists()

    # Phase 3: every item's result, once, in order; nothing parked.
    assert mrpool.results(job_id) == [{"id": f"k{n}", "result": {"sq": n * n}} for n in range(40)]
    status = mrpool.status(job_id)
    assert (status["state"], status["succeeded"], status["dlq"]) == ("completed", 40, 0)

    # Phase 4: attribution: the death is blamed on k10 only, as signal 9, and the worker replaced.
    log = events(mrpool, job_id)
    died = [e for e in log if e["event"] == "worker_died"]
    assert len(died) == 1 and died[0]["exitcode"] == -signal.SIGKILL
    failures = [e for e in log if e["event"] in ("item_retrying", "item_failed", "item_parked")]
    assert [(e["id"], e["event"], e["kind"]) for e in failures] == [
        ("k10", "item_retrying", "worker_died")
    ]
    assert "worker died: signal 9" in failures[0]["error"]
    assert failures[0]["worker_pid"] == died[0]["pid"]
    started = [e for e in log if e["event"] == "worker_started"]
    assert len(started) == 2 + 1  # two workers plus one replacement
    # Attempt numbers count runs: k10 succeeded on attempt 2; an item the dead worker had
    # already run (its outcome died with it) ran again as attempt 2; one it never reached
    # was handed back un-charged and ran once, as attempt 1.
    runs = (tmp_path / "job" / "runs.log").read_text().split()
    ok_attempts = {e["id"]: e["attempt"] for e in log if e["event"] == "item_succeeded"}
    assert ok_attempts == {f"k{n}": runs.count(f"k{n}") for n in range(40)}
    assert ok_attempts["k10"] == 2


def test_worker_that_always_dies_parks_its_item_and_only_it(mrpool, tmp_path):
    """No retries and a map that always SIGKILLs on one item: that item is parked, the rest succeed."""
    # Phase 1 + 2: 12 items, one always kills its worker.
    items = [{"id": n, "n": n, **({"die": True} if n == 4 else {})} for n in range(12)]
    job = write_job(
        tmp_path / "job", items, {"callable": "mapmod:kill_always"}, files={"mapmod.py": MAPMOD}
    )
    job_id = run_ok(mrpool, job, expect=1)

    # Phase 3: the DLQ holds item 4 with the death as its error; the others all succeeded.
    dlq = mrpool.dlq(job_id)
    assert [(e["id"], e["attempts"]) for e in dlq] == [(4, 1)]
    assert "worker died: signal 9" in dlq[0]["error"]
    assert [r["id"] for r in mrpool.results(job_id)] == [n for n in range(12) if n != 4]
    assert mrpool.status(job_id)["state"] == "completed_with_failures"


def test_outcomes_that_always_die_with_their_worker_end_in_the_dlq_not_a_loop(mrpool, tmp_path):
    """Every worker dies after running its attempts, before reporting them (a failpoint):
    each attempt counts, each item is run again, and after three lost outcomes it counts as
    failed -- the run ends (exit 1, all parked) instead of looping; resume then finishes."""
    # Phase 1: six items; every worker SIGKILLs itself at its first send of outcomes.
    items = [{"id": n, "n": n} for n in range(6)]
    job = write_job(
        tmp_path / "job", items, {"callable": "mapmod:square"}, files={"mapmod.py": MAPMOD}
    )
    r = mrpool.run(
        "run",
        str(job),
        "--job-id",
        "lost",
        env=mrpool.env(MRPOOL_FAILPOINTS="worker.before_send=kill"),
    )

    # Phase 2: it ended by itself; every item parked after three runs, as worker_died.
    assert r.returncode == 1, (r.returncode, r.stderr)
    dlq = mrpool.dlq("lost")
    assert sorted(e["id"] for e in dlq) == list(range(6))
    for entry in dlq:
        assert entry["attempts"] == 3, entry
        assert "before reporting the outcome (3 times" in entry["error"], entry

    # Phase 3: resume (no failpoint) runs the parked items once more, as attempt 4.
    r = mrpool.run("resume", "lost")
    assert r.returncode == 0, r.stderr
    assert mrpool.results("lost") == [{"id": n, "result": {"sq": n * n}} for n in range(6)]
    assert mrpool.dlq("lost") == []


def test_hung_command_is_killed_by_the_timeout_and_parked(mrpool, tmp_path):
    """``sleep 100`` under ``map.timeout: 0.5`` is killed, lands in the DLQ as timeout; others finish."""
    # Phase 1: three items; the middle one sleeps 100 s.
    items = [{"id": "fast-1", "s": "0"}, {"id": "hung", "s": "100"}, {"id": "fast-2", "s": "0"}]
    job = write_job(tmp_path / "job", items, {"command": ["sleep", "{item.s}"], "timeout": 0.5})

    # Phase 2: run; it must end long before the sleep would.
    started = time.monotonic()
    job_id = run_ok(mrpool, job, expect=1)
    assert time.monotonic() - started < 20

    # Phase 3: the hung item is in the DLQ with kind timeout; the others succeeded.
    dlq = mrpool.dlq(job_id)
    assert [(e["id"], e["kind"], e["attempts"]) for e in dlq] == [("hung", "timeout", 1)]
    assert "timed out" in dlq[0]["error"]
    assert [r["id"] for r in mrpool.results(job_id)] == ["fast-1", "fast-2"]
    # Phase 4: no `sleep 100` survives the job (the autouse fixture checks every tagged process).
    assert not [p for p in tagged_processes(mrpool.tag) if "100" in p.cmdline()]


def test_hung_callable_is_killed_by_the_timeout_each_attempt_counted(mrpool, tmp_path):
    """A callable stuck in ``sleep(100)`` is killed at the 0.3 s timeout, retried once, then parked."""
    # Phase 1: five items; one hangs; one retry allowed.
    items = [{"id": n, "n": n, **({"hang": True} if n == 2 else {})} for n in range(5)]
    job = write_job(
        tmp_path / "job",
        items,
        {"callable": "mapmod:hang", "timeout": 0.3, "retries": 1},
        files={"mapmod.py": MAPMOD},
    )

    # Phase 2: run; two timed-out attempts take about a second, not 200.
    started = time.monotonic()
    job_id = run_ok(mrpool, job, expect=1)
    assert time.monotonic() - started < 20
    assert (tmp_path / "job" / "hang.started").exists()

    # Phase 3: both attempts counted; kind timeout; the rest succeeded with their results.
    dlq = mrpool.dlq(job_id)
    assert [(e["id"], e["kind"], e["attempts"]) for e in dlq] == [(2, "timeout", 2)]
    assert mrpool.results(job_id) == [{"id": n, "result": n} for n in (0, 1, 3, 4)]


def test_what_a_map_command_left_running_in_the_background_never_outlives_its_attempt(
    mrpool, tmp_path
):
    """A background child dies with its attempt: when the command exits, or at its timeout."""
    # Phase 1: one command exits at once, leaving a child holding stdout; the other
    # also leaves a child but then runs past its timeout. Each child would create a
    # file a second later.
    job_dir = tmp_path / "job"
    items = [
        {"id": "exits", "script": "(sleep 1; touch survived-exits) & echo started"},
        {"id": "hangs", "script": "(sleep 1; touch survived-hangs) & sleep 30"},
    ]
    job = write_job(
        job_dir, items, {"command": ["sh", "-c", "{item.script}"], "timeout": 0.3}, workers=2
    )

    # Phase 2: run: the first succeeds (its command exited 0; the attempt ends there),
    # the second times out and is parked.
    job_id = run_ok(mrpool, job, expect=1)
    assert mrpool.results(job_id) == [{"id": "exits", "result": "started\n"}]
    assert [(e["id"], e["kind"]) for e in mrpool.dlq(job_id)] == [("hangs", "timeout")]

    # Phase 3: neither background child did anything after its attempt ended.
    time.sleep(1.5)
    assert not (job_dir / "survived-exits").exists()
    assert not (job_dir / "survived-hangs").exists()


# -- retries, backoff and the command protocol ---------------------------------------
FLAKY = textwrap.dedent(
    """
    import json, os, sys, time
    item = json.load(sys.stdin)
    attempt = int(os.environ["MRPOOL_ATTEMPT"])
    with open("side.log", "a") as log:
        log.write(json.dumps({"id": os.environ["MRPOOL_ITEM_ID"], "attempt": attempt, "t": time.time()}) + "\\n")
    if attempt < item["ok_at"]:
        sys.exit(f"not yet (attempt {attempt})")
    print(json.dumps({"attempt": attempt}))
    """
)


def test_retries_with_exponential_backoff_number_attempts_from_one(mrpool, tmp_path):
    """``retries: 2, backoff: 0.2``: attempts 1..3 in MRPOOL_ATTEMPT, gaps >= 0.2 s then >= 0.4 s."""
    # Phase 1: "a" succeeds on attempt 3, "b" never, "c" at once.
    items = [{"id": "a", "ok_at": 3}, {"id": "b", "ok_at": 99}, {"id": "c", "ok_at": 1}]
    job = write_job(
        tmp_path / "job",
        items,
        {"command": [PY, "flaky.py"], "retries": 2, "backoff": 0.2},
        files={"flaky.py": FLAKY},
    )

    # Phase 2: run: "b" ends in the DLQ, so exit 1.
    job_id = run_ok(mrpool, job, expect=1)

    # Phase 3: the side log shows the attempt numbers and the growing gaps.
    side = [json.loads(line) for line in (tmp_path / "job" / "side.log").read_text().splitlines()]
    attempts = {k: [e["attempt"] for e in side if e["id"] == k] for k in "abc"}
    assert attempts == {"a": [1, 2, 3], "b": [1, 2, 3], "c": [1]}
    for key in "ab":
        t = [e["t"] for e in side if e["id"] == key]
        assert t[1] - t[0] >= 0.2 and t[2] - t[1] >= 0.4, (key, t)

    # Phase 4: outcomes: "a" and "c" succeeded with the attempt that made it, "b" parked.
    assert mrpool.results(job_id) == [
        {"id": "a", "result": {"attempt": 3}},
        {"id": "c", "result": {"attempt": 1}},
    ]
    dlq = mrpool.dlq(job_id)
    assert [(e["id"], e["attempts"]) for e in dlq] == [("b", 3)]
    assert "exit status 1" in dlq[0]["error"] and "not yet (attempt 3)" in dlq[0]["error"]


ARGV = "import json, sys\nprint(json.dumps(sys.argv[1:]))\n"

HOSTILE = [
    "$(touch pwned)",
    "; rm -rf x",
    "`touch pwned`",
    "line1\nline2",
    "a b  c",
    "'single' \"double\" \\back",
    "$HOME *",
    "| touch pwned &",
    "{item.other}",
    "",
]


def test_item_values_reach_the_map_literally_as_one_argv_element(mrpool, tmp_path):
    """Shell metacharacters, newlines and placeholders in values arrive verbatim, one argument each."""
    # Phase 1: a map that echoes its argv; a file "x" that "; rm -rf x" would delete.
    items = [
        {"id": n, "v": v, "obj": {"k": [1, 2]}, "num": 7, "other": "LEAKED"}
        for n, v in enumerate(HOSTILE)
    ]
    argv = [PY, "argv.py", "{item.v}", "pre-{item.v}-post", "{item.obj}", "{item.num}"]
    job = write_job(
        tmp_path / "job", items, {"command": argv}, files={"argv.py": ARGV, "x": "keep"}
    )

    # Phase 2: run.
    job_id = run_ok(mrpool, job)

    # Phase 3: each value is exactly one argument, unchanged; non-strings as compact JSON.
    results = mrpool.results(job_id)
    assert [r["result"] for r in results] == [
        [v, f"pre-{v}-post", '{"k":[1,2]}', "7"] for v in HOSTILE
    ]

    # Phase 4: nothing was executed by a shell: no "pwned" anywhere, "x" still there.
    for where in (tmp_path / "job", REPO, mrpool.state_dir, Path.cwd()):
        assert not (where / "pwned").exists(), where
    assert (tmp_path / "job" / "x").read_text() == "keep"


def test_a_missing_item_key_fails_that_attempt_naming_the_key(mrpool, tmp_path):
    """``{item.path}`` on an item without ``path``: that item fails with a message naming ``path``."""
    # Phase 1: two items, the second lacks the key.
    items = [{"id": "has", "path": "a.txt"}, {"id": "lacks"}]
    job = write_job(tmp_path / "job", items, {"command": ["echo", "{item.path}"]})

    # Phase 2: run: exit 1 (one item parked).
    job_id = run_ok(mrpool, job, expect=1)

    # Phase 3: the other item ran (echo's non-JSON stdout is a text result); the message names the key.
    assert mrpool.results(job_id) == [{"id": "has", "result": "a.txt\n"}]
    dlq = mrpool.dlq(job_id)
    assert [e["id"] for e in dlq] == ["lacks"]
    assert "path" in dlq[0]["error"]


PROTO = textwrap.dedent(
    """
    import json, os, sys
    data = sys.stdin.read()
    item = json.loads(data)
    if item.get("plain"):
        print("plain text, not JSON")
    elif item.get("quiet"):
        pass  # no output at all
    else:
        names = ["MRPOOL_JOB_ID", "MRPOOL_ITEM_ID", "MRPOOL_ATTEMPT", "MRPOOL_ITEM"]
        print(json.dumps({"stdin": data, "cwd": os.getcwd(), "env": {n: os.environ.get(n) for n in names}}))
    """
)


def test_map_command_protocol_stdin_env_cwd_and_text_results(mrpool, tmp_path):
    """A map command gets the item on stdin and in MRPOOL_ITEM, its ids and attempt, the job dir as cwd."""
    # Phase 1: a string command (split like a shell would), run from a different cwd (the repo).
    items = [
        {"id": "p-1", "payload": [1, "two", {"three": 3.5}], "u": "é ünï"},
        {"id": 42, "plain": True},
        {"id": "quiet", "quiet": True},
    ]
    job = write_job(
        tmp_path / "job",
        items,
        {"command": f"{shlex.quote(PY)} proto.py"},
        files={"proto.py": PROTO},
    )

    # Phase 2: run.
    job_id = run_ok(mrpool, job, "--job-id", "proto")

    # Phase 3: the JSON result carries what the command saw.
    first, second, third = mrpool.results(job_id)
    seen = first["result"]
    assert json.loads(seen["stdin"]) == items[0]
    assert json.loads(seen["env"]["MRPOOL_ITEM"]) == items[0]
    assert seen["env"]["MRPOOL_JOB_ID"] == "proto"
    assert seen["env"]["MRPOOL_ITEM_ID"] == "p-1"
    assert seen["env"]["MRPOOL_ATTEMPT"] == "1"
    assert os.path.realpath(seen["cwd"]) == os.path.realpath(tmp_path / "job")

    # Phase 4: stdout that is not JSON becomes a text result, as printed; no stdout, "".
    assert second == {"id": 42, "result": "plain text, not JSON\n"}
    assert third == {"id": "quiet", "result": ""}


SEQ = textwrap.dedent(
    """
    import os, time
    me = os.environ["MRPOOL_ITEM_ID"]
    with open("side.log", "a") as log:
        log.write(f"start {me}\\n")
    time.sleep(0.02)
    with open("side.log", "a") as log:
        log.write(f"end {me}\\n")
    print(me)
    """
)


def test_one_worker_runs_items_strictly_one_after_another_in_input_order(mrpool, tmp_path):
    """``workers: 1``: each item starts after the previous one ended, in input order."""
    # Phase 1: eight items in a deliberately unsorted order.
    order = [5, 3, 8, 1, 7, 2, 6, 4]
    job = write_job(
        tmp_path / "job",
        [{"id": n} for n in order],
        {"command": [PY, "seq.py"]},
        workers=1,
        files={"seq.py": SEQ},
    )

    # Phase 2: run.
    job_id = run_ok(mrpool, job)

    # Phase 3: the side log is start/end pairs, never overlapping, in input order.
    lines = (tmp_path / "job" / "side.log").read_text().splitlines()
    assert lines == [f"{what} {n}" for n in order for what in ("start", "end")]
    assert mrpool.results(job_id) == [{"id": n, "result": n} for n in order]


def test_yaml_job_file_with_defaults_and_a_string_command(mrpool, tmp_path):
    """A YAML job file: input relative to it, name = file stem, workers = CPU count, shlex-split command."""
    # Phase 1: thumbs.yaml in one dir, its input in a subdir; no name, no workers.
    job_dir = tmp_path / "proj"
    (job_dir / "data").mkdir(parents=True)
    (job_dir / "data" / "items.jsonl").write_text(
        '{"id": "a", "w": "x y"}\n{"id": "b", "w": "z"}\n'
    )
    (job_dir / "thumbs.yaml").write_text(
        "input: data/items.jsonl\nmap:\n  command: 'echo \"word: {item.w}\" {item.id}'\n"
    )

    # Phase 2: run; the generated id is derived from the name.
    job_id = run_ok(mrpool, job_dir / "thumbs.yaml")
    assert job_id.startswith("thumbs")
    assert mrpool.status(job_id)["name"] == "thumbs"

    # Phase 3: the command was split like a shell would, then filled per element.
    assert mrpool.results(job_id) == [
        {"id": "a", "result": "word: x y a\n"},
        {"id": "b", "result": "word: z b\n"},
    ]
    started = [e for e in events(mrpool, job_id) if e["event"] == "worker_started"]
    assert len(started) == os.cpu_count()


# -- identity, duplicates and inputs -------------------------------------------------
@pytest.mark.parametrize("id_field", [None, "key"])
def test_duplicate_ids_collapse_first_wins_and_7_equals_string_7(mrpool, tmp_path, id_field):
    """Items with ids 7 and "7" are one; the first wins; ``duplicates_in_input`` counts the rest."""
    # Phase 1: five input items, three identities (by "id" by default, or by id_field "key").
    name = id_field or "id"
    raw = [(7, "first"), ("7", "second"), ("b", "b1"), ("b", "b2"), (8, "c")]
    items = [{name: i, "v": v} for i, v in raw]
    extra = {"id_field": id_field} if id_field else None
    job = write_job(
        tmp_path / "job",
        items,
        {"callable": "mapmod:value"},
        extra=extra,
        files={"mapmod.py": MAPMOD},
    )

    # Phase 2: run.
    job_id = run_ok(mrpool, job)

    # Phase 3: three items, two duplicates; the first occurrence's data and id were used.
    status = mrpool.status(job_id)
    assert (status["total"], status["succeeded"], status["duplicates_in_input"]) == (3, 3, 2)
    assert mrpool.results(job_id) == [
        {"id": 7, "result": "first"},
        {"id": "b", "result": "b1"},
        {"id": 8, "result": "c"},
    ]


def test_items_without_ids_get_content_hash_identities(mrpool, tmp_path):
    """Without an "id" on every item, identity is a hash of canonical JSON (key order ignored)."""
    # Phase 1: mixed items (one has an "id", so the default falls back to content hashes).
    items = ["a", "b", {"x": 1, "y": 2}, {"y": 2, "x": 1}, "a", 5, {"id": 1}]
    job = write_job(
        tmp_path / "job", items, {"callable": "mapmod:identity"}, files={"mapmod.py": MAPMOD}
    )

    # Phase 2: run.
    job_id = run_ok(mrpool, job)

    # Phase 3: identical content collapsed (2 duplicates), ids are distinct hash strings.
    status = mrpool.status(job_id)
    assert (status["total"], status["duplicates_in_input"]) == (5, 2)
    results = mrpool.results(job_id)
    assert [r["result"] for r in results] == ["a", "b", {"x": 1, "y": 2}, 5, {"id": 1}]
    ids = [r["id"] for r in results]
    assert len(set(ids)) == 5
    assert all(isinstance(i, str) and len(i) >= 16 for i in ids)
    assert 1 not in ids


@pytest.mark.parametrize(
    "document, json_path",
    [
        ([{"id": "a", "n": 2}, {"id": "b", "n": 3}, {"id": "c", "n": 4}], None),
        (
            {
                "meta": {"n": 99},
                "items": [{"id": "a", "n": 2}, {"id": "b", "n": 3}, {"id": "c", "n": 4}],
            },
            "$.items[*]",
        ),
    ],
    ids=["array", "json_path"],
)
def test_json_input_with_and_without_json_path(mrpool, tmp_path, document, json_path):
    """A ``.json`` input: the document itself as the array, or the items ``json_path`` selects."""
    # Phase 1: a .json input document instead of .jsonl.
    extra: dict[str, Any] = {"input": "data.json"}
    if json_path:
        extra["json_path"] = json_path
    job = write_job(
        tmp_path / "job",
        [],
        {"callable": "mapmod:square"},
        extra=extra,
        files={"mapmod.py": MAPMOD, "data.json": json.dumps(document)},
    )

    # Phase 2 + 3: run; the three items' results in document order.
    job_id = run_ok(mrpool, job)
    assert mrpool.results(job_id) == [
        {"id": "a", "result": {"sq": 4}},
        {"id": "b", "result": {"sq": 9}},
        {"id": "c", "result": {"sq": 16}},
    ]


@pytest.mark.parametrize("in_file, flag", [(3, 1), (1, 3)])
def test_workers_option_overrides_the_job_file(mrpool, tmp_path, in_file, flag):
    """``--workers N`` starts exactly N workers whatever the job file says."""
    # Phase 1: a job file asking for ``in_file`` workers.
    items = [{"id": n} for n in range(12)]
    job = write_job(
        tmp_path / "job",
        items,
        {"callable": "mapmod:pid"},
        workers=in_file,
        files={"mapmod.py": MAPMOD},
    )

    # Phase 2: run with the override.
    job_id = run_ok(mrpool, job, "--workers", str(flag))

    # Phase 3: the event log shows ``flag`` workers started; results come from at most that many.
    log = events(mrpool, job_id)
    assert len([e for e in log if e["event"] == "worker_started"]) == flag
    pids = {r["result"] for r in mrpool.results(job_id)}
    assert 1 <= len(pids) <= flag


# -- the reduce step -----------------------------------------------------------------
REDUCE_CMD = textwrap.dedent(
    """
    import json, sys
    rows = [json.loads(line) for line in sys.stdin if line.strip()]
    print(json.dumps({"count": len(rows), "sum": sum(r["sq"] for r in rows), "order": [r["sq"] for r in rows]}))
    """
)


@pytest.mark.parametrize("kind", ["callable", "command"])
def test_reduce_step_output_is_printed_by_results_reduce(mrpool, tmp_path, kind):
    """A reduce callable / command gets the successful results in input order; ``results --reduce`` prints its output."""
    # Phase 1: six items; the reduce sums the squares and keeps their order.
    order = [3, 1, 4, 5, 9, 2]
    reduce = {"callable": "mapmod:total"} if kind == "callable" else {"command": [PY, "reduce.py"]}
    job = write_job(
        tmp_path / "job",
        [{"id": n, "n": n} for n in order],
        {"callable": "mapmod:square"},
        extra={"reduce": reduce},
        files={"mapmod.py": MAPMOD, "reduce.py": REDUCE_CMD},
    )

    # Phase 2: run; exit 0 needs the reduce to have succeeded too.
    job_id = run_ok(mrpool, job)

    # Phase 3: the reduce output.
    r = mrpool.run("results", job_id, "--reduce")
    assert r.returncode == 0, r.stderr
    output = json.loads(r.stdout)
    assert output["sum"] == sum(n * n for n in order)
    assert output["order"] == [n * n for n in order]
    if kind == "command":
        assert output["count"] == len(order)


def test_failing_reduce_makes_the_run_exit_1(mrpool, tmp_path):
    """A reduce command that fails: every item succeeded, but the run exits 1 and says why."""
    # Phase 1 + 2: a reduce that exits 3.
    job = write_job(
        tmp_path / "job",
        [{"id": n, "n": n} for n in range(3)],
        {"callable": "mapmod:square"},
        extra={"reduce": {"command": [PY, "-c", "import sys; sys.exit('reduce broke')"]}},
        files={"mapmod.py": MAPMOD},
    )
    r = mrpool.run("run", str(job))
    assert r.returncode == 1, r.stderr
    assert "reduce broke" in r.stderr
    job_id = r.stdout.splitlines()[0]

    # Phase 3: the map results are all there; ``results --reduce`` reports the failure, not output.
    assert len(mrpool.results(job_id)) == 3
    r = mrpool.run("results", job_id, "--reduce")
    assert r.returncode != 0 and r.stdout == ""
    assert "reduce broke" in r.stderr


# -- interruption --------------------------------------------------------------------
BLOCK = textwrap.dedent(
    """
    import json, os, time
    from pathlib import Path
    me = os.environ["MRPOOL_ITEM_ID"]
    Path(f"started-{me}").write_text("")
    deadline = time.monotonic() + 60
    while not Path("go").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    print(json.dumps({"attempt": int(os.environ["MRPOOL_ATTEMPT"])}))
    """
)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_sigint_or_sigterm_exits_130_interrupted_and_resume_finishes(mrpool, tmp_path, sig):
    """Ctrl-C (SIGINT to the group) or SIGTERM (to the supervisor): exit 130, ``interrupted``, resume finishes."""
    # Phase 1: four items that block until a "go" file exists.
    job_dir = tmp_path / "job"
    job = write_job(
        job_dir,
        [{"id": n} for n in range(4)],
        {"command": [PY, "block.py"]},
        files={"block.py": BLOCK},
    )
    proc = mrpool.start("run", str(job), "--job-id", "intr")
    try:
        # Phase 2: wait until both workers hold an item, then signal.
        wait_for(lambda: len(list(job_dir.glob("started-*"))) >= 2, what="two items running")
        # Both workers are blocked, so exactly these two attempts are in flight.
        cut_short = {int(p.name.split("-")[1]) for p in job_dir.glob("started-*")}
        assert len(cut_short) == 2
        running = mrpool.status("intr")
        assert running["state"] == "running" and running["lock"]["pid"] == proc.pid
        if sig == signal.SIGINT:
            os.killpg(proc.pid, sig)  # what a terminal's Ctrl-C does
        else:
            os.kill(proc.pid, sig)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == 130, err
    assert b"Traceback" not in err
    assert out.decode().splitlines()[0] == "intr"
    assert b"mrpool resume intr" in err

    # Phase 3: saved as interrupted, unlocked; nothing succeeded, and our own signal parked nothing.
    status = mrpool.status("intr")
    assert status["state"] == "interrupted" and status["lock"] is None
    assert (status["total"], status["succeeded"], status["dlq"]) == (4, 0, 0)
    assert (
        status["total"]
        == status["succeeded"] + status["dlq"] + status["failed"] + status["pending"]
    )

    # Phase 4: resume (with "go" in place) finishes every item, one result per id.
    (job_dir / "go").write_text("")
    r = mrpool.run("resume", "intr")
    assert r.returncode == 0, r.stderr
    assert mrpool.status("intr")["state"] == "completed"
    # The two attempts cut short still count: their items ran again as attempt 2 (cumulative).
    assert mrpool.results("intr") == [
        {"id": n, "result": {"attempt": 2 if n in cut_short else 1}} for n in range(4)
    ]


# -- the Python API ------------------------------------------------------------------
API_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from mrpool import api

    state_dir, base_dir = sys.argv[1], sys.argv[2]
    spec = {"name": "apijob", "input": "items.jsonl", "workers": 2, "map": {"callable": "mapmod:square"}}
    created = []
    report = api.run_job(spec, job_id="api-1", state_dir=state_dir, base_dir=base_dir, on_created=created.append)
    status = api.job_status("api-1", state_dir=state_dir)
    rows = list(api.iter_results("api-1", state_dir=state_dir))
    print(json.dumps({"exit_code": report.exit_code, "state": report.state, "created": created,
                      "status": status, "rows": rows}))
    """
)


def run_api_script(mrpool, tmp_path, source: str, job_dir) -> Any:
    """Run ``source`` as a script of its own (workers are forked from it) with the state
    dir and job dir as arguments; return the JSON its last line printed."""
    script = tmp_path / "use_api.py"
    script.write_text(source)
    r = subprocess.run(
        [PY, str(script), str(mrpool.state_dir), str(job_dir)],
        env=mrpool.env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.splitlines()[-1])


def test_python_api_runs_a_spec_dict_and_reads_status_and_results(mrpool, tmp_path):
    """``api.run_job`` with a spec dict, then ``job_status`` and ``iter_results``, in one Python process."""
    # Phase 1: the job's files, and a script using the API (its own process: workers are forked).
    job_dir = tmp_path / "job"
    write_job(
        job_dir,
        [{"id": n, "n": n} for n in range(20)],
        {"callable": "mapmod:square"},
        files={"mapmod.py": MAPMOD},
    )

    # Phase 2: run the script.
    out = run_api_script(mrpool, tmp_path, API_SCRIPT, job_dir)

    # Phase 3: what the API returned.
    assert (out["exit_code"], out["state"], out["created"]) == (0, "completed", ["api-1"])
    status = out["status"]
    assert (status["job_id"], status["state"], status["total"], status["succeeded"]) == (
        "api-1",
        "completed",
        20,
        20,
    )
    assert status["lock"] is None
    assert out["rows"] == [{"id": n, "result": {"sq": n * n}} for n in range(20)]

    # Phase 4: the CLI sees the same job in the same state dir.
    assert mrpool.results("api-1") == out["rows"]


GC_SCRIPT = textwrap.dedent(
    """
    import gc, json, sys
    from mrpool import api

    state_dir, base_dir = sys.argv[1], sys.argv[2]
    seen = []
    for n, threshold in enumerate([(1234, 11, 12), (0, 10, 10)]):
        gc.set_threshold(*threshold)
        spec = {"input": "items.jsonl", "workers": 2, "map": {"callable": "gcmod:threshold"},
                "reduce": {"callable": "gcmod:first"}}
        report = api.run_job(spec, job_id=f"gc-{n}", state_dir=state_dir, base_dir=base_dir)
        results = [row["result"] for row in api.iter_results(f"gc-{n}", state_dir=state_dir)]
        seen.append({"after": list(gc.get_threshold()), "map": results,
                     "reduce": report.reduce["output"], "exit": report.exit_code})
    print(json.dumps(seen))
    """
)
GCMOD = textwrap.dedent(
    """
    import gc

    def threshold(item):
        return list(gc.get_threshold())

    def first(results):
        return list(gc.get_threshold())
    """
)


def test_the_api_leaves_the_callers_gc_settings_and_user_code_runs_under_them(mrpool, tmp_path):
    """mrpool collects garbage less often in its own bulk loops; the caller's setting is back
    afterwards, and the map and reduce steps (user code) run under the caller's setting."""
    # Phase 1: a job whose map and reduce report the collector threshold they run under.
    job_dir = tmp_path / "job"
    write_job(
        job_dir,
        [{"id": n} for n in range(30)],
        {"callable": "gcmod:threshold"},
        files={"gcmod.py": GCMOD},
    )

    # Phase 2: run it in-process twice: a custom threshold, and automatic collection off.
    custom, disabled = run_api_script(mrpool, tmp_path, GC_SCRIPT, job_dir)

    # Phase 3: each time, the caller's setting afterwards, and in every worker and the reduce.
    for seen, threshold in ((custom, [1234, 11, 12]), (disabled, [0, 10, 10])):
        assert seen["exit"] == 0
        assert seen["after"] == threshold
        assert seen["map"] == [threshold] * 30
        assert seen["reduce"] == threshold


def test_a_nul_byte_in_an_argv_value_fails_the_item_not_the_worker(mrpool, tmp_path):
    """A value with a NUL byte cannot be an argument: that attempt fails with a clear message; no crash."""
    # Phase 1: one item whose placeholder value holds a NUL byte, two plain ones.
    items = [{"id": 1, "v": "ok"}, {"id": 2, "v": "a\u0000b"}, {"id": 3, "v": "fine"}]
    job = write_job(tmp_path / "job", items, {"command": ["echo", "{item.v}"]})

    # Phase 2: run: exit 1, and no worker traceback spilled onto the user's terminal.
    job_id = run_ok(mrpool, job, expect=1)

    # Phase 3: only item 2 is parked, with a message about the argument, not a "worker died".
    dlq = mrpool.dlq(job_id)
    assert [e["id"] for e in dlq] == [2]
    assert "null byte" in dlq[0]["error"] and "worker died" not in dlq[0]["error"]
    assert mrpool.results(job_id) == [{"id": 1, "result": "ok\n"}, {"id": 3, "result": "fine\n"}]
    assert not [e for e in events(mrpool, job_id) if e["event"] == "worker_died"]


def test_package_exports_exactly_the_api():
    """``mrpool.<name>`` serves every name of ``mrpool.api.__all__`` (and nothing stale)."""
    import mrpool
    import mrpool.api

    assert set(mrpool.API_NAMES) == set(mrpool.api.__all__)
    assert all(getattr(mrpool, name) is getattr(mrpool.api, name) for name in mrpool.API_NAMES)


@pytest.mark.skipif(
    len(os.sched_getaffinity(0)) < 2, reason="the input is validated in parts only with 2+ cores"
)
def test_sigkill_during_a_parallel_ingest_leaves_no_job_and_no_helper(mrpool, tmp_path):
    """A large input is validated by forked helpers; SIGKILL of ``run`` mid-ingest leaves
    no job (nothing existed yet), the helpers stop on their own (the fixture checks
    that no process outlives the test), and the same run then succeeds."""
    n = 600_000
    job_dir = tmp_path / "job"
    job_file = write_job(
        job_dir, [], {"callable": "m:f"}, files={"m.py": "def f(item):\n    return None\n"}
    )
    (job_dir / "items.jsonl").write_bytes(
        b"".join(b'{"id": %d, "pad": "xxxxxxxxxxxx"}\n' % i for i in range(n))
    )
    proc = mrpool.start("run", str(job_file), "--job-id", "big")
    supervisor = psutil.Process(proc.pid)
    wait_for(supervisor.children, timeout=30, interval=0.002, what="an ingest helper")
    assert not mrpool.job_dir("big").exists()  # still validating
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not mrpool.job_dir("big").exists()
    r = mrpool.run("run", str(job_file), "--job-id", "big", timeout=120)
    assert r.returncode == 0, r.stderr
    status = mrpool.status("big")
    assert (status["total"], status["succeeded"]) == (n, n)


def test_a_map_command_is_looked_up_on_path_once_yet_a_vanished_one_is_found_again(
    mrpool, tmp_path
):
    """Workers remember where a command was found on PATH (as a shell does). When that
    file goes away mid-run, the next attempt searches PATH again, as it would have
    without the cache: here it finds the second ``tool`` and every item succeeds."""
    first, second = tmp_path / "bin1", tmp_path / "bin2"
    for directory, body in (
        (first, 'printf first\nif [ "$MRPOOL_ITEM_ID" = 3 ]; then rm -f "$0"; fi\n'),
        (second, "printf second\n"),
    ):
        directory.mkdir()
        (directory / "tool").write_text("#!/bin/sh\n" + body)
        (directory / "tool").chmod(0o755)
    job = write_job(
        tmp_path / "job", [{"id": i} for i in range(8)], {"command": ["tool"]}, workers=1
    )
    env = mrpool.env(PATH=f"{first}:{second}:{os.environ['PATH']}")
    r = mrpool.run("run", str(job), "--job-id", "path", env=env)
    assert r.returncode == 0, r.stderr
    by_id = {row["id"]: row["result"] for row in mrpool.results("path")}
    assert by_id == {i: "first" if i <= 3 else "second" for i in range(8)}


def test_printed_next_steps_paste_as_is_with_a_non_default_state_dir(mrpool, tmp_path):
    """After ``run --state-dir DIR`` the hints the summary prints (``dlq list``, ``dlq
    retry``) name DIR, so pasting them into a shell works instead of 'no such job'."""
    state = tmp_path / "my state"  # a space: the hint must quote it
    job = write_job(tmp_path / "src", [{"id": 1}, {"id": 2, "bad": True}], {"callable": "m:f"},
                    files={"m.py": "def f(item):\n    assert 'bad' not in item\n    return 1\n"})  # fmt: skip
    env = mrpool.env()  # tagged for the leak check; the state dir comes from the option alone
    env.pop("MRPOOL_HOME")
    r = subprocess.run([PY, "-m", "mrpool", "run", str(job), "--job-id", "hints", "--state-dir",
                        str(state)], capture_output=True, text=True, env=env, cwd=str(REPO))  # fmt: skip
    assert r.returncode == 1, r.stderr
    line = next(ln for ln in r.stderr.splitlines() if ln.startswith("inspect with: "))
    for hint in line.removeprefix("inspect with: ").split("  |  retry with: "):
        pasted = subprocess.run(hint.replace("mrpool", f"{PY} -m mrpool", 1), shell=True,
                                capture_output=True, text=True, env=env, cwd=str(REPO))  # fmt: skip
        assert pasted.returncode in (0, 1), (hint, pasted.stderr)  # 4 would be "no such job"


@pytest.mark.parametrize("closed", ["stdout", "stderr", "both"])
def test_a_reader_that_went_away_neither_stops_the_run_nor_hides_its_exit_code(
    mrpool, tmp_path, closed
):
    """``mrpool run job.yaml | head -c0`` or ``2>&1 | head -1``: the job id and the summary
    have nowhere to go, but the run is the product. Every item still runs, and the exit
    code still says an item was parked (1), not 0."""
    items = [{"id": n, "n": n, **({"die": True} if n == 3 else {})} for n in range(20)]
    job = write_job(
        tmp_path / "job", items, {"callable": "mapmod:kill_always"}, files={"mapmod.py": MAPMOD}
    )
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write to the pipe fails with EPIPE from the start
    streams = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    for name in ("stdout", "stderr") if closed == "both" else (closed,):
        streams[name] = write_end
    proc = mrpool.start("run", str(job), "--job-id", "gone", "--json", **streams)
    os.close(write_end)
    assert proc.wait(timeout=60) == 1
    status = mrpool.status("gone")
    assert (status["succeeded"], status["dlq"], status["state"]) == (
        19,
        1,
        "completed_with_failures",
    )
