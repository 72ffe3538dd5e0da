"""results.py: the streaming reader behind ``mrpool results`` gives exactly what decoding
the journal gives -- the first success of each item, in input order -- whatever the
records look like: runs the supervisor writes, rows out of order, repeated successes,
results whose bytes mimic row heads, large rows, items without a success."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

import orjson
import pytest
from conftest import PY, write_job

from mrpool import results
from mrpool.journal import encode_record


def write_journal(path: Path, batches: list[list[tuple[int, object]]]) -> None:
    """A journal of a job header, ``ok`` records (one per batch of (index, result)) and
    unrelated records between them."""
    records = [{"k": "job", "v": 1, "t": 1.0, "job_id": "j", "total": 0}]
    for n, batch in enumerate(batches):
        records.append({"k": "s", "r": [[0, 1, 1]], "t": 2.0})
        rows = [[index, 1, 0.000123 * (n + 1), result] for index, result in batch]
        records.append({"k": "ok", "b": orjson.Fragment(orjson.dumps(rows)), "t": 3.0})
    path.write_bytes(b"".join(map(encode_record, records)))


def expected(batches: list[list[tuple[int, object]]], total: int) -> list[tuple[int, bytes]]:
    first: dict[int, bytes] = {}
    for batch in batches:
        for index, result in batch:
            first.setdefault(index, orjson.dumps(result))
    return sorted((i, r) for i, r in first.items() if i < total)


def read(path: Path, total: int) -> list[tuple[int, bytes]]:
    return [(i, bytes(r)) for i, r in results.result_json(path, total)]


def test_every_kind_of_record_gives_the_first_success_in_input_order(tmp_path):
    big = "x" * 10_000
    batches = [
        [(0, "a"), (1, {"x": [1, 2]})],  # a run, as the supervisor writes them
        [(3, 5), (2, "b")],  # rows out of order: looked up one by one
        [(1, "again")],  # a second success of item 1: the first one counts
        [(4, [[0], [5, 1]])],  # its bytes hold "],[5,": looks like a run of items 4 and 5
        [(5, "five")],  # ... whose item 5 is really here
        [(6, big), (7, big + "y")],  # large rows: cut from the bytes, not decoded
        [(9, None), (10, 1.5e-7), (11, 'tab\there \\ "quoted" ],[12,')],
    ]  # item 8: no success
    path = tmp_path / "journal.log"
    write_journal(path, batches)
    assert read(path, 12) == expected(batches, 12)


@pytest.mark.parametrize("seed", range(40))
def test_random_journals_read_as_decoding_them_does(tmp_path, seed):
    rng = random.Random(seed)
    total = rng.randint(1, 300)
    values = [
        lambda: rng.randint(-5, 10**12),
        lambda: "s" * rng.randint(0, 9000),
        lambda: [[rng.randint(0, total)], [rng.randint(0, total), 1]],
        lambda: {"k": f"],[{rng.randint(0, total)},", "v": [1, 2.5, None, True]},
        lambda: None,
    ]
    batches, at = [], 0
    while at < total:
        count = rng.randint(1, 40)
        batch = [(i, rng.choice(values)()) for i in range(at, min(at + count, total))]
        if rng.random() < 0.3:
            rng.shuffle(batch)
        if rng.random() < 0.2:
            batch = batch[: len(batch) // 2]  # some items never succeed
        batches.append(batch)
        at += count
    for _ in range(rng.randint(0, 5)):  # retried items, successes repeated later
        picked = rng.sample(range(total), rng.randint(1, min(total, 20)))
        batches.append([(i, rng.choice(values)()) for i in sorted(picked)])
    if rng.random() < 0.3:
        rng.shuffle(batches)
    path = tmp_path / "journal.log"
    write_journal(path, batches)
    assert read(path, total) == expected(batches, total)


def test_jsonl_blocks_are_the_rows_iter_result_lines_gives(tmp_path):
    """The CLI's blocks (a large row in three pieces) join to exactly the per-row lines."""
    batches = [[(0, "small"), (1, "L" * (results.BIG_ROW + 5))], [(3, {"a": 1}), (2, 7)]]
    path = tmp_path / "journal.log"
    write_journal(path, batches)
    ids = [b'"a"', b"17", b'"c\\u0001"', b"4"]
    lines = [
        b"".join(b"%s\t{}\n" % i for i in ids[:2]),
        b"%s\t%s\n" % (ids[2], b"x" * 999) + ids[3] + b"\t{}\n",
    ]
    pieces = list(results.jsonl_blocks(path, 4, lines))
    rows = [b'{"id":%b,"result":%b}\n' % (ids[i], r) for i, r in expected(batches, 4)]
    assert b"".join(pieces) == b"".join(rows)
    assert any(isinstance(p, memoryview) for p in pieces), "the large result was copied"
    assert [(raw_id, bytes(r)) for raw_id, r in results.result_pairs(path, 4, lines)] == [
        (ids[i], r) for i, r in expected(batches, 4)
    ]
    items = [b"{}", b"{}", b"x" * 999, b"{}"]
    with_items = [
        b'{"id":%b,"item":%b,"result":%b}\n' % (ids[i], items[i], r)
        for i, r in expected(batches, 4)
    ]
    assert b"".join(results.jsonl_blocks(path, 4, lines, with_item=True)) == b"".join(with_items)


def test_reading_commands_import_neither_psutil_nor_the_executor(mrpool, tmp_path):
    """status / results / events start without the running side (its imports were ~40 %
    of a reading command's start-up): they may run while the job runs, many times."""
    job = write_job(tmp_path / "job", [{"id": 1}, {"id": 2}], {"callable": "builtins:str"})
    assert mrpool.run("run", str(job), "--job-id", "reads").returncode == 0
    probe = (
        "import sys\n"
        "from mrpool.cli import main\n"
        "for argv in sys.argv[1:]:\n"
        "    assert main(argv.split()) == 0, argv\n"
        "heavy = ('psutil', 'fasteners', 'multiprocessing', 'mrpool.executor',\n"
        "         'mrpool.supervisor', 'mrpool.worker', 'mrpool.slots')\n"
        "print(sorted(m for m in heavy if m in sys.modules), file=sys.stderr)\n"
    )
    commands = ["status reads", "status reads --json", "status", "results reads", "events reads"]
    r = subprocess.run(
        [PY, "-c", probe, *commands], env=mrpool.env(), capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stderr.splitlines()[-1] == "[]", r.stderr


def test_after_a_rerun_record_the_next_success_counts(tmp_path):
    """``mrpool rerun`` writes a ``rerun`` record: the items it names take their first
    success after it, also items of a run an earlier record owned."""
    first_batch = [(i, f"old{i}") for i in range(6)]
    records = [{"k": "job", "v": 1, "t": 1.0, "job_id": "j", "total": 6}]
    rows = [[i, 1, 0.1, r] for i, r in first_batch]
    records.append({"k": "ok", "b": orjson.Fragment(orjson.dumps(rows)), "t": 2.0})
    records.append({"k": "rerun", "b": [2, 4], "t": 3.0})
    rows = [[4, 2, 0.1, "new4"], [2, 2, 0.1, "new2"]]
    records.append({"k": "ok", "b": orjson.Fragment(orjson.dumps(rows)), "t": 4.0})
    path = tmp_path / "journal.log"
    path.write_bytes(b"".join(map(encode_record, records)))
    want = [(i, orjson.dumps(f"old{i}")) for i in (0, 1, 3, 5)]
    want += [(2, b'"new2"'), (4, b'"new4"')]
    assert read(path, 6) == sorted(want)
