"""Security: no one gets in through job ids, state files, symlinks, item data or callables.

What is shown here (see SECURITY.md for the threat model):

* Job ids are plain names. ``..``, ``/``, absolute paths, control characters
  (a trailing newline included), a leading ``.`` or ``-`` and 129+ characters
  are refused with exit 2 by every command that takes an id, before anything is
  read or created -- even when the path the id spells leads to a real job.
* State is private: a new ``--state-dir`` and every directory under it are
  0700, every file in a job directory (journal, items, checkpoint, DLQ, reduce
  output) is 0600 -- even under ``umask 000``.
* Symlinks planted in a job directory are never written through: state files
  written by replace (``holder.json``, ``checkpoint.json``, ``dlq.json``) get
  the link replaced, files opened in place (``lock``, ``journal.log``) and
  planted ``jobs/`` / ``tmp/`` directories make the command fail with one clear
  line, and an atomic write's temp name cannot be pre-planted. The file a link
  points to is never modified (checked by content: these tests run as root).
* Item values never reach a shell: ``$(...)``, backticks, ``;``, ``&&``, ``|``,
  newlines and redirections in ``{item.KEY}`` arrive literally, as one argv
  element; a command given as a string is split with shlex and not run by a
  shell.
* A callable path names an importable module, never a file path.

Every behaviour runs the real CLI in a subprocess, except the job-id matrix (in
process: the same ``mrpool.cli.main``) and the temp-name check (whose name is
random in a real process, so the primitive is driven directly).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
from pathlib import Path

import pytest
from conftest import PY, REPO, write_job

from mrpool import cli, fsutil
from mrpool.errors import StorageError

pytestmark = pytest.mark.timeout(180)

ARGV_PY = """\
import json, os, sys
out = os.path.join("out", os.environ["MRPOOL_ITEM_ID"] + ".json")
with open(out, "w") as handle:
    json.dump(sys.argv[1:], handle)
print(json.dumps(sys.argv[1:]))
"""
FAIL_B_PY = "import sys\nsys.exit(3 if sys.argv[1] == 'b' else 0)\n"


# -- helpers -------------------------------------------------------------------------
def tree(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a digest of its content (or its link target)."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "-> " + os.readlink(path)
            elif path.is_file():
                found[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                found[rel] = "dir"
    return found


def one_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    assert stderr.endswith("\n") and stderr.count("\n") == 1, f"not one line: {stderr!r}"
    return stderr[:-1]


def dlq_job(tmp_path: Path) -> Path:
    """A job of three items where ``b`` always fails: it ends with one item in the DLQ."""
    return write_job(
        tmp_path / "job",
        [{"id": 1, "v": "a"}, {"id": 2, "v": "b"}, {"id": 3, "v": "c"}],
        {"command": [PY, "fail_b.py", "{item.v}"]},
        workers=1,
        files={"fail_b.py": FAIL_B_PY},
    )


def run_dlq_job(mrpool, tmp_path: Path, job_id: str = "j") -> Path:
    r = mrpool.run("run", str(dlq_job(tmp_path)), "--job-id", job_id)
    assert r.returncode == 1, r.stderr
    return mrpool.job_dir(job_id)


def outside_file(tmp_path: Path, name: str, content: bytes = b"do not touch\n") -> Path:
    path = tmp_path / "outside" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return path


# -- job ids ---------------------------------------------------------------------------
BAD_IDS = [
    "..",
    ".",
    "../x",
    "../../other/jobs/victim",  # leads to a real job (see the test)
    "a/b",
    "a/../b",
    "/etc",
    "/tmp/x",
    "abc\n",  # a regex "$" would let a trailing newline through
    "a\nb",
    "a\x00b",
    "a\tb",
    "\x1b[31mred",
    "a b",
    ".hidden",
    "-rf",
    "--help",
    "a..b",
    "a" * 129,
    "",
    "é",
    "a\\b",
]
COMMANDS = [
    ["resume", "--", "{id}"],
    ["status", "--", "{id}"],
    ["status", "--json", "--", "{id}"],
    ["results", "--", "{id}"],
    ["results", "--reduce", "--", "{id}"],
    ["events", "--", "{id}"],
    ["dlq", "list", "--", "{id}"],
    ["dlq", "show", "--", "{id}", "1"],
    ["dlq", "stats", "--", "{id}"],
    ["dlq", "retry", "--", "{id}"],
    ["dlq", "purge", "--yes", "--", "{id}"],
    ["dlq", "export", "-o", "{out}", "--", "{id}"],
]


def test_job_ids_that_are_not_plain_names_are_refused_by_every_command(
    mrpool, tmp_path: Path, capsys, monkeypatch
) -> None:
    """Every command taking a job id refuses each non-plain id with exit 2 and one line saying
    the id is invalid, before it touches any state: the whole temp tree is unchanged, even for
    an id whose path leads to a real job in another state dir."""
    from mrpool import api

    def never(*_args, **_kwargs):  # in this process, no command may get as far as running items
        raise AssertionError("a command with an invalid job id started a session")

    monkeypatch.setattr(api, "_run_session", never)
    other = tmp_path / "other"
    job = dlq_job(tmp_path)
    r = mrpool.run("run", str(job), "--job-id", "victim", "--state-dir", str(other))
    assert r.returncode == 1, r.stderr
    state = tmp_path / "state"
    state.mkdir()
    (state / "jobs").mkdir(mode=0o700)  # so "../../other/jobs/victim" resolves to the victim
    before = tree(tmp_path)
    out = tmp_path / "export.jsonl"
    for job_id in BAD_IDS:
        argvs = [["run", str(job), f"--job-id={job_id}"]] + [
            [a.replace("{id}", job_id).replace("{out}", str(out)) for a in argv]
            for argv in COMMANDS
        ]
        for argv in argvs:
            capsys.readouterr()
            code = cli.main(
                [*argv, "--state-dir", str(state)]
                if argv[0] == "run"
                else ["--state-dir", str(state), *argv]
            )
            err = capsys.readouterr().err
            assert code == 2, (argv, code, err)
            assert "invalid job id" in one_line(err), (argv, err)
    assert tree(tmp_path) == before


def test_the_job_id_rule_is_exactly_the_contracts(mrpool, tmp_path: Path) -> None:
    """Plain names up to 128 characters (letters, digits, ``_ . -``, not starting with ``.`` or
    ``-``) are valid ids -- a missing one is "no such job" (exit 4) -- and a trailing newline
    makes an id invalid (exit 2) in a real process, where ``run`` creates nothing for it."""
    for job_id in ["a" * 128, "A.b-c_9", "_x", "0"]:
        r = mrpool.run("status", job_id)
        assert r.returncode == 4, (job_id, r.stderr)
    r = mrpool.run("status", "a" * 129)
    assert r.returncode == 2 and "invalid job id" in one_line(r.stderr)
    r = mrpool.run("run", str(dlq_job(tmp_path)), "--job-id", "abc\n")
    assert r.returncode == 2, r.stderr
    assert "invalid job id" in one_line(r.stderr) and r.stdout == ""
    jobs = mrpool.state_dir / "jobs"
    assert not jobs.exists() or os.listdir(jobs) == []


# -- private state ----------------------------------------------------------------------
def test_state_is_readable_by_the_owner_only_even_under_umask_000(mrpool, tmp_path: Path) -> None:
    """With ``umask 000``, a run that parks an item in the DLQ, a resume, and a job with a
    reduce step leave a new state dir, jobs/, tmp/ and each job dir 0700, and every file in a
    job dir (items, journal, checkpoint, DLQ snapshot, reduce output) 0600."""
    state = tmp_path / "new" / "state"
    env = mrpool.env()

    def cli_run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PY, "-m", "mrpool", *args, "--state-dir", str(state)],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            umask=0,
            cwd=str(REPO),
        )

    assert cli_run("run", str(dlq_job(tmp_path)), "--job-id", "dlq").returncode == 1
    assert cli_run("resume", "dlq").returncode == 1  # the DLQ item fails again
    reducing = write_job(
        tmp_path / "reducing",
        [{"id": 1}, {"id": 2}],
        {"command": ["true"]},
        extra={"reduce": {"command": ["cat"]}},
        workers=1,
    )
    r = cli_run("run", str(reducing), "--job-id", "reduced")
    assert r.returncode == 0, r.stderr

    def mode(path: Path) -> int:
        return stat.S_IMODE(path.lstat().st_mode)

    for directory in [
        state,
        state / "jobs",
        state / "tmp",
        state / "jobs/dlq",
        state / "jobs/reduced",
    ]:
        assert mode(directory) == 0o700, (directory, oct(mode(directory)))
    files = {}
    for job_id in ("dlq", "reduced"):
        for path in (state / "jobs" / job_id).iterdir():
            assert path.is_file() and not path.is_symlink(), path
            files[f"{job_id}/{path.name}"] = oct(mode(path))
    assert {
        "dlq/dlq.json",
        "dlq/journal.log",
        "dlq/items.jsonl",
        "dlq/checkpoint.json",
        "reduced/reduce.json",
    } <= set(files)
    assert set(files.values()) == {"0o600"}, files


# -- symlinks ---------------------------------------------------------------------------
def test_planted_symlinks_at_replaced_state_files_are_replaced_not_followed(
    mrpool, tmp_path: Path
) -> None:
    """``holder.json``, ``checkpoint.json`` and ``dlq.json`` planted as symlinks to files
    outside: ``resume`` works, the files outside keep their content, and the job dir ends
    with regular files (the links replaced) and no holder; no outcome is lost."""
    job_dir = run_dlq_job(mrpool, tmp_path)
    targets = {}
    for name in ("holder.json", "checkpoint.json", "dlq.json"):
        targets[name] = outside_file(tmp_path, name + ".target")
        (job_dir / name).unlink(missing_ok=True)
        (job_dir / name).symlink_to(targets[name])
    r = mrpool.run("resume", "j")
    assert r.returncode == 1, r.stderr  # b fails again and is parked again
    assert "Traceback" not in r.stderr
    for name, target in targets.items():
        assert target.read_bytes() == b"do not touch\n", name
    assert not (job_dir / "holder.json").exists() and not (job_dir / "holder.json").is_symlink()
    for name in ("checkpoint.json", "dlq.json"):
        assert (job_dir / name).is_file() and not (job_dir / name).is_symlink(), name
    status = mrpool.status("j")
    assert (status["succeeded"], status["dlq"], status["total"]) == (2, 1, 3)
    assert [e["id"] for e in mrpool.dlq("j")] == [2]


@pytest.mark.parametrize("name", ["lock", "journal.log"])
def test_a_planted_symlink_at_a_file_opened_in_place_fails_the_command_clearly(
    mrpool, tmp_path: Path, name: str
) -> None:
    """``lock`` or ``journal.log`` planted as a symlink (to a copy of the journal, which a
    write-through would grow): ``resume`` exits non-zero with one line naming the file, the
    target is unchanged, no holder is left, and once the link is gone nothing was lost."""
    job_dir = run_dlq_job(mrpool, tmp_path)
    journal = job_dir / "journal.log"
    original = journal.read_bytes()
    target = outside_file(tmp_path, "target", original)
    real = tmp_path / "journal.real"
    if name == "journal.log":
        journal.rename(real)
    (job_dir / name).symlink_to(target)
    r = mrpool.run("resume", "j")
    assert r.returncode not in (0, 2), r.stderr
    line = one_line(r.stderr)
    assert str(job_dir / name) in line, line
    assert target.read_bytes() == original
    (job_dir / name).unlink()
    if name == "journal.log":
        real.rename(journal)
    assert not (job_dir / "holder.json").exists()
    status = mrpool.status("j")
    assert (status["succeeded"], status["dlq"]) == (2, 1)


@pytest.mark.parametrize("name", ["jobs", "tmp"])
def test_a_planted_symlink_for_a_state_subdirectory_is_refused(
    mrpool, tmp_path: Path, name: str
) -> None:
    """``jobs/`` or ``tmp/`` in the state dir planted as a symlink to a directory elsewhere:
    ``run`` refuses with one line naming it, and nothing is created in the directory it
    points to."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    mrpool.state_dir.mkdir(mode=0o700)
    (mrpool.state_dir / name).symlink_to(elsewhere, target_is_directory=True)
    r = mrpool.run("run", str(dlq_job(tmp_path)), "--job-id", "j")
    assert r.returncode not in (0, 2), r.stderr
    line = one_line(r.stderr)
    assert str(mrpool.state_dir / name) in line and "symbolic link" in line, line
    assert r.stdout == ""
    assert os.listdir(elsewhere) == []


def test_the_temp_name_of_an_atomic_write_cannot_be_planted(tmp_path: Path, monkeypatch) -> None:
    """Every state file is replaced via a temp file; one planted at the temp name (made
    predictable here) -- a symlink to a file outside, or a dangling one -- makes the write
    fail (O_EXCL, O_NOFOLLOW): the outside file is unchanged, no dangling target appears, and
    the state file is not created."""
    monkeypatch.setattr(fsutil.secrets, "token_hex", lambda _n: "feedface")
    temp = f"checkpoint.json{fsutil.TEMP_MARK}{os.getpid()}-feedface"
    target = outside_file(tmp_path, "target")
    (tmp_path / "job").mkdir()
    (tmp_path / "job" / temp).symlink_to(target)
    with pytest.raises((FileExistsError, StorageError)):  # raw, or as mrpool reports it
        fsutil.atomic_write(tmp_path / "job" / "checkpoint.json", b"new state")
    assert target.read_bytes() == b"do not touch\n"
    dangling = tmp_path / "outside" / "created-through-link"
    (tmp_path / "job" / temp).unlink()
    (tmp_path / "job" / temp).symlink_to(dangling)
    with pytest.raises((FileExistsError, StorageError)):  # raw, or as mrpool reports it
        fsutil.atomic_write(tmp_path / "job" / "checkpoint.json", b"new state")
    assert not dangling.exists()
    assert not (tmp_path / "job" / "checkpoint.json").exists()


# -- no shell ---------------------------------------------------------------------------
NASTY = [
    "$(touch pwned)",
    "`touch pwned`",
    "; touch pwned",
    "&& touch pwned",
    "| touch pwned",
    "x\ntouch pwned",
    "> pwned",
    "$HOME ${PATH} *",
    "'single' \"double\" \\",
    "{item.v} {item}",  # a value is never re-scanned for placeholders
    "--flag=1",
    "  spaced  ",
    "",
]


def _no_pwned(tmp_path: Path) -> None:
    """No ``pwned*`` file under the test's dir (map commands run in there) nor in the cwd."""
    found = [*tmp_path.rglob("pwned*"), *REPO.glob("pwned*"), *Path.cwd().glob("pwned*")]
    assert not found, found


def test_item_values_arrive_as_one_literal_argument(mrpool, tmp_path: Path) -> None:
    """Shell syntax in item values (``$(...)``, backticks, ``;``, ``&&``, ``|``, a newline, a
    redirection, variables, quotes, placeholders) reaches the map as exactly one argv element
    per ``{item.v}``, byte for byte, and nothing runs: no ``pwned`` file anywhere."""
    items = [{"id": i, "v": v} for i, v in enumerate(NASTY)]
    job = write_job(
        tmp_path / "job",
        items,
        {"command": [PY, "argv.py", "{item.v}", "pre-{item.v}-post"]},
        files={"argv.py": ARGV_PY},
    )
    (tmp_path / "job" / "out").mkdir()
    r = mrpool.run("run", str(job), "--job-id", "nasty")
    assert r.returncode == 0, r.stderr
    for item in items:
        argv = json.loads((tmp_path / "job" / "out" / f"{item['id']}.json").read_text())
        assert argv == [item["v"], f"pre-{item['v']}-post"], item
    results = {row["id"]: row["result"] for row in mrpool.results("nasty")}
    assert results == {i["id"]: [i["v"], f"pre-{i['v']}-post"] for i in items}
    _no_pwned(tmp_path)


def test_a_command_string_is_split_like_a_shell_but_never_run_by_one(
    mrpool, tmp_path: Path
) -> None:
    """``map.command`` given as one string is split with shlex: ``echo hi; touch pwned`` prints
    ``hi; touch pwned`` (``;`` is an argument), and operators, substitutions and pipes in a
    string command are plain arguments too; no ``pwned`` file appears."""
    job = write_job(tmp_path / "echo", [{"id": 1}], {"command": "echo hi; touch pwned"})
    r = mrpool.run("run", str(job), "--job-id", "echo")
    assert r.returncode == 0, r.stderr
    assert mrpool.results("echo") == [{"id": 1, "result": "hi; touch pwned\n"}]

    command = f'{PY} argv.py "a b" ; touch pwned && $(touch pwned2) `touch pwned3` | cat > pwned4 {{item.v}}'
    job = write_job(
        tmp_path / "argv",
        [{"id": 7, "v": "$(touch pwned5)"}],
        {"command": command},
        files={"argv.py": ARGV_PY},
    )
    (tmp_path / "argv" / "out").mkdir()
    r = mrpool.run("run", str(job), "--job-id", "argv")
    assert r.returncode == 0, r.stderr
    argv = json.loads((tmp_path / "argv" / "out" / "7.json").read_text())
    assert argv == [
        "a b",
        ";",
        "touch",
        "pwned",
        "&&",
        "$(touch",
        "pwned2)",
        "`touch",
        "pwned3`",
        "|",
        "cat",
        ">",
        "pwned4",
        "$(touch pwned5)",
    ]
    _no_pwned(tmp_path)


# -- callables ---------------------------------------------------------------------------
EVIL = "import pathlib\npathlib.Path({marker!r}).write_text('ran')\ndef f(item):\n    return item\n"


@pytest.mark.parametrize(
    "path",
    [
        "{tmp}/evil.py:f",
        "{tmp}/evil:f",
        "../evil:f",
        "./evil:f",
        "../evil.py:f",
        "x.py:f",
        "~/evil:f",
        "evil.py/f",
        "file://{tmp}/evil.py:f",
    ],
)
def test_a_callable_path_names_a_module_never_a_file(mrpool, tmp_path: Path, path: str) -> None:
    """A ``callable`` that is a file path (absolute, relative, ``~``, a URL) or a file name
    (``x.py:f``) is refused with exit 2 naming ``map.callable``; ``evil.py`` next to the job's
    directory, which such a path points at, is never imported, and no job is created."""
    marker = tmp_path / "evil-ran"
    (tmp_path / "evil.py").write_text(EVIL.format(marker=str(marker)))
    job = write_job(tmp_path / "job", [{"id": 1}], {"callable": path.format(tmp=tmp_path)})
    r = mrpool.run("run", str(job))
    assert r.returncode == 2, r.stderr
    assert "map.callable" in one_line(r.stderr) and str(job) in r.stderr
    assert r.stdout == ""
    assert not marker.exists(), "the file named by the callable path was executed"
    jobs = mrpool.state_dir / "jobs"
    assert not jobs.exists() or os.listdir(jobs) == []


def test_a_callable_module_that_exits_on_import_is_refused_not_obeyed(
    mrpool, tmp_path: Path
) -> None:
    """A callable whose module calls ``sys.exit(0)`` while being imported cannot end ``run``
    with a silent success: it is refused with exit 2 naming ``map.callable``."""
    job = write_job(
        tmp_path / "job",
        [{"id": 1}],
        {"callable": "quits:f"},
        files={"quits.py": "import sys\nsys.exit(0)\n"},
    )
    r = mrpool.run("run", str(job))
    assert r.returncode == 2, r.stderr
    assert "map.callable" in one_line(r.stderr) and "SystemExit" in r.stderr


# -- what a human reads: ids and names cannot forge lines (issue 23 item 8) ---------------
FORGING_ID = "evil\nok        1         000000000000  forged row\x1b[2J\x1b[31m"


def test_control_characters_in_ids_and_names_cannot_forge_table_lines(
    mrpool, tmp_path: Path
) -> None:
    """An item id (and a job name) holding a newline, a fake table row and ANSI escapes (clear
    screen, red): the human outputs -- ``status``, the all-jobs table, ``dlq list``, ``dlq
    stats`` and the run's summary -- show it escaped, one line per row, no raw control
    character; ``dlq list --json`` and ``dlq export`` still give the id exactly."""
    job = write_job(
        tmp_path / "job",
        [{"id": FORGING_ID}, {"id": "plain"}],
        {"command": ["false"]},
        name="forger",
        workers=1,
        extra={"name": "two\nlines\x1b[31m"},
    )
    r = mrpool.run("run", str(job), "--job-id", "forge")
    assert r.returncode == 1, r.stderr
    outputs = {
        "run": r.stderr,
        "status": mrpool.run("status", "forge").stdout,
        "status-all": mrpool.run("status").stdout,
        "dlq-list": mrpool.run("dlq", "list", "forge").stdout,
        "dlq-stats": mrpool.run("dlq", "stats", "forge").stdout,
    }
    for name, text in outputs.items():
        assert "\x1b" not in text and "\r" not in text, (name, text)
    listed = outputs["dlq-list"].splitlines()
    assert len(listed) == 3, listed  # the header and two rows: no forged third row
    assert listed[1].startswith("evil\\nok        1"), listed
    assert "two\\nlines\\x1b[31m" in outputs["status"], outputs["status"]
    assert len(outputs["status-all"].splitlines()) == 2, outputs["status-all"]
    assert {e["id"] for e in mrpool.dlq("forge")} == {FORGING_ID, "plain"}
    exported = mrpool.run("dlq", "export", "forge").stdout.splitlines()
    assert {json.loads(line)["id"] for line in exported} == {FORGING_ID, "plain"}


def test_dlq_export_to_a_file_is_private_and_replaced_whole_even_under_umask_000(
    mrpool, tmp_path: Path
) -> None:
    """``dlq export -o FILE`` under ``umask 000`` writes FILE 0600 (it holds item data) with
    exactly what stdout would get; an existing 0644 file is replaced whole (by rename: a
    reader never sees half an export) and becomes 0600; a link to a file writes the file;
    a device, a FIFO or a directory at FILE is refused (exit 2, one line) and left alone."""
    run_dlq_job(mrpool, tmp_path)
    expected = mrpool.run("dlq", "export", "j").stdout

    def export(out: Path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [PY, "-m", "mrpool", "dlq", "export", "j", "-o", str(out)],
            env=mrpool.env(),
            capture_output=True,
            text=True,
            timeout=60,
            umask=0,
            cwd=str(REPO),
        )

    out = tmp_path / "exports" / "dlq.jsonl"
    out.parent.mkdir()
    for previous in (None, "an older export, longer than the new one\n" * 50):
        if previous is not None:
            out.write_text(previous)
            out.chmod(0o644)
        r = export(out)
        assert r.returncode == 0, r.stderr
        assert stat.S_IMODE(out.stat().st_mode) == 0o600
        assert out.read_text() == expected
    assert sorted(os.listdir(out.parent)) == ["dlq.jsonl"]  # no temp file left
    link = tmp_path / "exports" / "link.jsonl"
    link.symlink_to(out)
    out.write_text("old\n")
    assert export(link).returncode == 0
    assert link.is_symlink() and out.read_text() == expected
    fifo = tmp_path / "exports" / "fifo"
    os.mkfifo(fifo)
    for target in (Path("/dev/null"), fifo, tmp_path / "exports"):
        r = export(target)
        assert r.returncode == 2, (target, r.stderr)
        assert f"{target}: not a regular file" in one_line(r.stderr)
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
