"""Every next step mrpool prints pastes as is (issue 24, item 4).

With a state dir that is not the default (``--state-dir`` given, ``$MRPOOL_HOME``
pointing elsewhere), each command a message names -- in quotes, or after "with:" --
is run exactly as printed, and must find the job (never exit 4, "no such job").
``test_run.py`` covers the end-of-run lines (``continue with:``, ``inspect with:``);
these are the hints inside error messages.
"""

from __future__ import annotations

import json
import re
import shlex
import socket

from conftest import write_job

_QUOTED = re.compile(r"'(mrpool [^']+)'")
_AFTER_WITH = re.compile(r"with: (mrpool [^|\n]+?)(?:\s+\||\s*$)", re.M)


def _hints(stderr: str) -> list[str]:
    return _QUOTED.findall(stderr) + _AFTER_WITH.findall(stderr)


def _paste(mrpool, hint: str, elsewhere: str):
    """Run ``hint`` as printed (its words after ``mrpool``), with $MRPOOL_HOME elsewhere."""
    words = shlex.split(hint)
    assert words[0] == "mrpool", hint
    return mrpool.run(*words[1:], env=mrpool.env(MRPOOL_HOME=elsewhere))


def test_hints_in_messages_carry_the_state_dir(mrpool, tmp_path):
    state, elsewhere = str(tmp_path / "mystate"), str(tmp_path / "default")
    at = ["--state-dir", state]
    env = mrpool.env(MRPOOL_HOME=elsewhere)
    job = write_job(tmp_path / "job", [{"id": 1}, {"id": 2}], {"command": ["false"]},
                    extra={"dlq": {"max_items": 0}})  # fmt: skip

    # a full DLQ (on_full: stop): "Inspect with 'mrpool dlq list ...'"
    r = mrpool.run("run", str(job), "--job-id", "h", *at, env=env)
    assert r.returncode == 1, r.stderr
    hints = _hints(r.stderr)
    assert any(h.startswith("mrpool dlq list h") for h in hints), r.stderr
    assert any(h.startswith("mrpool resume h") for h in hints), r.stderr
    for hint in hints:
        assert "--state-dir" in hint, hint
        assert _paste(mrpool, hint, elsewhere).returncode in (0, 1), hint

    # an existing id: "use 'mrpool resume h ...' to continue it"
    r = mrpool.run("run", str(job), "--job-id", "h", *at, env=env)
    assert r.returncode == 2, r.stderr
    (hint,) = _hints(r.stderr)
    assert _paste(mrpool, hint, elsewhere).returncode in (0, 1), hint

    # rerun of an item that has not succeeded: "run it with: mrpool resume h ..."
    r = mrpool.run("rerun", "h", "1", *at, env=env)
    assert r.returncode == 2, r.stderr
    (hint,) = _hints(r.stderr)
    assert hint.startswith("mrpool resume h") and _paste(mrpool, hint, elsewhere).returncode == 1

    # a holder recorded on another host: "run 'mrpool unlock h --force ...'"
    job_dir = tmp_path / "mystate" / "jobs" / "h"
    holder = {"v": 1, "pid": 1, "hostname": socket.gethostname() + "-other",
              "create_time": 0, "acquired_at": 0, "command": "mrpool resume h"}  # fmt: skip
    (job_dir / "holder.json").write_text(json.dumps(holder))
    (job_dir / "lock").write_text("")
    r = mrpool.run("resume", "h", *at, env=env)
    assert r.returncode == 3, r.stderr
    (hint,) = _hints(r.stderr)
    assert hint.startswith("mrpool unlock h --force")
    assert _paste(mrpool, hint, elsewhere).returncode == 0
    assert not (job_dir / "holder.json").exists()

    # damage in the journal: "run 'mrpool fsck h ...'", then fsck's "... --salvage"
    journal = job_dir / "journal.log"
    lines = journal.read_bytes().split(b"\n")
    lines[2] = lines[2][:12] + (b"X" if lines[2][12:13] != b"X" else b"Y") + lines[2][13:]
    journal.write_bytes(b"\n".join(lines))
    r = mrpool.run("results", "h", *at, env=env)
    assert r.returncode == 5, r.stderr
    (hint,) = _hints(r.stderr)
    r = _paste(mrpool, hint, elsewhere)
    assert r.returncode == 5, r.stderr  # fsck found it: damaged, not "no such job"
    (hint,) = _hints(r.stderr)
    assert hint.startswith("mrpool fsck h") and "--salvage" in hint
    assert _paste(mrpool, hint, elsewhere).returncode == 0
