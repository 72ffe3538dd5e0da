"""The job-wide rate limit: at most N attempt starts a second, a minute or an hour.

``rate: "20/s"`` (or ``"600/min"``, ``"1000/h"``) in the job file, or ``--rate``,
caps how many attempts the whole job starts -- first attempts and retries
alike, across every worker and every lane -- the usual way to stay under an
API's quota. The supervisor enforces it with one ``TokenBucket`` before it
hands anything to the executor, so no worker needs to know about it.

The bucket holds at most one second's worth of starts (``max(1, per second)``
tokens): after an idle spell at most that many start at once. It starts with a
single token, not full, so a run starts its first attempt at once and then
keeps to the rate: in any window of T seconds at most ``rate * T`` starts, plus
what the bucket held when the window opened (1 at a session's start, at most one
second's worth after an idle spell). The bucket fills from the moment the
workers are forked; attempts sent to a worker that is still starting up begin
together once it is (at 50/s, two or three more than 50 in the first second).
Starts that the executor
hands back unrun (a worker lost before reaching them) spend a token again when
they are sent again: the limit errs on the side of fewer starts.
"""

from __future__ import annotations

import math
import re
import time

__all__ = ["RATE_UNITS", "TokenBucket", "parse_rate", "rate_text"]

RATE_UNITS = {"s": 1.0, "min": 60.0, "h": 3600.0}
_RATE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*/\s*(s|min|h)\s*$")
MIN_RATE = 1.0 / 86400  # one start a day: below that, a typo


def parse_rate(text: str) -> float:
    """Starts per second for ``"N/s"``, ``"N/min"`` or ``"N/h"``; ValueError with the reason
    (the caller names the field)."""
    if not isinstance(text, str):
        raise ValueError(f'must be a string such as "20/s", "600/min" or "1000/h", got {text!r}')
    match = _RATE_RE.match(text)
    if match is None:
        raise ValueError(f'must look like "20/s", "600/min" or "1000/h", got {text!r}')
    per_second = float(match.group(1)) / RATE_UNITS[match.group(2)]
    if not math.isfinite(per_second) or per_second < MIN_RATE:
        raise ValueError(f"must be at least one start a day, got {text!r}")
    return per_second


def rate_text(per_second: float) -> str:
    """A rate as the user would write it (for messages and ``status``)."""
    for unit, seconds in (("s", 1.0), ("min", 60.0), ("h", 3600.0)):
        count = per_second * seconds
        if count >= 1 or unit == "h":
            return f"{count:.12g}/{unit}"
    raise AssertionError("unreachable")


class TokenBucket:
    """``per_second`` tokens a second, at most one second's worth held (see module doc)."""

    def __init__(self, per_second: float, clock=time.monotonic) -> None:
        self.per_second = per_second
        self.capacity = max(1.0, per_second)
        self._clock = clock
        self._tokens = 1.0
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._at) * self.per_second)
        self._at = now

    def available(self) -> int:
        """Whole starts allowed now."""
        self._refill()
        return int(self._tokens + 1e-9)

    def take(self, count: int) -> None:
        """Spend ``count`` starts (no more than ``available()`` said)."""
        self._tokens -= count

    def next_in(self) -> float:
        """Seconds until the next whole start is allowed (0: one is now)."""
        self._refill()
        missing = 1.0 - self._tokens
        return 0.0 if missing <= 1e-9 else missing / self.per_second
