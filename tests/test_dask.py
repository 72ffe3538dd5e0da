"""The map phase on Dask: real schedulers, workers and supervisors, killed for real.

Two clusters: a ``LocalCluster`` a session starts for itself (``executor: {kind:
dask}``), and one started here as separate OS processes (``dask scheduler``,
``dask worker``) on 127.0.0.1, shared by the module's other tests and reached by
address. Its processes carry their own ``MRPOOL_TEST_TAG``, so the per-test leak
check does not see them; the ``cluster`` fixture checks instead that after each
test nothing but Dask's own processes is left under them (no helper, no worker,
no map command).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from conftest import PY, REPO, journal_records, kill_group, tagged_processes, wait_for, write_job

distributed = pytest.importorskip(
    "distributed", reason="the Dask executor needs the 'dask' extra: pip install 'mrpool[dask]'"
)

CLUSTER_TAG = f"dask-cluster-{uuid.uuid4().hex}"


def _dask_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PYTHONPATH=str(REPO), MRPOOL_TEST_TAG=CLUSTER_TAG, **extra)
    return env


def _start_scheduler(tmp: Path, name: str, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    scheduler_file = tmp / f"{name}.json"
    proc = subprocess.Popen(
        [PY, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0"]
        + ["--no-dashboard", "--scheduler-file", str(scheduler_file)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    wait_for(
        lambda: scheduler_file.exists() and scheduler_file.stat().st_size, 60, 0.1, "scheduler"
    )
    time.sleep(0.2)  # the file is written whole, but give the writer its close
    return proc, json.loads(scheduler_file.read_text())["address"]


def _stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        kill_group(proc)


@pytest.fixture(scope="module")
def shared_cluster(tmp_path_factory):
    """``dask scheduler`` + ``dask worker`` (2 worker processes, 1 thread each, nanny)."""
    tmp = tmp_path_factory.mktemp("dask")
    env = _dask_env(DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0")
    scheduler, address = _start_scheduler(tmp, "scheduler", env)
    workers = subprocess.Popen(
        [PY, "-m", "distributed.cli.dask_worker", address, "--nworkers", "2", "--nthreads", "1"]
        + ["--host", "127.0.0.1", "--no-dashboard"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    _wait_for_workers(address, 2)
    yield address
    _stop(workers)
    _stop(scheduler)
    left = wait_for_gone(CLUSTER_TAG)
    assert not left, f"cluster processes left running: {left}"


def _wait_for_workers(address: str, n: int) -> None:
    with distributed.Client(address, timeout=60) as client:
        client.wait_for_workers(n, timeout=120)


def wait_for_gone(tag: str, timeout: float = 20.0) -> list:
    deadline = time.monotonic() + timeout
    left = tagged_processes(tag)
    while left and time.monotonic() < deadline:
        time.sleep(0.1)
        left = tagged_processes(tag)
    for proc in left:
        try:
            proc.kill()
        except psutil.Error:
            pass
    return [proc.pid for proc in left]


def _not_dask(proc: psutil.Process) -> bool:
    try:
        line = " ".join(proc.cmdline())
    except psutil.Error:
        return False
    return "dask" not in line and "multiprocessing" not in line


def _dask_worker_pids() -> set[int]:
    found = set()
    for proc in tagged_processes(CLUSTER_TAG):
        try:
            if "multiprocessing" in " ".join(proc.cmdline()):
                found.add(proc.pid)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def cluster(shared_cluster):
    """The shared cluster's address; afterwards no helper, worker or map command of the
    test's sessions is left on it (Dask's own processes stay for the next test)."""
    yield shared_cluster
    deadline = time.monotonic() + 15
    extra = [p for p in tagged_processes(CLUSTER_TAG) if _not_dask(p)]
    while extra and time.monotonic() < deadline:
        time.sleep(0.1)
        extra = [p for p in tagged_processes(CLUSTER_TAG) if _not_dask(p)]
    assert not extra, f"left on the cluster: {[(p.pid, p.cmdline()) for p in extra]}"
    _wait_for_workers(shared_cluster, 2)  # a test that killed a worker: the nanny restarts it


def _dask_address(address: str) -> str:
    return "dask://" + address.removeprefix("tcp://")


def _run_json(mrpool, *args: str, timeout: float = 120):
    r = mrpool.run(*args, "--json", timeout=timeout)
    report = json.loads(r.stdout.splitlines()[-1]) if r.stdout.strip() else None
    return r, report


# -- a LocalCluster of the session's own, against the local executor ------------------
COMMAND = [
    "sh",
    "-c",
    'if [ "$1" = bad ]; then echo "broken $MRPOOL_ITEM_ID" >&2; exit 3; fi; '
    'printf \'["%s","%s",%s,\' "$1" "$MRPOOL_ITEM_ID" "$MRPOOL_ATTEMPT"; cat; printf \']\'',
    "sh",
    "{item.word}",
]
CALLABLE_MODULE = """
def square(item):
    if item["n"] == 7:
        raise ValueError("seven is not allowed")
    return {"n": item["n"], "sq": item["n"] ** 2}
"""


def _outcomes(mrpool, job_id: str) -> tuple[list, list]:
    dlq = [(e["id"], e["kind"], e["error"], e["attempts"]) for e in mrpool.dlq(job_id)]
    return mrpool.results(job_id), sorted(dlq, key=str)


@pytest.mark.parametrize("step", ["command", "callable"])
def test_local_cluster_gives_the_local_executors_results(mrpool, tmp_path, step):
    items = [{"id": i, "n": i, "word": "bad" if i == 13 else f"w{i}"} for i in range(220)]
    if step == "command":
        map_step, files = {"command": COMMAND}, None
    else:
        map_step, files = {"callable": "sq:square"}, {"sq.py": CALLABLE_MODULE}
    local = write_job(tmp_path / "local", items, map_step, name="local", files=files)
    on_dask = write_job(
        tmp_path / "dask",
        items,
        map_step,
        name="dask",
        files=files,
        extra={"executor": {"kind": "dask"}},
    )
    r_local, report_local = _run_json(mrpool, "run", str(local))
    r_dask, report_dask = _run_json(mrpool, "run", str(on_dask))
    assert r_local.returncode == r_dask.returncode == 1, (r_local.stderr, r_dask.stderr)
    assert report_dask["succeeded"] == report_local["succeeded"] == 219
    assert _outcomes(mrpool, report_dask["job_id"]) == _outcomes(mrpool, report_local["job_id"])
    status = mrpool.status(report_dask["job_id"])
    assert status["executor"]["kind"] == "dask" and status["executor"]["cluster"] == "local"
    assert status["executor"]["address"].startswith("tcp://127.0.0.1:")
    assert mrpool.status(report_local["job_id"])["executor"] == {"kind": "local"}


# -- a cluster of separate OS processes, by address ------------------------------------
def test_external_cluster_by_address(mrpool, tmp_path, cluster):
    items = [{"id": i, "word": f"w{i}"} for i in range(200)]
    job = write_job(tmp_path, items, {"command": COMMAND})
    r, report = _run_json(mrpool, "run", str(job), "--executor", _dask_address(cluster))
    assert r.returncode == 0, r.stderr
    results = mrpool.results(report["job_id"])
    assert [row["result"][:3] for row in results] == [[f"w{i}", str(i), 1] for i in range(200)]
    assert [row["result"][3] for row in results] == items  # the item arrived on stdin
    events = [json.loads(line) for line in mrpool.run("events", report["job_id"]).stdout.split()]
    executor = [e for e in events if e["event"] == "executor"]
    assert len(executor) == 1 and executor[0]["address"] == cluster
    assert executor[0]["cluster"] == "external" and executor[0]["workers"] == 2


def _ancestor_dask_worker(pid: int) -> psutil.Process:
    """The Dask worker process running a map command: its helper's parent."""
    chain = psutil.Process(pid).parents()
    helpers = [p for p in chain if "mrpool.remote_helper" in " ".join(p.cmdline())]
    return chain[chain.index(helpers[-1]) + 1]


def test_dask_worker_killed_mid_item_is_attributed(mrpool, tmp_path, cluster):
    pid_file = tmp_path / "slow.pid"
    command = [
        "sh",
        "-c",
        f'if [ "$1" = slow ] && [ "$MRPOOL_ATTEMPT" = 1 ]; then echo $$ > {pid_file}; '
        "exec sleep 60; fi; echo done",
        "sh",
        "{item.word}",
    ]
    items = [{"id": i, "word": "slow" if i == 3 else "fast"} for i in range(40)]
    job = write_job(tmp_path, items, {"command": command, "retries": 1})
    proc = mrpool.start("run", str(job), "--executor", _dask_address(cluster), "--json")
    try:
        wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 60, 0.05, "slow item")
        sleeper = int(pid_file.read_text())
        time.sleep(1.0)  # its task reports the attempt running within ~0.1 s
        _ancestor_dask_worker(sleeper).kill()
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == 0, err
    report = json.loads(out.splitlines()[-1])
    assert report["succeeded"] == 40
    failures = [r for r in journal_records(mrpool.job_dir(report["job_id"])) if r["k"] == "f"]
    assert [(f["i"], f["a"], f["kind"], f["next"]) for f in failures] == [
        (3, 1, "worker_died", "retry")
    ]
    assert not psutil.pid_exists(sleeper) or psutil.Process(sleeper).status() == "zombie"


def test_timeout_kills_the_attempt_and_its_tree_not_the_dask_worker(mrpool, tmp_path, cluster):
    before = _dask_worker_pids()
    bg = tmp_path / "bg.pid"
    command = [
        "sh",
        "-c",
        f'if [ "$1" = hang ]; then sleep 60 & echo $! > {bg}; wait; fi; echo ok',
        "sh",
        "{item.word}",
    ]
    items = [{"id": i, "word": "hang" if i == 0 else "quick"} for i in range(20)]
    job = write_job(tmp_path, items, {"command": command, "timeout": 1})
    r, report = _run_json(mrpool, "run", str(job), "--executor", _dask_address(cluster))
    assert r.returncode == 1, r.stderr
    assert report["succeeded"] == 19 and report["dlq"] == 1
    (entry,) = mrpool.dlq(report["job_id"])
    assert entry["kind"] == "timeout"
    background = int(bg.read_text())
    wait_for(lambda: not psutil.pid_exists(background), 10, 0.05, "the background sleep killed")
    assert _dask_worker_pids() == before  # no Dask worker died or was replaced


def test_supervisor_killed_mid_run_then_resume(mrpool, tmp_path, cluster):
    command = ["sh", "-c", "sleep 0.02; echo $MRPOOL_ITEM_ID"]
    items = [{"id": i} for i in range(300)]
    job = write_job(tmp_path, items, {"command": command})
    proc = mrpool.start("run", str(job), "--executor", _dask_address(cluster), "--job-id", "j1")
    job_dir = mrpool.job_dir("j1")

    def some_succeeded() -> bool:
        try:
            return any(r["k"] == "ok" for r in journal_records(job_dir))
        except Exception:  # noqa: BLE001 - the journal may not exist yet
            return False

    try:
        wait_for(some_succeeded, 90, 0.05, "first outcomes")
    finally:
        kill_group(proc)
    assert mrpool.status("j1")["succeeded"] < 300
    r = mrpool.run("resume", "j1", "--executor", _dask_address(cluster), timeout=120)
    assert r.returncode == 0, r.stderr
    results = mrpool.results("j1")
    assert [row["id"] for row in results] == list(range(300))  # every id once
    assert [row["result"] for row in results] == list(range(300))
    records = journal_records(job_dir)
    opens = [r for r in records if r["k"] == "open"]
    # settled by resume's open record: a Dask session leaves no evidence (began unknown:
    # every open attempt charged) and names nothing running (no crash streak)
    assert opens[1]["began"] is None and opens[1]["cut"] == []
    assert not [r for r in records[: records.index(opens[1])] if r["k"] == "close"]
    plan = [r for r in records if r["k"] == "plan"][-1]
    assert plan["poison_parked"] == 0
    assert mrpool.status("j1")["executor"]["kind"] == "dask"


def test_poison_item_parks_with_history_and_dlq_retry_on_dask_clears_it(mrpool, tmp_path, cluster):
    fixed = tmp_path / "fixed"
    command = [
        "sh",
        "-c",
        f'if [ "$1" = bad ] && [ ! -e {fixed} ]; then echo "still broken" >&2; exit 2; fi; echo ok',
        "sh",
        "{item.word}",
    ]
    items = [{"id": i, "word": "bad" if i == 5 else "good"} for i in range(30)]
    job = write_job(tmp_path, items, {"command": command, "retries": 2})
    r, report = _run_json(mrpool, "run", str(job), "--executor", _dask_address(cluster))
    assert r.returncode == 1, r.stderr
    (brief,) = mrpool.dlq(report["job_id"])
    assert brief["id"] == 5 and brief["attempts"] == 3
    shown = mrpool.run("dlq", "show", report["job_id"], "5")
    entry = json.loads(shown.stdout)
    assert [h["attempt"] for h in entry["history"]] == [1, 2, 3]
    assert all(h["kind"] == "exit" and "still broken" in h["msg"] for h in entry["history"])
    fixed.write_text("")
    r = mrpool.run("dlq", "retry", report["job_id"], "--executor", _dask_address(cluster))
    assert r.returncode == 0, r.stderr
    assert mrpool.dlq(report["job_id"]) == []
    assert mrpool.status(report["job_id"])["succeeded"] == 30


def test_ctrl_c_cancels_the_clusters_attempts(mrpool, tmp_path, cluster):
    started = tmp_path / "started"
    command = ["sh", "-c", f"touch {started}; sleep 60"]
    job = write_job(tmp_path, [{"id": i} for i in range(4)], {"command": command})
    proc = mrpool.start("run", str(job), "--executor", _dask_address(cluster), "--job-id", "c1")
    try:
        wait_for(started.exists, 60, 0.05, "an attempt running")
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            kill_group(proc)
    assert proc.returncode == 130
    assert mrpool.status("c1")["state"] == "interrupted"
    # the cluster fixture checks that no attempt (sleep 60) is left running on the cluster


def _dask_semaphores() -> list[str]:
    return [name for name in os.listdir("/dev/shm") if name.startswith("sem.mp-")]


def _unlink_orphaned_semaphores(names: set[str]) -> None:
    """SIGKILLing a whole ``dask worker`` group (its resource tracker with it) leaves the
    nanny's multiprocessing semaphores in /dev/shm: Dask's, not mrpool's, and a
    consequence of this test's kill. Remove those no live process still maps."""
    mapped = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as maps:
                mapped.update(
                    line.rsplit("/", 1)[-1].strip() for line in maps if "/sem.mp-" in line
                )
        except OSError:
            continue
    for name in names - mapped:
        try:
            os.unlink(f"/dev/shm/{name}")
        except FileNotFoundError:
            pass


def test_losing_every_worker_ends_the_session_resumably(mrpool, tmp_path):
    env = _dask_env(DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="0")
    scheduler, address = _start_scheduler(tmp_path, "lonely", env)
    workers = subprocess.Popen(
        [PY, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1"]
        + ["--host", "127.0.0.1", "--no-dashboard"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    started, hold = tmp_path / "started", tmp_path / "hold"
    semaphores = set(_dask_semaphores())
    try:
        _wait_for_workers(address, 1)
        hold.write_text("")
        command = ["sh", "-c", f"touch {started}; if [ -e {hold} ]; then sleep 60; fi"]
        job = write_job(tmp_path, [{"id": i} for i in range(3)], {"command": command})
        proc = mrpool.start(
            "run",
            str(job),
            "--executor",
            _dask_address(address),
            "--job-id",
            "w1",
            env=mrpool.env(MRPOOL_DASK_NO_WORKER_SECONDS="2"),
        )
        try:
            wait_for(started.exists, 60, 0.05, "an attempt running")
            kill_group(workers)  # the nanny and its worker: no worker left
            _, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                kill_group(proc)
    finally:
        kill_group(workers)
        _stop(scheduler)
        _unlink_orphaned_semaphores(set(_dask_semaphores()) - semaphores)
    assert proc.returncode == 1, err
    assert "no Dask worker left" in err.decode() and "mrpool resume w1" in err.decode()
    hold.unlink()
    r = mrpool.run("resume", "w1", "--executor", "local", "--json")
    assert r.returncode == 0, r.stderr  # resumable, here on the local executor
    assert json.loads(r.stdout.splitlines()[-1])["succeeded"] == 3


# -- refusals ------------------------------------------------------------------------
def test_a_scheduler_that_retries_tasks_is_refused(mrpool, tmp_path):
    scheduler, address = _start_scheduler(tmp_path, "retrying", _dask_env())
    try:
        job = write_job(tmp_path, [{"id": 1}], {"command": ["true"]})
        r = mrpool.run("run", str(job), "--executor", _dask_address(address), "--job-id", "r1")
    finally:
        _stop(scheduler)
    assert r.returncode == 1
    assert "allowed-failures = 3" in r.stderr
    assert "DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES=0 dask scheduler" in r.stderr
    assert not [rec for rec in journal_records(mrpool.job_dir("r1")) if rec["k"] == "s"]


def test_without_distributed_asking_for_dask_names_the_extra(mrpool, tmp_path):
    fake = tmp_path / "no_dask" / "distributed"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError(\"No module named 'distributed'\")\n")
    job = write_job(tmp_path, [{"id": 1}], {"command": ["true"]}, extra={"executor": "dask"})
    env = mrpool.env(PYTHONPATH=f"{fake.parent}{os.pathsep}{REPO}")
    r = mrpool.run("run", str(job), env=env)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "mrpool: the Dask executor needs the 'dask' extra: pip install 'mrpool[dask]'"
    ]


@pytest.mark.parametrize(
    "executor, field",
    [
        ({"kind": "ray"}, "executor.kind"),
        ({"kind": "dask", "address": "8786"}, "executor.address"),
        ({"kind": "dask", "port": 1}, "executor.port"),
        (["dask"], "executor"),
    ],
)
def test_bad_executor_field_is_one_line_naming_it(mrpool, tmp_path, executor, field):
    job = write_job(tmp_path, [{"id": 1}], {"command": ["true"]}, extra={"executor": executor})
    r = mrpool.run("run", str(job))
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()
    assert f"{job}: {field}:" in line


def test_bad_executor_option_is_a_usage_error(mrpool, tmp_path):
    job = write_job(tmp_path, [{"id": 1}], {"command": ["true"]})
    r = mrpool.run("run", str(job), "--executor", "spark://x:1")
    assert r.returncode == 2
    assert "--executor" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (mrpool.state_dir / "jobs").exists() or not list(
        (mrpool.state_dir / "jobs").iterdir()
    )


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
