"""``mrpool.map`` / ``mrpool.imap`` as a user's script runs them: real processes, real
crashes (SIGKILL of the script mid-run, as a killed kernel), real Ctrl-C.

Every map function appends one line per execution to an O_APPEND side log, so
the tests count what ran, not what mrpool says ran.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import PY, default_sigint, wait_for

import mrpool
from mrpool.errors import InputError, MrpoolError, UsageError
from mrpool.fsck import fsck

SCRIPT = textwrap.dedent(
    """
    import functools, json, os, random, sys, time
    import mrpool

    LOG = os.environ["SIDE_LOG"]
    DELAY = float(os.environ.get("DELAY", "0"))

    def log(line):
        fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, line.encode() + b"\\n")
        os.close(fd)

    def attempt_of(n):
        try:
            with open(LOG) as handle:
                return 1 + sum(1 for line in handle if line.split()[1] == str(n))
        except FileNotFoundError:
            return 1

    def flaky_square(item):
        '''Fails at random, seeded by item and attempt; never more than twice an item.'''
        n = item["n"]
        attempt = attempt_of(n)
        time.sleep(DELAY)
        if attempt < 3 and random.Random(n * 1000 + attempt).random() < 0.3:
            log(f"fail {n}")
            raise RuntimeError(f"flaky failure of {n}")
        log(f"ok {n}")
        return n * n

    def broken_sevens(n):
        log(f"ran {n}")
        if n % 7 == 0:
            raise ValueError(f"seven divides {n}")
        return -n

    def items(count):
        return ({"id": f"item-{n}", "n": n} for n in range(count))  # a generator

    mode, job = sys.argv[1], sys.argv[2]
    try:
        if mode == "map":
            results = mrpool.map(flaky_square, items(int(sys.argv[3])), job=job, retries=2, workers=2)
            print(json.dumps(results))
        elif mode == "imap":
            for item, result in mrpool.imap(flaky_square, items(int(sys.argv[3])), job=job, retries=2):
                assert result == item["n"] ** 2
                fd = os.open(os.environ["YIELD_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
                os.write(fd, b"%d\\n" % item["n"])
                os.close(fd)
        elif mode == "imap-break":
            import psutil
            pairs = mrpool.imap(flaky_square, items(300), job=job, retries=2)
            taken = [next(pairs) for _ in range(10)]
            pairs.close()  # the caller is done early: the session stops, saving
            status = mrpool.job_status(job)
            print(json.dumps([len(taken), status["state"], status["lock"],
                              len(psutil.Process().children(recursive=True))]))
        elif mode == "kinds":
            def in_main(x):
                return x + 1
            print(json.dumps([
                mrpool.map(lambda x: x * 10, range(20), job=job + "-lambda"),
                mrpool.map(in_main, range(20), job=job + "-main"),
                mrpool.map(functools.partial(pow, 2), range(20), job=job + "-partial"),
            ]))
        elif mode == "failures":
            try:
                mrpool.map(broken_sevens, range(50), job=job, retries=1)
            except mrpool.MapFailures as e:
                print(json.dumps({
                    "failures": [[f.id, f.attempts, f.error, f.signature] for f in e.failures],
                    "results": [r if not isinstance(r, mrpool.Failed) else "FAILED" for r in e.results],
                    "returned": [r if not isinstance(r, mrpool.Failed) else "FAILED" for r in
                                 mrpool.map(broken_sevens, range(50), job=job, on_failure="return",
                                            include_dlq=False)],
                }))
        elif mode == "module":
            sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
            import workmod
            extend = sys.argv[4:] == ["extend"]
            print(json.dumps(mrpool.map(workmod.cube, range(int(sys.argv[3])), job=job, workers=2,
                                        extend=extend)))
    except KeyboardInterrupt:
        print("INTERRUPTED", flush=True)
        sys.exit(130)
    """
)

WORKMOD = textwrap.dedent(
    """
    import os, time

    def cube(n):
        time.sleep(float(os.environ.get("DELAY", "0")))
        fd = os.open(os.environ["SIDE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(fd, b"ok %d\\n" % n)
        os.close(fd)
        return n ** 3
    """
)


class Script:
    """The user's script in ``tmp_path``, run with the test's state dir and tag."""

    def __init__(self, mrpool_runner, tmp_path: Path) -> None:
        self.mrpool = mrpool_runner
        self.dir = tmp_path
        (tmp_path / "script.py").write_text(SCRIPT)
        (tmp_path / "workmod.py").write_text(WORKMOD)

    def env(self, log: str, **extra: str) -> dict[str, str]:
        return self.mrpool.env(SIDE_LOG=str(self.dir / log), **extra)

    def run(self, *args: str, log: str = "run1.log", **extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PY, str(self.dir / "script.py"), *args],
            env=self.env(log, **extra),
            capture_output=True,
            text=True,
            timeout=60,
            cwd=str(self.dir),
            preexec_fn=default_sigint,
        )

    def start(self, *args: str, log: str = "run1.log", **extra: str) -> subprocess.Popen:
        return subprocess.Popen(
            [PY, str(self.dir / "script.py"), *args],
            env=self.env(log, **extra),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=str(self.dir),
            start_new_session=True,
            preexec_fn=default_sigint,
        )

    def log(self, name: str) -> list[str]:
        path = self.dir / name
        return path.read_text().splitlines() if path.exists() else []

    def wait_for_lines(self, name: str, count: int) -> None:
        wait_for(lambda: len(self.log(name)) >= count, timeout=30, what=f"{count} lines in {name}")


@pytest.fixture
def script(mrpool, tmp_path: Path) -> Script:
    return Script(mrpool, tmp_path)


def successes(lines: list[str]) -> list[int]:
    return [int(line.split()[1]) for line in lines if line.startswith("ok ")]


def test_map_of_a_generator_with_random_failures_returns_every_result_in_input_order(script):
    # phase 1: 500 items, ~30 % of first and second attempts fail, retries=2 covers them
    r = script.run("map", "flaky", "500")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [n * n for n in range(500)]
    lines = script.log("run1.log")
    assert sorted(successes(lines)) == list(range(500))  # each item succeeded exactly once
    assert any(line.startswith("fail ") for line in lines)  # and the retries were exercised
    # phase 2: the CLI sees the job like any other
    status = script.mrpool.status("flaky")
    assert (status["state"], status["total"], status["succeeded"]) == ("completed", 500, 500)
    rows = script.mrpool.results("flaky")
    assert [row["result"] for row in rows] == [n * n for n in range(500)]
    assert rows[0]["id"] == "item-0"
    events = script.mrpool.run("events", "flaky")
    assert '"item_retrying"' in events.stdout


def test_rerun_after_sigkill_runs_only_the_remaining_items(script):
    # phase 1: kill the script (as a dead kernel) once ~150 items have run
    proc = script.start("map", "crashy", "500", DELAY="0.004")
    script.wait_for_lines("run1.log", 150)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    recorded = {row["id"] for row in script.mrpool.results("crashy")}
    assert 0 < len(recorded) < 500
    # phase 2: the same script again: recorded items do not run, the result is whole
    r = script.run("map", "crashy", "500", log="run2.log")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [n * n for n in range(500)]
    rerun = successes(script.log("run2.log"))
    assert not {f"item-{n}" for n in rerun} & recorded
    assert len(rerun) == len(set(rerun)) == 500 - len(recorded)


def test_lambda_main_function_and_partial_run_and_cli_resume_refuses_them(script):
    r = script.run("kinds", "k")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [
        [x * 10 for x in range(20)],
        [x + 1 for x in range(20)],
        [2**x for x in range(20)],
    ]
    for job in ("k-lambda", "k-main", "k-partial"):
        refused = script.mrpool.run("dlq", "retry", job)
        assert refused.returncode == 2
        assert "resume it from Python" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1


def test_map_failures_carry_the_parked_items_and_the_partial_results(script):
    r = script.run("failures", "sevens")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    sevens = list(range(0, 50, 7))
    assert [f[0] for f in out["failures"]] == [
        json.loads(json.dumps(row["id"])) for row in script.mrpool.dlq("sevens")
    ]
    assert all(f[1] == 2 and f[2].startswith("ValueError: seven divides") for f in out["failures"])
    assert len({f[3] for f in out["failures"]}) == 1  # one signature: the same failure
    expected = ["FAILED" if n in sevens else -n for n in range(50)]
    assert out["results"] == expected
    assert out["returned"] == expected  # on_failure="return", DLQ left parked
    ran = script.log("run1.log")
    assert sorted(int(line.split()[1]) for line in ran) == sorted(
        [*range(50), *sevens]  # every item once, the sevens twice (retries=1); none again
    )
    assert script.mrpool.status("sevens")["state"] == "completed_with_failures"


def test_imap_yields_each_item_once_across_a_crash_and_a_rerun(script):
    proc = script.start("imap", "streamed", "300", DELAY="0.004", YIELD_LOG=str(script.dir / "y1"))
    script.wait_for_lines("y1", 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    first = [int(n) for n in script.log("y1")]
    assert len(first) == len(set(first)) < 300
    r = script.run("imap", "streamed", "300", log="run2.log", YIELD_LOG=str(script.dir / "y2"))
    assert r.returncode == 0, r.stderr
    second = [int(n) for n in script.log("y2")]
    assert sorted(second) == list(range(300))  # the re-run yields every item, each once
    assert not set(successes(script.log("run2.log"))) & set(first)  # yielded ones were recorded


def test_ctrl_c_raises_keyboard_interrupt_and_leaves_no_process(script):
    proc = script.start("map", "stopped", "400", DELAY="0.01")
    script.wait_for_lines("run1.log", 20)
    os.kill(proc.pid, signal.SIGINT)  # the script alone, as a notebook's "interrupt kernel"
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert "INTERRUPTED" in out
    status = script.mrpool.status("stopped")
    assert status["state"] == "interrupted" and status["lock"] is None
    assert 0 < status["succeeded"] < 400
    # (no_leftovers checks that no worker or session process outlived the call)


def test_an_importable_function_is_resumed_by_the_cli(script):
    proc = script.start("module", "cubes", "300", DELAY="0.004")
    script.wait_for_lines("run1.log", 60)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    r = script.mrpool.run("resume", "cubes", env=script.env("run2.log"))
    assert r.returncode == 0, r.stderr
    assert [row["result"] for row in script.mrpool.results("cubes")] == [n**3 for n in range(300)]
    assert sorted(successes(script.log("run1.log") + script.log("run2.log")))[-1] == 299


# -- refusals: checked before anything runs ----------------------------------------
def negate(x):
    return -x


def test_a_non_json_item_is_refused_by_position_and_nothing_is_created(tmp_path):
    state = tmp_path / "state"
    with pytest.raises(InputError, match=r"item at position 2 is not JSON"):
        mrpool.map(negate, iter([1, 2, {3}, 4]), job="bad", state_dir=state)
    with pytest.raises(InputError, match=r"item at position 1: field 'id' is float"):
        mrpool.map(negate, [{"id": 1}, {"id": 1.5}], job="bad", key="id", state_dir=state)
    with pytest.raises(UsageError, match="invalid job id"):
        mrpool.map(negate, [1], job="../escape", state_dir=state)
    assert not (state / "jobs" / "bad").exists()
    assert mrpool.map(negate, [], job="empty", state_dir=state) == []


def test_items_that_differ_from_the_jobs_are_refused(tmp_path):
    state = tmp_path / "state"
    items = [{"id": n, "v": n} for n in range(6)]
    assert mrpool.map(_value, items, job="fixed", state_dir=state, workers=1) == list(range(6))
    with pytest.raises(InputError, match=r"1 item\(s\) are not in job fixed .*id '9'.*extend=True"):
        mrpool.map(_value, [*items, {"id": 9, "v": 9}], job="fixed", state_dir=state)
    with pytest.raises(InputError, match=r"holds 2 item\(s\) the iterable lacks"):
        mrpool.map(_value, items[:4], job="fixed", state_dir=state)
    # extend=True adds, never drops: missing items are refused all the same, nothing added
    with pytest.raises(InputError, match=r"holds 6 item\(s\) the iterable lacks"):
        mrpool.map(_value, [{"id": 9, "v": 9}], job="fixed", state_dir=state, extend=True)
    assert mrpool.job_status("fixed", state_dir=state)["total"] == 6
    # the same items (a duplicate collapses, as in the first call): all from the journal
    again = mrpool.map(_value, [*items, items[0]], job="fixed", state_dir=state)
    assert again == [*range(6), 0]


def _value(item):
    return item["v"]


def test_the_exports():
    assert {"map", "imap", "MapFailures", "Failed"} <= set(mrpool.__all__)
    assert issubclass(mrpool.MapFailures, MrpoolError)
    assert sys.modules["mrpool.pymap"].map is mrpool.map


def test_duplicate_identities_are_one_item_and_every_position_gets_its_result(tmp_path):
    state = tmp_path / "state"
    many = [n % 5 for n in range(5000)]  # content-hash ids, duplicates past the first chunk
    assert mrpool.map(negate, many, job="dups", state_dir=state, workers=1) == [-n for n in many]
    assert mrpool.job_status("dups", state_dir=state)["total"] == 5
    rows = [{"k": n % 3, "v": n} for n in range(7)]  # a key function: the first of each wins
    got = mrpool.map(_value, rows, job="keyed", key=lambda r: r["k"], state_dir=state, workers=1)
    assert got == [0, 1, 2, 0, 1, 2, 0]
    assert list(
        mrpool.imap(_value, rows, job="keyed", key=lambda r: r["k"], state_dir=state, ordered=True)
    ) == [(row, row["k"]) for row in rows]


def test_closing_imap_early_stops_the_session_and_a_rerun_finishes(script):
    r = script.run("imap-break", "early", DELAY="0.004")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [10, "interrupted", None, 0]  # stopped, unlocked, no child
    r = script.run("map", "early", "300", log="run2.log")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [n * n for n in range(300)]


# -- extend=True: new identities join the job ---------------------------------------
def _logged_cube(n):
    fd = os.open(os.environ["SIDE_LOG"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    os.write(fd, b"ok %d\n" % n)
    os.close(fd)
    return n**3


def _extensions(job: str, state: Path) -> list[tuple[int, int, int]]:
    events = mrpool.iter_events(job, state_dir=state)
    return [(e["from"], e["total"], e["added"]) for e in events if e["event"] == "job_extended"]


def test_extend_runs_only_the_new_items_and_every_reader_sees_them(tmp_path, monkeypatch):
    state, log = tmp_path / "state", tmp_path / "side.log"
    monkeypatch.setenv("SIDE_LOG", str(log))
    # phase 1: a job of 20 items; a longer iterable is refused without extend=True
    assert mrpool.map(_logged_cube, range(20), job="grow", state_dir=state, workers=2) == [
        n**3 for n in range(20)
    ]
    with pytest.raises(InputError, match=r"10 item\(s\) are not in job grow"):
        mrpool.map(_logged_cube, range(30), job="grow", state_dir=state)
    # phase 2: extend=True adds the 10 new ones (in any order, a duplicate among them);
    # only they run
    log.unlink()
    items = [*range(29, 19, -1), 25, *range(20)]
    got = mrpool.map(_logged_cube, items, job="grow", state_dir=state, extend=True, workers=2)
    assert got == [n**3 for n in items]
    assert sorted(successes(log.read_text().splitlines())) == list(range(20, 30))
    # phase 3: every reader sees the extended job; the journal says when it grew
    status = mrpool.job_status("grow", state_dir=state)
    assert (status["total"], status["succeeded"], status["state"]) == (30, 30, "completed")
    assert status["duplicates_in_input"] == 1
    results = [row["result"] for row in mrpool.iter_results("grow", state_dir=state)]
    assert results == [n**3 for n in [*range(20), *range(29, 19, -1)]]  # the job's order
    assert _extensions("grow", state) == [(20, 30, 10)]
    assert not fsck("grow", state_dir=state).findings
    # phase 4: the same call again runs nothing and adds nothing
    assert mrpool.map(_logged_cube, items, job="grow", state_dir=state, extend=True) == got
    assert len(log.read_text().splitlines()) == 10 and _extensions("grow", state) == [(20, 30, 10)]


async def _stamped_nap(n):
    import asyncio
    import time

    with open(os.environ["SIDE_LOG"], "a") as log:
        log.write(f"S {time.time():.6f}\n")
    await asyncio.sleep(0.3)
    with open(os.environ["SIDE_LOG"], "a") as log:
        log.write(f"E {time.time():.6f}\n")
    return n * 2


def test_concurrency_runs_an_async_function_8_at_once_in_one_worker(tmp_path, monkeypatch):
    state, log = tmp_path / "state", tmp_path / "side.log"
    monkeypatch.setenv("SIDE_LOG", str(log))
    got = mrpool.map(_stamped_nap, range(8), job="lanes", state_dir=state, workers=1, concurrency=8)
    assert got == [n * 2 for n in range(8)]
    events = sorted(
        (float(t), 1 if kind == "S" else -1)
        for kind, t in map(str.split, log.read_text().splitlines())
    )
    running = [sum(step for _, step in events[: i + 1]) for i in range(len(events))]
    assert max(running) == 8  # all 8 naps overlapped: one worker, 8 lanes
    with pytest.raises(UsageError, match="concurrency"):
        mrpool.map(_stamped_nap, range(8), job="lanes2", state_dir=state, concurrency=0)


EXTEND_KILLS = [  # (failpoint, is the job extended once the process is dead?)
    ("extend.after_items", False),
    ("extend.before_replace", False),
    ("extend.after_replace", True),
    ("extend.before_record", True),
]


@pytest.mark.parametrize("point,extended", EXTEND_KILLS)
def test_sigkill_during_extend_leaves_the_old_job_or_the_extended_one(script, point, extended):
    # phase 1: 10 items done; then an extension to 16 is killed at the failpoint
    assert script.run("module", "cut", "10").returncode == 0
    killed = script.run(
        "module", "cut", "16", "extend", log="run2.log", MRPOOL_FAILPOINTS=f"{point}=kill"
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert script.log("run2.log") == []  # it died before any new item ran
    # phase 2: every reader sees one job -- the old one or the extended one, never a mix
    state = script.mrpool.state_dir
    status = mrpool.job_status("cut", state_dir=state)
    total = 16 if extended else 10
    assert (status["total"], status["succeeded"], status["pending"]) == (total, 10, total - 10)
    results = [row["result"] for row in mrpool.iter_results("cut", state_dir=state)]
    assert results == [n**3 for n in range(10)]
    assert list(mrpool.open_dlq("cut", state_dir=state).entries()) == []
    assert not [f for f in fsck("cut", state_dir=state).findings if f.damage]
    # phase 3: the CLI's resume runs what the job holds; the call again finishes the rest
    r = script.mrpool.run("resume", "cut", env=script.env("run3.log"))
    assert r.returncode == 0, r.stderr
    r = script.run("module", "cut", "16", "extend", log="run4.log")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [n**3 for n in range(16)]
    reran = successes(script.log("run3.log") + script.log("run4.log"))
    assert sorted(reran) == list(range(10, 16))  # each new item once; no recorded one again
    # one record of the extension, also when the crash cut it off (the next session wrote it)
    assert _extensions("cut", state) == [(10, 16, 6)]
    assert not fsck("cut", state_dir=state).findings  # stray rows, temp files: all gone


def test_the_dlq_hint_of_map_failures_pastes_as_is_with_its_own_state_dir(tmp_path, monkeypatch):
    """A state dir other than the default: the printed ``dlq list`` must name it."""
    monkeypatch.setenv("MRPOOL_HOME", str(tmp_path / "default"))
    with pytest.raises(mrpool.MapFailures) as caught:
        mrpool.map(int, ["1", "x"], job="hint", state_dir=tmp_path / "elsewhere", workers=1)
    hint = str(caught.value).split("('", 1)[1].split("')", 1)[0]
    assert "--state-dir" in hint, hint
    words = shlex.split(hint)
    assert words[0] == "mrpool"
    listed = subprocess.run([PY, "-m", *words], capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert "invalid literal for int()" in listed.stdout
