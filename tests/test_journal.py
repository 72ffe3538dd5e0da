"""The journal and checkpoint survive torn writes; real corruption is reported, never skipped.

Every test starts from a *real* job directory -- written by ``mrpool run`` in a
subprocess -- copied to a scratch state dir, then damaged the way a crash or a
bad disk would damage it:

* a torn tail: the last record cut at every byte offset (what SIGKILL or a power
  cut during an append leaves), or padded with zeros (what some file systems
  leave after a power cut). ``read_records`` and ``JobStore.load_state`` must
  return every earlier record / the state they imply, and ``JournalWriter`` must
  cut the torn bytes away before appending;
* a damaged checkpoint (it is derived): the state is rebuilt from the journal;
* a flipped byte in the middle of the journal: not a crash artefact, so
  ``status`` / ``results`` fail with one line naming journal.log and the byte offset.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import write_job

from mrpool.errors import CorruptStateError, StateRebuiltWarning
from mrpool.journal import (
    JournalWriter,
    decode_line,
    encode_record,
    read_records,
)
from mrpool.records import started_attempts
from mrpool.store import JobState, JobStore

pytestmark = pytest.mark.timeout(240)

MAP = """\
def work(item):
    if item["id"] == 3:
        raise ValueError("three is not allowed")
    return {"n": item["id"], "text": "x" * item["id"]}
"""


# -- helpers -----------------------------------------------------------------------
def real_job(mrpool, tmp_path: Path) -> tuple[Path, str]:
    """Run a 6-item job (item 3 fails into the DLQ) and copy its directory to a scratch root."""
    job_file = write_job(
        tmp_path / "job",
        [{"id": i} for i in range(1, 7)],
        {"callable": "jmap:work"},
        files={"jmap.py": MAP},
    )
    r = mrpool.run("run", str(job_file), "--job-id", "j")
    assert r.returncode == 1, r.stderr
    root = tmp_path / "copy"
    shutil.copytree(mrpool.job_dir("j"), root / "jobs" / "j")
    return root, "j"


def overwrite(path: Path, data: bytes) -> None:
    """Make ``path`` hold ``data``: pwrite + ftruncate, since ext4 flushes on O_TRUNC (slow)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def records_with_offsets(path: Path) -> list[tuple[int, int, dict]]:
    return list(read_records(path))


def replay(records: list[dict], total: int) -> JobState:
    state = JobState(total)
    for record in records:
        state.apply(record)
    return state


def same_state(a: JobState, b: JobState) -> bool:
    return (
        a.status == b.status
        and a.attempts == b.attempts
        and a.streak == b.streak
        and a.open_attempts() == b.open_attempts()
        and a.counts == b.counts
        and a.reduce == b.reduce
    )


def status_cli(mrpool, root: Path, job_id: str, *args: str):
    return mrpool.run("status", job_id, "--json", *args, env=mrpool.env(MRPOOL_HOME=str(root)))


# -- torn tails ----------------------------------------------------------------------
def test_last_record_torn_at_every_byte_offset_keeps_every_earlier_record(
    mrpool, tmp_path, monkeypatch
):
    """Cut (or zero-pad) the last record anywhere: all earlier records and their state survive."""
    root, job_id = real_job(mrpool, tmp_path)
    monkeypatch.setattr(os, "fsync", lambda fd: None)  # durability is not the point: ~1000 writers
    store = JobStore(root, job_id)
    path = store.journal_path
    original = path.read_bytes()
    entries = records_with_offsets(path)
    total = store.info().total
    checkpoint = (store.dir / "checkpoint.json").read_bytes()
    # Tear the last record of the journal as it stands after each of these kinds:
    # the final "close", the last "f" (a failure) and the last "ok" (results).
    kinds = {"close", "f", "ok"}
    chosen = [n for n, (_, _, rec) in enumerate(entries) if rec["k"] in kinds]
    chosen = sorted({max(n for n in chosen if entries[n][2]["k"] == k) for k in kinds})
    assert len(chosen) == 3
    tried = 0
    for n in chosen:
        start, end, _ = entries[n]
        earlier = [rec for _, _, rec in entries[:n]]
        expected = replay(earlier, total)
        for cut in range(start, end):
            padded = original[:cut] + b"\0" * (
                end - cut
            )  # same length, zeros where bytes were lost
            for torn in (original[:cut], padded):
                # Phase 1: the reader returns exactly the earlier records and stops quietly.
                overwrite(path, torn)
                assert [rec for _, _, rec in read_records(path)] == earlier, (n, cut)

                # Phase 2: the replayed state is theirs. A checkpoint is written only after the
                # journal is fsynced up to its offset, so one pointing past the end of a
                # shorter journal proves acknowledged records were lost: refused, loudly.
                if torn is not padded:
                    overwrite(store.dir / "checkpoint.json", checkpoint)
                    with pytest.raises(CorruptStateError, match="acknowledged records lost"):
                        store.load_state(total)
                (store.dir / "checkpoint.json").unlink(missing_ok=True)
                state = store.load_state(total)
                assert same_state(state, expected) and state.offset == start, (n, cut)

                # Phase 3: the writer cuts the torn bytes away before it appends.
                writer = JournalWriter(path, state.offset)
                assert path.stat().st_size == start
                writer.append({"k": "ckpt", "t": 1.0, "off": start})
                writer.close()
                assert path.read_bytes() == original[:start] + encode_record(
                    {"k": "ckpt", "t": 1.0, "off": start}
                )
                assert [rec["k"] for _, _, rec in read_records(path)] == [
                    rec["k"] for rec in earlier
                ] + ["ckpt"]
                tried += 1
    assert tried == 2 * sum(entries[n][1] - entries[n][0] for n in chosen)


def test_status_of_a_job_with_a_torn_tail_works_and_resume_cleans_it(mrpool, tmp_path):
    """``status`` reads past nothing: exit 0 with the earlier records' counts; resume truncates."""
    root, job_id = real_job(mrpool, tmp_path)
    store = JobStore(root, job_id)
    entries = records_with_offsets(store.journal_path)
    # Tear the last "ok" record: its items go back to pending.
    last_ok = max(n for n, (_, _, rec) in enumerate(entries) if rec["k"] == "ok")
    start, end, record = entries[last_ok]
    lost = len(record["b"])
    data = store.journal_path.read_bytes()
    store.journal_path.write_bytes(data[: start + (end - start) // 2])
    (store.dir / "checkpoint.json").unlink()

    # Phase 1: status works and shows the state without the torn record.
    r = status_cli(mrpool, root, job_id)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert (status["succeeded"], status["dlq"], status["pending"]) == (5 - lost, 1, lost)
    assert status["state"] == "interrupted"

    # Phase 2: resume cuts the torn bytes and finishes; the journal is whole again.
    r = mrpool.run("resume", job_id, env=mrpool.env(MRPOOL_HOME=str(root)))
    assert r.returncode == 1, r.stderr  # item 3 still fails
    recs = [rec for _, _, rec in read_records(store.journal_path)]
    assert sum(1 for _ in store.journal_path.open("rb")) == len(recs)  # no bad line anywhere
    status = json.loads(status_cli(mrpool, root, job_id).stdout)
    assert (status["succeeded"], status["dlq"], status["pending"]) == (5, 1, 0)


# -- checkpoints -----------------------------------------------------------------------
def test_damaged_checkpoint_is_ignored_and_the_state_rebuilt_from_the_journal(mrpool, tmp_path):
    """Truncated or byte-flipped checkpoint.json at every offset: identical state from the journal."""
    root, job_id = real_job(mrpool, tmp_path)
    store = JobStore(root, job_id)
    total = store.info().total
    path = store.dir / "checkpoint.json"
    good = path.read_bytes()
    reference = replay([rec for _, _, rec in read_records(store.journal_path)], total)
    reference_end = store.journal_path.stat().st_size

    # Phase 1: the sound checkpoint gives the journal's state.
    state = store.load_state(total)
    assert same_state(state, reference) and state.offset == reference_end

    # Phase 2: every truncation and every flipped byte is detected and rebuilt around.
    damaged = [good[:cut] for cut in range(len(good))]
    damaged += [good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1 :] for i in range(len(good))]
    for n, data in enumerate(damaged):
        overwrite(path, data)
        with pytest.warns(StateRebuiltWarning, match="checkpoint.json: damaged checkpoint"):
            state = store.load_state(total)
        assert same_state(state, reference) and state.offset == reference_end, n

    # Phase 3: an older sound checkpoint is used, and the journal after it replayed.
    entries = records_with_offsets(store.journal_path)
    middle = len(entries) // 2
    older = replay([rec for _, _, rec in entries[: middle + 1]], total)
    older.offset = entries[middle][1]
    store.write_checkpoint(older)
    state = store.load_state(total)
    assert same_state(state, reference) and state.offset == reference_end

    # Phase 4: the CLI agrees: same counts as with the sound checkpoint, exit 0.
    path.write_bytes(good[: len(good) // 2])
    r = status_cli(mrpool, root, job_id)
    assert r.returncode == 0, r.stderr
    status = json.loads(r.stdout)
    assert (status["total"], status["succeeded"], status["dlq"], status["pending"]) == (6, 5, 1, 0)
    assert "checkpoint.json" in r.stderr


# -- the start record's two forms ----------------------------------------------------------
def test_a_start_run_means_exactly_its_pairs_and_never_lowers_an_attempt():
    """``s`` with ``r`` runs replays to the state the same attempts as ``b`` pairs give,
    including an item whose recorded attempt is already higher than the run's."""
    before = [{"k": "s", "b": [[4, 7]]}, {"k": "ok", "b": [[4, 7, 0.1, None]]}]
    runs = {"k": "s", "r": [[0, 3, 1], [4, 3, 2]], "b": [[9, 5]]}
    pairs = {"k": "s", "b": [[i, a] for i, a in started_attempts(runs)]}
    assert pairs["b"] == [[0, 1], [1, 1], [2, 1], [4, 2], [5, 2], [6, 2], [9, 5]]
    with_runs, with_pairs = replay(before + [runs], 10), replay(before + [pairs], 10)
    assert same_state(with_runs, with_pairs)
    assert list(with_runs.attempts) == [1, 1, 1, 0, 7, 2, 2, 0, 0, 5]
    # open attempts read as each item's highest (a live writer never starts a lower one)
    assert with_runs.open_attempts() == {0: 1, 1: 1, 2: 1, 4: 7, 5: 2, 6: 2, 9: 5}


def test_a_fresh_run_journals_its_starts_as_runs(mrpool, tmp_path):
    """A new job's dispatches are consecutive first attempts: ``r`` runs, no pairs."""
    root, job_id = real_job(mrpool, tmp_path)
    starts = [r for _, _, r in read_records(JobStore(root, job_id).journal_path, kind="s")]
    assert starts and all("r" in r and "b" not in r for r in starts), starts
    started = [pair for r in starts for pair in started_attempts(r)]
    assert sorted(started) == [(i, 1) for i in range(6)]


# -- corruption ------------------------------------------------------------------------
def test_reading_one_kind_of_record_yields_exactly_those_records(mrpool, tmp_path):
    """``read_records(kind=...)`` is the full read filtered by kind, offsets included."""
    root, job_id = real_job(mrpool, tmp_path)
    path = JobStore(root, job_id).journal_path
    everything = records_with_offsets(path)
    kinds = {record["k"] for _, _, record in everything}
    assert {"job", "open", "s", "ok", "close"} <= kinds
    for kind in sorted(kinds):
        expected = [entry for entry in everything if entry[2]["k"] == kind]
        assert list(read_records(path, kind=kind)) == expected, kind


def test_flipped_byte_in_the_middle_of_the_journal_is_an_error_naming_file_and_offset(
    mrpool, tmp_path
):
    """A bad record followed by good ones is corruption: one-line error, journal.log + offset."""
    root, job_id = real_job(mrpool, tmp_path)
    store = JobStore(root, job_id)
    path = store.journal_path
    good = path.read_bytes()
    entries = records_with_offsets(path)
    start, end, _ = entries[len(entries) // 2]

    # Phase 1: any byte of a middle record flipped -> the reader refuses, naming the offset,
    # also when it reads one kind of record only (the others are checked, not decoded).
    for i in range(start, end):
        overwrite(path, good[:i] + bytes([good[i] ^ 0xFF]) + good[i + 1 :])
        for kind in (None, "ok"):
            with pytest.raises(CorruptStateError) as caught:
                list(read_records(path, kind=kind))
            assert "journal.log" in str(caught.value) and f"byte {start} " in str(caught.value), i

    # Phase 2: `status` (no checkpoint to start from) fails with one line, no traceback.
    flipped = good[: start + 20] + bytes([good[start + 20] ^ 0xFF]) + good[start + 21 :]
    path.write_bytes(flipped)
    checkpoint = store.dir / "checkpoint.json"
    saved = checkpoint.read_bytes()
    checkpoint.unlink()
    r = status_cli(mrpool, root, job_id)
    assert r.returncode not in (0, 2), r.stdout
    message = r.stderr.strip()
    assert "\n" not in message and "Traceback" not in message, message
    assert "journal.log" in message and f"byte {start}" in message, message

    # Phase 3: with a checkpoint past the damage, `results` (which reads it all) still refuses.
    checkpoint.write_bytes(saved)
    r = mrpool.run("results", job_id, env=mrpool.env(MRPOOL_HOME=str(root)))
    assert r.returncode not in (0, 2) and r.stdout == "", r.stdout
    message = r.stderr.strip()
    assert "\n" not in message and "journal.log" in message and f"byte {start}" in message


# -- group commit on the committer thread --------------------------------------------
def test_a_slow_fsync_does_not_hold_up_the_writer_and_a_forced_sync_waits_for_it(
    tmp_path, monkeypatch
):
    """The disk is made slow (fsync blocks until released): an unforced sync starts the
    fsync and returns at once, records keep reaching the kernel meanwhile, and a forced
    sync waits for it, then fsyncs what came after."""
    import threading

    import mrpool.journal as journal_mod

    release, calls, real_fsync = threading.Event(), [], os.fsync

    def slow_fsync(fd):
        calls.append(os.fstat(fd).st_size)
        assert release.wait(10)
        real_fsync(fd)

    path = tmp_path / "journal.log"
    writer = JournalWriter(path, 0, commit_interval=0.0)
    monkeypatch.setattr(journal_mod.os, "fsync", slow_fsync)
    writer.append({"k": "job", "n": 1})
    assert writer.sync() is True  # an fsync started; it is blocked on the "disk"
    writer.append({"k": "ok", "n": 2})
    assert writer.sync() is False  # written to the kernel; the next commit waits its turn
    assert len(path.read_bytes().splitlines()) == 2
    threading.Timer(0.2, release.set).start()
    writer.sync(force=True)
    assert len(calls) == 2 and calls[1] == path.stat().st_size  # the second covers both
    writer.close()
    assert [r["n"] for _, _, r in read_records(path)] == [1, 2]


def test_an_fsync_failing_on_the_committer_thread_is_raised_by_the_next_sync(tmp_path, monkeypatch):
    import errno

    import mrpool.journal as journal_mod
    from mrpool.errors import StorageError

    def failing_fsync(fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    path = tmp_path / "journal.log"
    writer = JournalWriter(path, 0, commit_interval=0.0)
    monkeypatch.setattr(journal_mod.os, "fsync", failing_fsync)
    writer.append({"k": "job"})
    assert writer.sync() is True
    with pytest.raises(StorageError, match=r"journal\.log: cannot fsync journal"):
        writer.sync(force=True)
    with pytest.raises(StorageError):  # and every later one: nothing since is known durable
        writer.sync()
    writer.abandon()


# -- results read without decoding -------------------------------------------------------
def test_result_spans_find_exactly_the_results_orjson_wrote():
    """``result_spans`` locates each result's JSON in an ``ok`` line without decoding it;
    on tricky values (escapes at window edges, nesting, brackets inside strings) the bytes
    it finds decode to exactly the results, and a line of another layout falls back."""
    import random

    import orjson

    from mrpool.journal import result_spans

    rng = random.Random(5)
    alphabet = ["a", '"', "\\", "\n", "é", "\u2028", "{", "[", "]", "}", ","]

    def text(n):
        return "".join(rng.choice(alphabet) for _ in range(n))

    edge = "\\" * ((1 << 20) - 3) + '"'  # an escape split by the 1 MiB window edge
    for case in range(300):
        values = [
            rng.choice([None, 7, -2.5e-7, True, text(rng.randint(0, 40)), {"a": [text(5), {}]},
                        [[], [1, text(3)]], edge if case == 0 else "x"])
            for _ in range(rng.randint(1, 4))
        ]  # fmt: skip
        rows = orjson.dumps([[i, 1, 0.5e-6, v] for i, v in enumerate(values)])
        line = encode_record({"k": "ok", "b": orjson.Fragment(rows), "t": 1.0})
        spans = result_spans(line)
        assert [orjson.loads(line[start:end]) for _, start, end in spans] == values
        assert [index for index, _, _ in spans] == list(range(len(values)))
    other = encode_record({"t": 1.0, "k": "ok", "b": [[3, 1, 0.1, {"x": 1}]]})
    assert result_spans(other) == [(3, -1, -1)]  # "decode to read"


def test_status_rechecks_the_checkpointed_prefix_only_when_the_journal_changed(
    mrpool, tmp_path, monkeypatch
):
    """A finished job's journal is as the checkpoint saw it: no re-read. Any change of size
    or mtime: the prefix is re-checked, and a flip in it is found and located."""
    import mrpool.store as store_mod

    root, job_id = real_job(mrpool, tmp_path)
    store = JobStore(root, job_id)
    shutil.rmtree(root)
    shutil.copytree(mrpool.job_dir(job_id), root / "jobs" / job_id)  # copy2: mtimes kept
    total = store.info().total
    reads = []
    real = store_mod.crc_of_bytes
    monkeypatch.setattr(store_mod, "crc_of_bytes", lambda *a: reads.append(a) or real(*a))
    store.load_state(total)
    assert reads == []  # unchanged since the checkpoint: nothing re-read
    entries = records_with_offsets(store.journal_path)
    start = entries[2][0]
    data = bytearray(store.journal_path.read_bytes())
    data[start + 12] ^= 0x01
    overwrite(store.journal_path, bytes(data))
    with pytest.raises(CorruptStateError, match=rf"journal\.log: damaged at byte {start} "):
        store.load_state(total)
    assert len(reads) == 1


def _record_with_checksum(test) -> bytes:
    """An encoded record whose checksum field passes ``test`` (records differ by ``t``)."""
    return next(
        line
        for t in range(200_000)
        if test((line := encode_record({"k": "plan", "t": float(t)}))[:8])
    )


@pytest.mark.parametrize(
    "respell",
    [
        lambda crc: crc.upper(),  # a flipped 0x20 bit: 'a' -> 'A'
        lambda crc: b"+" + crc[1:],
        lambda crc: b" " + crc[1:],
        lambda crc: b"0_" + crc[2:],
    ],
    ids=["upper", "sign", "space", "underscore"],
)
def test_a_checksum_field_not_as_written_fails_the_record(respell):
    """Only the writer's own form (eight lowercase hex digits) verifies: a checksum
    field that parses to the same number in another spelling is damage, as a changed
    payload byte is (``int(field, 16)`` took all four)."""
    line = _record_with_checksum(lambda crc: crc.startswith(b"00") and crc != crc.upper())
    spelled = respell(line[:8])
    assert int(spelled, 16) == int(line[:8], 16) and spelled != line[:8]
    assert decode_line(line) is not None
    assert decode_line(spelled + line[8:]) is None
