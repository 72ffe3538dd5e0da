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
from pathlib import Path

from . import failpoints
from .errors import StorageError

__all__ = [
    "TEMP_MARK",
    "atomic_write",
    "fsync_dir",
    "make_private_dir",
    "open_private",
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
    created = []
    missing = path
    while not os.path.lexists(missing) and missing != missing.parent:
        created.append(missing)
        missing = missing.parent
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.is_symlink():
        raise OSError(f"refusing to use {path}: it is a symbolic link")
    for directory in created:
        fsync_dir(directory.parent)
    return path


def open_private(path: str | os.PathLike, flags: int) -> int:
    """``os.open`` with mode 0600, no symlink following, close-on-exec."""
    return os.open(path, flags | _NOFOLLOW | _CLOEXEC, 0o600)


def atomic_write(
    path: str | os.PathLike, data: bytes, failpoint: str | None = None, durable: bool = True
) -> None:
    """Replace ``path`` with ``data`` so that a crash leaves the old or the new file whole.

    ``failpoint`` names a pair of failpoints, ``NAME.before_replace`` and
    ``NAME.after_replace``. A failing disk raises ``StorageError`` naming the file.
    ``durable=False`` skips the fsyncs: still atomic against a process crash, but
    after a power cut the file may be old, empty or missing (for informative files).
    """
    path = Path(path)
    try:
        _atomic_write(path, data, failpoint, durable)
    except OSError as e:
        raise StorageError(f"{path}: cannot write: {e.strerror or e}") from None


def _atomic_write(path: Path, data: bytes, failpoint: str | None, durable: bool) -> None:
    tmp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        view = memoryview(data)
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
