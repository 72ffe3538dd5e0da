"""Worker slots: what a worker writes is what the supervisor and the next session read.

The worker's hot path stores straight into typed views of the shared mapping;
on a big-endian machine it packs little-endian fields instead (the file format
is little endian either way). Both must give the same file, the same
``read()`` and the same ``running_at_crash`` answer.
"""

from __future__ import annotations

import sys

import pytest

from mrpool.slots import IDLE, RUNNING, SlotTable, running_at_crash


@pytest.mark.parametrize("byteorder", ["little", "big"], ids=["typed-views", "packed"])
def test_what_a_worker_writes_is_what_readers_see(tmp_path, monkeypatch, byteorder):
    path = tmp_path / "slots.bin"
    table = SlotTable(3, path)
    monkeypatch.setattr(sys, "byteorder", byteorder)
    try:
        table.claim(1, 4242)
        begin, end = table.writer(1)

        # An attempt starts: readers see it running, with its item, attempt and start time.
        begin(123_456_789_012, 7, 55.5)
        table.set_child(1, 999)
        view = table.read(1)
        assert (view.state, view.pid, view.child) == (RUNNING, 4242, 999)
        assert (view.index, view.attempt, view.started) == (123_456_789_012, 7, 55.5)
        assert running_at_crash(path) == [(123_456_789_012, 7)]  # what a crash would leave

        # It ends: idle, and the slot still names the last attempt started.
        table.set_child(1, 0)
        end()
        view = table.read(1)
        assert (view.state, view.child, view.index, view.attempt) == (IDLE, 0, 123_456_789_012, 7)
        assert running_at_crash(path) == []

        # The other slots were never touched.
        assert table.read(0).pid == 0 and table.read(2).pid == 0
        written = path.read_bytes()
    finally:
        table.close(remove=False)
    assert written == path.read_bytes()  # the mapping is the file
