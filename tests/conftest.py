"""Shared test helpers: run the real CLI in subprocesses and check nothing leaks.

Every process a test starts carries ``MRPOOL_TEST_TAG`` in its environment (and
so do the workers and map commands it forks), which lets the autouse
``no_leftovers`` fixture prove that after each test no mrpool process, worker or
map command is still running, no shared-memory segment appeared in /dev/shm,
and no lock, holder or temp file is left in any job directory.
"""

from __future__ import annotations

import compileall
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable

# The tests start hundreds of `python -m mrpool` processes. Compile the package once, so
# that none of them recompiles it when PYTHONDONTWRITEBYTECODE is set (bytecode is read
# either way; only writing it is switched off).
compileall.compile_dir(REPO / "mrpool", quiet=1)


# -- running the CLI ---------------------------------------------------------------
def default_sigint() -> None:
    """Start a child with SIGINT at its default, whatever the suite inherited: a shell
    without job control starts a background command (``.ci/run &``) with SIGINT
    ignored, the children would inherit that, and the tests' Ctrl-C would not land."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Mrpool:
    """Runs ``python -m mrpool`` against one state dir, tagged for leak checks."""

    def __init__(self, state_dir: Path, tag: str) -> None:
        self.state_dir = state_dir
        self.tag = tag

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("MRPOOL_FAILPOINTS", None)
        env.update(MRPOOL_HOME=str(self.state_dir), MRPOOL_TEST_TAG=self.tag, PYTHONPATH=str(REPO))
        env.update(extra)
        return env

    def run(
        self,
        *args: str,
        timeout: float = 60,
        env: dict[str, str] | None = None,
        input: bytes | None = None,
    ) -> subprocess.CompletedProcess:
        """Run to completion; returns CompletedProcess with text stdout/stderr."""
        return subprocess.run(
            [PY, "-m", "mrpool", *args],
            env=env or self.env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=None if input is None else input.decode(),
            cwd=str(REPO),
            preexec_fn=default_sigint,
        )

    def start(
        self, *args: str, env: dict[str, str] | None = None, **popen: Any
    ) -> subprocess.Popen:
        """Start in its own process group (so a test can SIGKILL the whole group)."""
        popen.setdefault("stdout", subprocess.PIPE)
        popen.setdefault("stderr", subprocess.PIPE)
        return subprocess.Popen(
            [PY, "-m", "mrpool", *args],
            env=env or self.env(),
            start_new_session=True,
            cwd=str(REPO),
            preexec_fn=default_sigint,
            **popen,
        )

    def status(self, job_id: str) -> dict[str, Any]:
        r = self.run("status", job_id, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def results(self, job_id: str) -> list[dict[str, Any]]:
        r = self.run("results", job_id)
        assert r.returncode == 0, r.stderr
        return [json.loads(line) for line in r.stdout.splitlines()]

    def dlq(self, job_id: str) -> list[dict[str, Any]]:
        r = self.run("dlq", "list", job_id, "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def job_dir(self, job_id: str) -> Path:
        return self.state_dir / "jobs" / job_id


def kill_group(proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for(
    predicate, timeout: float = 20.0, interval: float = 0.01, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy (state-based sync, not sleeps)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def journal_records(job_dir: Path) -> list[dict[str, Any]]:
    """The journal's valid records (for asserting intermediate state)."""
    from mrpool.journal import read_records

    return [record for _, _, record in read_records(job_dir / "journal.log")]


def write_job(
    directory: Path,
    items: list[Any],
    map_step: dict[str, Any],
    name: str = "job",
    workers: int = 2,
    extra: dict[str, Any] | None = None,
    files: dict[str, str] | None = None,
) -> Path:
    """Write ``items.jsonl``, helper files and a JSON job file; return the job file path."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "items.jsonl", "w") as handle:
        for item in items:
            handle.write(json.dumps(item) + "\n")
    for filename, text in (files or {}).items():
        (directory / filename).write_text(text)
    lanes = int(os.environ.get("MRPOOL_TEST_CONCURRENCY") or 1)
    if lanes > 1 and "concurrency" not in map_step:  # the suite with lanes (scripts/stress.sh)
        map_step = {**map_step, "concurrency": lanes}
    job = {
        "name": name,
        "input": "items.jsonl",
        "workers": workers,
        "map": map_step,
        **(extra or {}),
    }
    path = directory / f"{name}.json"
    path.write_text(json.dumps(job))
    return path


# -- fixtures ----------------------------------------------------------------------
@pytest.fixture
def mrpool(tmp_path: Path) -> Mrpool:
    state = tmp_path / "state"
    return Mrpool(state, uuid.uuid4().hex)


def tagged_processes(tag: str) -> list[psutil.Process]:
    """Live processes started by a test (they inherit ``MRPOOL_TEST_TAG``)."""
    found = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if (
                proc.environ().get("MRPOOL_TEST_TAG") == tag
                and proc.status() != psutil.STATUS_ZOMBIE
            ):
                found.append(proc)
        except (psutil.Error, OSError):
            continue
    return found


def mrpool_shm(names: set[str]) -> set[str]:
    """The entries of ``names`` that look like mrpool's or multiprocessing's segments."""
    return {n for n in names if "mrpool" in n or n.startswith("psm_")}


def shm_entries() -> set[str]:
    try:
        return set(os.listdir("/dev/shm"))
    except FileNotFoundError:
        return set()


@pytest.fixture(autouse=True)
def no_leftovers(request):
    """After each test: no tagged processes, no new /dev/shm entries, no lock/temp files."""
    shm_before = shm_entries()
    yield
    fixture = request.node.funcargs.get("mrpool")
    if fixture is None:
        return
    deadline = time.monotonic() + 5
    leftovers = tagged_processes(fixture.tag)
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.05)
        leftovers = tagged_processes(fixture.tag)
    for proc in leftovers:  # clean up before failing, so one failure does not cascade
        try:
            proc.kill()
        except psutil.Error:
            pass
    assert not leftovers, f"processes left running: {[(p.pid, p.cmdline()) for p in leftovers]}"
    new_shm = mrpool_shm(shm_entries() - shm_before)
    assert not new_shm, f"shared-memory segments left: {new_shm}"
    jobs = fixture.state_dir / "jobs"
    if jobs.is_dir() and not getattr(request.node, "allow_leftover_files", False):
        for job_dir in jobs.iterdir():
            stray = [n for n in os.listdir(job_dir) if n in ("lock", "holder.json") or ".tmp-" in n]
            assert not stray, f"{job_dir}: files left behind: {stray}"


def pytest_collection_modifyitems(config, items):
    """Long randomized stress runs are opt-in: MRPOOL_STRESS=1 (scripts/ sets it)."""
    if os.environ.get("MRPOOL_STRESS") == "1":
        return
    skip = pytest.mark.skip(reason="stress run: set MRPOOL_STRESS=1 (see scripts/)")
    for item in items:
        if "stress" in item.keywords:
            item.add_marker(skip)
