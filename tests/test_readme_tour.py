"""The README's quick tour, pasted as it is into bash and into Python, works.

The blocks are read from README.md at test time, so the test breaks when the README
drifts from what the commands do. ``mrpool`` on PATH is this checkout's (a shim), and
state goes to a fresh, non-default ``$MRPOOL_HOME``. Each line of the bash block runs as
written; after each one the test's own marker line records its exit status.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from conftest import PY, REPO

TOUR = REPO / "README.md"
SESSION_COMMANDS = (
    "mrpool run",
    "mrpool resume",
    "mrpool dlq retry",
    "mrpool rerun",
)  # may exit 1: DLQ
MARK = "@@tour-rc"


def tour_blocks(language: str) -> list[str]:
    """The ```language blocks of the README's "Quick tour" section."""
    section = TOUR.read_text().split("\n## Quick tour\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"^```{language}\n(.*?)^```$", section, re.M | re.S)


def tour_env(mrpool, tmp_path: Path) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    shim = bin_dir / "mrpool"
    shim.write_text(f'#!/bin/sh\nexec "{PY}" -m mrpool "$@"\n')
    shim.chmod(0o755)
    env = mrpool.env()
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    return env


def test_the_bash_tour_runs_as_written(mrpool, tmp_path):
    (block,) = tour_blocks("bash")
    commands = [line for line in block.splitlines() if line.strip()]
    assert len(commands) >= 8, block
    script = "".join(f'{line}\necho "{MARK} $?" >&2\n' for line in commands)
    r = subprocess.run(
        ["bash", "-c", script],
        cwd=REPO,
        env=tour_env(mrpool, tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    codes = [int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith(MARK)]
    assert len(codes) == len(commands), r.stderr
    for line, code in zip(commands, codes):
        allowed = (0, 1) if any(c in line.split("#")[0] for c in SESSION_COMMANDS) else (0,)
        assert code in allowed, f"{line!r} exited {code}:\n{r.stderr}"
    for bad in ("Traceback", "command not found", "unrecognized arguments", "no such job"):
        assert bad not in r.stderr, r.stderr
    # What the tour promises to show: the job, its status, results, the two parked items.
    (job_id,) = [p.name for p in (mrpool.state_dir / "jobs").iterdir()]
    status = json.loads(
        next(line for line in r.stdout.splitlines() if line.startswith('{"job_id"'))
    )
    assert (status["job_id"], status["dlq"], status["succeeded"]) == (job_id, 2, 40), status
    assert '"id":"doc01"' in r.stdout and '"item":{' in r.stdout
    assert "missing-a" in r.stdout and "Seq\tHost\tStarttime" in r.stdout


def test_the_python_tour_runs_as_written(mrpool, tmp_path):
    (block,) = tour_blocks("python")
    r = subprocess.run(
        [PY, "-c", block],
        cwd=REPO,
        env=tour_env(mrpool, tmp_path),
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert r.returncode == 0, r.stderr
    job_id, state, plan = r.stdout.splitlines()[:3]
    assert (mrpool.state_dir / "jobs" / job_id).is_dir()
    assert state == "completed_with_failures"
    assert plan == (
        "2 item(s) to run (0 pending, 0 failed, 2 from the DLQ; 0 duplicate(s) collapsed; "
        "0 parked as poison)"
    )
