"""The smaller walls of a newcomer's first hour (issue 24, item 7): results with their
items, readable times, what ``status`` and a run's summary say of purged items and the
reduce step, DLQ filters, a script that names its own function, ``plan.summary()``.
"""

from __future__ import annotations

import json
import os
import subprocess
from datetime import datetime

import pytest
from conftest import PY, REPO, write_job

from mrpool import api

TASKS_PY = """
def work(item):
    if item["n"] == 3:
        raise ValueError("no such page")
    return {"pages": item["n"] * 10}

def total(results):
    return sum(r["pages"] for r in results)
"""


def status_lines(mrpool, job_id: str) -> dict[str, str]:
    r = mrpool.run("status", job_id)
    assert r.returncode == 0, r.stderr
    return {line[:20].strip(): line[21:] for line in r.stdout.splitlines()}


def assert_iso_twin(record: dict, field: str) -> None:
    """``FIELD_iso`` is the same instant as the epoch ``FIELD``, in ISO-8601 with offset."""
    when = datetime.fromisoformat(record[f"{field}_iso"])
    assert when.tzinfo is not None, record
    assert abs(when.timestamp() - record[field]) < 0.001, record


def test_results_times_status_and_the_reduce_after_a_purge(mrpool, tmp_path):
    job = write_job(
        tmp_path,
        [{"id": f"doc{n}", "n": n} for n in (1, 2, 3)],
        {"callable": "tasks:work"},
        extra={"reduce": {"callable": "tasks:total"}},
        files={"tasks.py": TASKS_PY},
    )
    # Phase 1: one item parks; the reduce waits for it.
    r = mrpool.run("run", str(job), "--job-id", "j")
    assert r.returncode == 1, r.stderr
    rows = [
        json.loads(line) for line in mrpool.run("results", "j", "--with-item").stdout.splitlines()
    ]
    assert rows == [
        {"id": "doc1", "item": {"id": "doc1", "n": 1}, "result": {"pages": 10}},
        {"id": "doc2", "item": {"id": "doc2", "n": 2}, "result": {"pages": 20}},
    ]
    plain = list(api.iter_results("j", state_dir=mrpool.state_dir))
    assert plain == [{k: v for k, v in row.items() if k != "item"} for row in rows]
    shown = status_lines(mrpool, "j")
    assert shown["purged"] == "0", shown
    assert shown["reduce"] == "not run yet: it runs once every item has succeeded", shown

    # Phase 2: every epoch time has its ISO-8601 twin.
    events = [json.loads(line) for line in mrpool.run("events", "j").stdout.splitlines()]
    assert events and all(list(e)[:2] == ["t", "t_iso"] for e in events), events[0]
    for event in events:
        assert_iso_twin(event, "t")
    shown_item = json.loads(mrpool.run("dlq", "show", "j", "doc3").stdout)
    for field in ("first_failure", "last_failure"):
        assert_iso_twin(shown_item, field)
    assert_iso_twin(shown_item["history"][0], "t")
    assert_iso_twin(
        api.open_dlq("j", state_dir=mrpool.state_dir).entries()[0].brief(), "last_failure"
    )
    assert_iso_twin(api.job_status("j", state_dir=mrpool.state_dir), "created_at")

    # Phase 3: plan.summary() prints as a sentence; a plan's repr stays short.
    plan = api.plan_resume("j", state_dir=mrpool.state_dir)
    assert str(plan.summary()) == (
        "1 item(s) to run (0 pending, 0 failed, 1 from the DLQ; 0 duplicate(s) collapsed; "
        "0 parked as poison)"
    )
    assert plan.summary()["dlq"] == 1 and len(repr(plan)) < 200

    # Phase 4: the purge leaves every item succeeded: it says how to run the reduce,
    # and so does status; resume runs it and says where its output and the results are.
    r = mrpool.run("dlq", "purge", "j", "--yes")
    assert r.returncode == 0, r.stderr
    assert "every item has succeeded; run the reduce step with: mrpool resume j" in r.stderr
    shown = status_lines(mrpool, "j")
    assert (shown["purged"], shown["state"]) == ("1", "completed"), shown
    assert shown["reduce"] == "not run yet; run it with: mrpool resume j", shown
    r = mrpool.run("resume", "j")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert "reduce: ran; its output: mrpool results j --reduce" in lines, r.stderr
    assert lines[-1] == "results: mrpool results j", r.stderr
    assert api.reduce_output("j", state_dir=mrpool.state_dir)["output"] == 30
    assert status_lines(mrpool, "j")["reduce"] == "ran; its output: mrpool results j --reduce"


FILTER_MAP = {
    "command": [
        "sh",
        "-c",
        "case {item.n} in 4) echo missing input >&2; exit 3;; "
        "5) echo bad format >&2; exit 3;; 6) sleep 5;; esac",
    ],
    "timeout": 0.5,
}


def test_dlq_list_and_retry_take_signature_and_kind_filters(mrpool, tmp_path):
    job = write_job(tmp_path, [{"id": n, "n": n} for n in range(1, 7)], FILTER_MAP)
    assert mrpool.run("run", str(job), "--job-id", "j").returncode == 1

    def listed(signature=None, kind=None) -> list[int]:  # the filters, read in-process
        dlq = api.open_dlq("j", state_dir=mrpool.state_dir)
        return [entry.id for entry in dlq.select(signature, kind)]

    parked = {entry["id"]: entry for entry in mrpool.dlq("j")}
    assert sorted(parked) == [4, 5, 6]
    signature = parked[4]["signature"]
    assert parked[5]["signature"] != signature
    assert listed(kind="exit") == [4, 5]
    assert listed(signature) == [4]
    assert 4 in listed(signature[:4].upper())  # a prefix, any case
    assert listed(signature, "timeout") == []
    r = mrpool.run("dlq", "list", "j", "--json", "--kind", "timeout")
    assert [entry["id"] for entry in json.loads(r.stdout)] == [6], r.stderr
    table = mrpool.run("dlq", "list", "j", "--kind", "timeout")
    assert "1 item(s) in the DLQ" in table.stderr, table.stderr
    assert [row.split()[0] for row in table.stdout.splitlines()] == ["ID", "6"], table.stdout

    # Retry only the signature of item 4: it alone gets a new attempt.
    r = mrpool.run("dlq", "retry", "j", "--signature", signature)
    assert r.returncode == 1, r.stderr
    assert "plan: 1 item(s) to run" in r.stderr, r.stderr
    attempts = {entry["id"]: entry["attempts"] for entry in mrpool.dlq("j")}
    assert attempts == {4: 2, 5: 1, 6: 1}
    r = mrpool.run("dlq", "retry", "j", "--kind", "nonesuch")
    assert r.returncode == 0, r.stderr
    assert "no item in the DLQ of job j matches --kind nonesuch" in r.stderr, r.stderr


SCRIPT_PY = """
from mrpool import api

def double(item):
    return item["n"] * 2

print("top-level code ran", flush=True)
report = api.run_job(
    {"input": "items.jsonl", "workers": 1, "map": {"callable": "script:double"}},
    base_dir=".",
)
print(report.state, [row["result"] for row in api.iter_results(report.job_id)], flush=True)
"""


@pytest.mark.parametrize("how", ["script", "module"])
def test_a_script_naming_its_own_function_does_not_run_its_top_level_twice(mrpool, tmp_path, how):
    """``python script.py`` (or ``python -m script``) whose job names ``script:double``,
    without an ``if __name__ == "__main__"`` guard: the check before the run, and the
    workers, use the running script, not a second import of it."""
    (tmp_path / "items.jsonl").write_text('{"n": 1}\n{"n": 2}\n')
    (tmp_path / "script.py").write_text(SCRIPT_PY)
    argv = [PY, "script.py"] if how == "script" else [PY, "-m", "script"]
    env = mrpool.env(PYTHONPATH=os.pathsep.join([str(REPO), str(tmp_path)]))
    r = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["top-level code ran", "completed [2, 4]"], r.stdout
