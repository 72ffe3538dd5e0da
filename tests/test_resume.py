"""Issue 4, ``resume``: exactly the remaining items (pending + failed + DLQ), once each.

Everything runs through real processes: the real CLI in subprocesses, maps in
forked workers, SIGKILL of a whole process group, of the supervisor alone or of
one worker. ``mrpool.api.plan_resume`` is called in-process only to inspect a
plan (it runs nothing). Maps write a *side log* -- one line per attempt as it
starts -- which is the ground truth of what really ran.

The test map (``testmap.py``, below) is steered by marker files in the job
file's directory, so every scenario is ordered by state, never by sleeps:

* ``fail-ID``   -- the attempt fails (the "cause" a test later fixes);
* ``block-ID``  -- the attempt blocks while the file exists (holds a run busy so a
  test can SIGKILL it at a known point);
* ``poison-ID`` -- the attempt SIGKILLs its supervisor (after the delay the file holds).

What is proved: (1) the seed lifecycle -- 10 items, 1-3 ok, 4-6 parked, killed
before 7-10 ran -- plans exactly 7 items and resume runs exactly those; (2) an item
both in the DLQ and in flight at a crash is planned once, as ``pending``; (3) SIGKILL
at random instants loses nothing, duplicates nothing and never re-runs a recorded
success (the crash trials of ``scripts/crash_stress.py``); (4) the resume options
and edge cases; (5) a poison item ends in the DLQ as ``crash_loop``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import sys
from collections import Counter
from pathlib import Path

import pytest
from conftest import PY, REPO, journal_records, kill_group, wait_for, write_job

from mrpool import api
from mrpool.store import JobStore

pytestmark = pytest.mark.timeout(240)

CRASH_TRIALS = 20  # SIGKILL of the group / the supervisor at random instants
WORKER_TRIALS = 4  # SIGKILL of one worker at a random instant

TEST_MAP = '''\
"""Test map: logs each attempt, then fails / blocks / kills its supervisor per marker files."""
import os
import signal
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def work(item):
    key = item["id"]
    with open(HERE / "side.log", "a") as log:
        log.write(f"{key}\\n")
    poison = HERE / f"poison-{key}"
    if poison.exists():
        time.sleep(float(poison.read_text() or 0))
        os.kill(os.getppid(), signal.SIGKILL)
        time.sleep(30)  # the worker dies with its supervisor
    if (HERE / f"fail-{key}").exists():
        raise RuntimeError(f"item {key}: input not ready")
    while (HERE / f"block-{key}").exists():
        time.sleep(0.005)
    time.sleep(item.get("sleep", 0))
    return {"double": key * 2}
'''

# A command map that logs "ID ATTEMPT" (MRPOOL_ATTEMPT) and fails while fail-ID exists.
ATTEMPT_COMMAND = [
    "sh",
    "-c",
    'echo "$MRPOOL_ITEM_ID $MRPOOL_ATTEMPT" >> attempts.log; test ! -e "fail-$MRPOOL_ITEM_ID"',
]


# -- helpers -----------------------------------------------------------------------
def make_job(directory: Path, items: list, workers: int = 1, **map_options) -> Path:
    """A job of ``items`` whose map is ``testmap:work`` (or ``map_options['command']``)."""
    step = {"callable": "testmap:work", **map_options}
    if "command" in step:
        del step["callable"]
    return write_job(directory, items, step, workers=workers, files={"testmap.py": TEST_MAP})


def kill_when(proc, predicate, what: str = "condition") -> None:
    """SIGKILL ``proc``'s process group once ``predicate()`` holds (also when waiting fails)."""
    try:
        wait_for(predicate, what=what)
    finally:
        kill_group(proc)


def touch(directory: Path, *names: str, text: str = "") -> None:
    for name in names:
        (directory / name).write_text(text)


def remove(directory: Path, *names: str) -> None:
    for name in names:
        (directory / name).unlink()


def side_log(directory: Path) -> list[int]:
    """Ids in the order their attempts started."""
    try:
        return [int(line) for line in (directory / "side.log").read_text().split()]
    except FileNotFoundError:
        return []


def attempts_log(directory: Path, item_id: str) -> list[int]:
    """``MRPOOL_ATTEMPT`` of each attempt of ``item_id``, in order."""
    lines = (directory / "attempts.log").read_text().splitlines()
    return [int(a) for i, a in (line.split() for line in lines) if i == item_id]


def settled(job_dir: Path) -> dict[int, str]:
    """Index -> "ok" / "dlq" / "failed" for every outcome in the journal (retries excluded)."""
    done: dict[int, str] = {}
    for record in journal_records(job_dir):
        if record["k"] == "ok":
            done.update((entry[0], "ok") for entry in record["b"])
        elif record["k"] == "f" and record["next"] != "retry":
            done[record["i"]] = record["next"]
    return done


def records_since_last_open(job_dir: Path) -> list[dict]:
    records = journal_records(job_dir)
    opens = [n for n, r in enumerate(records) if r["k"] == "open"]
    return records[opens[-1] :] if opens else []


def result_ids(mrpool, job_id: str) -> list:
    return [row["id"] for row in api.iter_results(job_id, state_dir=mrpool.state_dir)]


def status_of(mrpool, job_id: str) -> dict:
    """``status --json``, in-process (the seed test checks the CLI itself)."""
    return api.job_status(job_id, state_dir=mrpool.state_dir)


def dlq_of(mrpool, job_id: str) -> list[dict]:
    """``dlq list --json``, in-process."""
    return [entry.brief() for entry in api.open_dlq(job_id, state_dir=mrpool.state_dir).entries()]


def counts(status: dict) -> tuple:
    return tuple(status[k] for k in ("state", "total", "succeeded", "dlq", "failed", "pending"))


def load_crash_stress():
    """``scripts/crash_stress.py`` as a module: the suite runs the same trials as the script."""
    spec = importlib.util.spec_from_file_location(
        "crash_stress", REPO / "scripts" / "crash_stress.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("crash_stress", module)
    spec.loader.exec_module(module)
    return module


# -- (1) the seed lifecycle ----------------------------------------------------------
def test_seed_lifecycle_plans_exactly_seven_items_and_resume_runs_exactly_those(mrpool, tmp_path):
    """10 items: 1-3 ok, 4-6 parked, killed before 7-10 ran -> plan of 7 -> resume runs those 7."""
    job = tmp_path / "seed"
    job_file = make_job(job, [{"id": i} for i in range(1, 11)])
    touch(job, "fail-4", "fail-5", "fail-6", "block-7")

    # Phase 1: run with one worker; 1-3 succeed, 4-6 fail into the DLQ, 7 blocks.
    proc = mrpool.start("run", str(job_file), "--job-id", "seed")
    job_dir = mrpool.job_dir("seed")
    kill_when(
        proc,
        lambda: len(settled(job_dir)) == 6 and 7 in side_log(job),
        what="items 1-6 settled and item 7 started",
    )
    assert settled(job_dir) == {0: "ok", 1: "ok", 2: "ok", 3: "dlq", 4: "dlq", 5: "dlq"}
    assert side_log(job) == [1, 2, 3, 4, 5, 6, 7]  # 8-10 never started
    assert counts(mrpool.status("seed")) == ("interrupted", 10, 3, 3, 0, 4)

    # Phase 2: the plan, inspected without running anything.
    journal_before = (job_dir / "journal.log").read_bytes()
    plan = api.plan_resume("seed", state_dir=mrpool.state_dir)
    planned = [(json.loads(line.split(b"\t")[0]), source) for _, source, line in plan.items()]
    assert sorted(planned) == [(4, "dlq"), (5, "dlq"), (6, "dlq")] + [
        (i, "pending") for i in (7, 8, 9, 10)
    ]
    assert plan.counts == {"pending": 4, "failed": 0, "dlq": 3}
    assert (plan.total, plan.duplicates, plan.poison) == (7, 0, [])
    assert (job_dir / "journal.log").read_bytes() == journal_before  # planning wrote nothing
    assert side_log(job) == [1, 2, 3, 4, 5, 6, 7]  # ... and ran nothing

    # Phase 3: fix the cause, resume: exactly those 7 run, once each, in input order.
    remove(job, "fail-4", "fail-5", "fail-6", "block-7")
    r = mrpool.run("resume", "seed", "--json")
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["plan"] == {
        "pending": 4,
        "failed": 0,
        "dlq": 3,
        "duplicates": 0,
        "poison_parked": 0,
        "total": 7,
    }
    assert "plan: 7 item(s) to run (4 pending, 0 failed, 3 from the DLQ" in r.stderr
    plan_events = [rec for rec in journal_records(job_dir) if rec["k"] == "plan"]
    assert (plan_events[-1]["pending"], plan_events[-1]["dlq"], plan_events[-1]["total"]) == (
        4,
        3,
        7,
    )
    assert side_log(job)[7:] == [4, 5, 6, 7, 8, 9, 10]

    # Phase 4: the end state: everything succeeded, DLQ empty, one result per id.
    assert counts(mrpool.status("seed")) == ("completed", 10, 10, 0, 0, 0)
    assert mrpool.dlq("seed") == []
    results = mrpool.results("seed")
    assert [row["id"] for row in results] == list(range(1, 11))
    assert [row["result"]["double"] for row in results] == [2 * i for i in range(1, 11)]


# -- (2) pending and in the DLQ at once ------------------------------------------------
def test_item_in_the_dlq_and_in_flight_at_a_crash_is_planned_once_as_pending(mrpool, tmp_path):
    """A DLQ item whose ``dlq retry`` was SIGKILLed mid-attempt: planned once, tagged pending."""
    job = tmp_path / "dup"
    job_file = make_job(job, [{"id": 1}, {"id": 2}, {"id": 3}])
    touch(job, "fail-2")

    # Phase 1: item 2 is parked in the DLQ.
    r = mrpool.run("run", str(job_file), "--job-id", "dup")
    assert r.returncode == 1, r.stderr
    assert [e["id"] for e in dlq_of(mrpool, "dup")] == [2]

    # Phase 2: `dlq retry` is SIGKILLed while item 2 is in flight (open attempt + status dlq).
    remove(job, "fail-2")
    touch(job, "block-2")
    proc = mrpool.start("dlq", "retry", "dup")
    job_dir = mrpool.job_dir("dup")
    kill_when(
        proc,
        lambda: (
            side_log(job).count(2) == 2
            and any(r["k"] == "s" for r in records_since_last_open(job_dir))
        ),
        what="the retry of item 2 in flight",
    )
    assert [e["id"] for e in dlq_of(mrpool, "dup")] == [2]  # only a success takes it out
    status = status_of(mrpool, "dup")
    assert status["succeeded"] == 2
    assert status["total"] == sum(status[k] for k in ("succeeded", "dlq", "failed", "pending"))

    # Phase 3: the plan holds it once, as pending, one duplicate collapsed.
    plan = api.plan_resume("dup", state_dir=mrpool.state_dir)
    items = list(plan.items())
    assert [(index, source) for index, source, _ in items] == [(1, "pending")]
    assert json.loads(items[0][2].split(b"\t")[1]) == {"id": 2}
    assert plan.counts == {"pending": 1, "failed": 0, "dlq": 0}
    assert plan.duplicates == 1

    # Phase 4: resume runs it exactly once; it leaves the DLQ.
    remove(job, "block-2")
    before = len(side_log(job))
    r = mrpool.run("resume", "dup", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["plan"]["duplicates"] == 1
    assert side_log(job)[before:] == [2]
    assert counts(status_of(mrpool, "dup")) == ("completed", 3, 3, 0, 0, 0)
    assert dlq_of(mrpool, "dup") == []
    assert result_ids(mrpool, "dup") == [1, 2, 3]


# -- (3) random SIGKILLs -------------------------------------------------------------
def _crash_seed() -> int:
    return int(os.environ.get("MRPOOL_CRASH_SEED") or random.SystemRandom().randrange(2**32))


def test_sigkill_at_random_instants_loses_nothing_and_reruns_no_recorded_success(mrpool, tmp_path):
    """20 trials: SIGKILL the group (or the supervisor alone) at random instants, resume to the end."""
    crash_stress = load_crash_stress()
    seed = _crash_seed()
    rng = random.Random(seed)
    results = []
    for n in range(CRASH_TRIALS):
        kind = "supervisor" if n % 4 == 3 else "group"
        results.append(
            crash_stress.run_trial(tmp_path / f"trial-{n}", f"trial-{n}", mrpool.env(), rng, kind)
        )
    summary = crash_stress.summarise(results)
    failed = [(n, r) for n, r in enumerate(results) if not r.ok]
    assert not failed, f"seed {seed} (MRPOOL_CRASH_SEED): {summary}; failed trials: {failed}"
    assert (summary["lost"], summary["duplicated"], summary["re_run"]) == (0, 0, 0)
    # The trials must really have crashed mid-job, else they prove nothing.
    kills = summary["kills_by_kind"]
    assert kills["group"] + kills["supervisor"] >= CRASH_TRIALS, summary
    assert summary["interrupted"] >= CRASH_TRIALS // 2, summary


def test_sigkill_of_one_worker_mid_run_and_the_same_run_completes(mrpool, tmp_path):
    """4 trials: SIGKILL one worker at a random instant; that run still completes (exit 0)."""
    crash_stress = load_crash_stress()
    seed = _crash_seed()
    rng = random.Random(seed)
    results = [
        crash_stress.run_trial(tmp_path / f"w-{n}", f"w-{n}", mrpool.env(), rng, "worker")
        for n in range(WORKER_TRIALS)
    ]
    summary = crash_stress.summarise(results)
    failed = [(n, r) for n, r in enumerate(results) if not r.ok]
    assert not failed, f"seed {seed} (MRPOOL_CRASH_SEED): {summary}; failed trials: {failed}"
    assert summary["kills_by_kind"]["worker"] >= WORKER_TRIALS - 1, summary
    assert summary["sessions"] == WORKER_TRIALS  # no resume was needed
    # At least one kill hit a worker mid-item: attributed as worker_died and retried.
    assert summary["worker_died_retried"] >= 1, summary


@pytest.mark.stress
@pytest.mark.timeout(3600)
def test_crash_stress_script_many_trials(mrpool):
    """The stress script with 300 trials: lost / duplicated / re-run all zero (opt-in)."""
    import subprocess

    r = subprocess.run(
        [PY, str(REPO / "scripts" / "crash_stress.py"), "--trials", "300"],
        env=mrpool.env(),
        capture_output=True,
        text=True,
        timeout=3500,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "lost: 0" in r.stdout and "duplicated: 0" in r.stdout and "re-run: 0" in r.stdout


# -- (4) options and edge cases ---------------------------------------------------------
def test_reset_failed_restarts_attempts_at_one_and_max_additional_retries_gives_n(mrpool, tmp_path):
    """DLQ item: resume continues the attempt count, --reset-failed restarts it, -N gives N tries."""
    job = tmp_path / "attempts"
    job_file = make_job(job, [{"id": "a"}, {"id": "b"}], command=ATTEMPT_COMMAND, retries=1)
    touch(job, "fail-b")

    # Phase 1: run: b fails twice (1 + retries) and is parked; a is done for good.
    r = mrpool.run("run", str(job_file), "--job-id", "att")
    assert r.returncode == 1, r.stderr
    assert attempts_log(job, "b") == [1, 2]

    # Phase 2: a plain resume gives b 1 + retries more attempts, numbered on (cumulative).
    r = mrpool.run("resume", "att")
    assert r.returncode == 1, r.stderr
    assert attempts_log(job, "b") == [1, 2, 3, 4]
    assert [(e["id"], e["attempts"]) for e in dlq_of(mrpool, "att")] == [("b", 4)]

    # Phase 3: --reset-failed restarts b's attempt numbers at 1.
    r = mrpool.run("resume", "att", "--reset-failed")
    assert r.returncode == 1, r.stderr
    assert attempts_log(job, "b")[4:] == [1, 2]
    assert [(e["id"], e["attempts"]) for e in dlq_of(mrpool, "att")] == [("b", 2)]

    # Phase 4: --max-additional-retries 3 gives the DLQ item exactly 3 attempts.
    r = mrpool.run("resume", "att", "--max-additional-retries", "3")
    assert r.returncode == 1, r.stderr
    assert attempts_log(job, "b")[6:] == [3, 4, 5]
    assert [(e["id"], e["attempts"]) for e in dlq_of(mrpool, "att")] == [("b", 5)]

    # Phase 5: the cause fixed, one more attempt succeeds; a never ran again.
    remove(job, "fail-b")
    r = mrpool.run("resume", "att", "--max-additional-retries", "1")
    assert r.returncode == 0, r.stderr
    assert attempts_log(job, "b")[9:] == [6]
    assert attempts_log(job, "a") == [1]
    assert counts(status_of(mrpool, "att")) == ("completed", 2, 2, 0, 0, 0)


def test_max_additional_retries_gives_a_failed_item_exactly_n_attempts(mrpool, tmp_path):
    """An item killed while waiting to retry is *failed*; -N 1 gives it one attempt, no backoff."""
    job = tmp_path / "failed"
    job_file = make_job(
        job, [{"id": "x"}, {"id": "y"}], command=ATTEMPT_COMMAND, retries=2, backoff=60
    )
    touch(job, "fail-x")

    # Phase 1: x fails once and waits 60 s to retry; y succeeds; SIGKILL during the wait.
    proc = mrpool.start("run", str(job_file), "--job-id", "fx")
    job_dir = mrpool.job_dir("fx")
    kill_when(
        proc,
        lambda: (
            settled(job_dir) == {1: "ok"}
            and any(r["k"] == "f" and r["next"] == "retry" for r in journal_records(job_dir))
        ),
        what="x waiting to retry, y done",
    )
    assert counts(status_of(mrpool, "fx")) == ("interrupted", 2, 1, 0, 1, 0)
    plan = api.plan_resume("fx", state_dir=mrpool.state_dir)
    assert plan.counts == {"pending": 0, "failed": 1, "dlq": 0}

    # Phase 2: one attempt (not 1 + retries with 60 s backoffs), then parked.
    r = mrpool.run("resume", "fx", "--max-additional-retries", "1", timeout=30)
    assert r.returncode == 1, r.stderr
    assert attempts_log(job, "x") == [1, 2]
    assert [(e["id"], e["attempts"]) for e in dlq_of(mrpool, "fx")] == [("x", 2)]
    assert attempts_log(job, "y") == [1]


def test_no_dlq_leaves_parked_items_alone_and_then_nothing_is_left(mrpool, tmp_path):
    """--no-dlq runs pending items only; with only DLQ items left it says nothing is left."""
    job = tmp_path / "nodlq"
    job_file = make_job(job, [{"id": i} for i in (1, 2, 3, 4)])
    touch(job, "fail-1", "block-3")

    # Phase 1: 1 parked, 2 ok, killed while 3 runs.
    proc = mrpool.start("run", str(job_file), "--job-id", "nd")
    job_dir = mrpool.job_dir("nd")
    kill_when(proc, lambda: len(settled(job_dir)) == 2 and 3 in side_log(job), what="1, 2 settled")

    # Phase 2: the cause of 1 is fixed, but --no-dlq leaves it parked: only 3 and 4 run.
    remove(job, "fail-1", "block-3")
    before = len(side_log(job))
    r = mrpool.run("resume", "nd", "--no-dlq", "--json")
    assert r.returncode == 1, r.stderr  # the DLQ is not empty
    assert json.loads(r.stdout)["plan"]["dlq"] == 0
    assert side_log(job)[before:] == [3, 4]
    assert [(e["id"], e["attempts"]) for e in dlq_of(mrpool, "nd")] == [(1, 1)]
    assert counts(status_of(mrpool, "nd")) == ("completed_with_failures", 4, 3, 1, 0, 0)

    # Phase 3: only DLQ items left and --no-dlq: nothing to do, exit 0, no session opened.
    journal_before = (job_dir / "journal.log").read_bytes()
    r = mrpool.run("resume", "nd", "--no-dlq")
    assert r.returncode == 0, r.stderr
    assert "nothing left" in r.stderr
    assert (job_dir / "journal.log").read_bytes() == journal_before

    # Phase 4: a plain resume takes the DLQ item too.
    r = mrpool.run("resume", "nd")
    assert r.returncode == 0, r.stderr
    assert side_log(job)[before + 2 :] == [1]
    assert dlq_of(mrpool, "nd") == []


def test_resume_of_a_completed_job_says_nothing_left_and_starts_no_worker(mrpool, tmp_path):
    """A completed job: resume exits 0, says so, adds no journal record and runs nothing."""
    job = tmp_path / "done"
    job_file = make_job(job, [{"id": 1}, {"id": 2}], workers=2)
    r = mrpool.run("run", str(job_file), "--job-id", "done")
    assert r.returncode == 0, r.stderr
    job_dir = mrpool.job_dir("done")
    opens = sum(1 for rec in journal_records(job_dir) if rec["k"] == "open")
    journal_before = (job_dir / "journal.log").read_bytes()

    r = mrpool.run("resume", "done", "--json")
    assert r.returncode == 0, r.stderr
    assert "nothing left" in r.stderr
    assert json.loads(r.stdout)["plan"]["total"] == 0
    assert (job_dir / "journal.log").read_bytes() == journal_before  # no open, no worker record
    assert sum(1 for rec in journal_records(job_dir) if rec["k"] == "open") == opens == 1
    assert sorted(side_log(job)) == [1, 2]
    assert counts(status_of(mrpool, "done")) == ("completed", 2, 2, 0, 0, 0)


def test_a_killed_resume_can_be_resumed_again_many_times(mrpool, tmp_path):
    """run killed, then three resumes each killed mid-work, then one more finishes: all once."""
    job = tmp_path / "again"
    job_file = make_job(job, [{"id": i, "sleep": 0.015} for i in range(1, 31)], workers=2)
    job_dir = mrpool.job_dir("again")
    store = JobStore(mrpool.state_dir, "again")

    # Phase 1: the run and three resumes, each SIGKILLed once it made progress of its own.
    args = ("run", str(job_file), "--job-id", "again")
    for session in range(4):
        recorded = set(result_ids(mrpool, "again")) if session else set()
        in_flight = (
            {i + 1 for i in store.load_state(30).open_indices()} if session else set()
        )  # in flight at the last crash: let those settle, or they count as crash loops
        offset = len(side_log(job))
        proc = mrpool.start(*args)

        def progressed(recorded=recorded, in_flight=in_flight) -> bool:
            done = set(result_ids(mrpool, "again")) if job_dir.exists() else set()
            return done >= in_flight | recorded and len(done - recorded) >= 3

        kill_when(proc, progressed, what=f"session {session} to record 3 new successes")
        assert not set(side_log(job)[offset:]) & recorded, f"session {session} re-ran a success"
        assert status_of(mrpool, "again")["pending"] > 0  # killed mid-job
        args = ("resume", "again")

    # Phase 2: the last resume completes: every id once, no recorded success ran again.
    recorded = set(result_ids(mrpool, "again"))
    offset = len(side_log(job))
    r = mrpool.run("resume", "again")
    assert r.returncode == 0, r.stderr
    assert not set(side_log(job)[offset:]) & recorded
    assert result_ids(mrpool, "again") == list(range(1, 31))
    assert counts(status_of(mrpool, "again")) == ("completed", 30, 30, 0, 0, 0)
    assert Counter(rec["k"] for rec in journal_records(job_dir))["open"] == 5


# -- (5) poison items ----------------------------------------------------------------
def _resume_until_settled(mrpool, job_id: str, limit: int = 4) -> int:
    """Resume until a resume finishes (exit 0/1); return how many resumes it took."""
    for n in range(1, limit + 1):
        r = mrpool.run("resume", job_id)
        if r.returncode in (0, 1):
            return n
        assert r.returncode == -9, r.stderr  # killed by the poison item
    raise AssertionError(f"{job_id}: still crashing after {limit} resumes")


def test_poison_item_that_kills_its_supervisor_ends_in_the_dlq_as_crash_loop(mrpool, tmp_path):
    """A map that SIGKILLs the supervisor every time: parked as crash_loop, the rest complete."""
    job = tmp_path / "poison"
    job_file = make_job(job, [{"id": i, "sleep": 0.03} for i in range(1, 7)])
    touch(job, "poison-3", text="0.3")  # outcomes of earlier items reach the journal first

    # Phase 1: the run dies with item 3; so does the next resume.
    r = mrpool.run("run", str(job_file), "--job-id", "poison")
    assert r.returncode == -9
    resumes = _resume_until_settled(mrpool, "poison")

    # Phase 2: item 3 was run twice (two crashes in a row), then parked; the rest succeeded.
    assert resumes <= 2
    assert side_log(job).count(3) == 2
    parked = dlq_of(mrpool, "poison")
    assert [(e["id"], e["kind"]) for e in parked] == [(3, "crash_loop")]
    assert "crashes in a row" in parked[0]["error"]
    assert counts(status_of(mrpool, "poison")) == ("completed_with_failures", 6, 5, 1, 0, 0)
    assert result_ids(mrpool, "poison") == [1, 2, 4, 5, 6]
    assert Counter(side_log(job)) == {1: 1, 2: 1, 3: 2, 4: 1, 5: 1, 6: 1}


def test_poison_item_killing_at_once_parks_only_itself(mrpool, tmp_path):
    """Fast items, the poison kills at once: only the poison item may end up in the DLQ."""
    job = tmp_path / "poison-now"
    job_file = make_job(job, [{"id": i} for i in range(1, 9)])
    touch(job, "poison-5")  # 2-8 go out in one batch: 6-8 queue behind the poison item

    # Phase 1: run and resume until the crash loop is broken.
    r = mrpool.run("run", str(job_file), "--job-id", "pnow")
    assert r.returncode == -9
    _resume_until_settled(mrpool, "pnow")

    # Phase 2: the poison item is parked; 6-8 (never started at any crash) are not,
    # and each of them ran exactly once: after the poison item was parked.
    assert [side_log(job).count(i) for i in (6, 7, 8)] == [1, 1, 1]
    assert [(e["id"], e["kind"]) for e in dlq_of(mrpool, "pnow")] == [(5, "crash_loop")]
    assert result_ids(mrpool, "pnow") == [1, 2, 3, 4, 6, 7, 8]


def test_items_that_never_started_before_a_crash_are_not_charged_an_attempt(mrpool, tmp_path):
    """Killed while item 2 runs: items 3 and 4 never started, so their first attempt is 1."""
    job = tmp_path / "charged"
    job_file = make_job(job, [{"id": i} for i in (1, 2, 3, 4)])
    touch(job, "block-2", "fail-3", "fail-4")

    # Phase 1: 1 succeeds, 2 blocks; SIGKILL before 3 and 4 start.
    proc = mrpool.start("run", str(job_file), "--job-id", "chg")
    kill_when(proc, lambda: side_log(job) == [1, 2] and settled(mrpool.job_dir("chg")) == {0: "ok"})
    assert side_log(job) == [1, 2]

    # Phase 2: resume: 3 and 4 run (and fail) for the first time: attempt 1 each.
    remove(job, "block-2")
    r = mrpool.run("resume", "chg")
    assert r.returncode == 1, r.stderr
    assert side_log(job)[2:] == [2, 3, 4]
    assert [(e["id"], e["attempts"]) for e in dlq_of(mrpool, "chg")] == [(3, 1), (4, 1)]
