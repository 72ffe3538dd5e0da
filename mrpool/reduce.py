"""The reduce step: once every item has succeeded, fold the results into one output.

A reduce callable gets the list of successful results in input order and runs
in a forked child (a crash in user code cannot take the supervisor down); a
reduce command gets the results as JSONL on stdin and its stdout is the output
(JSON when it parses, else text). The output is stored atomically in
``reduce.json`` (``{"v":1,"ok":..,"output":..,"error":..,"t":..}``) and the
outcome is journaled, so ``results --reduce`` reads what the last reduce made.
"""

from __future__ import annotations

import subprocess
import time
import traceback
from pathlib import Path
from typing import Any

import orjson

from . import gc_policy
from .checksums import job_checksum
from .errors import CorruptStateError, fsck_hint
from .fsutil import atomic_write
from .spec import JobSpec, import_callable

__all__ = ["REDUCE_FILE", "run_reduce", "read_reduce_output"]

REDUCE_FILE = "reduce.json"


def run_reduce(spec: JobSpec, results: list[Any], job_dir) -> dict[str, Any]:
    """Run the reduce step; store and return ``{"ok", "output", "error"}``."""
    assert spec.reduce is not None
    if spec.reduce.callable:
        outcome = _reduce_callable(spec, results)
    else:
        outcome = _reduce_command(spec, results)
    outcome["v"] = 1
    outcome["t"] = time.time()
    outcome["checksum"] = job_checksum(outcome)  # of the other fields, as job.json's
    atomic_write(job_dir / REDUCE_FILE, orjson.dumps(outcome))
    return outcome


def read_reduce_output(job_dir) -> dict[str, Any] | None:
    """The stored outcome, verified (``CorruptStateError`` naming the file if damaged)."""
    path = Path(job_dir) / REDUCE_FILE
    try:
        outcome = orjson.loads(path.read_bytes())
        if not isinstance(outcome, dict) or not isinstance(outcome.get("ok"), bool):
            raise ValueError("not a reduce outcome")
        if "checksum" in outcome and outcome["checksum"] != job_checksum(outcome):
            raise ValueError("checksum mismatch")
        if "checksum" not in outcome and not set(outcome) <= _LEGACY_KEYS:
            raise ValueError("no checksum, and not the fields of an older mrpool's reduce.json")
    except FileNotFoundError:
        return None
    except ValueError as e:
        why = "invalid JSON" if isinstance(e, orjson.JSONDecodeError) else str(e)
        raise CorruptStateError(f"{path}: damaged ({why}); {fsck_hint(path.parent)}") from None
    return outcome


_LEGACY_KEYS = {"v", "ok", "output", "error", "tail", "t"}  # reduce.json of mrpool <= 0.1


def _child(spec: JobSpec, results: list[Any], conn) -> None:
    gc_policy.for_user_code()
    try:
        function = import_callable(spec.reduce.callable, spec.base_dir)
        conn.send_bytes(orjson.dumps({"ok": True, "output": function(results), "error": None}))
    except BaseException as e:  # noqa: BLE001 - reported to the user, not raised
        detail = " ".join(f"{type(e).__name__}: {e}".split())
        detail = detail.encode("utf-8", "replace").decode()  # a lone surrogate: "?", not a crash
        conn.send_bytes(
            orjson.dumps(
                {
                    "ok": False,
                    "output": None,
                    "error": detail,
                    "tail": traceback.format_exc()[-2048:].encode("utf-8", "replace").decode(),
                }
            )
        )
    finally:
        conn.close()


def _reduce_callable(spec: JobSpec, results: list[Any]) -> dict[str, Any]:
    import multiprocessing  # (here: the reading commands import this module too)

    ctx = multiprocessing.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    process = ctx.Process(target=_child, args=(spec, results, child), daemon=True)
    process.start()
    child.close()
    try:
        if not parent.poll(spec.reduce.timeout):
            process.kill()
            return {
                "ok": False,
                "output": None,
                "error": f"reduce timed out after {spec.reduce.timeout:g} s",
            }
        return orjson.loads(parent.recv_bytes())
    except EOFError:
        return {
            "ok": False,
            "output": None,
            "error": f"reduce process died (exit status {process.exitcode})",
        }
    except orjson.JSONDecodeError as e:
        return {
            "ok": False,
            "output": None,
            "error": f"reduce output is not JSON-serializable: {e}",
        }
    finally:
        process.join(2)
        if process.is_alive():
            process.kill()
            process.join()
        parent.close()


def _reduce_command(spec: JobSpec, results: list[Any]) -> dict[str, Any]:
    stdin = b"".join(orjson.dumps(r) + b"\n" for r in results)
    try:
        proc = subprocess.run(
            spec.reduce.command,
            input=stdin,
            capture_output=True,
            cwd=spec.base_dir,
            timeout=spec.reduce.timeout,
        )
    except subprocess.TimeoutExpired:
        return {
            "ok": False,
            "output": None,
            "error": f"reduce timed out after {spec.reduce.timeout:g} s",
        }
    except OSError as e:
        return {
            "ok": False,
            "output": None,
            "error": f"cannot run {spec.reduce.command[0]!r}: {e.strerror}",
        }
    if proc.returncode != 0:
        tail = proc.stderr[-2048:].decode("utf-8", errors="replace")
        last = tail.strip().splitlines()[-1] if tail.strip() else "(no stderr)"
        return {
            "ok": False,
            "output": None,
            "error": f"reduce exit status {proc.returncode}: {last}",
            "tail": tail,
        }
    try:
        output = orjson.loads(proc.stdout)
    except orjson.JSONDecodeError:
        output = proc.stdout.decode("utf-8", errors="replace")
    return {"ok": True, "output": output, "error": None}
