"""Power-cut crash states: record what a real mrpool process asks of the file system, build
every state a power cut may leave, and check mrpool's recovery from each (ALICE, OSDI '14;
CrashMonkey, OSDI '18, on a small scale).

Recording
---------
A command (``python -m mrpool run ...``) runs under ``strace -f``: every ``openat``,
``write``/``pwrite64``/``writev``, ``lseek``, ``ftruncate``, ``fsync``/``fdatasync``,
``rename*``, ``unlink*``, ``mkdir*`` and ``rmdir`` of it and its threads and children is
logged with its file paths (``-y``) and full data (``-xx``). The syscalls themselves are
the record, so no write can slip past it by taking another path through the code. What
the supervisor prints on stdout is logged too: the job id line is the moment ``run`` has
acknowledged that the job exists.

The persistence model (what a power cut may leave)
--------------------------------------------------
Written down as the weak POSIX model these tools start from; a real file system
(ext4 ``data=ordered``) keeps more, never less:

* A file's data persists up to its last completed ``fsync``/``fdatasync``: the state
  the file had when that fsync *started*. Later writes and truncates of the file
  may be lost; if kept, they are kept in order -- a prefix of them, the last one
  possibly cut at any byte -- each file independently of the others.
* A directory entry (a create, rename, unlink, mkdir or rmdir) persists once its
  directory has been fsynced after it. Until then it may or may not have happened;
  a directory's pending changes are kept as a prefix, in order. A rename is one
  change, atomic, belonging to the directory the name moves into.
* Nothing after the cut exists. Memory-mapped files (``slots.bin``) are never
  written through ``write``: a power cut leaves them at any content; we leave them
  as the size they were given, zero-filled, the worst case for their reader.

An outcome is *acknowledged* once the journal fsync covering it has returned
(README, Durability); a job once ``run`` has printed its id.

Exploring
---------
``crash_states(trace)`` cuts the trace at every point where something became durable
(each completed fsync) and at its end; at each cut it builds the state with none
of the pending changes, with all of them, and ``samples`` more with seeded random
prefixes and tears. ``check_state`` materialises one as a state directory and runs
``status``, ``results``, ``dlq list`` and ``resume`` (through the API, in-process:
an exception that is not a ``MrpoolError`` is a traceback a user would have seen),
then checks the guarantees.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRACED = (
    "openat,open,creat,write,pwrite64,writev,lseek,ftruncate,fsync,fdatasync,"
    "rename,renameat,renameat2,unlink,unlinkat,mkdir,mkdirat,rmdir,clone,clone3,fork,vfork"
)
_LINE = re.compile(r"^(\d+) +(.*)$")  # strace pads the pid column
_CALL = re.compile(r"^(\w+)\((.*)\) += (-?\d+)(?:<([^>]*)>)?(?: .*)?$")
_HEX = re.compile(r"\\x([0-9a-f]{2})")


def strace_available() -> bool:
    return shutil.which("strace") is not None


def record(argv: list[str], trace: Path, **popen: Any) -> subprocess.CompletedProcess:
    """Run ``argv`` under strace, logging into ``trace``."""
    command = ["strace", "-f", "-qq", "-y", "-xx", "-s", str(1 << 26), "-o", str(trace),
               "-e", f"trace={TRACED}", "--", *argv]  # fmt: skip
    return subprocess.run(command, capture_output=True, **popen)


# -- parsing -----------------------------------------------------------------------
def _text(escaped: str) -> bytes:
    return bytes(int(h, 16) for h in _HEX.findall(escaped)) if escaped else b""


def _split_args(args: str) -> list[str]:
    """Top-level comma-separated arguments (brackets and braces nest; strings hold no
    raw quote or comma under ``-xx``)."""
    parts, depth, current, in_string = [], 0, [], False
    for ch in args:
        if ch == '"':
            in_string = not in_string
        elif not in_string and ch in "[{(":
            depth += 1
        elif not in_string and ch in "]})":
            depth -= 1
        if ch == "," and depth == 0 and not in_string:
            parts.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if current:
        parts.append("".join(current).strip())
    return parts


def _fd(arg: str) -> tuple[int, str | None]:
    """``3<\\x2f...>`` -> (3, "/..."); ``AT_FDCWD</cwd>`` -> (-100, "/cwd")."""
    number, _, rest = arg.partition("<")
    path = os.fsdecode(_text(rest[:-1])) if rest else None
    return (-100 if number == "AT_FDCWD" else int(number)), path


def _string(arg: str) -> bytes:
    if arg.endswith("..."):
        raise ValueError("strace cut a string short: raise -s")
    return _text(arg.strip('"'))


@dataclass
class Call:
    """One completed syscall: ``start`` and ``end`` are its positions in the trace (they
    differ when another thread's line came between its start and its end)."""

    pid: int
    name: str
    args: list[str]
    ret: int
    ret_path: str | None
    start: int
    end: int


def parse(trace: Path) -> list[Call]:
    """The trace's successful syscalls in completion order, unfinished ones rejoined."""
    pending: dict[int, tuple[str, int]] = {}
    calls: list[Call] = []
    for position, raw in enumerate(trace.read_text().splitlines()):
        match = _LINE.match(raw)
        if not match:
            continue
        pid, text = int(match.group(1)), match.group(2)
        if text.endswith("<unfinished ...>"):
            pending[pid] = (text[: -len("<unfinished ...>")].rstrip(), position)
            continue
        start = position
        if text.startswith("<... "):
            head, start = pending.pop(pid, ("", position))
            text = head + text.split("resumed>", 1)[1]
        call = _CALL.match(text.strip())
        if call is None or int(call.group(3)) < 0:
            continue  # exits, signals, failed calls: nothing changed
        name, args = call.group(1), _split_args(call.group(2))
        calls.append(Call(pid, name, args, int(call.group(3)), call.group(4), start, position))
    return calls


# -- the file-system model ---------------------------------------------------------
@dataclass(eq=False)
class File:
    current: bytearray = field(default_factory=bytearray)
    durable: bytes = b""
    pending: list[tuple] = field(default_factory=list)  # ("w", offset, data) | ("t", size)
    mapped: bool = False


@dataclass(eq=False)
class Dir:
    current: dict[str, Any] = field(default_factory=dict)
    durable: dict[str, Any] = field(default_factory=dict)
    pending: list[tuple] = field(
        default_factory=list
    )  # ("link", name, node, src) | ("unlink", name)


def _apply_data(data: bytearray, op: tuple, tear: int | None = None) -> None:
    if op[0] == "t":
        del data[op[1] :]
        data.extend(bytes(max(0, op[1] - len(data))))
        return
    _, offset, chunk = op
    if tear is not None:
        chunk = chunk[:tear]
    if len(data) < offset:
        data.extend(bytes(offset - len(data)))
    data[offset : offset + len(chunk)] = chunk


def _apply_entry(entries: dict[str, Any], op: tuple, sources: dict | None = None) -> None:
    if op[0] == "unlink":
        entries.pop(op[1], None)
        return
    _, name, node, src = op
    if src is not None and sources is not None:
        src_dir, src_name = src
        view = sources.get(id(src_dir))
        if view is not None and view.get(src_name) is node:
            del view[src_name]
    entries[name] = node


class Model:
    """Replays parsed calls under ``root`` (a state dir) and builds crash states."""

    def __init__(self, root: Path, before: Dir | None, first_pid: int) -> None:
        self.root = str(root)
        self.top = Dir()  # the state dir's parent: only the state dir's own entry matters
        if before is not None:  # what existed when the trace began was durable
            self.top.current[root.name] = self.top.durable[root.name] = _clone(before)
        self.first_pid = first_pid  # the traced command itself: its stdout acknowledges
        self.acks: list[tuple[int, str]] = []  # (trace position, what was acknowledged)
        self.boundaries: list[int] = []  # positions just after something became durable
        self._fds: dict[tuple[int, int], list] = {}  # (process, fd) -> [path, offset]
        self._process: dict[int, int] = {}  # thread id -> the process it belongs to
        self._covers: dict[int, int] = {}  # fsync call -> pending changes it covers

    # -- namespace -----------------------------------------------------------------
    def _inside(self, path: str | None) -> bool:
        return path is not None and (path == self.root or path.startswith(self.root + "/"))

    def _parts(self, path: str) -> list[str]:
        rel = os.path.relpath(path, os.path.dirname(self.root))
        return rel.split("/")

    def _lookup(self, path: str) -> tuple[Dir | None, str, Any]:
        """(parent dir, name, node) of ``path`` in the current view."""
        parts = self._parts(path)
        directory: Any = self.top
        for part in parts[:-1]:
            directory = directory.current.get(part) if isinstance(directory, Dir) else None
            if not isinstance(directory, Dir):
                return None, parts[-1], None
        return directory, parts[-1], directory.current.get(parts[-1])

    def _link(self, path: str, node: Any, src: tuple | None = None) -> None:
        parent, name, _ = self._lookup(path)
        if parent is None:
            return
        if src is not None:
            src[0].current.pop(src[1], None)
        parent.current[name] = node
        parent.pending.append(("link", name, node, src))

    def _unlink(self, path: str) -> None:
        parent, name, node = self._lookup(path)
        if parent is not None and node is not None:
            del parent.current[name]
            parent.pending.append(("unlink", name))

    # -- replay --------------------------------------------------------------------
    def replay(self, calls: list[Call], upto: int | None = None) -> None:
        """Apply every call that completed before trace position ``upto``."""
        events = sorted(
            [(c.start, 0, k, c) for k, c in enumerate(calls)]
            + [(c.end, 1, k, c) for k, c in enumerate(calls)]
        )
        for position, phase, key, call in events:
            if upto is not None and position >= upto:
                break
            if phase == 0:
                if call.name in ("fsync", "fdatasync"):
                    self._fsync_start(call, key)
                continue
            handler = getattr(self, f"_on_{call.name}", None)
            if handler is not None:
                handler(call, key, position)

    def _proc(self, pid: int) -> int:
        return self._process.get(pid, pid)

    def _on_clone(self, call: Call, key: int, position: int) -> None:
        parent = self._proc(call.pid)
        if "CLONE_THREAD" in ",".join(call.args):
            self._process[call.ret] = parent
            return
        for (proc, fd), entry in list(self._fds.items()):
            if proc == parent:
                self._fds[(call.ret, fd)] = list(entry)

    _on_clone3 = _on_fork = _on_vfork = _on_clone

    def _on_openat(self, call: Call, key: int, position: int) -> None:
        path = os.fsdecode(_text(call.ret_path or ""))
        if not self._inside(path):
            return
        flags = call.args[2] if call.name == "openat" else call.args[1]
        _, _, node = self._lookup(path)
        if node is None and "O_CREAT" in flags:
            node = File()
            self._link(path, node)
        if isinstance(node, File) and "O_TRUNC" in flags and node.current:
            node.current.clear()
            node.pending.append(("t", 0))
        offset = len(node.current) if isinstance(node, File) and "O_APPEND" in flags else 0
        self._fds[(self._proc(call.pid), call.ret)] = [path, offset]

    def _on_open(self, call: Call, key: int, position: int) -> None:
        self._on_openat(call, key, position)

    def _file_of(self, call: Call, arg: str) -> tuple[File | None, list | None]:
        fd, path = _fd(arg)
        if not self._inside(path):
            return None, None
        entry = self._fds.setdefault((self._proc(call.pid), fd), [path, 0])
        _, _, node = self._lookup(path)
        return (node if isinstance(node, File) else None), entry

    def _write_at(self, node: File, offset: int, data: bytes) -> None:
        op = ("w", offset, data)
        _apply_data(node.current, op)
        node.pending.append(op)

    def _on_write(self, call: Call, key: int, position: int) -> None:
        fd, _ = _fd(call.args[0])
        if fd == 1 and self._proc(call.pid) == self.first_pid:
            self.acks.append((position, "stdout:" + _string(call.args[1]).decode(errors="replace")))
        node, entry = self._file_of(call, call.args[0])
        if node is None:
            return
        data = _string(call.args[1])[: call.ret]
        self._write_at(node, entry[1], data)
        entry[1] += len(data)

    def _on_pwrite64(self, call: Call, key: int, position: int) -> None:
        node, _ = self._file_of(call, call.args[0])
        if node is not None:
            self._write_at(node, int(call.args[3]), _string(call.args[1])[: call.ret])

    def _on_writev(self, call: Call, key: int, position: int) -> None:
        node, entry = self._file_of(call, call.args[0])
        if node is None:
            return
        data = b"".join(_text(s) for s in re.findall(r'iov_base="([^"]*)"', call.args[1]))
        data = data[: call.ret]
        self._write_at(node, entry[1], data)
        entry[1] += len(data)

    def _on_lseek(self, call: Call, key: int, position: int) -> None:
        node, entry = self._file_of(call, call.args[0])
        if entry is not None:
            entry[1] = call.ret

    def _on_ftruncate(self, call: Call, key: int, position: int) -> None:
        node, _ = self._file_of(call, call.args[0])
        if node is not None:
            op = ("t", int(call.args[1]))
            _apply_data(node.current, op)
            node.pending.append(op)
            node.mapped = node.mapped or op[1] > 0 and not any(p[0] == "w" for p in node.pending)

    def _synced_node(self, call: Call) -> tuple[str | None, Any]:
        """The file or directory an fsync names (the state dir's parent included: its
        fsync makes the state dir's own entry durable)."""
        _, path = _fd(call.args[0])
        if path == os.path.dirname(self.root):
            return path, self.top
        if not self._inside(path):
            return None, None
        return path, self._lookup(path)[2]

    def _fsync_start(self, call: Call, key: int) -> None:
        _, node = self._synced_node(call)
        if node is not None:
            self._covers[key] = len(node.pending)

    def _on_fsync(self, call: Call, key: int, position: int) -> None:
        path, node = self._synced_node(call)
        covered = self._covers.pop(key, None)
        if node is None or covered is None:
            return
        done, node.pending = node.pending[:covered], node.pending[covered:]
        if isinstance(node, File):
            data = bytearray(node.durable)
            for op in done:
                _apply_data(data, op)
            node.durable = bytes(data)
            if path.endswith("journal.log"):
                self.acks.append((position, "journal:" + path))
        else:
            views = self._durable_views()
            for op in done:
                _apply_entry(node.durable, op, views)
        self.boundaries.append(position + 1)

    _on_fdatasync = _on_fsync

    def _durable_views(self) -> dict[int, dict]:
        views: dict[int, dict] = {}

        def walk(directory: Dir) -> None:
            views[id(directory)] = directory.durable
            for child in directory.durable.values():
                if isinstance(child, Dir):
                    walk(child)

        walk(self.top)
        return views

    def _path_arg(self, call: Call, dir_arg: str | None, path_arg: str) -> str:
        raw = os.fsdecode(_string(path_arg))
        if raw.startswith("/"):
            return os.path.normpath(raw)
        base = _fd(dir_arg)[1] if dir_arg else None
        return os.path.normpath(os.path.join(base or "/", raw))

    def _on_rename(self, call: Call, key: int, position: int) -> None:
        if call.name == "rename":
            old, new = (
                self._path_arg(call, None, call.args[0]),
                self._path_arg(call, None, call.args[1]),
            )
        else:
            old = self._path_arg(call, call.args[0], call.args[1])
            new = self._path_arg(call, call.args[2], call.args[3])
        if not (self._inside(old) or self._inside(new)):
            return
        src_dir, src_name, node = self._lookup(old)
        if node is not None:
            self._link(new, node, (src_dir, src_name))

    _on_renameat = _on_renameat2 = _on_rename

    def _on_unlink(self, call: Call, key: int, position: int) -> None:
        path = (
            self._path_arg(call, None, call.args[0])
            if call.name in ("unlink", "rmdir")
            else self._path_arg(call, call.args[0], call.args[1])
        )
        if self._inside(path):
            self._unlink(path)

    _on_unlinkat = _on_rmdir = _on_unlink

    def _on_mkdir(self, call: Call, key: int, position: int) -> None:
        path = (
            self._path_arg(call, None, call.args[0])
            if call.name == "mkdir"
            else self._path_arg(call, call.args[0], call.args[1])
        )
        if self._inside(path):
            self._link(path, Dir())

    _on_mkdirat = _on_mkdir

    # -- crash states --------------------------------------------------------------
    def materialise(self, into: Path, rng: random.Random | None, keep_all: bool) -> None:
        """Write the state a power cut leaves now into ``into`` (the state dir's copy):
        durable content plus, per file and per directory, none of the pending changes
        (``rng`` None and not ``keep_all``), all of them (``keep_all``), or a random
        prefix with a random tear of the last write (``rng``)."""

        def keep(count: int) -> int:
            if keep_all:
                return count
            return rng.randint(0, count) if rng else 0

        def entries_of(directory: Dir) -> dict[str, Any]:
            view = dict(directory.durable)
            for op in directory.pending[: keep(len(directory.pending))]:
                _apply_entry(view, op)
            return view

        def content_of(node: File) -> bytes:
            if node.mapped:
                return bytes(len(node.current))
            data = bytearray(node.durable)
            n = keep(len(node.pending))
            for k, op in enumerate(node.pending[:n]):
                tear = None
                if rng and k == n - 1 and op[0] == "w" and not keep_all:
                    tear = rng.randint(0, len(op[2]))
                _apply_data(data, op, tear)
            return bytes(data)

        def write_dir(directory: Dir, path: Path) -> None:
            path.mkdir(mode=0o700)
            for name, child in entries_of(directory).items():
                if isinstance(child, Dir):
                    write_dir(child, path / name)
                else:
                    (path / name).write_bytes(content_of(child))
                    os.chmod(path / name, 0o600)

        state = entries_of(self.top).get(Path(self.root).name)
        if isinstance(state, Dir):
            into.parent.mkdir(parents=True, exist_ok=True)
            write_dir(state, into)


def snapshot(path: Path) -> Dir | None:
    """A directory tree on disk as a durable model (what existed before the trace)."""
    if not path.exists():
        return None
    directory = Dir()
    for entry in os.scandir(path):
        if entry.is_dir(follow_symlinks=False):
            node: Any = snapshot(Path(entry.path))
        else:
            data = Path(entry.path).read_bytes()
            node = File(bytearray(data), data)
        directory.current[entry.name] = directory.durable[entry.name] = node
    return directory


def model_at(calls: list[Call], root: Path, before: Dir | None, cut: int | None) -> Model:
    """The model after every call that completed before trace position ``cut``."""
    model = Model(root, before, calls[0].pid if calls else -1)
    model.replay(calls, cut)
    return model


def _clone(directory: Dir) -> Dir:
    copy = Dir()
    for name, child in directory.durable.items():
        node = (
            _clone(child)
            if isinstance(child, Dir)
            else File(bytearray(child.durable), child.durable)
        )
        copy.current[name] = copy.durable[name] = node
    return copy


def cut_points(calls: list[Call], root: Path, before: Dir | None) -> list[int]:
    """Every position just after something became durable, the start, and the end."""
    model = model_at(calls, root, before, None)
    end = max((c.end for c in calls), default=0) + 1
    return sorted({0, *model.boundaries, end})


# -- checking one crash state --------------------------------------------------------
@dataclass
class Acknowledged:
    """What a user had been told was safe at the cut."""

    job: bool  # ``run`` had printed the job id
    succeeded: dict[int, Any]  # item index -> result, in the durable journal
    parked: set[int]  # item indices whose parking in the DLQ is in the durable journal
    reduced: bool = False  # a successful reduce step is in the durable journal


def acknowledged(model: Model, job_id: str) -> Acknowledged:
    """Read the durable journal of ``job_id`` as the model has it at the cut."""
    from mrpool.journal import read_records

    printed = any(what.startswith("stdout:") and job_id in what for _, what in model.acks)
    node = _node_at(model, ["jobs", job_id, "journal.log"], durable=True)
    succeeded: dict[int, Any] = {}
    parked: set[int] = set()
    reduced = False
    if isinstance(node, File) and node.durable:
        scratch = (
            Path(os.environ.get("TMPDIR", "/tmp")) / f"ack-{os.getpid()}-{os.urandom(4).hex()}"
        )
        scratch.write_bytes(node.durable)
        try:
            for _, _, rec in read_records(scratch):
                if rec["k"] == "ok":
                    for index, _attempt, _duration, result in rec["b"]:
                        succeeded[index] = result
                        parked.discard(index)
                elif rec["k"] == "f":  # parked, or failed again (a retry from the DLQ)
                    (parked.add if rec.get("next") == "dlq" else parked.discard)(rec["i"])
                elif rec["k"] == "purge":
                    parked.difference_update(rec["b"])
                elif rec["k"] == "reduce":
                    reduced = bool(rec.get("ok"))
        finally:
            scratch.unlink()
    return Acknowledged(printed, succeeded, parked, reduced)


def _node_at(model: Model, parts: list[str], durable: bool) -> Any:
    node: Any = model.top
    for part in [Path(model.root).name, *parts]:
        if not isinstance(node, Dir):
            return None
        node = (node.durable if durable else node.current).get(part)
    return node


def check_state(state_dir: Path, job_id: str, ack: Acknowledged, side_log: Path) -> list[str]:
    """Run the read commands and a resume to the end on one crash state; the guarantees
    it breaks, as one line each (empty: it holds)."""
    from mrpool import api
    from mrpool.errors import MrpoolError, NoSuchJob

    problems: list[str] = []

    def call(what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs), None
        except NoSuchJob as e:
            return None, e
        except MrpoolError as e:
            problems.append(f"{what}: refused a state a power cut may leave: {e}")
            return None, e
        except Exception as e:  # noqa: BLE001 - a traceback a user would see
            problems.append(f"{what}: traceback: {type(e).__name__}: {e}")
            return None, e

    status, error = call("status", api.job_status, job_id, state_dir=state_dir)
    if isinstance(error, NoSuchJob):
        if ack.job:
            problems.append("the job's id was printed, and after the power cut it is gone")
        return problems
    if status is None:
        return problems
    before, _ = call("results", lambda: list(api.iter_results(job_id, state_dir=state_dir)))
    call("dlq list", lambda: api.open_dlq(job_id, state_dir=state_dir).entries())
    if before is None:
        return problems
    problems += _acknowledged_kept(before, ack, job_id, state_dir, "before resume")
    side_log.unlink(missing_ok=True)
    for _ in range(3):  # resume until nothing is left (a DLQ retry may park again)
        report, error = call("resume", api.resume_job, job_id, state_dir=state_dir)
        if error is not None:
            return problems
        status = api.job_status(job_id, state_dir=state_dir)
        if not status["pending"] and not status["failed"]:
            break
    after = list(api.iter_results(job_id, state_dir=state_dir))
    ran = set(side_log.read_text().split()) if side_log.exists() else set()
    again = sorted({str(row["id"]) for row in before} & ran)
    if again:
        problems.append(f"recorded successes ran again after the power cut: {again}")
    problems += _acknowledged_kept(after, ack, job_id, state_dir, "after resume")
    if ack.reduced:
        call("results --reduce", api.reduce_output, job_id, state_dir=state_dir)
    ids = [row["id"] for row in after]
    if len(ids) != len(set(ids)):
        problems.append("results list an id twice")
    status = api.job_status(job_id, state_dir=state_dir)
    parts = status["succeeded"] + status["dlq"] + status["failed"] + status["pending"]
    if status["total"] != parts or status["pending"] or status["failed"]:
        problems.append(f"counts after resume do not add up or are not finished: {status}")
    return problems


def _acknowledged_kept(
    rows, ack: Acknowledged, job_id: str, state_dir: Path, when: str
) -> list[str]:
    """Acknowledged successes are there with their results; an acknowledged parking is
    not forgotten: the item is parked, failed (retried since), succeeded or purged --
    never back to pending with no attempt counted."""
    from mrpool.items import read_ids
    from mrpool.store import PENDING, JobStore

    store = JobStore.open(state_dir, job_id)
    state = store.load_state(store.info().total)
    ids = read_ids(store.dir)
    got = {str(row["id"]): row["result"] for row in rows}
    problems = []
    for index, result in ack.succeeded.items():
        if got.get(str(ids[index]), object()) != result:
            problems.append(f"{when}: acknowledged success of {ids[index]!r} lost or changed")
    for index in ack.parked:
        if state.status[index] == PENDING and not state.opened[index]:
            problems.append(f"{when}: acknowledged DLQ item {ids[index]!r} is pending again")
    return problems


# -- workloads ---------------------------------------------------------------------
MAP_MODULE = """
import os, pathlib

def work(item):
    log = os.environ.get("POWERCUT_SIDE_LOG")
    if log:
        with open(log, "a") as handle:
            handle.write(f"{item['id']}\\n")
    if item["id"] % 7 == 3 and not pathlib.Path(__file__).with_name("fixed").exists():
        raise ValueError(f"item {item['id']} is bad")
    return {"twice": item["id"] * 2}

def total(results):
    return sum(r["twice"] for r in results)
"""


def write_workload(directory: Path, items: int = 20, reduce: bool = False) -> Path:
    """A small job: items whose id % 7 == 3 fail until a file ``fixed`` exists."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "powercut_map.py").write_text(MAP_MODULE)
    (directory / "items.jsonl").write_text("".join(f'{{"id": {i}}}\n' for i in range(items)))
    job = "input: items.jsonl\nworkers: 2\nmap:\n  callable: powercut_map:work\n  retries: 1\n" + (
        "reduce:\n  callable: powercut_map:total\n" if reduce else ""
    )
    (directory / "job.yaml").write_text(job)
    return directory / "job.yaml"


@dataclass
class Trace:
    calls: list[Call]
    root: Path  # the state dir the traced command used
    before: Dir | None  # the state dir as it was (durable) when the command started
    job_id: str


def _materialise(model: Model, into: Path, variant: str, seed: float) -> None:
    """One crash state of ``model``: ``none`` / ``all`` of the pending changes, or a
    ``random-*`` prefix and tear drawn from ``seed`` (the same seed, the same state)."""
    pick = random.Random(seed) if variant.startswith("random") else None
    model.materialise(into, pick, keep_all=variant == "all")


def explore(trace: Trace, scratch: Path, side_log: Path, samples: int = 1, seed: int = 0,
            keep_going: bool = True) -> tuple[int, list[str]]:  # fmt: skip
    """Check every crash state of ``trace`` (see the module docstring); returns the number
    of states checked and the problems found, each naming its cut and variant."""
    rng = random.Random(seed)
    checked, problems = 0, []
    for cut in cut_points(trace.calls, trace.root, trace.before):
        variants = ["none", "all"] + [f"random-{k}" for k in range(samples)]
        for variant in variants:
            model = model_at(trace.calls, trace.root, trace.before, cut)
            ack = acknowledged(model, trace.job_id)
            state = scratch / f"cut{cut}-{variant}"
            seed_of_state = rng.random()
            _materialise(model, state, variant, seed_of_state)
            found = check_state(state, trace.job_id, ack, side_log)
            checked += 1
            problems += [f"cut {cut} ({variant}): {p}" for p in found]
            shutil.rmtree(state, ignore_errors=True)
            if found:  # keep the state as the power cut left it, to look at
                _materialise(
                    model, scratch / "failed" / f"cut{cut}-{variant}", variant, seed_of_state
                )
            if found and not keep_going:
                return checked, problems
    return checked, problems


WORKLOADS = ("run", "resume --reset-failed", "dlq retry", "dlq purge", "reduce")


def record_workload(name: str, work: Path, items: int = 20, env: dict | None = None) -> Trace:
    """Set up ``work`` for workload ``name`` with ordinary (untraced) commands, then
    record the workload's own command. Job id ``j``; state dir ``work/state``."""
    import sys

    job = write_workload(work / "job", items=items, reduce=name == "reduce")
    state = work / "state"
    env = dict(env or os.environ, POWERCUT_SIDE_LOG=str(work / "recording.log"))

    def mrpool(*args: str, traced: Path | None = None) -> subprocess.CompletedProcess:
        argv = [sys.executable, "-m", "mrpool", *args, "--state-dir", str(state)]
        if traced is not None:
            return record(argv, traced, env=env)
        return subprocess.run(argv, capture_output=True, env=env)

    run = ("run", str(job), "--job-id", "j")
    traced = {
        "run": run,
        "resume --reset-failed": ("resume", "j", "--reset-failed"),
        "dlq retry": ("dlq", "retry", "j"),
        "dlq purge": ("dlq", "purge", "j", "--yes"),
        "reduce": ("resume", "j"),
    }[name]
    if name != "run":
        setup = mrpool(*run)
        if setup.returncode != 1:  # the job parks its bad items and stops there
            raise RuntimeError(f"set-up run of {name!r} exited {setup.returncode}: {setup.stderr}")
    if name in ("dlq retry", "reduce"):
        (work / "job" / "fixed").write_text("")  # from now on every item succeeds
    os.sync()
    before = snapshot(state)
    done = mrpool(*traced, traced=work / "trace.txt")
    if done.returncode not in (0, 1):
        raise RuntimeError(f"traced {name!r} exited {done.returncode}: {done.stderr[-2000:]}")
    return Trace(parse(work / "trace.txt"), state, before, "j")
