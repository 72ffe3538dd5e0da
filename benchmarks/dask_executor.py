"""mrpool on Dask vs raw ``client.map`` over the same batches vs mrpool's local executor.

One 2-worker ``LocalCluster`` (processes, one thread each, allowed-failures 0)
is started once and kept warm, so no runner pays for its start. Per workload,
in interleaved rounds (medians):

* ``mrpool dask``: ``api.run_job`` with ``executor: dask://<that cluster>`` --
  ingest, journal, lock, helpers, everything a user gets.
* ``raw client.map``: the same items in the same slices (mrpool's slice size
  for that workload), mapped with plain ``client.map`` to a function that runs
  each item in the Dask worker and returns the encoded rows: no journal, no
  helper, no retries, nothing survives a crash.
* ``mrpool local``: ``api.run_job`` with the local executor (2 workers).

``journal s`` is the supervisor's time inside the journal (append, write, sync)
during the ``mrpool dask`` runs: what durability costs on top of the cluster.
``dask map s`` is the part of a ``mrpool dask`` run from its first ``submit`` to
its last outcome: the map phase itself, without the session's fixed costs
(connecting, one helper process started per Dask worker, closing), which is
what ``raw client.map`` measures too.

    python benchmarks/dask_executor.py [--callables 20000] [--commands 1000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import subprocess
import time
from pathlib import Path

import orjson
from _common import make_job, report, scratch

from mrpool import api
from mrpool.dask_executor import MAX_SLICE, TASK_SECONDS, DaskExecutor
from mrpool.journal import JournalWriter


def _raw_callables(lines: list[bytes]) -> bytes:
    from noop_map import noop

    rows = []
    for line in lines:
        started = time.monotonic()
        result = noop(orjson.loads(line))
        rows.append([0, 1, time.monotonic() - started, result])
    return orjson.dumps(rows)


def _raw_commands(lines: list[bytes]) -> bytes:
    rows = []
    for line in lines:
        started = time.monotonic()
        done = subprocess.run(["true"], input=line, capture_output=True)
        rows.append([0, 1, time.monotonic() - started, done.returncode])
    return orjson.dumps(rows)


class JournalClock:
    """Time spent in the journal's append/write/sync (patched on for a measurement)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._originals = {n: getattr(JournalWriter, n) for n in ("append", "write", "sync")}

    def __enter__(self) -> JournalClock:
        for name, original in self._originals.items():
            setattr(JournalWriter, name, self._timed(original))
        return self

    def __exit__(self, *_exc) -> None:
        for name, original in self._originals.items():
            setattr(JournalWriter, name, original)

    def _timed(self, original):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


class MapClock:
    """From the executor's first ``submit`` to the last ``wait`` that brought outcomes."""

    def __init__(self) -> None:
        self.first = self.last = 0.0
        self._submit, self._wait = DaskExecutor.submit, DaskExecutor.wait

    def __enter__(self) -> MapClock:
        clock = self

        def submit(executor, batch):
            if not clock.first:
                clock.first = time.perf_counter()
            return clock._submit(executor, batch)

        def wait(executor, timeout):
            outcomes = clock._wait(executor, timeout)
            if len(outcomes):
                clock.last = time.perf_counter()
            return outcomes

        DaskExecutor.submit, DaskExecutor.wait = submit, wait
        return self

    def __exit__(self, *_exc) -> None:
        DaskExecutor.submit, DaskExecutor.wait = self._submit, self._wait

    @property
    def seconds(self) -> float:
        return self.last - self.first


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--callables", type=int, default=20_000)
    parser.add_argument("--commands", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import dask
    import distributed

    dask.config.set({"distributed.scheduler.allowed-failures": 0})
    here = Path(__file__).resolve().parent
    cluster = distributed.LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        host="127.0.0.1",
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    client = distributed.Client(cluster)
    client.run(_add_path, str(here))  # the raw map imports noop_map, as mrpool's helper does
    address = "dask://" + cluster.scheduler_address.removeprefix("tcp://")
    base = scratch()
    workloads = [
        ("noop callable", args.callables, {"callable": "noop_map:noop"}, _raw_callables),
        ("`true` command", args.commands, {"command": ["true"]}, _raw_commands),
    ]
    rows, notes = [], []
    try:
        for name, n, step, raw_fn in workloads:
            job_dir = base / name.replace(" ", "_").replace("`", "")
            job = make_job(job_dir, n, step)
            (job_dir / "noop_map.py").write_text((here / "noop_map.py").read_text())
            lines = [orjson.dumps({"id": i}) for i in range(n)]
            size = _slice_size(client, raw_fn, lines)
            times: dict[str, list[float]] = {"dask": [], "map": [], "raw": [], "local": []}
            journal: list[float] = []
            for round_no in range(args.repeats):
                state = base / f"state-{round_no}-{len(rows)}"
                with JournalClock() as clock, MapClock() as map_clock:
                    times["dask"].append(_timed_run(job, state, address))
                journal.append(clock.seconds)
                times["map"].append(map_clock.seconds)
                times["raw"].append(_timed_raw(client, raw_fn, lines, size))
                times["local"].append(_timed_run(job, state, "local"))
            dask_s, map_s, raw_s, local_s = (
                statistics.median(times[k]) for k in ("dask", "map", "raw", "local")
            )
            rows.append(
                {
                    "workload": f"{n:,} x {name}",
                    "slice": size,
                    "mrpool dask s": round(dask_s, 3),
                    "dask map s": round(map_s, 3),
                    "raw client.map s": round(raw_s, 3),
                    "mrpool local s": round(local_s, 3),
                    "map / raw": round(raw_s / map_s, 2),
                    "dask / raw": round(raw_s / dask_s, 2),
                    "dask / local": round(local_s / dask_s, 2),
                    "journal s": round(statistics.median(journal), 3),
                }
            )
    finally:
        client.close()
        cluster.close()
    notes.append(
        "ratios are throughput, higher is better for mrpool on Dask: 'map / raw' = raw time / "
        "mrpool's map phase on Dask (target >= 0.8); 'dask / raw' the same for the whole job"
    )
    notes.append(
        "mrpool's times are whole jobs (ingest, journal, fsync, one helper process per Dask "
        "worker started per session); raw client.map times only the map over warm workers"
    )
    report("dask_executor", rows, notes)


def _add_path(path: str) -> None:
    import sys

    if path not in sys.path:
        sys.path.insert(0, path)


def _slice_size(client, raw_fn, lines: list[bytes]) -> int:
    """The slice mrpool converges to for this workload: ~TASK_SECONDS of work, at most
    MAX_SLICE items (measured on a sample run through the raw function)."""
    sample = lines[:50]
    rows = orjson.loads(client.submit(raw_fn, sample, pure=False).result())
    per_item = max(1e-7, sum(row[2] for row in rows) / len(rows))
    return max(1, min(MAX_SLICE, int(TASK_SECONDS / per_item)))


def _timed_run(job: Path, state: Path, executor: str) -> float:
    started = time.perf_counter()
    result = api.run_job(job, state_dir=state, executor=executor)
    elapsed = time.perf_counter() - started
    if result.exit_code != 0:
        raise SystemExit(f"mrpool run failed: {result.message}")
    return elapsed


def _timed_raw(client, raw_fn, lines: list[bytes], size: int) -> float:
    started = time.perf_counter()
    slices = [lines[i : i + size] for i in range(0, len(lines), size)]
    futures = client.map(raw_fn, slices, pure=False)
    for rows in client.gather(futures):
        orjson.loads(rows)
    return time.perf_counter() - started


if __name__ == "__main__":
    main()
