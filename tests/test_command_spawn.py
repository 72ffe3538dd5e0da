"""How a worker runs one map command: exit status, timeout, and the old-kernel fallbacks.

The worker starts each command with ``posix_spawn`` and waits on a pidfd (Linux 5.3+),
giving the command memfds (Linux 3.17+) as stdin/stdout/stderr. Kernels without pidfds
(RHEL 8's 4.18, say) or memfds cannot be had here, so those two tests switch the call
off and check that the fallback gives the same answers with real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import psutil
import pytest
from conftest import REPO

from mrpool import worker


def spawn(*argv: str) -> int:
    return os.posix_spawnp(argv[0], list(argv), dict(os.environ))


@pytest.fixture(params=["pidfd", "polling"])
def wait_mode(request, monkeypatch):
    if request.param == "polling":

        def no_pidfd(*args: int) -> int:
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "pidfd_open", no_pidfd)
    return request.param


def test_exit_statuses_come_back_as_the_contract_records_them(wait_mode):
    assert worker._wait_for(spawn("true"), timeout=None) == 0
    assert worker._wait_for(spawn("sh", "-c", "exit 3"), timeout=5) == 3
    assert worker._wait_for(spawn("sh", "-c", "kill -TERM $$"), timeout=5) == -15


def test_a_command_past_its_timeout_is_killed_with_its_children_and_reaped(wait_mode, monkeypatch):
    pid = spawn("sh", "-c", "sleep 30 & sleep 30; true")  # "; true": sh forks both
    children = _children_once_started(pid, count=2)  # its background child and its own
    started = time.monotonic()
    assert worker._wait_for(pid, timeout=0.3) is None
    assert time.monotonic() - started < 5
    monkeypatch.undo()  # psutil itself waits with pidfds
    assert not psutil.pid_exists(pid)  # reaped, not a zombie
    psutil.wait_procs(children, timeout=5)
    assert not any(c.is_running() and c.status() != psutil.STATUS_ZOMBIE for c in children)


@pytest.mark.parametrize("memfd", [True, False], ids=["memfd", "unnamed-temp-file"])
def test_memory_files_hold_the_item_and_read_back_whole_and_tail(memfd, monkeypatch):
    if not memfd:

        def no_memfd(*args: object) -> int:
            raise OSError(38, "Function not implemented")

        monkeypatch.setattr(os, "memfd_create", no_memfd)
    data = b'{"id": 1, "text": "' + b"x" * 5000 + b'"}'
    fd = worker._memory_file(data)
    try:
        assert os.lseek(fd, 0, os.SEEK_CUR) == 0  # a command reads it from the start
        assert worker._command_result(fd) == json.loads(data)  # read whole, from the start
        assert worker._tail(fd) == data[-worker.TAIL_BYTES :].decode()
        assert not os.get_inheritable(fd)  # only its dup as fd 0/1/2 reaches the command
    finally:
        os.close(fd)


def _children_once_started(pid: int, count: int) -> list[psutil.Process]:
    """``pid``'s descendants once there are ``count`` of them (no guessed sleep)."""
    deadline = time.monotonic() + 10
    while True:
        children = psutil.Process(pid).children(recursive=True)
        if len(children) >= count or time.monotonic() > deadline:
            assert len(children) >= count, children
            return children
        time.sleep(0.01)


STRAYS_SCRIPT = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from mrpool import worker

def children():
    return len(open(f"/proc/{me}/task/{me}/children").read().split())

worker._adopt_orphans()
me = os.getpid()
worker._kill_strays(me)  # no child at all: nothing to do
# A command that exits at once, leaving one orphan that runs on and one that exits
# a moment later: both are re-parented to this process, as to a worker.
pid = os.posix_spawnp("sh", ["sh", "-c", "sleep 30 >/dev/null 2>&1 & (sleep 0.1; exit 0) &"], dict(os.environ))
os.waitpid(pid, 0)
deadline = time.monotonic() + 10
while time.monotonic() < deadline:  # until both orphans are ours and the short one has exited
    kids = open(f"/proc/{me}/task/{me}/children").read().split()
    states = [open(f"/proc/{k}/stat").read().rsplit(")", 1)[1].split()[0] for k in kids]
    if len(kids) == 2 and "Z" in states:
        break
    time.sleep(0.01)
print(children())
worker._kill_strays(me)
print(children())
"""


def test_what_an_attempt_left_behind_is_killed_and_reaped_running_or_exited(tmp_path):
    """``_kill_strays`` in a subreaper, as a worker is: a command left one orphan running
    and one that has since exited; afterwards neither is a child any more (killed,
    reaped), and with no child at all the call is a no-op."""
    proc = subprocess.run(
        [sys.executable, "-c", STRAYS_SCRIPT, str(REPO)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["2", "0"]
