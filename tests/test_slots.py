"""Worker slots: what a worker writes is what the supervisor and the next session read.

The worker's hot path stores straight into typed views of the shared mapping;
on a big-endian machine it packs little-endian fields instead (the file format
is little endian either way). Both must give the same file, the same
``read()`` and the same crash evidence. The next session ends the processes a
slot file names -- only those: a pid reused by someone else is left alone --
and reads a version-1 file of an older mrpool conservatively.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import time

import pytest

from mrpool.slots import (
    IDLE,
    RUNNING,
    SLOTS_FILE,
    SlotTable,
    crash_evidence,
    end_session,
    process_start,
)
from mrpool.store import JobState


def open_state(total: int, started: list[tuple[int, int]]) -> JobState:
    """A job's state with these ``(index, attempt)`` attempts started and open."""
    state = JobState(total)
    state.apply({"k": "s", "b": [list(pair) for pair in started]})
    return state


@pytest.mark.parametrize("byteorder", ["little", "big"], ids=["typed-views", "packed"])
def test_what_a_worker_writes_is_what_readers_see(tmp_path, monkeypatch, byteorder):
    path = tmp_path / SLOTS_FILE
    table = SlotTable(3, path, items=10)
    state = open_state(10, [(3, 7), (4, 7), (5, 2)])
    try:
        table.claim(1, 4242)
        monkeypatch.setattr(sys, "byteorder", byteorder)
        begin, end = table.writer(1)  # the writer this machine's byte order would get
        monkeypatch.undo()  # the readers: this machine's

        # An attempt starts: readers see it running, with its item, attempt and start time.
        begin(3, 7, 55.5)
        table.set_child(1, 999)
        view = table.read(1)
        assert (view.state, view.pid, view.child) == (RUNNING, 4242, 999)
        assert (view.index, view.attempt, view.started) == (3, 7, 55.5)
        assert table.began(3) == 7 and table.began(4) == 0
        evidence = crash_evidence(tmp_path, state, end_stragglers=False)  # what a crash leaves
        assert (evidence.began, evidence.running) == ([3], [3])

        # It ends, the next begins and ends: both began, none is running.
        table.set_child(1, 0)
        end()
        begin(4, 7, 56.0)
        end()
        view = table.read(1)
        assert (view.state, view.child, view.index, view.attempt) == (IDLE, 0, 4, 7)
        evidence = crash_evidence(tmp_path, state, end_stragglers=False)
        assert (evidence.began, evidence.running) == ([3, 4], [])  # 5: never begun

        # The other slots were never touched.
        assert table.read(0).pid == 0 and table.read(2).pid == 0
        written = path.read_bytes()
    finally:
        table.close(remove=False)
    assert written == path.read_bytes()  # the mapping is the file


def test_an_attempt_begun_earlier_in_the_session_is_not_this_attempt(tmp_path):
    """Item 2 began attempt 1, failed, and attempt 2 was journaled but never begun."""
    table = SlotTable(1, tmp_path / SLOTS_FILE, items=4)
    try:
        begin, end = table.writer(0)
        begin(2, 1, 1.0)
        end()
        evidence = crash_evidence(tmp_path, open_state(4, [(2, 2)]), end_stragglers=False)
        assert (evidence.began, evidence.running) == ([], [])
    finally:
        table.close()
    assert not (tmp_path / SLOTS_FILE).exists()


@pytest.mark.parametrize("byteorder", ["little", "big"], ids=["typed-views", "packed"])
def test_a_table_without_items_keeps_slots_and_no_begun_entries(tmp_path, monkeypatch, byteorder):
    """An executor not told the job's size still runs any index; its evidence is unknown."""
    table = SlotTable(1, tmp_path / SLOTS_FILE)
    try:
        monkeypatch.setattr(sys, "byteorder", byteorder)
        begin, end = table.writer(0)
        monkeypatch.undo()
        begin(599, 1, 2.0)
        assert (table.read(0).index, table.read(0).state) == (599, RUNNING)
        evidence = crash_evidence(tmp_path, open_state(600, [(599, 1)]), end_stragglers=False)
        assert evidence.began is None  # a table for another item count: nothing known
    finally:
        table.close()


def test_each_table_is_a_new_file_and_old_mappings_stay_apart(tmp_path):
    """A straggler of the old session maps the old inode: it can never see the new slots."""
    path = tmp_path / SLOTS_FILE
    old = SlotTable(1, path, items=2)
    try:
        inode = path.stat().st_ino
        new = SlotTable(1, path, items=2)
        try:
            assert path.stat().st_ino != inode
            new.set_child(0, 1234)
            assert old.read(0).child == 0
            old.set_child(0, 4321)
            assert new.read(0).child == 1234
        finally:
            new.close()
    finally:
        old.close(remove=False)


def test_missing_or_foreign_evidence_charges_every_open_attempt_and_streaks_none(tmp_path):
    state = open_state(5, [(1, 1), (2, 1)])
    assert crash_evidence(tmp_path, state) == crash_evidence(tmp_path, state, end_stragglers=False)
    evidence = crash_evidence(tmp_path, state)
    assert (evidence.began, evidence.running) == (None, [])
    SlotTable(1, tmp_path / SLOTS_FILE, items=9).close(remove=False)  # another item count
    assert crash_evidence(tmp_path, state).began is None
    (tmp_path / SLOTS_FILE).write_bytes(b"garbage")
    assert crash_evidence(tmp_path, state).began is None
    assert crash_evidence(tmp_path, JobState(5)).began == []  # nothing open: nothing to know


def _v1_file(path, slots: list[tuple[int, int, int, int, int]]) -> None:
    """A slot file as mrpool wrote it before version 2: (state, pid, child, attempt, index)."""
    data = bytearray(64 + 64 * len(slots))
    struct.pack_into("<8sII", data, 0, b"MRPSLOT1", 1, len(slots))
    for n, (state, pid, child, attempt, index) in enumerate(slots):
        struct.pack_into("<iiiiqd", data, 64 + 64 * n, state, pid, child, attempt, index, 1.0)
    path.write_bytes(bytes(data))


def test_version_1_file_is_read_conservatively_and_its_pids_not_trusted(tmp_path):
    bystander = subprocess.Popen(["sleep", "30"])
    try:
        _v1_file(tmp_path / SLOTS_FILE, [(RUNNING, bystander.pid, 0, 1, 2), (IDLE, 0, 0, 1, 1)])
        evidence = crash_evidence(tmp_path, open_state(4, [(1, 1), (2, 1)]))
        assert (evidence.began, evidence.running) == (None, [2])  # all charged, 2 streaked
        assert bystander.poll() is None, "a pid from a version-1 file was killed"
    finally:
        bystander.kill()
        bystander.wait()


def test_end_session_kills_its_workers_and_commands_and_nothing_else(tmp_path):
    worker = subprocess.Popen(["sleep", "30"])  # stands in for a worker that outlived us
    reused = subprocess.Popen(["sleep", "30"])  # a pid the file names, now someone else's
    orphan = subprocess.Popen(["sleep", "30"])  # a map command whose worker is gone
    newcomer = subprocess.Popen(["sleep", "30"])  # took a dead command's pid, later
    everyone = (worker, reused, orphan, newcomer)
    table = SlotTable(4, tmp_path / SLOTS_FILE, items=1)
    try:
        table.register(0, worker.pid)
        table.register(1, reused.pid)
        start_at = 64 + 64 + 40  # slot 1's pid start: as if the pid had been another process's
        struct.pack_into("<Q", table._mem, start_at, process_start(reused.pid) - 1)
        table.set_child(2, orphan.pid)  # slot 2's worker (pid 0) is gone
        table.set_child(3, newcomer.pid)
        child_at = 64 + 3 * 64 + 48  # recorded before the newcomer started
        struct.pack_into("<d", table._mem, child_at, time.clock_gettime(time.CLOCK_BOOTTIME) - 60)
        end_session(tmp_path)
        for proc in (worker, orphan):
            assert proc.wait(timeout=5) == -9
        assert reused.poll() is None and newcomer.poll() is None
    finally:
        table.close()
        for proc in everyone:
            proc.kill()
            proc.wait()
