"""Nothing a map starts outlives its job (contract guarantee 4; containment.py).

Real processes throughout: a map command leaves a background child (``(sleep 77 &)``) or
a setsid double-fork daemon running, then the supervisor is SIGKILLed, gets SIGTERM, one
worker is SIGKILLed, or the user's whole process group is SIGKILLed; whatever the
command started must be gone within 2 s. Both mechanisms run: cgroup v2 (where this
process may create cgroups) and the environment token (``MRPOOL_CONTAINMENT=token``).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from conftest import tagged_processes, wait_for, write_job

from mrpool import containment

GONE_WITHIN = 2.0  # seconds: the contract's bound for what a command started
BACKGROUND = {
    "background": "(sleep 77 &); sleep 30",
    "daemon": "setsid sh -c '(sleep 77 &)'; sleep 30",
}
MODES = [
    pytest.param(
        "cgroup",
        marks=pytest.mark.skipif(
            containment.cgroup_base() is None, reason="no writable cgroup v2 here"
        ),
    ),
    "token",
]


def leftovers(tag: str) -> list[psutil.Process]:
    """The test's ``sleep 77`` processes still running."""
    found = []
    for proc in tagged_processes(tag):
        try:
            if proc.cmdline() == ["sleep", "77"]:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def kill_all(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass


def end(proc) -> None:
    """Kill ``proc`` if it still runs, reap it, close its pipes."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    proc.stdout.close()
    proc.stderr.close()


def mrpool_cgroups(job_dir: Path) -> list[str]:
    base = containment.cgroup_base()
    if base is None:
        return []
    prefix = f"{containment.CGROUP_PREFIX}{containment.job_key(job_dir)}-"
    return [name for name in os.listdir(base) if name.startswith(prefix)]


def only_job_dir(mrpool) -> Path:
    (job_dir,) = (mrpool.state_dir / "jobs").iterdir()
    return job_dir


def workers_of(supervisor: int) -> list[psutil.Process]:
    """The supervisor's worker processes (its children in its session: not the guardian)."""
    sid = os.getsid(supervisor)
    found = []
    for child in psutil.Process(supervisor).children():
        try:
            if os.getsid(child.pid) == sid:
                found.append(child)
        except OSError:
            continue
    return found


def guardian_of(supervisor: int) -> psutil.Process:
    sid = os.getsid(supervisor)
    (guardian,) = [c for c in psutil.Process(supervisor).children() if os.getsid(c.pid) != sid]
    return guardian


def start_job(tmp_path, mrpool, mode: str, shell: str, workers: int = 1, items: int = 1):
    job = write_job(
        tmp_path / "job",
        [{"id": i} for i in range(items)],
        {"command": ["sh", "-c", shell]},
        workers=workers,
    )
    proc = mrpool.start("run", str(job), env=mrpool.env(MRPOOL_CONTAINMENT=mode))
    wait_for(lambda: leftovers(mrpool.tag), what="the background sleep to start")
    return proc


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("started", sorted(BACKGROUND))
@pytest.mark.parametrize("kill", ["supervisor-SIGKILL", "supervisor-SIGTERM", "group-SIGKILL"])
def test_what_a_command_started_ends_when_its_supervisor_dies(
    tmp_path, mrpool, request, mode, started, kill
):
    proc = start_job(tmp_path, mrpool, mode, BACKGROUND[started])
    try:
        if kill == "supervisor-SIGTERM":
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 130
        else:
            request.node.allow_leftover_files = True  # a SIGKILLed holder's lock file
            if kill == "group-SIGKILL":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.kill()
            proc.wait(timeout=30)
        wait_for(
            lambda: not leftovers(mrpool.tag),
            timeout=GONE_WITHIN,
            what=f"'sleep 77' to end after {kill}",
        )
        job_dir = only_job_dir(mrpool)
        wait_for(lambda: not mrpool_cgroups(job_dir), timeout=GONE_WITHIN, what="cgroups gone")
    finally:
        kill_all(leftovers(mrpool.tag))
        end(proc)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("started", sorted(BACKGROUND))
def test_what_a_command_started_ends_when_its_worker_is_killed(tmp_path, mrpool, mode, started):
    proc = start_job(tmp_path, mrpool, mode, BACKGROUND[started])
    try:
        (worker,) = workers_of(proc.pid)
        worker.kill()
        wait_for(
            lambda: not leftovers(mrpool.tag),
            timeout=GONE_WITHIN,
            what="'sleep 77' to end after its worker was killed",
        )
        assert proc.wait(timeout=30) == 1  # the item is parked as worker_died
        (parked,) = mrpool.dlq(only_job_dir(mrpool).name)
        assert parked["kind"] == "worker_died"
    finally:
        kill_all(leftovers(mrpool.tag))
        end(proc)


@pytest.mark.parametrize("mode", MODES)
def test_a_previous_sessions_leftovers_end_before_the_next_session_runs(
    tmp_path, mrpool, request, mode
):
    """Guardian, supervisor and workers all SIGKILLed (nothing left to clean up): the next
    session of the job ends what the old one left before it starts a worker."""
    request.node.allow_leftover_files = True
    proc = start_job(tmp_path, mrpool, mode, BACKGROUND["daemon"])
    try:
        guardian_of(proc.pid).kill()
        os.killpg(proc.pid, signal.SIGKILL)  # workers too: none is left to clean up
        proc.wait(timeout=30)
        time.sleep(0.3)
        assert leftovers(mrpool.tag)  # nobody was left to end it
        job_id = only_job_dir(mrpool).name
        resumed = mrpool.start("resume", job_id, env=mrpool.env(MRPOOL_CONTAINMENT=mode))
        try:
            wait_for(lambda: not leftovers(mrpool.tag), timeout=10, what="the old sleep to end")
        finally:
            end(resumed)
    finally:
        kill_all(leftovers(mrpool.tag))
        end(proc)


FORKING_CALLABLE = """
import os, time

def sleeper():
    pid = os.fork()
    if pid == 0:
        os.setsid()
        time.sleep(120)
        os._exit(0)
    return pid

def fork_and_return(item):
    return sleeper()

def fork_and_hang(item):
    out = os.environ["OUT"]
    with open(os.path.join(out, "pids.tmp"), "w") as f:
        f.write(f"{os.getpid()} {sleeper()}")
    os.rename(os.path.join(out, "pids.tmp"), os.path.join(out, "pids"))
    time.sleep(120)
"""


def alive(pid: int, tag: str) -> bool:
    try:
        proc = psutil.Process(pid)
        return (
            proc.status() != psutil.STATUS_ZOMBIE and proc.environ().get("MRPOOL_TEST_TAG") == tag
        )
    except psutil.Error:
        return False


@pytest.mark.parametrize("mode", MODES)
def test_a_child_a_callable_forked_ends_with_a_clean_finish(tmp_path, mrpool, mode):
    job = write_job(
        tmp_path / "job",
        [{"id": 1}, {"id": 2}],
        {"callable": "forking:fork_and_return"},
        files={"forking.py": FORKING_CALLABLE},
    )
    r = mrpool.run("run", str(job), env=mrpool.env(MRPOOL_CONTAINMENT=mode))
    assert r.returncode == 0, r.stderr
    children = [row["result"] for row in mrpool.results(only_job_dir(mrpool).name)]
    try:
        assert len(children) == 2
        assert not [pid for pid in children if alive(pid, mrpool.tag)]
        assert not mrpool_cgroups(only_job_dir(mrpool))
    finally:
        for pid in children:
            if alive(pid, mrpool.tag):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", MODES)
def test_a_workers_death_is_noticed_at_once_whatever_its_callable_forked(tmp_path, mrpool, mode):
    job = write_job(
        tmp_path / "job",
        [{"id": 1}],
        {"callable": "forking:fork_and_hang"},
        workers=1,
        files={"forking.py": FORKING_CALLABLE},
    )
    proc = mrpool.start("run", str(job), env=mrpool.env(MRPOOL_CONTAINMENT=mode, OUT=str(tmp_path)))
    child = 0
    try:
        pids = wait_for(lambda: (tmp_path / "pids").exists() and (tmp_path / "pids").read_text())
        worker, child = map(int, pids.split())
        os.kill(worker, signal.SIGKILL)
        killed = time.monotonic()
        assert proc.wait(timeout=30) == 1
        assert time.monotonic() - killed < 10  # not when the forked child ends (120 s)
        wait_for(lambda: not alive(child, mrpool.tag), timeout=GONE_WITHIN, what="child gone")
        (parked,) = mrpool.dlq(only_job_dir(mrpool).name)
        assert parked["kind"] == "worker_died"
        assert "worker died: signal 9" in parked["error"]
    finally:
        if child and alive(child, mrpool.tag):
            os.kill(child, signal.SIGKILL)
        end(proc)


def test_an_item_of_50_mb_reaches_a_command_on_stdin(tmp_path, mrpool):
    """Past Linux's 128 KiB limit on one environment string the item is on stdin only."""
    big = {"id": "big", "text": "x" * 50_000_000}
    small = {"id": "small", "text": "y"}
    reader = (
        "import os, sys; data = sys.stdin.buffer.read(); "
        "print(len(data), os.environ.get('MRPOOL_ITEM') == data.decode())"
    )
    job = write_job(tmp_path / "job", [big, small], {"command": ["python3", "-c", reader]})
    r = mrpool.run("run", str(job), timeout=120)
    assert r.returncode == 0, r.stderr
    results = {row["id"]: row["result"] for row in mrpool.results(only_job_dir(mrpool).name)}
    assert results == {  # the item as the input file has it (write_job: json.dumps)
        "big": f"{len(json.dumps(big))} False\n",
        "small": f"{len(json.dumps(small))} True\n",
    }


def test_a_finished_run_leaves_no_cgroup(tmp_path, mrpool):
    if containment.cgroup_base() is None:
        pytest.skip("no writable cgroup v2 here")
    job = write_job(tmp_path / "job", [{"id": i} for i in range(4)], {"command": ["true"]})
    r = mrpool.run("run", str(job))
    assert r.returncode == 0, r.stderr
    assert not mrpool_cgroups(only_job_dir(mrpool))


@pytest.mark.stress
@pytest.mark.parametrize("mode", MODES)
def test_random_kills_never_leave_a_process_behind(tmp_path, mrpool, request, mode):
    """Rounds of a two-worker job whose every item leaves a background child and a daemon,
    each round ended by a random kill; then resume to the end: nothing is ever left, and
    every item still succeeds exactly once."""
    import random

    request.node.allow_leftover_files = True
    rng = random.Random(23)
    shell = "(sleep 77 &); setsid sh -c '(sleep 77 &)'; sleep 0.$(($$ % 5))"
    job = write_job(
        tmp_path / "job", [{"id": i} for i in range(60)], {"command": ["sh", "-c", shell]}
    )
    env = mrpool.env(MRPOOL_CONTAINMENT=mode)
    proc = mrpool.start("run", str(job), env=env)
    for _ in range(10):
        try:
            wait_for(lambda: len(leftovers(mrpool.tag)) >= 2, what="background sleeps")
            how = rng.choice(["supervisor", "group", "term", "worker"])
            if how == "worker" and workers_of(proc.pid):
                rng.choice(workers_of(proc.pid)).kill()
                time.sleep(0.3)
            if how == "group":
                os.killpg(proc.pid, signal.SIGKILL)
            else:
                proc.send_signal(signal.SIGTERM if how == "term" else signal.SIGKILL)
            proc.wait(timeout=30)
            wait_for(lambda: not leftovers(mrpool.tag), timeout=GONE_WITHIN, what=f"after {how}")
        finally:
            kill_all(leftovers(mrpool.tag))
            end(proc)
        proc = mrpool.start("resume", only_job_dir(mrpool).name, env=env)
    try:
        assert proc.wait(timeout=120) in (0, 1)
    finally:
        end(proc)
    wait_for(lambda: not leftovers(mrpool.tag), timeout=GONE_WITHIN, what="after the end")
    results = mrpool.results(only_job_dir(mrpool).name)
    assert len({row["id"] for row in results}) == len(results)


def test_the_guardian_holds_nothing_of_the_supervisors(tmp_path, mrpool):
    """No job file (the lock, the journal), no pipe a caller waits on: only its own pipe,
    its pidfd of the supervisor and /dev/null as stdin, stdout and stderr."""
    proc = start_job(tmp_path, mrpool, "token", BACKGROUND["background"])
    try:
        guardian = guardian_of(proc.pid)
        fds = {
            int(fd): os.readlink(f"/proc/{guardian.pid}/fd/{fd}")
            for fd in os.listdir(f"/proc/{guardian.pid}/fd")
        }
        assert [fds[fd] for fd in (0, 1, 2)] == [os.devnull] * 3
        rest = sorted(target for fd, target in fds.items() if fd > 2)
        # its pipe from the supervisor, and pidfds of the supervisor and of the worker
        assert [t.split(":")[0] for t in rest] == ["anon_inode", "anon_inode", "pipe"], fds
        assert rest[:2] == ["anon_inode:[pidfd]"] * 2, fds
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130
        assert not guardian.is_running()  # reaped by the supervisor before it exited
    finally:
        kill_all(leftovers(mrpool.tag))
        end(proc)
