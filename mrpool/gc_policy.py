"""Fewer garbage-collector passes while mrpool moves items in bulk.

CPython runs its cycle collector every 700 new container objects, and a full
pass walks every tracked object in the process. mrpool's own bulk loops --
ingest, the journal replay, the supervisor's session -- allocate a few
short-lived containers per item (decoded items, outcome rows) that never form
cycles, so at the default threshold the collector runs hundreds of times in a large
job, for nothing (figures: benchmarks/NOTES.md). Two measures:

* ``fewer_collections()``: while mrpool's own code runs in bulk, the collector
  waits for 20,000 new containers instead of 700; the caller's setting is back
  when the block ends (``run_job`` may run inside a user's process).
* ``for_user_code()``: a worker (and the reduce child) runs the user's code, so
  it gets the caller's threshold back (cycles a map creates are collected as
  often as in the user's own program), and freezes what it inherited from the
  supervisor, so full passes there walk only the worker's own objects.
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["BULK_THRESHOLD", "fewer_collections", "for_user_code"]

BULK_THRESHOLD = 20_000
_callers: list[tuple[int, ...]] = []  # thresholds replaced by the blocks now open, outermost first


_guard = threading.Lock()


@contextmanager
def fewer_collections() -> Iterator[None]:
    """The bulk threshold for the duration of the block, then the setting before it.

    Blocks may overlap on several threads (one session per thread): the threshold is
    the caller's again when the last open block ends, whichever thread ends last."""
    with _guard:
        before = _callers[0] if _callers else gc.get_threshold()
        _callers.append(before)
        if before[0]:  # 0: automatic collection is off, and stays off
            gc.set_threshold(max(BULK_THRESHOLD, before[0]), *before[1:])
    try:
        yield
    finally:
        with _guard:
            _callers.pop()
            if not _callers:
                gc.set_threshold(*before)


def for_user_code() -> None:
    """In a forked process about to run user code: the caller's threshold back, and
    what it inherited from the supervisor frozen."""
    if _callers:
        gc.set_threshold(*_callers[0])
    gc.freeze()
