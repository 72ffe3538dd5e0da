"""The progress display (issue 24, item 5): sized to the terminal, job-wide counts, a
smoothed ETA, a heartbeat when stderr is not a terminal, ``--progress`` / ``--quiet``.

The model and the line are checked in-process with a fake clock; the real CLI runs
once in a pseudo-terminal of 50 columns (then resized to 100), and in pipes.
"""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import shlex
import shutil
import struct
import subprocess
import termios
import time

import pytest
from conftest import PY, REPO, write_job

from mrpool.progress import (
    HEARTBEAT_ENV,
    Heartbeat,
    ProgressModel,
    heartbeat_seconds,
    mode_of,
    open_progress,
    render_line,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def model_at(clock: FakeClock, **fields) -> ProgressModel:
    model = ProgressModel("thumbs", 500, 500, clock=clock)
    for name, value in fields.items():
        setattr(model, name, value)
    return model


# -- the line ----------------------------------------------------------------------------
@pytest.mark.parametrize("width", [12, 30, 49, 79, 119, 200])
def test_the_line_never_exceeds_the_width_and_keeps_the_count_and_eta_first(width):
    clock = FakeClock()
    model = model_at(clock, succeeded=412, dlq=12, in_flight=4, retries=3, session_settled=424)
    clock.now += 42
    model.sample()
    line = render_line(model, width, bar=lambda fraction, columns: "#" * columns)
    assert len(line) <= width, line
    assert line.startswith("#") == (width >= 119), line  # the bar only where there is room
    if width >= 30:
        assert "412/500 ok" in line and "ETA 0:07" in line, line  # 76 left at ~10/s
    if width >= 79:
        for text in ("12 dlq", "4 in flight", "3 retries", "0:42 elapsed"):
            assert text in line, line


def test_the_eta_follows_the_recent_rate_not_the_mean_since_the_start():
    """100 items/s for 30 s, then 10/s for 30 s: the mean since the start is 55/s; the
    smoothed rate is near 10/s (the fast period, 30 s old, weighs e^-3 of its share)."""
    clock = FakeClock()
    model = ProgressModel("j", 10_000, 10_000, clock=clock)
    for step in range(120):  # 60 s in samples of 0.5 s
        clock.now += 0.5
        model.session_settled += 50 if step < 60 else 5
        model.sample()
    assert 10 <= model.rate < 15, model.rate
    left = 10_000 - model.session_settled
    assert model.eta() == pytest.approx(left / model.rate)
    assert model.eta() > 3 * left / (model.session_settled / 60)  # the mean's ETA: far off
    assert ProgressModel("j", 1, 1, clock=clock).eta() is None  # nothing known yet: "?"


def test_the_heartbeat_writes_one_plain_line_per_interval(tmp_path):
    clock = FakeClock()
    model = model_at(clock, succeeded=499, session_total=1)
    out = (tmp_path / "err").open("w+")
    beat = Heartbeat(model, out, 10.0)
    for _ in range(25):  # 25 s in steps of 1 s
        clock.now += 1
        beat.refresh()
    out.seek(0)
    lines = out.read().splitlines()
    assert len(lines) == 2, lines
    assert (
        lines[0] == "mrpool: thumbs: 499/500 ok, 0 in flight, 0:10 elapsed, ETA ?"
    )  # none settled: no rate yet


def test_modes_and_the_heartbeat_interval(monkeypatch, tmp_path):
    assert [mode_of(m) for m in (True, False, None, "auto", "always")] == [
        "tty",
        "off",
        "off",
        "auto",
        "always",
    ]
    with pytest.raises(ValueError):
        mode_of("sometimes")
    for text, seconds in (("", 10.0), ("2.5", 2.5), ("0", 10.0), ("x", 10.0), ("nan", 10.0)):
        monkeypatch.setenv(HEARTBEAT_ENV, text)
        assert heartbeat_seconds() == seconds, text
    with (tmp_path / "err").open("w") as pipe_like:  # not a terminal
        model = ProgressModel("j", 1, 1)
        kinds = {m: type(open_progress(model, m, pipe_like)).__name__ for m in ("tty", "auto")}
    assert kinds == {"tty": "NoProgress", "auto": "Heartbeat"}


# -- the real CLI ------------------------------------------------------------------------
def slow_job(tmp_path, n: int = 40, fail_over: int | None = None):
    """``n`` items, each a 50 ms command; items with ``n > fail_over`` fail while the file
    ``broken`` exists next to the job."""
    command = ["sleep", "0.05"]
    if fail_over is not None:
        command = ["sh", "-c", f"sleep 0.05; test ! -e broken || test {{item.n}} -le {fail_over}"]
    return write_job(tmp_path, [{"id": k, "n": k} for k in range(1, n + 1)], {"command": command})


def set_size(fd: int, rows: int, columns: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))


def frames(data: bytes) -> list[str]:
    """What a terminal shows line by line: the text between carriage returns and newlines."""
    return [f for f in re.split(r"[\r\n]", data.decode(errors="replace")) if f.strip()]


def test_in_a_50_column_terminal_the_line_fits_and_follows_a_resize(mrpool, tmp_path):
    """The real CLI on a pseudo-terminal: at 50 columns no frame is wider than the
    terminal (so nothing wraps), the counts are the job's; widened to 100 columns
    mid-run, the line grows a bar."""
    job = slow_job(tmp_path, 60)
    master, slave = pty.openpty()
    set_size(slave, 24, 50)
    proc = mrpool.start("run", str(job), "--job-id", "tty", stderr=slave)
    os.close(slave)
    before, after, resized = b"", b"", False
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.1)
        if not ready:
            continue
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: every writer of the terminal is gone
            break
        if not chunk:
            break
        if resized:
            after += chunk
        else:
            before += chunk
            if b"/60 ok" in before:
                set_size(master, 24, 100)
                resized = True
    os.close(master)
    assert proc.wait(timeout=30) == 0
    proc.stdout.close()
    shown = frames(before)
    assert any("/60 ok" in f and "ETA" in f for f in shown), shown
    assert all(len(f) <= 49 for f in shown), [f for f in shown if len(f) > 49]
    later = [f for f in frames(after) if "/60 ok" in f]
    assert later and later[-1].startswith("|") and "60/60 ok" in later[-1], later
    assert all(len(f) <= 99 for f in later), later


def test_a_pipe_gets_a_heartbeat_with_the_jobs_counts_and_quiet_gets_none(mrpool, tmp_path):
    """stderr into a pipe: plain heartbeat lines (no carriage return), counting the whole
    job -- a retry of 10 DLQ items of a 20-item job starts at 10/20, not 0/10;
    ``--quiet``: no heartbeat and no plan line; ``--progress``: the live line anyway."""
    job = slow_job(tmp_path, 20, fail_over=10)
    (tmp_path / "broken").write_text("")
    env = mrpool.env(**{HEARTBEAT_ENV: "0.2"})
    first = mrpool.run("run", str(job), "--job-id", "beat", "--quiet", env=env)
    # (CompletedProcess text is decoded with universal newlines: a "\r" reads as "\n")
    assert first.returncode == 1, first.stderr
    assert "ok," not in first.stderr and "plan:" not in first.stderr, first.stderr
    (tmp_path / "broken").unlink()
    retry = mrpool.run("dlq", "retry", "beat", env=env)
    assert retry.returncode == 0, retry.stderr
    live_frames = [f for f in retry.stderr.splitlines() if re.match(r"\||\d+/\d+ ok", f)]
    assert not live_frames, retry.stderr
    beats = [line for line in retry.stderr.splitlines() if line.startswith("mrpool: beat: ")]
    assert beats, retry.stderr
    counts = [int(re.search(r"(\d+)/20 ok", line).group(1)) for line in beats]
    assert counts[0] >= 10 and counts == sorted(counts), beats
    forced = mrpool.run("run", str(slow_job(tmp_path / "b", 4)), "--progress", env=env)
    assert forced.returncode == 0 and "\n|" in forced.stderr and "4/4 ok" in forced.stderr


@pytest.mark.stress
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_in_tmux_at_50_columns_the_screen_holds_one_progress_line(mrpool, tmp_path):
    """A real terminal emulator: tmux runs the CLI in a 50x20 window; every snapshot of
    the screen (capture-pane) shows at most one progress line, never wrapped, and the
    last one shows the job's final count. (Stress: tmux is not part of the project's
    install; scripts/stress.sh runs it.)"""
    job = slow_job(tmp_path, 60)
    server = f"mrpool-test-{os.getpid()}-{time.monotonic_ns()}"
    tmux = ["tmux", "-L", server]
    env = mrpool.env()
    command = " ".join(
        [f"{k}={shlex.quote(v)}" for k, v in env.items() if k.startswith(("MRPOOL_", "PYTHON"))]
        + [shlex.quote(PY), "-m", "mrpool", "run", shlex.quote(str(job)), "--job-id", "tmux"]
    )
    subprocess.run(
        [
            *tmux,
            "new-session",
            "-d",
            "-x",
            "50",
            "-y",
            "20",
            f"cd {REPO} && {command}; echo EXIT=$?; sleep 60",
        ],
        env=env,
        check=True,
        timeout=30,
    )
    screens: list[list[str]] = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            shot = subprocess.run(
                [*tmux, "capture-pane", "-p", "-J"], capture_output=True, text=True, timeout=30
            ).stdout.splitlines()
            screens.append(shot)
            if any(line.startswith("EXIT=") for line in shot):
                break
            time.sleep(0.2)
    finally:
        subprocess.run([*tmux, "kill-server"], timeout=30)
    assert any(line == "EXIT=0" for line in screens[-1]), screens[-1]
    for shot in screens:  # -J: a line the terminal wrapped comes back joined, whole
        progress = [line for line in shot if re.search(r"ok|in flight|ETA", line)]
        assert len(progress) <= 1, shot
        assert all(len(line) < 50 and "/60 ok" in line for line in progress), shot
    assert any("60/60 ok" in line for line in screens[-1]), screens[-1]


class GoneStream:
    """A stderr whose reader went away: every write fails as on a closed pipe."""

    writes = 0

    def write(self, text: str) -> int:
        GoneStream.writes += 1
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


def test_a_stderr_that_went_away_ends_the_display_not_the_session(mrpool, tmp_path):
    """``mrpool run ... 2>&1 | head -1``: once head exits, every heartbeat would raise
    EPIPE. The display stops after the first failed write; the job runs to the end."""
    clock = FakeClock()
    beat = Heartbeat(ProgressModel("j", 5, 5, clock=clock), GoneStream(), 1.0)
    for _ in range(5):
        clock.now += 1.5
        beat.refresh()  # does not raise
    beat.close()
    assert GoneStream.writes == 1 and not beat.live
    job = slow_job(tmp_path, 10)
    proc = mrpool.start(
        "run", str(job), "--job-id", "gone", env=mrpool.env(**{HEARTBEAT_ENV: "0.05"})
    )
    proc.stderr.close()  # the reader is gone before the first heartbeat
    proc.wait(timeout=60)
    proc.stdout.close()
    assert mrpool.status("gone")["succeeded"] == 10
