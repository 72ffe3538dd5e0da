"""A one-line live progress display for terminals; silent otherwise.

Shows ``done/total``, failures, rate and ETA on stderr, redrawn at most every
0.2 s. When stderr is not a terminal it prints nothing (the CLI prints a final
summary instead), so logs and pipes stay clean.
"""

from __future__ import annotations

import sys
import time

__all__ = ["Progress"]


class Progress:
    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.enabled = enabled and sys.stderr.isatty()
        self.succeeded = 0
        self.failed = 0
        self.in_flight = 0  # attempts handed to workers, not yet back (the supervisor's count)
        self.show_in_flight = False  # shown when workers run several attempts each
        self._start = time.monotonic()
        self._last = 0.0

    def update(self, force: bool = False) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last < 0.2:
            return
        self._last = now
        done = self.succeeded + self.failed
        elapsed = max(now - self._start, 1e-9)
        rate = done / elapsed
        eta = (self.total - done) / rate if rate > 0 else 0.0
        width = 24
        filled = int(width * done / self.total) if self.total else width
        bar = "#" * filled + "-" * (width - filled)
        flying = f" in flight {self.in_flight}" if self.show_in_flight else ""
        line = f"\r[{bar}] {done}/{self.total} ok {self.succeeded} parked {self.failed}{flying}  {rate:,.1f}/s  ETA {_clock(eta)} "
        sys.stderr.write(line)
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self.update(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
