"""Each benchmark script runs on tiny sizes and writes its figures (no timing asserts here)."""

import json
import os
import subprocess

import pytest
from conftest import PY, REPO

pytestmark = pytest.mark.timeout(300)

SCRIPTS = [
    ("throughput", ["--items", "300", "--repeats", "1", "--executor-items", "100"]),
    ("commands", ["--items", "30", "--repeats", "1"]),
    ("efficiency", ["--items", "40", "--repeats", "1"]),
    ("resume_scale", ["--sizes", "500"]),
    ("lock_contention", ["--rounds", "1"]),
    ("python_map", ["--items", "300", "--slow-items", "20", "--repeats", "1"]),
]


@pytest.mark.parametrize("name,args", SCRIPTS, ids=[name for name, _ in SCRIPTS])
def test_benchmark_script_runs_and_reports(name, args, tmp_path):
    """The script exits 0, prints its table, and its JSON has one row per runner/measure."""
    results = REPO / "benchmarks" / "results" / f"{name}.json"
    r = subprocess.run(
        [PY, str(REPO / "benchmarks" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    figures = json.loads(results.read_text())
    assert figures["benchmark"] == name and figures["rows"]
    assert all(isinstance(v, (int, float, str)) for row in figures["rows"] for v in row.values())
    first_row = next(iter(figures["rows"][0].values()))
    assert str(first_row) in r.stdout or first_row in r.stdout
