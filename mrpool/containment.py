"""Containment: every process a session starts, and how to end them all.

A session's workers, the map commands they run and whatever those start in
the background (a ``(sleep 77 &)``, a setsid double-fork daemon, a child a
callable forked) must all end with the session, however it ends: a clean
finish, Ctrl-C, SIGTERM, a SIGKILL of the supervisor, of one worker or of the
user's whole process group.

Two mechanisms, chosen at session start (``MRPOOL_CONTAINMENT=token`` forces
the second; anything else prefers the first):

* **cgroup** -- where this process's cgroup v2 directory is writable (found
  through ``/proc/self/cgroup`` and ``/proc/self/mountinfo``): one cgroup per
  session, ``mrpool-<job key>-<nonce>``, created beside the supervisor's own
  cgroup's processes (as a child of it), and a sub-cgroup ``w<slot>.<n>`` per
  worker incarnation. A worker moves itself into its cgroup first thing after
  the fork, so everything it ever starts is in there, whatever it does to its
  session, process group or environment; ending a worker's leftovers is one
  write to its ``cgroup.kill``. The supervisor (and the guardian) are never
  inside.
* **token** -- everywhere else: every process a worker execs carries
  ``MRPOOL_SESSION`` in its environment (``<job key>.<nonce>/w<slot>.<n>``,
  after any outer session's token, space separated: a job run from a map
  command is swept with the outer one), visible in ``/proc/PID/environ``;
  leftovers are found by scanning ``/proc`` for it. Workers are child
  subreapers, so while a worker lives it also finds and kills what its
  attempts left (``worker._kill_strays``); a process a *callable* forks (not
  exec'd, so without the token) is killed by ``PR_SET_PDEATHSIG`` when its
  worker dies. The token is set in cgroup mode too, so either sweep finds a
  previous session's leftovers.

The **guardian** covers the supervisor's own death: a small process forked at
session start that calls ``setsid`` (a ``kill -9 -PGID`` of the user's group
does not reach it), watches the supervisor through a pidfd, and is told each
worker's pid on a pipe. When the supervisor dies it kills the workers, the
session's cgroup (``cgroup.kill``) and every process holding the session's
token, removes the cgroups and exits. On a normal end the supervisor cleans up
itself, then tells it ``x`` and reaps it. It holds no descriptor of the
supervisor's (so no pipe a caller waits on, and no job lock: POSIX record
locks are per process and not inherited by a fork anyway).

``sweep_leftovers(job_dir)`` ends what a previous session of the same job left
(its cgroups, found by name beside ours, and its token), before any worker of
the new one starts.
"""

from __future__ import annotations

import gc
import hashlib
import os
import secrets
import select
import signal
import time
from dataclasses import dataclass

__all__ = [
    "Containment",
    "Unit",
    "die_with_parent",
    "sweep_leftovers",
    "cgroup_base",
    "TOKEN_ENV",
    "MODE_ENV",
]

TOKEN_ENV = "MRPOOL_SESSION"
MODE_ENV = "MRPOOL_CONTAINMENT"
CGROUP_PREFIX = "mrpool-"
_REMOVE_WITHIN = 2.0  # seconds to wait for killed processes to leave a cgroup
_PR_SET_PDEATHSIG = 1


def job_key(job_dir: str | os.PathLike | None) -> str:
    """A short name for one job directory (two state dirs may hold the same job id)."""
    if job_dir is None:
        return secrets.token_hex(8)
    return hashlib.sha256(os.fsencode(os.path.realpath(job_dir))).hexdigest()[:16]


# -- finding cgroup v2 ---------------------------------------------------------------
def cgroup_base() -> str | None:
    """This process's own cgroup v2 directory, if mrpool can create and fill cgroups
    under it; None when there is no cgroup2 mount, or it is not ours to write."""
    try:
        with open("/proc/self/cgroup", "rb") as f:
            own = next((ln[3:].rstrip(b"\n") for ln in f if ln.startswith(b"0::")), None)
        with open("/proc/self/mountinfo", "rb") as f:
            mounts = f.read().splitlines()
    except OSError:
        return None
    if own is None:
        return None
    for line in mounts:
        fields = line.split()
        if b"-" not in fields:
            continue
        sep = fields.index(b"-")
        if fields[sep + 1] != b"cgroup2":
            continue
        root, mountpoint = _unescaped(fields[3]), _unescaped(fields[4])
        if root != b"/" and not (own == root or own.startswith(root + b"/")):
            continue
        relative = own[len(root) :] if root != b"/" else own
        path = os.fsdecode(mountpoint + relative).rstrip("/") or "/"
        if _writable_cgroup(path):
            return path
    return None


def _unescaped(field: bytes) -> bytes:
    """A mountinfo field with its octal escapes (``\\040`` for a space) undone."""
    if b"\\" not in field:
        return field
    return field.decode("unicode_escape").encode("latin-1")


def _writable_cgroup(path: str) -> bool:
    """Whether we may create cgroups in ``path`` and move processes out of it into them:
    moving needs write access to the common ancestor's ``cgroup.procs`` -- ``path``'s
    own, which writing our pid to it (where we already are: a no-op) proves."""
    procs = os.path.join(path, "cgroup.procs")
    if not os.access(path, os.W_OK) or not os.access(procs, os.W_OK):
        return False
    try:
        _write(procs, b"%d" % os.getpid())
    except OSError:
        return False
    return True


def _write(path: str, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def _cgroup_pids(path: str) -> list[int]:
    try:
        with open(os.path.join(path, "cgroup.procs"), "rb") as f:
            return [int(p) for p in f.read().split()]
    except (OSError, ValueError):
        return []


def _cgroup_tree(path: str) -> list[str]:
    """``path`` and every cgroup below it, deepest first (the order to remove them)."""
    found = []
    for top, dirs, _ in os.walk(path, topdown=False):
        found.extend(os.path.join(top, d) for d in dirs)
    found.append(path)
    return found


def kill_cgroup(path: str) -> None:
    """SIGKILL every process in cgroup ``path`` and below it."""
    try:
        _write(os.path.join(path, "cgroup.kill"), b"1")
        return
    except FileNotFoundError:
        if not os.path.isdir(path):
            return
    except OSError:
        pass
    for _ in range(50):  # a kernel before 5.14: kill what cgroup.procs lists, until empty
        pids = [pid for cg in _cgroup_tree(path) for pid in _cgroup_pids(cg)]
        if not pids:
            return
        for pid in pids:
            _kill(pid)
        time.sleep(0.01)


def remove_cgroup(path: str, within: float = _REMOVE_WITHIN) -> bool:
    """Kill what is in cgroup ``path`` (and below), then remove them all; True when gone.
    A killed process leaves its cgroup a moment after the signal: retried ``within``."""
    deadline = time.monotonic() + within
    while True:
        busy = False
        for cg in _cgroup_tree(path) if os.path.isdir(path) else []:
            try:
                os.rmdir(cg)
            except FileNotFoundError:
                pass
            except OSError:
                busy = True
        if not busy:
            return True
        if time.monotonic() >= deadline:
            return False
        kill_cgroup(path)
        time.sleep(0.005)


# -- the token -----------------------------------------------------------------------
_TOKEN_NEEDLE = b"\0" + TOKEN_ENV.encode() + b"="


def _token_words(pid: int) -> list[bytes]:
    """The words of ``pid``'s ``MRPOOL_SESSION`` as it was exec'd ([] if none or gone)."""
    try:
        fd = os.open(f"/proc/{pid}/environ", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return []
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    except OSError:
        return []
    finally:
        os.close(fd)
    environ = b"\0" + b"".join(chunks)
    at = environ.find(_TOKEN_NEEDLE)
    if at < 0:
        return []
    start = at + len(_TOKEN_NEEDLE)
    end = environ.find(b"\0", start)
    return environ[start : end if end >= 0 else None].split(b" ")


def sweep_token(prefix: str, exact: bool = False) -> int:
    """SIGKILL every process whose ``MRPOOL_SESSION`` holds a word starting with
    ``prefix`` (equal to it, if ``exact``), until a pass of ``/proc`` finds none (one
    may fork while we kill); returns how many were killed. Never this process."""
    wanted, me, killed = prefix.encode(), os.getpid(), 0
    for _ in range(50):
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit() and int(name) != me:
                words = _token_words(int(name))
                if any(w == wanted if exact else w.startswith(wanted) for w in words):
                    found.append(int(name))
        if not found:
            break
        for pid in found:
            _kill(pid)
        killed += len(found)
        time.sleep(0.01)  # a killed process keeps its environ until it is really gone
    return killed


def _descendants(pid: int) -> list[int]:
    import psutil  # only here: the guardian and the sweeps need nothing of it

    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- a worker's unit -----------------------------------------------------------------
@dataclass(frozen=True)
class Unit:
    """One worker incarnation's containment, handed to the worker at its fork."""

    word: str  # its token word, "<key>.<nonce>/w<slot>.<n>"
    token: str  # its MRPOOL_SESSION value (an outer session's words first)
    cgroup: str | None  # its cgroup directory (cgroup mode)
    guardian_fd: int  # the supervisor's end of the guardian's pipe: closed in the worker

    def enter(self, forks_die_with_worker: bool) -> None:
        """First thing in a forked worker: into its cgroup, the guardian's pipe closed, the
        token in its environment (what it execs carries it). With
        ``forks_die_with_worker`` (token mode, callables), a process the worker forks
        gets SIGKILL when the worker dies: it carries no token to be found by."""
        if self.cgroup is not None:
            try:
                _write(os.path.join(self.cgroup, "cgroup.procs"), b"%d" % os.getpid())
            except OSError:
                pass  # the guardian and the supervisor still kill this pid itself
        if self.guardian_fd >= 0:
            try:
                os.close(self.guardian_fd)
            except OSError:
                pass
        os.environ[TOKEN_ENV] = self.token
        if forks_die_with_worker:
            os.register_at_fork(after_in_child=die_with_parent)


def die_with_parent() -> None:
    """Linux: SIGKILL this process when its parent (the thread that forked it) dies."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


# -- a session -----------------------------------------------------------------------
class Containment:
    """Every process one session starts: created by ``start``, ended by ``close``."""

    def __init__(self, job_dir: str | os.PathLike | None) -> None:
        self.job_dir = job_dir
        self.key = job_key(job_dir)
        self.nonce = secrets.token_hex(4)
        self.session = f"{self.key}.{self.nonce}"
        self.cgroup: str | None = None
        self._incarnations = 0
        self._guardian = 0
        self._to_guardian = -1
        outer = os.environ.get(TOKEN_ENV, "").strip()
        self._outer = f"{outer} " if outer else ""

    @property
    def mode(self) -> str:
        return "cgroup" if self.cgroup else "token"

    def start(self) -> None:
        """Sweep what a previous session of this job left, create the session's cgroup
        (where usable) and start the guardian."""
        if self.job_dir is not None:
            sweep_leftovers(self.job_dir)
        if os.environ.get(MODE_ENV) != "token":
            base = cgroup_base()
            if base is not None:
                path = os.path.join(base, f"{CGROUP_PREFIX}{self.key}-{self.nonce}")
                try:
                    os.mkdir(path)
                    self.cgroup = path
                except OSError:
                    self.cgroup = None
        self._start_guardian()

    def new_unit(self, slot: int) -> Unit:
        """The containment of the next worker started in ``slot``."""
        self._incarnations += 1
        word = f"{self.session}/w{slot}.{self._incarnations}"
        cgroup = None
        if self.cgroup is not None:
            path = os.path.join(self.cgroup, f"w{slot}.{self._incarnations}")
            try:
                os.mkdir(path)
                cgroup = path
            except OSError:
                cgroup = None
        return Unit(word, self._outer + word, cgroup, self._to_guardian)

    def attach(self, pid: int) -> None:
        """Worker ``pid`` was started: the guardian kills it if the supervisor dies."""
        self._tell(b"w %d\n" % pid)

    def end_unit(self, unit: Unit, pid: int | None = None) -> None:
        """SIGKILL everything a worker incarnation started, and the worker ``pid`` itself
        when given (it must not be reaped yet: its pid would be free for reuse)."""
        if pid is not None:
            victims = [] if unit.cgroup is not None else _descendants(pid)
            _kill(pid)
            for victim in victims:  # in token mode its tree, as it was: its strays, even
                _kill(victim)  # one that scrubbed its environment, are its children
        if unit.cgroup is not None:
            kill_cgroup(unit.cgroup)
        else:
            sweep_token(unit.word, exact=True)

    def release(self, unit: Unit, pid: int) -> None:
        """Worker ``pid`` was reaped: end what its incarnation left and drop its cgroup."""
        self._tell(b"g %d\n" % pid)
        if unit.cgroup is not None:
            remove_cgroup(unit.cgroup)
        # token mode: its strays were killed by the worker itself (subreaper), or by
        # end_unit when it was killed or died; the session's close sweeps once more

    def close(self) -> None:
        """End everything the session started, remove its cgroups, stop the guardian."""
        if self.cgroup is not None:
            kill_cgroup(self.cgroup)
            if remove_cgroup(self.cgroup):
                self.cgroup = None
        sweep_token(self.session + "/")
        if self._guardian:
            self._tell(b"x\n")
            os.close(self._to_guardian)
            self._to_guardian = -1
            try:
                os.waitpid(self._guardian, 0)
            except ChildProcessError:
                pass
            self._guardian = 0

    def _tell(self, message: bytes) -> None:
        if self._to_guardian >= 0:
            try:
                os.write(self._to_guardian, message)
            except OSError:
                pass  # it is gone: nothing to tell

    def _start_guardian(self) -> None:
        read_end, write_end = os.pipe()
        try:
            me = os.pidfd_open(os.getpid())
        except (OSError, AttributeError):
            me = -1
        supervisor = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the forked guardian
            try:
                _guardian(read_end, me, supervisor, self.cgroup, self.session)
            finally:
                os._exit(0)
        os.close(read_end)
        if me >= 0:
            os.close(me)
        self._guardian, self._to_guardian = pid, write_end


def sweep_leftovers(job_dir: str | os.PathLike) -> None:
    """End whatever a previous session of the job in ``job_dir`` left running: its
    cgroups (by name, beside ours) and every process carrying its token. Call it
    holding the job's lock, before this session starts a worker."""
    key = job_key(job_dir)
    base = cgroup_base()
    if base is not None:
        try:
            names = os.listdir(base)
        except OSError:
            names = []
        for name in names:
            if name.startswith(f"{CGROUP_PREFIX}{key}-"):
                path = os.path.join(base, name)
                kill_cgroup(path)
                remove_cgroup(path)
    sweep_token(key + ".")


# -- the guardian ----------------------------------------------------------------------
def _guardian(messages: int, supervisor_fd: int, supervisor: int, cgroup, session: str) -> None:
    """The guardian's life (see the module doc); returns when it is time to exit."""
    gc.disable()  # no finalizer of the supervisor's objects may close a descriptor of ours
    os.setsid()
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN if sig != signal.SIGTERM else signal.SIG_DFL)
    _keep_only(messages, supervisor_fd)
    poller = select.poll()
    poller.register(messages, select.POLLIN)
    if supervisor_fd >= 0:
        poller.register(supervisor_fd, select.POLLIN)
    workers: dict[int, int] = {}  # pid -> pidfd (-1: none), told by the supervisor
    pending = b""
    while True:
        events = poller.poll(None if supervisor_fd >= 0 else 100)
        if supervisor_fd < 0 and os.getppid() != supervisor:
            break  # no pidfd (a kernel before 5.3): our parent changed, so it died
        if any(fd == supervisor_fd for fd, _ in events):
            break
        if not events:
            continue
        data = os.read(messages, 4096)
        if not data:
            break  # every writer gone: the supervisor died
        pending += data
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line == b"x":
                return  # a clean end: the supervisor cleaned up itself
            verb, _, number = line.partition(b" ")
            if verb == b"w":
                workers[int(number)] = _pidfd(int(number))
            elif verb == b"g" and int(number) in workers:
                fd = workers.pop(int(number))
                if fd >= 0:
                    os.close(fd)
    _end_session(workers, cgroup, session)


def _keep_only(*keep: int) -> None:
    """Close every inherited descriptor but ``keep``; 0-2 become /dev/null (a caller
    waiting for the end of our stdout must not wait for us)."""
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        if fd != null:
            os.dup2(null, fd)
    start = 3
    for fd in sorted(k for k in keep if k >= 3):
        os.closerange(start, fd)
        start = fd + 1
    os.closerange(start, 1 << 20)


def _pidfd(pid: int) -> int:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return -1


def _end_session(workers: dict[int, int], cgroup: str | None, session: str) -> None:
    for pid, fd in workers.items():
        if fd >= 0:
            try:
                signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
        else:
            _kill(pid)
    if cgroup is not None:
        kill_cgroup(cgroup)
    sweep_token(session + "/")
    if cgroup is not None:
        remove_cgroup(cgroup)
