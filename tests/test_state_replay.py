"""The replayed job state is what the records mean, item by item, whatever their shape.

``JobState`` applies the hot records with slice operations (a run of starts, a
batch of consecutive successes) and everything else item by item. Resume is only
as right as this replay, so it is checked against a model written the plain way
-- one dict and four lists, one item at a time -- on random record sequences
that a live writer could produce: starts as runs or pairs (never a lower attempt
than the item's highest), successes in consecutive and scattered batches,
failures, and sessions ending cleanly or by crash (settled from crash evidence
naming begun and running attempts, or from the older records that named only
those whose attempt counts). After every record the two
must agree, and a checkpoint taken at the end must load back to the same state.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from mrpool import records
from mrpool.journal import decode_line, encode_record
from mrpool.store import DLQ, FAILED, PENDING, PURGED, SUCCEEDED, JobState

TOTAL = 24
OLD = object()  # an ``open`` record without ``began`` (written before it existed)


class Model:
    """The records' meaning, one item at a time."""

    def __init__(self, total: int) -> None:
        self.status = [PENDING] * total
        self.attempts = [0] * total
        self.streak = [0] * total
        self.open: dict[int, int] = {}

    def start(self, index: int, attempt: int) -> None:
        self.open[index] = attempt
        self.attempts[index] = max(self.attempts[index], attempt)

    def ok(self, index: int) -> None:
        self.open.pop(index, None)
        self.streak[index] = 0
        self.status[index] = SUCCEEDED

    def failed(self, index: int, attempt: int, parked: bool) -> None:
        self.open.pop(index, None)
        self.streak[index] = 0
        self.attempts[index] = max(self.attempts[index], attempt)
        self.status[index] = DLQ if parked else FAILED

    def end_session(self, cut: list[int] | None, crashed: bool, began=OLD) -> None:
        if began is OLD:  # cut: the items whose attempt counts (None: all); streaked too
            counted = streaked = cut
        else:  # began: counts (None: all); cut: running at the crash, streaked
            counted = None if began is None else began + (cut or [])
            streaked = cut or []
        for index, attempt in self.open.items():
            if counted is None or index in counted:
                if crashed and (streaked is None or index in streaked):
                    self.streak[index] = min(255, self.streak[index] + 1)
            elif self.attempts[index] == attempt:
                self.attempts[index] = attempt - 1
        self.open.clear()

    def purge(self, indices: list[int]) -> None:
        for index in indices:
            if self.status[index] == DLQ:
                self.status[index] = PURGED


def agrees(state: JobState, model: Model) -> None:
    assert list(state.status) == model.status
    assert list(state.attempts) == model.attempts
    assert list(state.streak) == model.streak
    assert state.open_attempts() == model.open
    assert state.open_count == len(model.open)
    assert state.counts == [model.status.count(code) for code in range(5)]


@st.composite
def record(draw, model: Model) -> dict:
    """One record a live writer could append next, given the state so far."""
    kind = draw(st.sampled_from(["run", "pairs", "ok-run", "ok-some", "f", "end", "purge"]))
    if kind == "run":
        first = draw(st.integers(0, TOTAL - 1))
        count = draw(st.integers(1, TOTAL - first))
        attempt = max(model.attempts[first : first + count]) + draw(st.integers(0, 1))
        return records.starts(runs=[[first, count, max(attempt, 1)]])
    if kind == "pairs":
        indices = draw(st.lists(st.integers(0, TOTAL - 1), min_size=1, max_size=6, unique=True))
        pairs = [[i, max(1, model.attempts[i] + draw(st.integers(0, 1)))] for i in indices]
        return records.starts(pairs)
    if kind == "ok-run":
        first = draw(st.integers(0, TOTAL - 1))
        count = draw(st.integers(1, TOTAL - first))
        indices = list(range(first, first + count))
    elif kind == "ok-some":
        indices = draw(st.lists(st.integers(0, TOTAL - 1), min_size=1, max_size=8, unique=True))
    if kind.startswith("ok"):
        rows = records.encode_rows([[i, model.attempts[i], 0.0, None] for i in indices])
        return decode_line(encode_record(records.successes(rows)))  # as a reader sees it
    if kind == "f":
        index = draw(st.integers(0, TOTAL - 1))
        nxt = draw(st.sampled_from([records.RETRY, records.PARK]))
        return records.failed(index, model.attempts[index], {}, nxt)
    if kind == "purge":
        return records.purge(draw(st.lists(st.integers(0, TOTAL - 1), max_size=5)))
    open_items = sorted(model.open)
    some_open = st.lists(st.sampled_from(open_items), unique=True) if open_items else st.just([])
    cut = draw(st.none() | some_open)
    rec = {"k": draw(st.sampled_from(["open", "close"])), "cut": cut}
    if rec["k"] == "open" and draw(st.booleans()):  # crash evidence: begun and running
        rec["began"], rec["cut"] = draw(st.none() | some_open), draw(some_open)
    return rec


def model_apply(model: Model, rec: dict) -> None:
    kind = rec["k"]
    if kind == "s":
        for first, count, attempt in rec.get("r", ()):
            for index in range(first, first + count):
                model.start(index, attempt)
        for index, attempt in rec.get("b", ()):
            model.start(index, attempt)
    elif kind == "ok":
        for index, *_ in rec["b"]:
            model.ok(index)
    elif kind == "f":
        model.failed(rec["i"], rec["a"], rec["next"] == "dlq")
    elif kind in ("open", "close"):
        model.end_session(rec["cut"], kind == "open", rec.get("began", OLD))
    elif kind == "purge":
        model.purge(rec["b"])


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_replay_agrees_with_the_item_by_item_meaning_of_every_record(data):
    state, model = JobState(TOTAL), Model(TOTAL)
    for _ in range(data.draw(st.integers(1, 30), label="records")):
        rec = data.draw(record(model))
        state.apply(rec)
        model_apply(model, rec)
        agrees(state, model)
    restored = JobState.from_checkpoint(decode_line(state.to_checkpoint()))
    agrees(restored, model)


def test_a_batch_of_successes_settles_items_from_every_place_in_one_go():
    """Consecutive successes take items out of pending, failed, the DLQ and purged alike,
    and close their open attempts; the counts follow."""
    state = JobState(8)
    state.apply({"k": "s", "r": [[0, 8, 1]]})
    state.apply({"k": "f", "i": 1, "a": 1, "next": "retry"})
    state.apply({"k": "f", "i": 2, "a": 1, "next": "dlq"})
    state.apply({"k": "f", "i": 3, "a": 1, "next": "dlq"})
    state.apply({"k": "purge", "b": [3]})
    assert state.counts == [5, 0, 1, 1, 1] and state.open_count == 5
    state.succeeded(list(range(0, 6)))
    assert state.counts == [2, 6, 0, 0, 0]
    assert state.open_indices() == [6, 7]
    state.succeeded([7, 6])  # not in order: the item-by-item path
    assert state.counts == [0, 8, 0, 0, 0] and state.open_count == 0
