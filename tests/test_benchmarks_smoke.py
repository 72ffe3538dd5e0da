"""Each benchmark script runs on tiny sizes and writes its figures (no timing asserts here)."""

import json
import os
import subprocess
import sys

import pytest
from conftest import PY, REPO

sys.path.insert(0, str(REPO / "benchmarks"))
from _common import _fmt  # noqa: E402  (the benchmarks' own formatting of a cell)

pytestmark = pytest.mark.timeout(300)

SCRIPTS = [
    ("throughput", ["--items", "300", "--repeats", "1"]),
    ("commands", ["--items", "30", "--repeats", "1"]),
    ("efficiency", ["--items", "40", "--repeats", "1"]),
    ("resume_scale", ["--sizes", "500"]),
    ("lock_contention", ["--rounds", "1"]),
    ("payloads", ["--cases", "20x20000", "--repeats", "1"]),
    ("failures", ["--items", "200", "--repeats", "1"]),
    ("python_map", ["--items", "300", "--slow-items", "20", "--repeats", "1"]),
    ("io_bound", "--items 40 --wait 0.05 --workers 1 --concurrency 4 --repeats 1".split()),
    ("map_cost", ["--small", "100", "--large", "400", "--repeats", "1"]),
    ("end_to_end", ["--sizes", "300", "--repeats", "1"]),
]


@pytest.mark.parametrize("name,args", SCRIPTS, ids=[name for name, _ in SCRIPTS])
def test_benchmark_script_runs_and_reports(name, args, tmp_path):
    """The script exits 0, prints its table, and its JSON has one row per runner/measure
    (written where the test says, not into the repo's benchmarks/results)."""
    results = tmp_path / f"{name}.json"
    r = subprocess.run(
        [PY, str(REPO / "benchmarks" / f"{name}.py"), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PYTHONPATH": str(REPO), "MRPOOL_BENCH_RESULTS": str(tmp_path)},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    figures = json.loads(results.read_text())
    assert figures["benchmark"] == name and figures["rows"]
    assert all(isinstance(v, (int, float, str)) for row in figures["rows"] for v in row.values())
    rows, keys = figures["rows"], list(figures["rows"][0])
    lines = r.stdout.splitlines()
    header = next(k for k, line in enumerate(lines) if line.startswith(keys[0]))
    assert all(key in lines[header] for key in keys)  # the table's columns
    body = lines[header + 1 : header + 1 + len(rows)]
    for line, row in zip(body, rows, strict=True):  # one printed line per row, in order
        first = _fmt(row[keys[0]])
        assert line.startswith(first) and line[len(first) : len(first) + 2].strip() == "", line
