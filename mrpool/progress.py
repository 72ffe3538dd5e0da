"""A session's progress: one live line on a terminal, a heartbeat line elsewhere.

    supervisor --feeds--> ProgressModel --read by--> TerminalLine (a terminal: tqdm)
    (after each turn        job-wide counts,          or Heartbeat (a pipe, a log file:
     of its loop)           in flight, retries,        one plain line every N seconds)
                            a smoothed rate

* ``ProgressModel`` is plain numbers. Counts are the **job's** (``succeeded``,
  ``dlq`` of ``total``: a resume of a job at 499/500 shows 499/500, not
  1/1); ``in_flight`` (attempts handed to workers and not yet settled -- whoever
  knows better, e.g. an executor running several attempts per worker, may set it)
  and ``retries`` (failed attempts that will be tried again) are this session's.
  The ETA is what this session still owes (``session_total - session_settled``)
  over a **smoothed** rate: settled items per second, each second weighing
  ``exp(-age / RATE_WINDOW)`` -- the last ~10 s count most, so a slow start or a
  change of pace does not skew it for the rest of the run (the mean since the start
  said 1:00 left of an 87 s run).
* ``TerminalLine`` redraws the line at most every 0.2 s through tqdm (its terminal
  width, looked up at every redraw, so a resize is followed; its in-place writer;
  its bar). The fields that do not fit the width are dropped, least useful first:
  the line never wraps, even at 50 columns.
* ``Heartbeat`` writes one line every ``MRPOOL_PROGRESS_SECONDS`` (default 10) on
  stderr: the same counts, no control characters -- a sign of life for CI and
  ``nohup`` runs, where a redrawn line would be noise.

Modes (``open_progress``): ``"off"``; ``"tty"`` (a line on a terminal, nothing
otherwise: the Python API's ``progress=True``); ``"auto"`` (a line on a terminal,
else the heartbeat: the CLI's default); ``"always"`` (the line even when stderr is
not a terminal: ``--progress``). ``--quiet`` is ``"off"``.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

__all__ = [
    "ProgressModel",
    "TerminalLine",
    "Heartbeat",
    "NoProgress",
    "open_progress",
    "mode_of",
    "heartbeat_seconds",
    "render_line",
    "HEARTBEAT_ENV",
]

RATE_WINDOW = 10.0  # seconds: the smoothed rate's time constant
SAMPLE_EVERY = 0.5  # seconds between rate samples
REDRAW_EVERY = 0.2  # seconds between terminal redraws
HEARTBEAT_ENV = "MRPOOL_PROGRESS_SECONDS"
HEARTBEAT_DEFAULT = 10.0
MODES = ("off", "tty", "auto", "always")


@dataclass
class ProgressModel:
    """What the display shows; the supervisor (or an executor) sets the fields."""

    job_id: str
    total: int  # the job's items (purged ones excluded)
    session_total: int  # items this session owes
    succeeded: int = 0  # job-wide
    dlq: int = 0  # job-wide
    in_flight: int = 0  # this session: handed to workers, not settled
    retries: int = 0  # this session: failed attempts that will be tried again
    session_settled: int = 0  # this session: items succeeded, parked or kept failed
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=0.0)
    _rate_num: float = 0.0  # decayed sum of items settled
    _rate_den: float = 0.0  # decayed sum of seconds
    _sampled_at: float = 0.0
    _sampled_settled: int = 0

    def __post_init__(self) -> None:
        self.started = self._sampled_at = self.clock()

    def set_counts(self, succeeded: int, dlq: int, total: int) -> None:
        """The job's counts as they stand (all of its sessions)."""
        self.succeeded, self.dlq, self.total = succeeded, dlq, total

    def sample(self, now: float | None = None) -> None:
        """Fold the items settled since the last sample into the smoothed rate (at most
        every ``SAMPLE_EVERY`` seconds; call it as often as you like)."""
        now = self.clock() if now is None else now
        dt = now - self._sampled_at
        if dt < SAMPLE_EVERY:
            return
        decay = math.exp(-dt / RATE_WINDOW)
        self._rate_num = self._rate_num * decay + (self.session_settled - self._sampled_settled)
        self._rate_den = self._rate_den * decay + dt
        self._sampled_at, self._sampled_settled = now, self.session_settled

    @property
    def rate(self) -> float | None:
        """Settled items per second, smoothed; None before the first sample."""
        return self._rate_num / self._rate_den if self._rate_den else None

    def elapsed(self, now: float | None = None) -> float:
        return (self.clock() if now is None else now) - self.started

    def eta(self) -> float | None:
        """Seconds until this session has settled everything it owes; None: unknown."""
        left = self.session_total - self.session_settled
        if left <= 0:
            return 0.0
        rate = self.rate
        return left / rate if rate else None


def _clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _fields(model: ProgressModel) -> list[tuple[int, str]]:
    """``(priority, text)`` of each field, in display order; 0 is kept first."""
    fields = [(0, f"{model.succeeded}/{model.total} ok")]
    if model.dlq:
        fields.append((2, f"{model.dlq} dlq"))
    fields.append((3, f"{model.in_flight} in flight"))
    if model.retries:
        fields.append((4, f"{model.retries} retr{'y' if model.retries == 1 else 'ies'}"))
    fields.append((5, f"{_clock(model.elapsed())} elapsed"))
    fields.append((1, f"ETA {_clock(model.eta())}"))
    return fields


def render_line(model: ProgressModel, width: int, bar=None) -> str:
    """The progress line in at most ``width`` columns: the fields that fit, by priority,
    then ``bar(fraction, columns)`` (a callable) in the room left, if there is enough."""
    fields = _fields(model)
    kept: set[int] = set()
    used = 0
    for priority, text in sorted(fields):
        cost = len(text) + (3 if kept else 0)  # " | " between fields
        if used + cost > width:
            continue
        kept.add(priority)
        used += cost
    line = " | ".join(text for priority, text in fields if priority in kept)
    if not kept:  # narrower than the count itself: what fits of it
        return fields[0][1][:width]
    room = width - len(line) - 1
    if bar is not None and room >= 12:
        fraction = model.succeeded / model.total if model.total else 1.0
        line = f"{bar(min(1.0, fraction), min(room, 40))} {line}"
    return line


def heartbeat_seconds() -> float:
    """The heartbeat's interval: ``$MRPOOL_PROGRESS_SECONDS`` (> 0), default 10."""
    text = os.environ.get(HEARTBEAT_ENV, "")
    try:
        value = float(text) if text else HEARTBEAT_DEFAULT
    except ValueError:
        value = HEARTBEAT_DEFAULT
    return value if value > 0 and math.isfinite(value) else HEARTBEAT_DEFAULT


class NoProgress:
    """The display that shows nothing; the base of those that do (``_due``, ``_draw``,
    ``_finish``). A display never stops a session: a stderr that went away (``2>&1 |
    head`` after head exited, a closed terminal) ends the display, not the job."""

    def __init__(self, model: ProgressModel) -> None:
        self.model = model
        self.live = True

    def refresh(self) -> None:
        self.model.sample()
        if self.live and self._due(self.model.clock()):
            self._guarded(self._draw)

    def close(self) -> None:
        if self.live:
            self._guarded(self._finish)

    def _guarded(self, step: Callable[[], None]) -> None:
        try:
            step()
        except (OSError, ValueError):  # EPIPE, EIO, a closed file
            self.live = False

    def _due(self, now: float) -> bool:
        return False

    def _draw(self) -> None:
        pass

    def _finish(self) -> None:
        pass


class Heartbeat(NoProgress):
    """One plain line on ``stream`` every ``seconds``: for logs, pipes, CI."""

    def __init__(self, model: ProgressModel, stream: TextIO, seconds: float) -> None:
        super().__init__(model)
        self.stream = stream
        self.seconds = seconds
        self._next = model.started + seconds

    def _due(self, now: float) -> bool:
        if now < self._next:
            return False
        self._next = now + self.seconds
        return True

    def _draw(self) -> None:
        text = ", ".join(text for _, text in _fields(self.model))
        self.stream.write(f"mrpool: {self.model.job_id}: {text}\n")
        self.stream.flush()


class TerminalLine(NoProgress):
    """The live line, drawn by tqdm on ``stream`` (stderr)."""

    def __init__(self, model: ProgressModel, stream: TextIO) -> None:
        super().__init__(model)
        self._bar = _new_tqdm(model, stream)  # draws the first state at once
        self._drawn = model.clock()

    def _due(self, now: float) -> bool:
        if now - self._drawn < REDRAW_EVERY:
            return False
        self._drawn = now
        return True

    def _draw(self) -> None:
        self._bar.n = self.model.succeeded
        self._bar.refresh()

    def _finish(self) -> None:
        self._bar.n = self.model.succeeded
        self._bar.close()  # the last state, then a newline: the line stays on screen


def _new_tqdm(model: ProgressModel, stream: TextIO):
    """A tqdm whose text is ``render_line``; tqdm supplies the terminal's width (again at
    each redraw), the in-place writer and the bar. No monitor thread and a thread lock,
    not tqdm's default multiprocessing one (a semaphore, and on some start methods a
    resource-tracker process): the supervisor forks workers after this."""
    from tqdm import tqdm
    from tqdm.std import Bar
    from tqdm.utils import _supports_unicode

    charset = Bar.UTF if _supports_unicode(stream) else Bar.ASCII

    def bar(fraction: float, columns: int) -> str:
        return "|" + format(Bar(fraction, columns - 2, charset=charset)) + "|"

    class _Line(tqdm):
        monitor_interval = 0

        def __str__(self) -> str:
            if self.dynamic_ncols:  # the terminal's width now (tqdm's is the width - 1)
                self.ncols, self.nrows = self.dynamic_ncols(self.fp)
            width = self.ncols or _fallback_columns()
            return render_line(model, width, bar)

        def display(self, msg: str | None = None, pos: int | None = None) -> bool:
            # One line at the cursor. tqdm's own display() hides a line whose position is
            # past the terminal's last row, and a pty of unknown size (0 rows: `script`,
            # some CI runners) makes row 0 "past the last": nothing would ever show.
            self.sp(self.__str__() if msg is None else msg)
            return True

    _Line.set_lock(threading.RLock())
    return _Line(
        total=model.total,
        initial=model.succeeded,
        file=stream,
        dynamic_ncols=True,
        mininterval=REDRAW_EVERY,
        leave=True,
    )


def _fallback_columns() -> int:
    """The width when stderr is no terminal (``--progress`` into a pipe): $COLUMNS - 1."""
    try:
        return max(20, int(os.environ.get("COLUMNS", "80")) - 1)
    except ValueError:
        return 79


def mode_of(progress: bool | str | None) -> str:
    """``True`` is ``"tty"``, ``False``/``None`` ``"off"``; a mode name is itself."""
    if progress is True:
        return "tty"
    if not progress:
        return "off"
    if progress not in MODES:
        raise ValueError(f"progress must be one of {', '.join(MODES)}, got {progress!r}")
    return progress


def open_progress(model: ProgressModel, mode: bool | str | None, stream: TextIO | None = None):
    """The display for ``mode`` on ``stream`` (default: stderr)."""
    stream = sys.stderr if stream is None else stream
    mode = mode_of(mode)
    terminal = _isatty(stream)
    if mode == "always" or (mode in ("tty", "auto") and terminal):
        try:
            return TerminalLine(model, stream)
        except (OSError, ValueError):  # the terminal is already gone
            return NoProgress(model)
    if mode == "auto":
        return Heartbeat(model, stream, heartbeat_seconds())
    return NoProgress(model)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or fake stream
        return False
