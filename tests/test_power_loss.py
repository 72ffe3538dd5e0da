"""Power cuts, not only SIGKILLs: every crash state the persistence model allows.

A SIGKILL never loses what the kernel holds, so kill tests cannot catch a missing
fsync. Here each workload runs once under strace (tests/powercut.py records its
file-system calls), and for every point where something became durable, plus the
start and the end, the state a power cut may leave there is built -- with none of
the pending (un-fsynced) changes, with all of them, and with a seeded random prefix
and tear -- and checked: nothing acknowledged lost, one result per id, counts that
add up, no traceback, and ``resume`` finishing the job without re-running a
recorded success. The model is written down in tests/powercut.py's docstring.
"""

from __future__ import annotations

import os

import powercut
import pytest
from conftest import REPO

pytestmark = [
    pytest.mark.skipif(
        not powercut.strace_available(), reason="needs strace (apt-get install strace)"
    ),
    pytest.mark.timeout(240),
]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=str(REPO), **extra)
    env.pop("MRPOOL_FAILPOINTS", None)
    env.update(extra)
    return env


def explore(tmp_path, workload: str, items: int = 12, **env: str) -> tuple[int, list[str]]:
    trace = powercut.record_workload(workload, tmp_path / "work", items=items, env=_env(**env))
    side_log = tmp_path / "side.log"
    os.environ["POWERCUT_SIDE_LOG"] = str(side_log)  # inherited by the workers resume forks
    try:
        return powercut.explore(trace, tmp_path / "states", side_log, samples=1, seed=7)
    finally:
        del os.environ["POWERCUT_SIDE_LOG"]


@pytest.mark.parametrize("workload", powercut.WORKLOADS)
def test_every_power_cut_state_recovers(tmp_path, workload):
    """All cut points of a 12-item job under each workload: no guarantee broken."""
    checked, problems = explore(tmp_path, workload)
    assert checked >= 6, checked  # the trace had durable points to cut at
    assert problems == [], "\n".join(problems[:20])


def test_the_explorer_catches_a_missing_directory_fsync(tmp_path):
    """A build that skips every directory fsync (failpoint ``fsutil.fsync_dir=skip``)
    prints a job id whose job a power cut can take away: the explorer must say so."""
    checked, problems = explore(tmp_path, "run", MRPOOL_FAILPOINTS="fsutil.fsync_dir=skip")
    assert any("the job's id was printed" in p for p in problems), problems[:5]


def test_a_new_state_dir_is_durable_before_the_job_id_is_printed(tmp_path):
    """Regression (found by the explorer): ``run`` into a new state dir created
    ``state/``, ``jobs/`` and ``tmp/`` without fsyncing their parents, so a power cut
    after the id was printed could leave no job at all."""
    trace = powercut.record_workload("run", tmp_path / "work", items=3, env=_env())
    printed = next(
        pos for pos, what in powercut.model_at(trace.calls, trace.root, None, None).acks
        if what.startswith("stdout:")
    )  # fmt: skip
    model = powercut.model_at(trace.calls, trace.root, trace.before, printed)
    state = tmp_path / "cut"
    model.materialise(state, None, keep_all=False)  # nothing un-fsynced survives
    assert (state / "jobs" / "j" / "journal.log").exists()
