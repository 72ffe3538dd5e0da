"""Crash-safe file primitives: every write that matters goes through here.

``atomic_write`` is the one way state files are replaced: write a temp file in
the same directory, flush, fsync, ``os.replace`` over the target, fsync the
directory. A SIGKILL at any point leaves either the old file or the new one,
plus at most a temp file that ``sweep_temp_files`` removes later.

State is private: directories are created 0700 and files 0600 (DLQ and journal
files hold item data), and files are opened with ``O_NOFOLLOW`` so a symlink
planted at a state path is refused rather than written through.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO

from . import failpoints
from .errors import StorageError

__all__ = [
    "TEMP_MARK",
    "NotRegularFileError",
    "atomic_write",
    "atomic_write_chunks",
    "fsync_dir",
    "make_private_dir",
    "missing_dirs",
    "open_private",
    "open_regular_file",
    "sweep_temp_files",
]

TEMP_MARK = ".tmp-"
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    if failpoints.ENABLED and failpoints.hit("fsutil.fsync_dir"):
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | _CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_private_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and parents) readable by the owner only; refuse a symlink.

    A directory it creates is made durable (its parent is fsynced): a job published
    into a new ``jobs/`` of a new state dir would otherwise vanish in a power cut
    with the directories that hold it, after ``run`` had printed its id."""
    path = Path(path)
    created = missing_dirs(path)
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_symlink():
        raise OSError(f"refusing to use {path}: it is a symbolic link")
    for directory in created:
        fsync_dir(directory.parent)
    return path


def missing_dirs(path: Path) -> list[Path]:
    """``path`` and its ancestors that do not exist yet (not even as a link), deepest first."""
    missing = []
    while not os.path.lexists(path) and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


def open_private(path: str | os.PathLike, flags: int) -> int:
    """``os.open`` with mode 0600, no symlink following, close-on-exec."""
    return os.open(path, flags | _NOFOLLOW | _CLOEXEC, 0o600)


class NotRegularFileError(OSError):
    """A path that must name a regular file names a FIFO, device, socket or directory."""

    def __init__(self, path: str | os.PathLike, kind: str) -> None:
        super().__init__(f"{path} is {kind}, not a regular file")
        self.kind = kind


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _require_regular(path: str | os.PathLike, mode: int) -> None:
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "not a file")
        raise NotRegularFileError(path, kind)


def open_regular_file(path: str | os.PathLike, buffering: int = -1) -> BinaryIO:
    """Open ``path`` (symlinks followed) for reading, if it is a regular file.

    A user's input or job file could be a FIFO (``open`` would wait forever for a
    writer) or a device (``/dev/zero`` never ends: reading it fills memory). So the
    path is stat'ed first, opened with ``O_NONBLOCK`` (a FIFO swapped in after the
    stat cannot block the open) and checked again on the open descriptor, which is
    what is then read. Raises ``NotRegularFileError`` (an ``OSError``) otherwise.
    """
    _require_regular(path, os.stat(path).st_mode)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | _CLOEXEC)
    try:
        _require_regular(path, os.fstat(fd).st_mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=buffering)
    except BaseException:
        os.close(fd)
        raise


def atomic_write(
    path: str | os.PathLike, data: bytes, failpoint: str | None = None, durable: bool = True
) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file whole.

    ``failpoint`` names a pair of failpoints, ``NAME.before_replace`` and
    ``NAME.after_replace``. A failing disk raises ``StorageError`` naming the file.
    ``durable=False`` skips the fsyncs: still atomic against a process crash, but
    after a power cut the file may be old, empty or missing (for informative files).
    """
    atomic_write_chunks(path, (data,), failpoint, durable)


def atomic_write_chunks(
    path: str | os.PathLike,
    chunks: Iterable[bytes],
    failpoint: str | None = None,
    durable: bool = True,
) -> None:
    """``atomic_write`` of data that comes in pieces (a large export): never all in memory."""
    path = Path(path)
    try:
        _atomic_write(path, chunks, failpoint, durable)
    except OSError as e:
        raise StorageError(f"{path}: cannot write: {e.strerror or e}") from None


def _atomic_write(
    path: Path, chunks: Iterable[bytes], failpoint: str | None, durable: bool
) -> None:
    tmp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        for chunk in chunks:
            view = memoryview(chunk)
            while view:
                view = view[os.write(fd, view) :]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(tmp)
        raise
    os.close(fd)
    try:
        if failpoints.ENABLED and failpoint:
            failpoints.hit(f"{failpoint}.before_replace")
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    if failpoints.ENABLED and failpoint:
        failpoints.hit(f"{failpoint}.after_replace")
    if durable:
        fsync_dir(path.parent)


def sweep_temp_files(directory: str | os.PathLike) -> int:
    """Remove temp files left by a crashed ``atomic_write`` whose writer is dead."""
    removed = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        _, mark, rest = name.partition(TEMP_MARK)
        if not mark:
            continue
        pid = rest.split("-", 1)[0]
        if pid.isdigit() and _pid_alive(int(pid)):
            continue
        _unlink_quietly(Path(directory) / name)
        removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
