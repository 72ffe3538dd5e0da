"""Shared helpers for the benchmark scripts: job setup, timing, medians, output.

Every benchmark measures mrpool and its peers in the same run on the same
machine and prints ratios (mrpool / peer, higher is better for throughput), so
the figures mean something on any machine. Figures are also written as JSON to
``benchmarks/results/NAME.json`` (or ``$MRPOOL_BENCH_RESULTS/NAME.json``: the
tests' smoke runs write to a temporary directory, never into the repo).
"""

from __future__ import annotations

import compileall
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))


def make_job(
    directory: Path, n: int, map_step: dict, workers: int = 2, item=lambda i: {"id": i}
) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "items.jsonl", "w") as handle:
        for i in range(n):
            handle.write(json.dumps(item(i)) + "\n")
    job = {"name": "bench", "input": "items.jsonl", "workers": workers, "map": map_step}
    path = directory / "job.json"
    path.write_text(json.dumps(job))
    return path


def compile_bytecode() -> None:
    """Compile mrpool's modules once, as any installed package is: with
    PYTHONDONTWRITEBYTECODE set (as on this machine) every CLI start would
    otherwise recompile the sources and the figure would measure the compiler."""
    compileall.compile_dir(REPO / "mrpool", quiet=1)


def time_mrpool_cli(job_file: Path, state_dir: Path, *extra: str) -> float:
    """Wall time of `python -m mrpool run` end to end (start-up, ingest, run, fsync)."""
    compile_bytecode()
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.perf_counter()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mrpool",
            "run",
            str(job_file),
            "--state-dir",
            str(state_dir),
            *extra,
        ],
        env=env,
        capture_output=True,
        text=True,
    )
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"mrpool run failed ({proc.returncode}): {proc.stderr}")
    return elapsed


def timed_process(
    argv: list[str], env=None, ok=(0,), stdout=subprocess.DEVNULL
) -> tuple[float, int]:
    """Wall seconds and peak RSS in bytes of running ``argv`` to its end: the largest
    process of its tree (``wait4``'s ``ru_maxrss`` covers the waited-for descendants).
    An exit status not in ``ok`` stops the benchmark with the command's stderr."""
    return timed_process_cpu(argv, env, ok, stdout)[:2]


def timed_process_cpu(
    argv: list[str], env=None, ok=(0,), stdout=subprocess.DEVNULL
) -> tuple[float, int, float]:
    """``timed_process`` and the CPU seconds (user + system) of the process and its
    waited-for descendants: on a shared machine, the figure a busy neighbour moves least."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=stdout, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    proc.stderr.close()
    if code not in ok:
        raise SystemExit(f"{' '.join(argv[:4])} ... exited {code}: {err}")
    return elapsed, usage.ru_maxrss * 1024, usage.ru_utime + usage.ru_stime


def interleaved_rounds(repeats: int, runners: dict) -> dict[str, list[float]]:
    """Every runner's times, measured round-robin (one run of each per round), so that a
    slow spell of a shared machine hits every runner alike, not one of them."""
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(repeats):
        for name, measure in runners.items():
            times[name].append(measure())
    return times


def interleaved_medians(repeats: int, runners: dict) -> dict[str, float]:
    """The median of ``interleaved_rounds`` for each runner."""
    rounds = interleaved_rounds(repeats, runners)
    return {name: statistics.median(values) for name, values in rounds.items()}


def ratio_rows(rounds: dict[str, list[float]], ours: str, items: int) -> list[dict]:
    """One row per runner: median seconds with the [min-max] range over rounds, and the
    ratio peer / mrpool taken round by round (both timed in the same round), as the
    median with its range -- the figure a README may quote, with the range it had."""
    rows = []
    for name, times in rounds.items():
        ratios = [peer / mine for peer, mine in zip(times, rounds[ours])]
        rows.append(
            {
                "runner": name,
                "seconds": statistics.median(times),
                "range s": f"{min(times):.3f}-{max(times):.3f}",
                "items/s": items / statistics.median(times),
                "peer s / mrpool s": statistics.median(ratios),
                "ratio range": f"{min(ratios):.2f}-{max(ratios):.2f}",
            }
        )
    return rows


def figure(workload: str, mrpool: str, peer: str, ratios: list[float], unit: str = "x") -> dict:
    """One README figure, in the shape ``scripts/readme_figures.py`` renders for every
    benchmark: the workload, what mrpool and its peer measured (text), and the ratio
    taken round by round (``unit`` "x": peer / mrpool, >1 means mrpool is better; "%":
    a percentage), kept as its median with the [min-max] over the rounds."""
    return {
        "workload": workload,
        "mrpool": mrpool,
        "peer": peer,
        "ratio": statistics.median(ratios),
        "min": min(ratios),
        "max": max(ratios),
        "unit": unit,
        "rounds": len(ratios),
    }


def ratio_figures(
    rounds: dict[str, list[float]], ours: str, workload: str, peers: list[str] | None = None
) -> list[dict]:
    """``figure`` for each peer of ``ratio_rows``'s rounds (all but ``ours``, or ``peers``)."""
    mine = rounds[ours]
    return [
        figure(
            workload,
            f"{statistics.median(mine):.3f} s",
            f"{name}: {statistics.median(times):.3f} s",
            [peer / me for peer, me in zip(times, mine)],
        )
        for name, times in rounds.items()
        if name != ours and (peers is None or name in peers)
    ]


def scratch() -> Path:
    return Path(tempfile.mkdtemp(prefix="mrpool-bench-"))


def report(
    name: str, rows: list[dict], notes: list[str] | None = None, figures: list[dict] | None = None
) -> None:
    """Print a table and write NAME.json (see the module docstring for where), with the
    README ``figures`` (see ``figure``) this run produced."""
    keys = list(rows[0].keys()) if rows else []
    widths = {k: max(len(k), *(len(_fmt(r.get(k))) for r in rows)) for k in keys}
    print("  ".join(k.ljust(widths[k]) for k in keys))
    for r in rows:
        print("  ".join(_fmt(r.get(k)).ljust(widths[k]) for k in keys))
    for note in notes or []:
        print(f"note: {note}")
    out = Path(os.environ.get("MRPOOL_BENCH_RESULTS") or HERE / "results")
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_avg": round(os.getloadavg()[0], 1),  # a shared machine's, as the run ended
        "rows": rows,
        "notes": notes or [],
        "figures": figures or [],
    }
    (out / f"{name}.json").write_text(json.dumps(payload, indent=2))


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:,.3f}" if value < 100 else f"{value:,.0f}"
    return "" if value is None else str(value)
