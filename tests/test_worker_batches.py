"""A worker's batch loop for callables gives exactly what running items one by one gives.

The worker decodes a whole batch of ``items.jsonl`` lines in one call (TABs and
LFs turned into commas: one flat array) and keeps results that cannot change after
return (None, booleans, floats) unencoded until the batch is sent. These tests
pin down the two promises that make that safe: the batch decode yields the very
items a line-by-line decode yields, or declines (never a different item); and a
result is recorded as it was when the map returned, with one that cannot be
encoded failing only its own attempt.
"""

from __future__ import annotations

import json

import orjson
from conftest import write_job
from hypothesis import given, settings
from hypothesis import strategies as st
from test_run import events, run_ok

from mrpool.executor import Answer, Batch, LocalExecutor, Outcomes
from mrpool.worker import WorkerConfig, _decoded_items, _json_now, _outcomes_message

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=12,
)
# Whitespace a user's line may hold between tokens; ingest keeps such bytes unless they
# hold a TAB, but a job directory written by other means (or damaged) might.
whitespace = st.sampled_from([b"", b" ", b"\t", b"  \t "])


def spaced(value: object, gaps: list[bytes]) -> bytes:
    """``value`` as JSON with ``gaps`` (cycled) inserted at every token boundary."""
    text = orjson.dumps(value)
    out, k, in_string, escaped = [], 0, False, False
    for byte in text:
        char = bytes([byte])
        if in_string:
            out.append(char)
            if escaped:
                escaped = False
            elif char == b"\\":
                escaped = True
            elif char == b'"':
                in_string = False
            continue
        if char in b"[]{},:":
            out += [gaps[k % len(gaps)], char, gaps[(k + 1) % len(gaps)]]
            k += 2
        else:
            if char == b'"':
                in_string = True
            out.append(char)
    return b"".join(out)


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 10**6) | st.text(max_size=6), json_values), min_size=1, max_size=20
    ),
    st.lists(whitespace, min_size=1, max_size=5),
)
def test_a_batch_decodes_to_the_line_by_line_items_or_declines(rows, gaps):
    """Whatever TABs a line holds, the one-call decode is the per-line decode, or None."""
    lines = [orjson.dumps(raw_id) + b"\t" + spaced(item, gaps) + b"\n" for raw_id, item in rows]
    one_by_one = [orjson.loads(line[line.index(b"\t") + 1 :]) for line in lines]
    decoded = _decoded_items(b"".join(lines), len(lines))
    if b"\t" not in b"".join(gaps):
        assert decoded == one_by_one  # what ingest writes always takes the fast path
    else:
        assert decoded in (None, one_by_one)


def test_a_batch_with_a_line_missing_or_over_the_size_cap_declines():
    lines = [b'1\t{"a":1}\n', b'2\t{"a":2}\n']
    assert _decoded_items(b"".join(lines), 2) == [{"a": 1}, {"a": 2}]
    assert _decoded_items(b"".join(lines), 3) is None  # the header names more items
    big = b'1\t"' + b"x" * (1 << 20) + b'"\n'
    assert _decoded_items(big, 1) is None  # decoded line by line: never held all at once


RESULTS_MOD = """
SHARED = []

def result(item):
    kind = item["kind"]
    if kind == "set":
        return {1, 2}
    if kind == "bigint":
        return 2 ** 70
    if kind == "surrogate":
        return "\\ud800"
    if kind == "nan":
        return float("nan")
    if kind == "shared":  # the same list, changed again by later calls
        SHARED.append(item["id"])
        return SHARED
    if kind == "raise":
        raise ValueError("no " + str(item["id"]))
    if kind == "raise-surrogate":  # a message that is not valid text
        raise ValueError("bad \\udc80 byte")
    return {"none": None, "true": True, "float": 0.25, "text": "t", "int": 7}[kind]
"""


def test_each_result_is_recorded_as_returned_and_a_bad_one_fails_only_its_attempt(mrpool, tmp_path):
    """Results that cannot be encoded (a set, an int past 64 bits, a lone surrogate) fail
    their own attempt with a clear message; the rest of the batch is recorded, each result
    as it was at return, and the worker lives on."""
    # Phase 1: one worker, one batch, every kind of result, some after the bad ones.
    kinds = ["none", "set", "true", "bigint", "float", "surrogate", "shared", "text", "shared"]
    kinds += ["raise", "nan", "int", "shared", "raise-surrogate"]
    items = [{"id": n, "kind": kind} for n, kind in enumerate(kinds)]
    job = write_job(
        tmp_path / "job",
        items,
        {"callable": "resmod:result"},
        workers=1,
        files={"resmod.py": RESULTS_MOD},
    )

    # Phase 2: run: the bad ones end in the DLQ, so exit 1.
    job_id = run_ok(mrpool, job, expect=1)

    # Phase 3: results as returned -- the shared list as it was at each return.
    assert mrpool.results(job_id) == [
        {"id": 0, "result": None},
        {"id": 2, "result": True},
        {"id": 4, "result": 0.25},
        {"id": 6, "result": [6]},
        {"id": 7, "result": "t"},
        {"id": 8, "result": [6, 8]},
        {"id": 10, "result": None},  # NaN is not JSON: orjson writes null
        {"id": 11, "result": 7},
        {"id": 12, "result": [6, 8, 12]},
    ]
    dlq = {e["id"]: e["error"] for e in mrpool.dlq(job_id)}
    assert sorted(dlq) == [1, 3, 5, 9, 13]
    for n in (1, 3, 5):
        assert "result is not JSON-serializable" in dlq[n], dlq[n]
    assert "ValueError: no 9" in dlq[9]
    assert "ValueError: bad ? byte" in dlq[13]  # what cannot be text is replaced, not fatal
    assert not [e for e in events(mrpool, job_id) if e["event"] == "worker_died"]
    assert json.loads(mrpool.run("status", job_id, "--json").stdout)["dlq"] == 5


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.booleans(), json_values), min_size=1, max_size=30))
def test_a_workers_outcomes_reach_the_supervisor_sorted_and_journal_ready(outcomes):
    """What a worker sends for a mixed batch is read back as: the failures, each with its
    own line, and the successes' indices with their rows encoded exactly as the journal
    stores them -- in order, nothing lost, nothing moved between the two."""
    n = len(outcomes)
    indices = [10 + 3 * k for k in range(n)]  # not consecutive: no slice shortcut
    attempts = [1 + k % 3 for k in range(n)]
    lines = [b'%d\t{"k":%d}\n' % (i, k) for k, i in enumerate(indices)]
    rows = []
    for k, (ok, value) in enumerate(outcomes):
        if ok:
            rows.append([indices[k], attempts[k], 0.5, _json_now(value)])
        else:
            rows.append([indices[k], attempts[k], 0.25, {"kind": "exception", "msg": "no"}, 1])
    answer = Answer.decode(_outcomes_message(rows))
    assert answer.count == n
    got = Outcomes()
    answer.sort(Batch(indices, attempts, lines), 4242, got)

    good = [k for k, (ok, _) in enumerate(outcomes) if ok]
    bad = [k for k, (ok, _) in enumerate(outcomes) if not ok]
    assert [f.index for f in got.failed] == [indices[k] for k in bad]
    assert [(f.attempt, f.line, f.error["pid"]) for f in got.failed] == [
        (attempts[k], lines[k], 4242) for k in bad
    ]
    assert [i for done in got.ok for i in done.indices] == [indices[k] for k in good]
    journaled = [row for done in got.ok for row in orjson.loads(done.rows)]
    assert journaled == [orjson.loads(orjson.dumps(rows[k])) for k in good]
    assert answer.duration == sum(row[2] for row in rows)


def test_large_fast_items_are_held_a_few_mib_at_a_time_per_worker(tmp_path):
    """Real workers, 100 KB items and a no-op map: a batch is sized by bytes as well as
    by time, so what a worker holds (sent, not yet answered) stays near two batches of
    ``MAX_BATCH_BYTES`` instead of growing to hundreds of items; every item comes back."""
    from mrpool import executor as executor_mod

    (tmp_path / "m.py").write_text("def f(item):\n    return None\n")
    executor = LocalExecutor(WorkerConfig("j", str(tmp_path), None, "m:f", None), 2)
    pad = "x" * 100_000
    pending = [b'%d\t{"id":%d,"pad":"%s"}\n' % (i, i, pad.encode()) for i in range(600)]
    item_size = len(pending[0])
    done, peak = 0, 0
    executor.start()
    try:
        while done < 600:
            room = executor.capacity()
            if room and pending:
                first = 600 - len(pending)
                lines, pending = pending[:room], pending[room:]
                executor.submit(
                    Batch(list(range(first, first + len(lines))), [1] * len(lines), lines)
                )
            peak = max([peak] + [w.held * item_size for w in executor.workers if w is not None])
            outcomes = executor.wait(0.05)
            assert not outcomes.failed and not outcomes.requeued
            done += sum(len(s.indices) for s in outcomes.ok)
    finally:
        executor.shutdown()
    assert peak <= 2 * executor_mod.MAX_BATCH_BYTES + item_size, peak
