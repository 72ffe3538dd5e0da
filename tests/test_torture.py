"""Random-kill torture (scripts/torture.py): a short run in the suite, long ones on demand.

The script SIGKILLs the supervisor alone, one worker, or the whole process
group at random instants over run/resume cycles, then checks: nothing lost,
no duplicate result, no recorded success re-run, no leaked process, lock,
temp file or shared-memory segment (workers must end within 2 s of their
supervisor's death).
"""

import os
import subprocess

import pytest
from conftest import PY, REPO

pytestmark = pytest.mark.timeout(600)


def run_torture(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, str(REPO / "scripts" / "torture.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )


def test_short_torture_loses_nothing():
    """Two jobs, four random kills each: all counters zero, exit 0."""
    r = run_torture("--jobs", "2", "--kills", "4", "--items", "40", "--seed", "11", timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "lost=0 duplicated=0 re-run=0 leaks=0" in r.stdout
    trials = int(r.stdout.split("trials=")[1].split()[0])
    assert trials >= 6, r.stdout  # kills really landed mid-run


@pytest.mark.stress
def test_long_torture_loses_nothing():
    """200 trials (MRPOOL_STRESS=1, or scripts/torture.py directly)."""
    r = run_torture("--jobs", "40", "--kills", "5", timeout=3600)
    assert r.returncode == 0, r.stdout + r.stderr
