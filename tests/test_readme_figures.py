"""README's performance table is rendered from the benchmarks' JSON, never typed by hand."""

from __future__ import annotations

import json
import subprocess
import sys

from conftest import PY, REPO

sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "scripts"))
from _common import figure, ratio_figures  # noqa: E402
from readme_figures import BEGIN, END  # noqa: E402

SCRIPT = REPO / "scripts" / "readme_figures.py"


def results_file(directory, name: str, figures: list[dict], when="2026-12-02 16:00:00") -> None:
    payload = {"benchmark": name, "when": when, "python": "3.11", "cpus": 2, "rows": [],
               "notes": [], "figures": figures}  # fmt: skip
    (directory / f"{name}.json").write_text(json.dumps(payload))


def render(tmp_path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [PY, str(SCRIPT), "--results", str(tmp_path / "results"), "--readme",
         str(tmp_path / "README.md"), *extra],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_any_benchmarks_figures_become_rows_with_their_ranges(tmp_path):
    """Figures of any benchmark in the common shape -- one the renderer has never heard of
    included -- become rows in a stable order, each ratio with its [min-max]; the rest
    of the README is left alone; --check tells a stale table from a current one."""
    # Phase 1: two benchmarks' results, one of them new to the renderer.
    results = tmp_path / "results"
    results.mkdir()
    rounds = {"mrpool": [1.0, 2.0, 4.0], "peer A": [2.0, 3.0, 4.0], "mrpool CLI": [1, 2, 3]}
    results_file(results, "io_bound", [figure("1000 x 10 ms", "10.2 s", "threads: 10.1 s",
                                              [0.97, 0.99, 1.01])])  # fmt: skip
    results_file(results, "throughput", ratio_figures(rounds, "mrpool", "100k dicts", ["peer A"]))
    (results / "unrelated.json").write_text(json.dumps({"benchmark": "x", "rows": []}))
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n\n{BEGIN}\nstale | row\n{END}\n\nafter\n")

    # Phase 2: render, then check.
    assert render(tmp_path, "--check").returncode == 1
    assert render(tmp_path).returncode == 0
    text = readme.read_text()
    assert text.startswith(f"intro\n\n{BEGIN}\n| workload |") and text.endswith(f"{END}\n\nafter\n")
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows[0].startswith("| 100k dicts | 2.000 s | peer A: 3.000 s | **1.50x** [1.00-2.00x]")
    assert "`throughput.py`, 2026-12-02, 2 CPUs" in rows[0]
    assert rows[1].startswith("| 1000 x 10 ms | 10.2 s | threads: 10.1 s | **0.99x** [0.97-1.01x]")
    assert "stale" not in text and len(rows) == 2
    assert render(tmp_path, "--check").returncode == 0


def test_the_readme_table_is_what_the_committed_results_render():
    r = subprocess.run([PY, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
