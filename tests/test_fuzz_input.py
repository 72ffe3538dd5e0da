"""Bad input fuzzing (contract guarantee 6): bad input is refused whole.

Hypothesis generates job files and input files that are malformed, have wrong
types, missing fields, unknown keys, bad ids, huge lines, invalid UTF-8, bad
``json_path`` expressions, bad callable paths, no items at all, YAML alias bombs,
or a job file or input that is not a regular file (FIFO, device, socket). Every such
case must give exit 2 and exactly ONE line on stderr that names the file at
fault and the line or field, never a traceback, nothing on stdout (where a
created job's id would go), and no job state: nothing under the state dir's
``jobs/`` and no half-built directory left in its ``tmp/``.

Speed: a subprocess per case would allow a few dozen cases, so the fuzz tests
call ``mrpool.cli.main([...])`` in-process -- the very function ``python -m
mrpool`` runs, exit code and stderr included -- with ``--state-dir`` pointing at
a fresh temp dir. ``api._run_session`` (the only way from ``run`` to a worker)
is replaced by a tripwire: an invalid case that reaches it would have run its
map, which fails the test; a case the oracle knows to be valid must reach it,
which proves the oracle and the harness can tell the two apart. A handful of
real-subprocess cases at the end prove the one-line/no-traceback property end
to end.

Example counts: ``MRPOOL_FUZZ_EXAMPLES`` is the total over the in-process fuzz
tests (default 1200), split by weight; ``scripts/fuzz_inputs.py`` runs a big
count. With ``MRPOOL_FUZZ_COUNT_FILE`` set, every executed case appends its
test's name to that file (a count independent of hypothesis).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, note, settings
from hypothesis import strategies as st

from mrpool import api, cli
from mrpool.spec import MAX_VALUES

# -- budget ----------------------------------------------------------------------------
_TOTAL = int(os.environ.get("MRPOOL_FUZZ_EXAMPLES") or 1200)
_WEIGHTS = {  # share of the total per fuzz test (json_path cases cost ~0.1 s each: its parser)
    "fields": 30,
    "unknown_keys": 12,
    "documents": 16,
    "callables": 12,
    "jsonl": 22,
    "json_doc": 6,
    "json_path": 1,
    "empty": 1,
    "alias_bombs": 4,
    "not_regular": 2,
}


# 180 s in the default suite; long runs (scripts/fuzz_inputs.py) get time in proportion.
pytestmark = pytest.mark.timeout(max(180, _TOTAL // 10))


def _examples(name: str) -> int:
    return max(5, _TOTAL * _WEIGHTS[name] // sum(_WEIGHTS.values()))


def _fuzz(name: str):
    return settings(
        max_examples=_examples(name),
        deadline=None,
        database=None,
        suppress_health_check=[
            HealthCheck.function_scoped_fixture,
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.filter_too_much,
            HealthCheck.large_base_example,
        ],
    )


def _count(name: str) -> None:
    path = os.environ.get("MRPOOL_FUZZ_COUNT_FILE")
    if path:
        with open(path, "a") as handle:
            handle.write(name + "\n")


# -- the harness -------------------------------------------------------------------------
# tmpfs when there is one: a case creates and removes a handful of directories, which
# costs ~4 ms on a disk file system and ~0.2 ms in memory.
_SCRATCH = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None


class _ReachedSession(BaseException):
    """Raised instead of starting workers: the job was accepted and created.

    A BaseException, so the CLI's error handling cannot turn it into an exit code.
    """


def _tripwire(*_args: Any, **_kwargs: Any) -> Any:
    raise _ReachedSession()


@dataclass
class Outcome:
    code: int | None  # None when the job was accepted (the session tripwire fired)
    out: str
    err: str
    job_file: str
    input_file: str
    leftovers: list[str] = field(default_factory=list)  # paths under the state dir
    strays: list[str] = field(default_factory=list)  # new files next to the job file

    @property
    def accepted(self) -> bool:
        return self.code is None


Content = bytes | Callable[[Path], None]  # a file's bytes, or what makes it (a FIFO, a link)


def make_files(directory: Path, files: dict[str, Content]) -> None:
    for filename, content in files.items():
        if callable(content):
            content(directory / filename)
        else:
            (directory / filename).write_bytes(content)


class Harness:
    """Runs ``cli.main(["run", JOBFILE, "--state-dir", DIR])`` on files written per case."""

    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self.capsys = capsys

    def run(self, name: str, files: dict[str, Content], job_name: str, *extra: str) -> Outcome:
        _count(name)
        base = Path(tempfile.mkdtemp(prefix="mrfuzz_", dir=_SCRATCH))
        try:
            job_dir = base / "job"
            job_dir.mkdir()
            make_files(job_dir, files)
            job_file = job_dir / job_name
            state = base / "state"
            before_path = list(sys.path)
            self.capsys.readouterr()
            code: int | None
            try:
                code = cli.main(["run", str(job_file), "--state-dir", str(state), *extra])
            except _ReachedSession:
                code = None
            except BaseException:  # a crash: the CLI would print a traceback
                _, err = self.capsys.readouterr()
                pytest.fail(f"mrpool crashed instead of refusing:\n{traceback.format_exc()}{err}")
            finally:
                self._forget_imports(before_path, str(base))
            out, err = self.capsys.readouterr()
            leftovers = [
                str(p.relative_to(state))
                for sub in ("jobs", "tmp")
                if (state / sub).is_dir()
                for p in (state / sub).iterdir()
            ]
            if state.is_dir():
                leftovers += [n for n in os.listdir(state) if n not in ("jobs", "tmp")]
            strays = [n for n in os.listdir(job_dir) if n not in files and n != "__pycache__"]
            return Outcome(
                code, out, err, str(job_file), str(job_dir / "items.jsonl"), leftovers, strays
            )
        finally:
            shutil.rmtree(base, ignore_errors=True)

    @staticmethod
    def _forget_imports(before_path: list[str], base: str) -> None:
        """Undo what importing the case's callables did to this process."""
        sys.path[:] = before_path
        for key in [k for k in sys.path_importer_cache if k.startswith(base)]:
            del sys.path_importer_cache[key]
        for key, module in list(sys.modules.items()):
            if (getattr(module, "__file__", None) or "").startswith(base):
                del sys.modules[key]


@pytest.fixture
def harness(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Harness:
    monkeypatch.setattr(api, "_run_session", _tripwire)
    # main() builds its argparse parser on every call (~13 ms); parsing leaves a parser as it
    # was, so building it once per test runs the same code at a tenth of the cost.
    monkeypatch.setattr(cli, "_build_parser", lru_cache(maxsize=1)(cli._build_parser))
    # jsonpath-ng builds its parser on every parse() (~0.1 s); mrpool parses the
    # same expression twice per run (check, then apply). Caching is invisible to
    # mrpool -- same input, same parse tree -- and halves the cost.
    import jsonpath_ng.ext

    monkeypatch.setattr(jsonpath_ng.ext, "parse", lru_cache(maxsize=256)(jsonpath_ng.ext.parse))
    return Harness(capsys)


def assert_refused(o: Outcome, file: str, *where: str, pattern: str | None = None) -> str:
    """Exit 2, one stderr line naming ``file`` and one of ``where``, no traceback, no state."""
    assert not o.accepted, f"bad input was accepted: a map would have run\nstdout: {o.out!r}"
    assert o.code == 2, f"exit {o.code} for bad input: {o.err!r}"
    assert "Traceback" not in o.err, o.err
    assert o.err.endswith("\n") and o.err.count("\n") == 1, f"not one line: {o.err!r}"
    line = o.err[:-1]
    assert line.startswith("mrpool: "), line
    assert file in line, f"the message does not name {file}: {line!r}"
    if where:
        assert any(w in line for w in where), f"none of {where} in {line!r}"
    if pattern:
        assert re.search(pattern, line), f"{pattern!r} does not match {line!r}"
    assert o.out == "", f"something on stdout (a job id means a job exists): {o.out!r}"
    assert o.leftovers == [], f"job state left behind: {o.leftovers}"
    assert o.strays == [], f"files created next to the job file: {o.strays}"
    return line


def assert_accepted(o: Outcome) -> None:
    assert o.accepted, f"valid input refused: exit {o.code}: {o.err!r}"
    assert re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*\n", o.out), o.out


# -- documents ----------------------------------------------------------------------------
ITEMS = b'{"id": 1, "v": "a"}\n{"id": 2, "v": "b"}\n'
BASE: dict[str, Any] = {
    "name": "fz",
    "input": "items.jsonl",
    "workers": 1,
    # {item}, not {item.v}: a generated item need not have "v", and a placeholder the
    # first item lacks is refused before anything runs (exit 2), which is not what these
    # tests are about
    "map": {"command": ["true", "{item}"], "timeout": 5, "retries": 1, "backoff": 0.1},
    "reduce": {"command": ["true"], "timeout": 5},
    "dlq": {"max_items": 10, "on_full": "stop"},
}


def dump(doc: Any, fmt: str) -> bytes:
    if fmt == "json":
        return json.dumps(doc, allow_nan=False).encode()
    # Non-ASCII escaped: PyYAML would write NEL (U+0085) raw, and read it back as a line break.
    return yaml.safe_dump(doc, sort_keys=False).encode()


def job_files(
    doc: Any, fmt: str, items: bytes = ITEMS, **more: bytes
) -> tuple[dict[str, bytes], str]:
    name = f"job.{fmt}"
    return {name: dump(doc, fmt), "items.jsonl": items, **more}, name


def with_field(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of ``doc`` with ``path`` ("map.retries") set to ``value`` (or removed)."""
    doc = json.loads(json.dumps(doc))
    *parents, last = path.split(".")
    target = doc
    for part in parents:
        target = target[part]
    if value is _DROP:
        target.pop(last, None)
    else:
        target[last] = value
    return doc


_DROP = object()

# -- value strategies ----------------------------------------------------------------------
finite = st.floats(allow_nan=False, allow_infinity=False)
non_finite = st.sampled_from([float("nan"), float("inf"), float("-inf")])  # YAML only
huge_ints = st.integers(min_value=2**63, max_value=2**200) | st.integers(max_value=-(2**63) - 1)
scalars = st.none() | st.booleans() | st.integers() | finite | st.text(max_size=8)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3)
    ),
    max_leaves=6,
)
not_str = values.filter(lambda v: not isinstance(v, str))
not_dict = values.filter(lambda v: not isinstance(v, dict))
not_int = values.filter(lambda v: not isinstance(v, int) or isinstance(v, bool))
not_number = values.filter(lambda v: not isinstance(v, (int, float)) or isinstance(v, bool))
blank = st.text(alphabet=" \t\n\r", max_size=4)


def _bad_suffix(path: str) -> bool:
    return posixpath.splitext(posixpath.normpath(posixpath.join("/b", path)))[1] not in (
        ".jsonl",
        ".json",
    )


control = st.sampled_from(["\n", "\r", "\x00", "\x1b", "\x7f", "\x85", "\u2028"])
bad_input_path = (
    st.just("")
    | not_str
    | st.text(min_size=1, max_size=20).filter(lambda t: "\x00" not in t and _bad_suffix(t))
    | st.builds(lambda a, c: f"{a}{c}x.jsonl", st.text(max_size=5), control)
)


def _valid_argv(v: Any) -> bool:
    return (
        isinstance(v, list)
        and bool(v)
        and all(isinstance(a, str) and "\x00" not in a for a in v)
        and v[0] != ""
    )


bad_command = (
    not_str.filter(lambda v: not _valid_argv(v))
    | st.lists(st.text(max_size=4), max_size=2).map(lambda v: [*v, 7])  # a non-string element
    | st.just([])
    | st.just([""])
    | blank
    | st.sampled_from(["echo 'unclosed", 'echo "unclosed', "echo \\"])
    | st.builds(lambda a: ["echo", f"{a}\x00"], st.text(max_size=4))
)
negative = st.floats(max_value=-1e-9, allow_infinity=False)  # not -0.0: that is 0
too_long = st.floats(min_value=2_147_483.001, allow_infinity=False)  # past a C int of ms
bad_positive = (
    not_number | st.integers(max_value=0) | finite.filter(lambda x: x <= 0) | huge_ints | too_long
)
bad_nonneg_int = not_int | st.integers(max_value=-1) | huge_ints
bad_nonneg_number = not_number | st.integers(max_value=-1) | negative | huge_ints

# field -> (strategy of bad values, the field named in the message)
FIELD_CASES: dict[str, tuple[st.SearchStrategy[Any], str]] = {
    "name": (not_str | blank, "name:"),
    "input": (bad_input_path | st.just(_DROP), "input:"),
    "json_path": (
        not_str.filter(lambda v: v is not None) | st.just("") | st.just("$[*]"),
        "json_path:",
    ),
    "id_field": (not_str.filter(lambda v: v is not None) | st.just(""), "id_field:"),
    "workers": (bad_nonneg_int | st.just(0), "workers:"),
    "map": (
        not_dict | st.just({}) | st.just({"command": ["a"], "callable": "m:f"}) | st.just(_DROP),
        "map:",
    ),
    "map.command": (bad_command.filter(lambda v: v is not None), "map.command:"),
    "map.callable": (not_str.filter(lambda v: v is not None), "map.callable:"),
    "map.timeout": (bad_positive.filter(lambda v: v is not None) | non_finite, "map.timeout:"),
    "map.retries": (bad_nonneg_int, "map.retries:"),
    "map.backoff": (bad_nonneg_number | non_finite, "map.backoff:"),
    "reduce": (not_dict.filter(lambda v: v is not None) | st.just({}), "reduce:"),
    "reduce.command": (bad_command.filter(lambda v: v is not None), "reduce.command:"),
    "reduce.timeout": (
        bad_positive.filter(lambda v: v is not None) | non_finite,
        "reduce.timeout:",
    ),
    "dlq": (not_dict.filter(lambda v: v is not None), "dlq:"),
    "dlq.max_items": (bad_nonneg_int.filter(lambda v: v is not None), "dlq.max_items:"),
    "dlq.on_full": (values.filter(lambda v: v not in ("stop", "keep_failed")), "dlq.on_full:"),
}


@st.composite
def field_case(draw) -> tuple[str, Any, str]:
    path = draw(st.sampled_from(sorted(FIELD_CASES)))
    strategy, where = FIELD_CASES[path]
    return path, draw(strategy), where


def _json_safe(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


# -- the fuzz tests -------------------------------------------------------------------------
def test_the_base_job_is_accepted(harness: Harness) -> None:
    """The job every field test mutates is valid: the harness sees an accepted job as accepted."""
    for fmt in ("yaml", "json"):
        files, name = job_files(BASE, fmt)
        o = harness.run("base", files, name)
        assert_accepted(o)


@_fuzz("fields")
@given(case=field_case(), fmt=st.sampled_from(["yaml", "json"]))
def test_a_wrong_value_or_a_missing_field_is_refused_naming_the_field(
    harness: Harness, case, fmt: str
) -> None:
    """One field of a valid job made wrong (type, range, non-finite, 64-bit overflow, empty,
    missing, both/neither step kinds): exit 2 naming the job file and that field."""
    path, value, where = case
    if value is not _DROP and (
        not _json_safe(value) or (type(value) is int and abs(value) >= 2**63)
    ):
        fmt = "yaml"  # JSON has no NaN, and orjson reads an integer past 64 bits as a float
    doc = with_field(BASE, path, value)
    if path.endswith(".callable"):  # the only step kind given, so the callable is what is judged
        del doc[path.split(".")[0]]["command"]
    note(f"{fmt} document: {doc!r}")
    files, name = job_files(doc, fmt)
    if fmt == "yaml":  # the document says what the test means (repr: NaN == NaN)
        assume(repr(yaml.safe_load(files[name])) == repr(doc))
    o = harness.run("fields", files, name)
    assert_refused(o, o.job_file, where)


keys = st.text(min_size=1, max_size=16)


@_fuzz("unknown_keys")
@given(
    section=st.sampled_from(["", "map", "reduce", "dlq"]),
    key=keys | st.integers() | st.booleans() | st.none(),
    fmt=st.sampled_from(["yaml", "json"]),
)
def test_an_unknown_key_is_refused_naming_it(
    harness: Harness, section: str, key: Any, fmt: str
) -> None:
    """A key the job file does not know, at the top or in a section, even one with line breaks
    or control characters in it: exit 2 naming the key (with its section) on one line."""
    allowed = {
        "": {"name", "input", "json_path", "id_field", "workers", "map", "reduce", "dlq"},
        "map": {"command", "callable", "timeout", "retries", "backoff"},
        "reduce": {"command", "callable", "timeout"},
        "dlq": {"max_items", "on_full"},
    }[section]
    if not isinstance(key, str):
        fmt = "yaml"  # a JSON object's keys are always strings
    assume(key not in allowed)
    doc = json.loads(json.dumps(BASE))
    (doc[section] if section else doc)[key] = 1
    files, name = job_files(doc, fmt)
    if fmt == "yaml":  # YAML gives some plain scalars a meaning of their own ("<<", "=")
        assume(yaml.safe_load(files[name]) == doc)
    o = harness.run("unknown_keys", files, name)
    prefix = f"{section}." if section else ""
    line = assert_refused(o, o.job_file, ": unknown key")
    assert f": {prefix}{shown_key(key)}: unknown key" in line, line


garbage_text = st.text(
    alphabet=st.sampled_from(list("{}[]:,-?!&*#|>'\"\\ \t\n%@`abc01.\x00\x07\x85\u2028é")),
    max_size=60,
)
deep = st.integers(min_value=50, max_value=650).map(lambda n: "a: " + "[" * n + "]" * n + "\n")
documents = (
    st.binary(max_size=80)
    | garbage_text.map(str.encode)
    | deep.map(str.encode)
    | st.builds(
        lambda head, bad: head.encode() + bad,
        garbage_text,
        st.sampled_from([b"\xff", b"\xc3(", b"\xed\xa0\x80"]),
    )
    | st.dictionaries(
        st.sampled_from(["name", "input", "workers", "json_path", "zz", "Map"]), values, max_size=4
    )
    .map(lambda d: {**d, "map": "not a mapping"})
    .map(lambda d: json.dumps(d).encode())
    | values.map(lambda v: json.dumps(v).encode())
)


@_fuzz("documents")
@given(data=documents, fmt=st.sampled_from(["yaml", "json"]))
def test_a_malformed_job_document_is_refused_naming_the_file_and_line_or_field(
    harness: Harness, data: bytes, fmt: str
) -> None:
    """Random bytes, YAML/JSON syntax soup, invalid UTF-8, deep nesting, non-mapping documents
    and mappings whose ``map`` is never valid: exit 2, one line naming the job file and either
    the line (a parse error) or a field of the document."""
    files = {f"job.{fmt}": data, "items.jsonl": ITEMS}
    o = harness.run("documents", files, f"job.{fmt}")
    job = re.escape(o.job_file)
    line = assert_refused(o, o.job_file)
    parse_error = re.fullmatch(rf"mrpool: {job}:(\d+): invalid (YAML|JSON): .+", line)
    if parse_error:
        # YAML also breaks lines at NEL, LS and PS: count lines as str.splitlines does (or more)
        assert 1 <= int(parse_error[1]) <= len(data.decode(errors="replace").splitlines()) + 1, line
        return
    if line == f"mrpool: {o.job_file}: invalid YAML: nested too deeply":
        return  # PyYAML builds nested values recursively: no line to name, but a clear refusal
    assert not re.match(rf"mrpool: {job}: invalid", line), (
        f"a parse error without its line: {line!r}"
    )
    # The document parsed: the message says what the document must be, or names a field of it.
    loaded = yaml.safe_load(data) if fmt == "yaml" else orjson.loads(data)
    if line == f"mrpool: {o.job_file}: the job file must be a mapping of keys to values":
        assert not isinstance(loaded, dict)
        return
    assert isinstance(loaded, dict), line
    named = line[len(f"mrpool: {o.job_file}: ") :]
    fields = {shown_key(k) for k in loaded} | {"input", "map"}  # the two required fields
    assert any(named.startswith((f"{f}: ", f"{f}.", f"{f}[")) for f in fields), (line, loaded)


def shown_key(key: Any) -> str:
    """How a message shows a key: as is, non-printable characters escaped, else its repr."""
    if isinstance(key, str) and key:
        return "".join(c if c.isprintable() else repr(c)[1:-1] for c in key)
    return repr(key)


# callables: every generated path must be refused; modules are planted per case and forgotten after.
RAISING_MODULES = {
    "mrfuzz_runtime": b"raise RuntimeError('boom\\nsecond line')\n",
    "mrfuzz_exit0": b"import sys\nsys.exit(0)\n",
    "mrfuzz_exit3": b"raise SystemExit(3)\n",
    "mrfuzz_syntax": b"def f(:\n",
    "mrfuzz_importerr": b"import mrfuzz_no_such_module_at_all\n",
    "mrfuzz_zero": b"1 / 0\n",
    "mrfuzz_badbytes": b"x = '\xff'\n",
}
OK_MODULE = b"value = 5\ndef func(item):\n    return item\nfunc.attr = 'x'\n"
identifier = st.from_regex(r"[a-z_][a-z0-9_]{0,8}", fullmatch=True)
callables = (
    # file paths, relative paths, URLs: never a module
    st.builds(
        lambda pre, mod, fn: f"{pre}mrfuzz_{mod}.py:{fn}",
        st.sampled_from(["/tmp/", "../", "./", "~/", "", "C:\\\\", "file:///", "/"]),
        identifier,
        identifier,
    )
    | st.builds(lambda mod, fn: f"../mrfuzz_{mod}:{fn}", identifier, identifier)
    # not module:function shaped at all (and never an importable-looking name)
    | st.text(max_size=20).filter(lambda t: not re.fullmatch(r"[\w.]+:[\w.]+", t))
    # well formed, but nothing importable there
    | st.builds(lambda mod, fn: f"mrfuzz_missing_{mod}:{fn}", identifier, identifier)
    | st.builds(lambda mod, fn: f"{mod}:{fn}", st.sampled_from(sorted(RAISING_MODULES)), identifier)
    | st.builds(lambda fn: f"mrfuzz_ok:no_{fn}", identifier)
    | st.sampled_from(
        [
            "mrfuzz_ok:value",
            "mrfuzz_ok:func.attr",
            "mrfuzz_ok:func.nope",
            "mrfuzz_ok.sub:func",
            "os:sep",
            "os.path:nope",
        ]
    )
)


@_fuzz("callables")
@given(
    path=callables,
    section=st.sampled_from(["map", "reduce"]),
    fmt=st.sampled_from(["yaml", "json"]),
)
def test_a_callable_that_cannot_be_imported_is_refused_before_anything_runs(
    harness: Harness, path: str, section: str, fmt: str
) -> None:
    """File paths, malformed names, missing modules, modules that raise (even SystemExit) at
    import, missing or non-callable attributes: exit 2 naming ``map.callable`` /
    ``reduce.callable``; nothing runs (no session starts)."""
    doc = with_field(BASE, section, {"callable": path})
    more = {f"{name}.py": body for name, body in RAISING_MODULES.items()}
    files, name = job_files(doc, fmt, **more, **{"mrfuzz_ok.py": OK_MODULE})
    o = harness.run("callables", files, name)
    assert_refused(o, o.job_file, f"{section}.callable:")


# -- input files ------------------------------------------------------------------------------
@dataclass
class Line:
    data: bytes
    kind: str  # good | blank | syntax | bad_id | no_id | not_object


def _good(i: int, big: int = 0) -> Line:
    return Line(
        json.dumps({"id": i % 5 if i % 3 == 0 else f"k{i}", "v": "x" * big}).encode(), "good"
    )


LINE_KINDS = st.one_of(
    st.integers(0, 50).map(_good),
    st.builds(lambda i, n: _good(i, n), st.integers(0, 50), st.sampled_from([70_000, 1_100_000])),
    st.sampled_from([b"", b"  ", b"\t", b"\r"]).map(lambda b: Line(b, "blank")),
    st.sampled_from(
        [
            b"{",
            b'{"id": 1',
            b"{'id': 1}",
            b'{"id": 1}}',
            b"nul",
            b"NaN",
            b'{"id": 1, "v": "\xff"}',
            b'{"id": "\xed\xa0\x80"}',
            b'"\\ud800"',
            b"[" * 2000 + b"]" * 2000,
            b"\x00",
            b'{"a": 1} 2',
            b'{"id": 1e400}',
            b"\xef\xbb\xbf{}",
        ]
    ).map(lambda b: Line(b, "syntax")),
    st.binary(min_size=1, max_size=12)
    .filter(lambda b: b"\n" not in b and b.strip() and not _parses(b))
    .map(lambda b: Line(b, "syntax")),
    st.sampled_from([70_000, 1_100_000]).map(
        lambda n: Line(b'{"id": 1, "v": "' + b"x" * n, "syntax")
    ),
    st.sampled_from(
        [
            *["null", "true", "false", "1.5", "[1]", "{}", '{"a": [1]}', "-0.0"],
            *['"a\\u0000b"', '"\\u0000"', "123456789012345678901234567890", "-9223372036854775809"],
        ]
    ).map(lambda v: Line(f'{{"id": {v}, "v": 1}}'.encode(), "bad_id")),
    st.sampled_from([b'{"v": 1}', b'{"ID": 1}', b'{"key": 1}']).map(lambda b: Line(b, "no_id")),
    st.sampled_from([b"5", b'"s"', b"[1, 2]", b"null", b"true"]).map(
        lambda b: Line(b, "not_object")
    ),
)


def _parses(data: bytes) -> bool:
    try:
        orjson.loads(data)
    except orjson.JSONDecodeError:
        return False
    return True


def expected_error_line(lines: list[Line], strict: bool) -> int | None:
    """The 1-based line the first error is on (None: the input is valid), per the contract.

    Default id mode (not strict): "id" when every item is an object with an "id",
    else a content hash, where only syntax counts. The case a bad id comes before
    the first item without one is left to ``test_default_id_mode...`` (see there).
    """
    inf = len(lines) + 1
    first = {
        k: next((n for n, ln in enumerate(lines, 1) if ln.kind == k), inf)
        for k in ("syntax", "bad_id", "no_id", "not_object")
    }
    if strict:
        n = min(first.values())
    else:
        switch = min(first["no_id"], first["not_object"])
        if switch == inf:
            n = min(first["syntax"], first["bad_id"])
        else:
            assume(not (first["bad_id"] < switch and first["bad_id"] < first["syntax"]))
            n = first["syntax"]
    return None if n == inf else n


@_fuzz("jsonl")
@given(
    lines=st.lists(LINE_KINDS, min_size=1, max_size=12),
    strict=st.booleans(),
    crlf=st.booleans(),
    final_newline=st.booleans(),
)
def test_a_bad_jsonl_line_is_refused_naming_its_line(
    harness: Harness, lines: list[Line], strict: bool, crlf: bool, final_newline: bool
) -> None:
    """JSONL inputs mixing good items, duplicate ids, blank lines, huge lines (70 KB, 1.1 MB),
    syntax errors, invalid UTF-8, lone surrogates, deep nesting and ids that are null, boolean,
    float, array or object (or missing, with ``id_field`` set): the first bad line is named
    (file:line), exit 2; an input without errors is accepted; one with no item is refused."""
    eol = b"\r\n" if crlf else b"\n"
    data = eol.join(ln.data for ln in lines) + (eol if final_newline else b"")
    doc = dict(BASE, id_field="id") if strict else dict(BASE)
    files, name = job_files(doc, "yaml", items=data)
    expected = expected_error_line(lines, strict)
    o = harness.run("jsonl", files, name)
    if expected is not None:
        assert_refused(o, o.input_file, pattern=rf"items\.jsonl:{expected}: ")
    elif all(ln.kind == "blank" for ln in lines):
        assert_refused(o, o.input_file, "holds no items")
    else:
        assert_accepted(o)


JSON_ITEMS = st.one_of(
    st.integers(0, 9).map(lambda i: {"id": i, "v": 1}),
    st.sampled_from([None, True, 1.5, [1], {"a": 1}, "a\x00b", 2**64]).map(lambda v: {"id": v}),
    st.just({"v": 2}),
    st.sampled_from([5, "s", [1], None]),
)


@_fuzz("json_doc")
@given(
    items=st.lists(JSON_ITEMS, max_size=8),
    strict=st.booleans(),
    wrap=st.booleans(),
    damage=st.none() | st.integers(min_value=0, max_value=10_000),
)
def test_a_bad_json_document_input_is_refused_naming_the_item(
    harness: Harness, items: list[Any], strict: bool, wrap: bool, damage: int | None
) -> None:
    """A ``.json`` input (a bare array, or ``{"items": [...]}`` with ``json_path``): a document that
    does not parse names its line, a bad item names its position (``item N``), an empty
    selection says the input holds no items; a document that is not an array is refused."""
    text = json.dumps({"items": items} if wrap else items, indent=1).encode()
    if damage is not None:
        text = text[: damage % max(1, len(text))]  # truncated: never valid JSON
    doc = dict(BASE, input="items.json", **({"json_path": "$.items[*]"} if wrap else {}))
    if strict:
        doc["id_field"] = "id"
    files, name = job_files(doc, "json", **{"items.json": text})
    o = harness.run("json_doc", files, name)
    path = o.input_file.replace("items.jsonl", "items.json")
    if damage is not None:
        assert_refused(o, path, pattern=r"items\.json:\d+: invalid JSON")
        return
    kinds = [
        "not_object"
        if not isinstance(i, dict)
        else "no_id"
        if "id" not in i
        else "bad_id"
        if isinstance(i["id"], bool) or not _usable_id(i["id"])
        else "good"
        for i in items
    ]
    n = expected_error_line([Line(b"", k) for k in kinds], strict)
    where = f"items.json{' at $.items[*]' if wrap else ''} item "
    if n is not None:
        assert_refused(o, path, f"{where}{n - 1}: ")
    elif not items:
        assert_refused(o, path, "holds no items")
    else:
        assert_accepted(o)


def _usable_id(value: Any) -> bool:
    """An id the contract accepts: a string without NUL, or an integer of 64 bits or fewer
    (orjson reads a longer one as a float)."""
    if isinstance(value, str):
        return "\x00" not in value
    return isinstance(value, int) and -(2**63) <= value < 2**64


json_path_text = st.lists(
    st.sampled_from(
        [
            "$",
            ".",
            "..",
            "[",
            "]",
            "*",
            "?(",
            ")",
            "@",
            "items",
            "a",
            "0",
            "-1",
            ":",
            ",",
            "'",
            '"',
            "`",
            "==",
            ">",
            "=~",
            "len",
            "sorted",
            "\n",
            " ",
            "|",
            "&",
            "this",
            "sub(/x/, y)",
        ]
    ),
    max_size=8,
).map("".join) | st.text(max_size=10)


@_fuzz("json_path")
@given(expr=json_path_text.filter(lambda t: t != ""))
def test_a_bad_json_path_is_refused_naming_the_field_or_the_input(
    harness: Harness, expr: str
) -> None:
    """Random and token-built JSONPath expressions: an expression that does not parse, or
    cannot be applied, is refused naming the job file and ``json_path``; one that selects
    no items or bad items names the input; never a crash, always one line, exit 2 or a job."""
    from jsonpath_ng.ext import parse

    data = json.dumps({"items": [{"id": 1}, {"id": [2]}], "a": "x"}).encode()
    doc = dict(BASE, input="items.json", json_path=expr)
    files, name = job_files(doc, "json", **{"items.json": data})
    o = harness.run("json_path", files, name)
    try:
        parse(expr)
        parses = True
    except Exception:  # noqa: BLE001 - what the user would see as "invalid JSONPath"
        parses = False
    if o.accepted:
        assert parses
        return
    input_file = o.input_file.replace("items.jsonl", "items.json")
    line = assert_refused(o, "")
    if not parses:
        assert f"{o.job_file}: json_path: invalid JSONPath" in line, line
    else:
        assert f"{o.job_file}: json_path: cannot apply" in line or line.startswith(
            f"mrpool: {input_file}"
        ), line


@_fuzz("empty")
@given(
    content=st.lists(st.sampled_from([b"", b" ", b"\t", b"\r"]), max_size=5).map(b"\n".join),
    kind=st.sampled_from(["jsonl", "json", "json_path"]),
)
def test_an_input_without_items_is_refused(harness: Harness, content: bytes, kind: str) -> None:
    """An empty input -- no bytes, only blank lines, ``[]``, or a ``json_path`` that selects
    nothing -- is refused with exit 2 naming the input file: a job of zero items is a mistake."""
    if kind == "jsonl":
        files, name = job_files(BASE, "yaml", items=content)
        path = "items.jsonl"
    else:
        body = b"[]" if kind == "json" else b'{"items": []}'
        extra = {"json_path": "$.items[*]"} if kind == "json_path" else {}
        files, name = job_files(
            dict(BASE, input="items.json", **extra),
            "yaml",
            **{"items.json": content + body + content},
        )
        path = "items.json"
    o = harness.run("empty", files, name)
    assert_refused(o, path, "holds no items")


# -- hostile documents and files ------------------------------------------------------------
def flow_document(doc: dict[str, Any], target: str, text: str, at: str = "") -> str:
    """``doc`` as one YAML flow mapping, the value at ``target`` ("map.command") written as
    ``text`` (YAML that json.dumps cannot say: anchors and aliases)."""
    parts = []
    for key, value in doc.items():
        path = f"{at}.{key}" if at else key
        if path == target:
            shown = text
        elif isinstance(value, dict):
            shown = flow_document(value, target, text, path)
        else:
            shown = json.dumps(value)
        parts.append(f"{json.dumps(key)}: {shown}")
    return "{" + ", ".join(parts) + "}"


def alias_chain(levels: int, fanout: int, merge: bool) -> tuple[str, int]:
    """``[&v0 ..., &v1 [*v0 x fanout], ...]``: YAML of a few hundred bytes standing for
    about ``fanout ** levels`` values once its aliases are expanded (with ``merge``, mapping
    merge keys ``<<: [*v0, ...]``, which PyYAML expands while building the mapping). Returns
    the text and its count of values (keys included), every alias counted as a copy."""
    nodes = ["&v0 {k: 1}" if merge else "&v0 [x]"]
    size = 3 if merge else 2  # of the newest node: {k: 1} is a mapping, a key and a value
    total = 1 + size  # the outer list and v0
    for n in range(1, levels + 1):
        refs = ", ".join([f"*v{n - 1}"] * fanout)
        nodes.append(f"&v{n} {{<<: [{refs}]}}" if merge else f"&v{n} [{refs}]")
        size = (3 if merge else 1) + fanout * size  # {<<: [...]}: mapping, key, list
        total += size
    return "[" + ", ".join(nodes) + "]", total


ALIAS_TARGETS = ["name", "input", "workers", "map.command", "map.timeout", "dlq.max_items"]


@_fuzz("alias_bombs")
@given(
    levels=st.integers(1, 12),
    fanout=st.integers(2, 12),
    merge=st.booleans(),
    target=st.sampled_from(ALIAS_TARGETS),
)
def test_a_yaml_alias_bomb_is_refused_at_once(
    harness: Harness, levels: int, fanout: int, merge: bool, target: str
) -> None:
    """Nested anchors and aliases (lists, or merge keys) under any field, standing for up to
    12**12 values: refused within seconds, exit 2, one line naming the job file -- "alias
    bomb" and the line when they expand past the limit, else the field, whose value is a
    list or mapping where a scalar belongs. Nothing is created."""
    text, expanded = alias_chain(levels, fanout, merge)
    files = {"job.yaml": flow_document(BASE, target, text).encode(), "items.jsonl": ITEMS}
    started = time.monotonic()
    o = harness.run("alias_bombs", files, "job.yaml")
    elapsed = time.monotonic() - started
    line = assert_refused(o, o.job_file)
    assert elapsed < 5, f"{elapsed:.1f} s to refuse {expanded} values: expanded, not weighed"
    if expanded > MAX_VALUES:
        assert f"{o.job_file}:1: invalid YAML: " in line and "alias bomb" in line, line
    else:
        assert f"{o.job_file}: {target}: " in line, line


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _zero_device(path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a device node needs root")
    os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))  # what /dev/zero is


def _socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(path))


def _link_to(target: str) -> Callable[[Path], None]:
    return lambda path: path.symlink_to(target)


NOT_REGULAR: dict[str, Callable[[Path], None]] = {
    "fifo": _fifo,
    "device": _zero_device,
    "socket": _socket,
    "directory": Path.mkdir,
    "link-to-dev-zero": _link_to("/dev/zero"),
    "link-to-dev-urandom": _link_to("/dev/urandom"),
}


class _Blocked(Exception):
    pass


def _blocked(_signum: int, _frame: object) -> None:
    raise _Blocked("mrpool blocked on a file that is not a regular file")


@_fuzz("not_regular")
@given(
    kind=st.sampled_from(sorted(NOT_REGULAR)),
    via_link=st.booleans(),
    victim=st.sampled_from(["input", "json input", "job file"]),
)
def test_a_file_that_is_not_a_regular_file_is_refused_without_reading_it(
    harness: Harness, kind: str, via_link: bool, victim: str
) -> None:
    """The input or the job file is a FIFO (opening it would wait for a writer forever), a
    character device such as /dev/zero or /dev/urandom (reading it would fill memory), a
    socket or a directory, directly or through a symlink that keeps the file's suffix: exit 2
    at once, one line naming the file (or the link's target), nothing created."""
    name = {"input": "items.jsonl", "json input": "items.json", "job file": "job.yaml"}[victim]
    doc = dict(BASE, input="items.json") if victim == "json input" else BASE
    files: dict[str, Content] = {"job.yaml": dump(doc, "yaml"), "items.jsonl": ITEMS}
    real = f"real{Path(name).suffix}"
    if via_link and not kind.startswith("link"):
        files.update({real: NOT_REGULAR[kind], name: _link_to(real)})
    else:
        files[name] = NOT_REGULAR[kind]
    previous = signal.signal(signal.SIGALRM, _blocked)
    signal.alarm(20)
    try:
        o = harness.run("not_regular", files, "job.yaml")
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    job_dir = Path(o.job_file).parent
    if victim == "job file":
        named, reason = o.job_file, "not a regular file"
    elif kind.startswith("link"):  # the link leads out of .jsonl / .json: the field is refused
        named, reason = (
            f"{o.job_file}: input: ",
            r"must be a \.jsonl or \.json file.*a link to /dev/",
        )
    else:
        named = str(job_dir / (real if via_link else name))
        reason = f"{re.escape(named)}: input is .*, expected a regular"
    line = assert_refused(o, named, pattern=reason)
    assert line.startswith(f"mrpool: {named}"), line


# -- known gaps -----------------------------------------------------------------------------
def test_default_id_mode_falls_back_to_content_hash_even_after_a_bad_id(harness: Harness) -> None:
    """Without ``id_field``, ``{"id": null}`` then ``{"x": 1}``: not every item is an object with
    an id, so identities are content hashes and the input is valid (contract, id_field)."""
    files, name = job_files(BASE, "yaml", items=b'{"id": null}\n{"x": 1}\n')
    assert_accepted(harness.run("known_gap", files, name))


# -- end to end: real processes ----------------------------------------------------------------
BAD_JOB = ("job.yaml", "job.yaml")  # (the job file to run, the file the message must name)
SUBPROCESS_CASES: dict[str, tuple[dict[str, Content], tuple[str, str], str]] = {
    "job-alias-bomb": (  # nine levels of ten: 10**9 values
        {"job.yaml": flow_document(BASE, "name", alias_chain(9, 10, False)[0]).encode()},
        BAD_JOB,
        "job.yaml:1: invalid YAML: this value's aliases expand",
    ),
    "job-json-deep-nesting": (
        {"job.json": b'{"input": "items.jsonl", "name": ' + b"[" * 1000 + b"]" * 1000 + b"}"},
        ("job.json", "job.json"),
        "name: is nested too deeply",
    ),
    "job-fifo": ({"job.yaml": _fifo}, BAD_JOB, "the job file is a FIFO"),
    "input-fifo": (
        {"job.yaml": dump(BASE, "yaml"), "items.jsonl": _fifo},
        ("job.yaml", "items.jsonl"),
        "items.jsonl: input is a FIFO (named pipe), expected a regular",
    ),
    "input-nul-id": (
        {"job.yaml": dump(BASE, "yaml"), "items.jsonl": b'{"id": 1}\n{"id": "a\\u0000"}\n'},
        ("job.yaml", "items.jsonl"),
        "items.jsonl:2: field 'id' holds a NUL character",
    ),
    "input-big-integer-id": (
        {
            "job.yaml": dump(BASE, "yaml"),
            "items.jsonl": b'{"id": 123456789012345678901234567890}\n',
        },
        ("job.yaml", "items.jsonl"),
        "items.jsonl:1: field 'id' is an integer out of range",
    ),
    "yaml-syntax": ({"job.yaml": b"input: items.jsonl\nmap: [command\n"}, BAD_JOB, "job.yaml:3"),
    "job-invalid-utf8": ({"job.yaml": b"input: items.jsonl\nname: \xff\n"}, BAD_JOB, "job.yaml:2"),
    "job-deep-nesting": ({"job.yaml": b"a: " + b"[" * 700 + b"\n"}, BAD_JOB, "nested too deeply"),
    "unknown-key-with-newline": (
        {"job.json": json.dumps({**BASE, "a\nb": 1}).encode()},
        ("job.json", "job.json"),
        "a\\nb: unknown key",
    ),
    "timeout-overflow": (
        {"job.yaml": dump(with_field(BASE, "map.timeout", 10**400), "yaml")},
        BAD_JOB,
        "map.timeout",
    ),
    "timeout-30-days": (  # past what a worker can wait on: refused, not a worker crash
        {"job.yaml": dump(with_field(BASE, "map.timeout", 30 * 86400), "yaml")},
        BAD_JOB,
        "map.timeout: must be at most",
    ),
    "callable-file-path": (
        {"job.yaml": dump(with_field(BASE, "map", {"callable": "/tmp/evil.py:f"}), "yaml")},
        BAD_JOB,
        "map.callable",
    ),
    "callable-exits-on-import": (
        {
            "job.yaml": dump(with_field(BASE, "map", {"callable": "quitter:f"}), "yaml"),
            "quitter.py": b"raise SystemExit(3)\n",
        },
        BAD_JOB,
        "map.callable",
    ),
    "input-bad-id": (
        {
            "job.yaml": dump(dict(BASE, id_field="id"), "yaml"),
            "items.jsonl": b'{"id": 1}\n{"id": [2]}\n',
        },
        ("job.yaml", "items.jsonl"),
        "items.jsonl:2: field 'id' is array",
    ),
    "input-invalid-utf8": (
        {"job.yaml": dump(BASE, "yaml"), "items.jsonl": b'{"id": 1}\n\n{"id": "\xff"}\n'},
        ("job.yaml", "items.jsonl"),
        "items.jsonl:3: invalid JSON",
    ),
    "input-empty": (
        {"job.yaml": dump(BASE, "yaml"), "items.jsonl": b""},
        ("job.yaml", "items.jsonl"),
        "holds no items",
    ),
}


@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_bad_input_end_to_end_in_a_real_process(mrpool, tmp_path: Path, case: str) -> None:
    """``python -m mrpool run`` on bad input: exit 2, exactly one stderr line naming the file and
    line/field, no traceback, empty stdout, and the state dir holds no job."""
    files, (job_name, bad_file), where = SUBPROCESS_CASES[case]
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    make_files(job_dir, {"items.jsonl": ITEMS, **files})
    r = mrpool.run("run", str(job_dir / job_name), timeout=30)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.endswith("\n"), repr(r.stderr)
    assert str(job_dir / bad_file) in r.stderr and where in r.stderr, r.stderr
    assert r.stdout == ""
    jobs = mrpool.state_dir / "jobs"
    assert not jobs.exists() or os.listdir(jobs) == []
    tmp = mrpool.state_dir / "tmp"
    assert not tmp.exists() or os.listdir(tmp) == []
