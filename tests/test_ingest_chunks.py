"""The chunked ingest gives exactly what a plain line-by-line reading gives.

``items.ingest`` validates the input a chunk at a time, taking a fast path for
chunks with nothing unusual in them and redoing any other chunk item by item.
These tests shrink the chunks to a few lines so that every case -- duplicates
across chunks, 7 and "7" as one identity, blank lines, TABs and CRs, a bad line
late in the file, items without an id -- lands on a chunk boundary somewhere,
and compare the job's copy of the items (or the one-line error) with a
reference model written the obvious way.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mrpool import items
from mrpool.errors import InputError
from mrpool.spec import spec_from_dict


def reference_rows(lines: list[bytes], id_field: str | None) -> list[tuple[object, object]]:
    """(id, item) per unique item, first wins: the contract's identity rules, plainly."""
    parsed = [orjson.loads(line) for line in lines if line.strip()]
    if id_field is None and all(isinstance(p, dict) and "id" in p for p in parsed):
        id_field = "id"
    rows, seen = [], set()
    for item in parsed:
        if id_field is None:
            canonical = orjson.dumps(item, option=orjson.OPT_SORT_KEYS)
            raw_id: object = hashlib.blake2b(canonical, digest_size=16).hexdigest()
        else:
            raw_id = item[id_field]
        key = raw_id if isinstance(raw_id, str) else str(raw_id)
        if key not in seen:
            seen.add(key)
            rows.append((raw_id, item))
    return rows


def ingest_lines(tmp: Path, lines: list[bytes], id_field: str | None = None):
    tmp.mkdir(parents=True, exist_ok=True)
    (tmp / "in.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    job = {"input": "in.jsonl", "map": {"command": ["true"]}}
    if id_field:
        job["id_field"] = id_field
    spec = spec_from_dict(job, base_dir=tmp, source=str(tmp / "job.yaml"))
    out = tmp / "out"
    out.mkdir(exist_ok=True)
    report = items.ingest(spec, out)
    stored = [items.split_line(line) for line in items.iter_item_lines(out)]
    return report, [(raw_id, orjson.loads(item)) for raw_id, item in stored]


@pytest.fixture
def tiny_chunks(monkeypatch):
    monkeypatch.setattr(items, "CHUNK_BYTES", 40)  # two or three lines a chunk


@pytest.fixture(params=[1, 3], ids=["one-pass", "three-parts"])
def parts(request, monkeypatch):
    """Validate in one pass, or in three parts (two forked helpers) whatever the cores."""
    monkeypatch.setattr(items, "MIN_PART_BYTES", 1)
    monkeypatch.setattr(items, "_cores", lambda: request.param)
    return request.param


class small_parts:
    """Tiny chunks, and the input cut into ``n`` parts (for hypothesis, which cannot
    take function-scoped fixtures)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        self.saved = items.CHUNK_BYTES, items.MIN_PART_BYTES, items._cores
        items.CHUNK_BYTES, items.MIN_PART_BYTES, items._cores = 40, 1, lambda: self.n

    def __exit__(self, *_):
        items.CHUNK_BYTES, items.MIN_PART_BYTES, items._cores = self.saved


ids = st.one_of(st.integers(-3, 12), st.integers(-3, 12).map(str), st.sampled_from(["a", "b\tc"]))
lines_with_ids = st.lists(
    st.one_of(
        ids.map(lambda i: orjson.dumps({"id": i, "v": 1})),
        ids.map(lambda i: b'  {"id": %s}\r' % orjson.dumps(i)),  # padding and a CR (CRLF file)
        st.just(b""),  # blank line
    ),
    min_size=1,
    max_size=30,
)


@pytest.mark.parametrize("n_parts", [1, 3])
@settings(max_examples=100, deadline=None)
@given(lines=lines_with_ids)
def test_chunked_ingest_matches_the_line_by_line_reference(tmp_path_factory, lines, n_parts):
    items_ = [line for line in lines if line.strip()]
    if not items_:
        return
    with small_parts(n_parts):
        report, stored = ingest_lines(tmp_path_factory.mktemp("ingest"), lines)
    expected = reference_rows(lines, None)
    assert stored == expected
    assert report.total == len(expected)
    assert report.duplicates == len(items_) - len(expected)


def test_seven_and_quoted_seven_are_one_item_across_chunks(tmp_path, tiny_chunks, parts):
    lines = [b'{"id": %d}' % i for i in range(10)] + [b'{"id": "7"}', b'{"id": "x"}']
    report, stored = ingest_lines(tmp_path, lines)
    assert [raw_id for raw_id, _ in stored] == [*range(10), "x"]
    assert report.duplicates == 1


def test_a_bad_line_in_a_late_chunk_is_named_by_its_line_number(tmp_path, tiny_chunks, parts):
    lines = [b'{"id": %d}' % i for i in range(20)]
    lines[16] = b'{"id": 16'
    with pytest.raises(InputError, match=r"in\.jsonl:17: invalid JSON"):
        ingest_lines(tmp_path, lines)


def test_a_bad_id_in_a_late_chunk_is_named_by_its_line_number(tmp_path, tiny_chunks, parts):
    lines = [b'{"key": "k%d"}' % i for i in range(20)]
    lines[13] = b'{"key": 1.5}'
    with pytest.raises(InputError, match=r"in\.jsonl:14: field 'key' is float"):
        ingest_lines(tmp_path, lines, id_field="key")


def test_one_item_without_an_id_switches_every_chunk_to_content_hashes(
    tmp_path, tiny_chunks, parts
):
    lines = [b'{"id": %d}' % i for i in range(15)] + [b'{"name": "no id"}']
    report, stored = ingest_lines(tmp_path, lines)
    assert report.id_mode == "content-hash"
    assert stored == reference_rows(lines, None)


def test_a_large_clean_input_takes_several_real_chunks(tmp_path):
    n = 300_000  # > CHUNK_BYTES (1 MiB) of input: the real chunk size, more than one chunk
    lines = [b'{"id": "item-%07d", "payload": "%s"}' % (i, b"x" * 8) for i in range(n)]
    lines.append(b'{"id": "item-0000005"}')  # a duplicate of an early item, in the last chunk
    report, stored = ingest_lines(tmp_path, lines)
    assert report.total == n and report.duplicates == 1
    assert stored[0] == ("item-0000000", orjson.loads(lines[0]))
    assert stored[-1] == (f"item-{n - 1:07d}", orjson.loads(lines[n - 1]))


def test_parts_validated_by_helpers_give_the_same_bytes_and_leave_nothing_behind(
    tmp_path, parts, monkeypatch
):
    """A clean input cut into parts makes exactly the file one pass makes, from the
    helpers' rows; their row files are gone and no helper outlives the ingest."""
    import multiprocessing

    kept = []
    copy_rows = items._Helper.copy_rows
    monkeypatch.setattr(
        items._Helper, "copy_rows", lambda h, out: (kept.append(h), copy_rows(h, out))
    )
    lines = [b'{"id": "k%d", "v": [%d, "x"]}' % (i, i) for i in range(500)]
    report, stored = ingest_lines(tmp_path / "a", lines)
    assert len(kept) == parts - 1  # every later part came from its helper
    assert report.total == 500 and report.duplicates == 0
    assert stored == reference_rows(lines, None)
    assert sorted(p.name for p in (tmp_path / "a" / "out").iterdir()) == ["items.jsonl"]
    assert multiprocessing.active_children() == []


def test_a_duplicate_in_a_later_part_is_counted_and_the_first_one_kept(tmp_path, parts):
    lines = [b'{"id": %d, "first": true}' % i for i in range(300)]
    lines.append(b'{"id": "5", "first": false}')  # in the last part: seen in the first
    report, stored = ingest_lines(tmp_path, lines)
    assert report.total == 300 and report.duplicates == 1
    assert stored[5] == (5, {"id": 5, "first": True})
    assert stored == reference_rows(lines, None)


def test_the_first_bad_line_is_named_even_when_a_later_part_also_has_one(tmp_path, parts):
    lines = [b'{"id": %d}' % i for i in range(300)]
    lines[120], lines[280] = b'{"id": 120', b"not json"
    with pytest.raises(InputError, match=r"in\.jsonl:121: invalid JSON"):
        ingest_lines(tmp_path, lines)
    lines[120] = b'{"id": 120}'
    with pytest.raises(InputError, match=r"in\.jsonl:281: invalid JSON"):
        ingest_lines(tmp_path / "again", lines)


def test_no_helper_to_be_had_means_one_plain_pass(tmp_path, monkeypatch):
    """Forking can fail (EAGAIN when a user is at their process limit, which cannot be
    made to happen here): the ingest then validates every part itself."""
    import errno
    import multiprocessing.process

    monkeypatch.setattr(items, "MIN_PART_BYTES", 1)
    monkeypatch.setattr(items, "_cores", lambda: 3)
    started = []

    def no_fork(process):
        if started:  # the first helper starts, the second cannot
            raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN))
        started.append(process)
        original_start(process)

    original_start = multiprocessing.process.BaseProcess.start
    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", no_fork)
    lines = [b'{"id": %d}' % i for i in range(300)]
    report, stored = ingest_lines(tmp_path, lines)
    assert len(started) == 1 and report.total == 300
    assert stored == reference_rows(lines, None)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["items.jsonl"]
    assert multiprocessing.active_children() == []
