"""Bad input is refused whole: malformed job files, inputs, ids and command lines.

Contract guarantee 6: a malformed job file or input file, a bad id, a callable
that cannot be imported, or a job id that is not a plain name gives exit 2 and
ONE line on stderr naming the file and the line or field -- never a traceback --
and no job state is created (no ``jobs/<id>`` directory, no half-built temp dir,
nothing on stdout, which is where a created job's id would be printed). Also:
``run`` with an existing ``--job-id`` (exit 2, with a hint to ``resume``),
``resume`` of an unknown job (exit 4) and an unknown CLI option (exit 2).
Every case runs the real CLI in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import textwrap
import time
from pathlib import Path

import pytest
from conftest import write_job
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(120)

GOOD_MAP = {"command": ["echo", "{item.id}"]}
MAPMOD = "def f(item):\n    return item\n"


# -- helpers -----------------------------------------------------------------------
def write_yaml_job(
    directory: Path, text: str, items: str | None = '{"id": 1}\n{"id": 2}\n'
) -> Path:
    """Write ``job.yaml`` (verbatim text) and, unless None, ``items.jsonl``."""
    directory.mkdir(parents=True, exist_ok=True)
    if items is not None:
        (directory / "items.jsonl").write_text(items)
    (directory / "mapmod.py").write_text(MAPMOD)
    path = directory / "job.yaml"
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


def assert_refused(mrpool, r: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit ``code``, one stderr line containing every needle, no traceback, no job state."""
    assert r.returncode == code, f"exit {r.returncode}\nstdout: {r.stdout}\nstderr: {r.stderr}"
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {r.stderr!r}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    assert r.stdout == "", (
        f"nothing may be printed on stdout (a job id means it exists): {r.stdout!r}"
    )
    assert_no_job_state(mrpool)
    return lines[0]


def assert_no_job_state(mrpool) -> None:
    jobs = mrpool.state_dir / "jobs"
    assert not jobs.exists() or not os.listdir(jobs), f"job state created: {os.listdir(jobs)}"
    tmp = mrpool.state_dir / "tmp"
    assert not tmp.exists() or not os.listdir(tmp), f"half-built job left: {os.listdir(tmp)}"


def run(mrpool, job: Path, *args: str) -> subprocess.CompletedProcess:
    return mrpool.run("run", str(job), "--job-id", "j", *args)


# -- the job file ------------------------------------------------------------------
def test_invalid_yaml_names_the_file_and_line(mrpool, tmp_path):
    """A YAML syntax error on line 4: ``job.yaml:4`` in a one-line message, exit 2."""
    # Phase 1: line 4 has a mapping value where none is allowed.
    job = write_yaml_job(
        tmp_path,
        """
        name: t
        input: items.jsonl
        map:
          command: echo: {item.id}
        """,
    )
    # Phase 2: refused with the line.
    assert_refused(mrpool, run(mrpool, job), "job.yaml:4", "YAML")


def test_invalid_json_job_file_names_the_file_and_line(mrpool, tmp_path):
    """A job file in JSON with a syntax error on line 3: ``job.json:3``."""
    (tmp_path / "items.jsonl").write_text('{"id": 1}\n')
    job = tmp_path / "job.json"
    job.write_text('{\n  "input": "items.jsonl",\n  "map": {"command": ["echo"],}\n}\n')
    assert_refused(mrpool, run(mrpool, job), "job.json:3")


@pytest.mark.parametrize(
    "text, field",
    [
        ("input: items.jsonl\ninptu: x\nmap: {command: [echo]}\n", "inptu"),
        ("input: items.jsonl\nmap: {command: [echo], retry: 2}\n", "map.retry"),
        ("map: {command: [echo]}\n", "input"),
        ("input: items.jsonl\n", "map"),
        ("input: items.jsonl\nmap: {command: [echo], callable: 'mapmod:f'}\n", "map"),
        ("input: items.jsonl\nmap: {timeout: 3}\n", "map"),
        ("input: items.jsonl\nmap: {command: [echo], retries: three}\n", "map.retries"),
        ("input: items.jsonl\nmap: {command: [echo], retries: -1}\n", "map.retries"),
        ("input: items.jsonl\nmap: {command: [echo], retries: true}\n", "map.retries"),
        ("input: items.jsonl\nmap: {command: [echo], timeout: 10s}\n", "map.timeout"),
        ("input: items.jsonl\nmap: {command: [echo], timeout: 0}\n", "map.timeout"),
        ("input: items.jsonl\nmap: {command: [echo], backoff: fast}\n", "map.backoff"),
        ("input: items.jsonl\nworkers: four\nmap: {command: [echo]}\n", "workers"),
        ("input: items.jsonl\nworkers: 0\nmap: {command: [echo]}\n", "workers"),
        ("input: items.jsonl\nmap: {command: [echo, 3]}\n", "map.command"),
        (
            "input: items.jsonl\nmap: {command: [echo]}\nreduce: {command: [cat], callable: 'mapmod:f'}\n",
            "reduce",
        ),
        ("- input: items.jsonl\n", "job.yaml"),
        # YAML's "\ud800" is a lone surrogate: no path, argument or record can hold it
        ('input: "items\\ud800.jsonl"\nmap: {command: [echo]}\n', "input: is not valid Unicode"),
        ('name: "a\\udc80"\ninput: items.jsonl\nmap: {command: [echo]}\n', "name: is not valid"),
        ('input: items.jsonl\nmap: {command: [echo, "\\ud800"]}\n', "map.command[1]: is not"),
    ],
    ids=[
        "unknown-key",
        "unknown-map-key",
        "missing-input",
        "missing-map",
        "command-and-callable",
        "neither-command-nor-callable",
        "retries-string",
        "retries-negative",
        "retries-bool",
        "timeout-string",
        "timeout-zero",
        "backoff-string",
        "workers-string",
        "workers-zero",
        "command-non-string",
        "reduce-both",
        "not-a-mapping",
        "input-lone-surrogate",
        "name-lone-surrogate",
        "argument-lone-surrogate",
    ],
)
def test_invalid_job_file_field_is_named(mrpool, tmp_path, text, field):
    """Each invalid field: exit 2, one line naming the job file and the field."""
    job = write_yaml_job(tmp_path, text)
    assert_refused(mrpool, run(mrpool, job), "job.yaml", field)


def test_missing_job_file_and_missing_input_file(mrpool, tmp_path):
    """A job file or input that does not exist is named, exit 2."""
    # Phase 1: no job file at all.
    assert_refused(mrpool, run(mrpool, tmp_path / "nope.yaml"), "nope.yaml")
    # Phase 2: a job file whose input does not exist.
    job = write_yaml_job(tmp_path, "input: gone.jsonl\nmap: {command: [echo]}\n", items=None)
    assert_refused(mrpool, run(mrpool, job), "gone.jsonl")


# -- callables ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "dotted, module_text",
    [
        ("nosuchmodule_xyz:f", None),
        ("mapmod:missing", None),
        ("broken:f", "def f(item):\n    return (\n"),
        ("raising:f", "raise RuntimeError('boom at import')\n"),
        ("exiting:f", "import sys\nsys.exit(0)\n"),
        ("/tmp/x.py:f", None),
        ("mapmod.py:f", None),
    ],
    ids=[
        "no-module",
        "no-function",
        "syntax-error",
        "raises-on-import",
        "sys-exit-on-import",
        "file-path",
        "py-suffix",
    ],
)
def test_a_callable_that_cannot_be_imported_is_refused_before_anything_runs(
    mrpool, tmp_path, dotted, module_text
):
    """``map.callable`` that cannot be imported (or is not ``pkg.module:function``): exit 2, field named."""
    # Phase 1: a job file naming the callable (and the broken module, where there is one).
    if module_text is not None:
        (tmp_path / f"{dotted.split(':')[0]}.py").write_text(module_text)
    job = write_yaml_job(tmp_path, f"input: items.jsonl\nmap: {{callable: {json.dumps(dotted)}}}\n")
    # Phase 2: refused, naming the field.
    assert_refused(mrpool, run(mrpool, job), "job.yaml", "map.callable")


def test_a_reduce_callable_that_cannot_be_imported_is_refused(mrpool, tmp_path):
    """``reduce.callable`` is checked before the map runs: exit 2, field named."""
    job = write_yaml_job(
        tmp_path,
        "input: items.jsonl\nmap: {callable: 'mapmod:f'}\nreduce: {callable: 'mapmod:nope'}\n",
    )
    assert_refused(mrpool, run(mrpool, job), "job.yaml", "reduce.callable")


# -- the input ---------------------------------------------------------------------
def test_invalid_json_on_line_n_of_the_input(mrpool, tmp_path):
    """A bad line 3 in items.jsonl: ``items.jsonl:3`` in the message, nothing created."""
    items = '{"id": 1}\n{"id": 2}\n{"id": 3,\n{"id": 4}\n'
    job = write_yaml_job(tmp_path, "input: items.jsonl\nmap: {command: [echo]}\n", items=items)
    assert_refused(mrpool, run(mrpool, job), "items.jsonl:3")


def test_a_bad_line_far_into_a_large_input_refuses_the_whole_input(mrpool, tmp_path):
    """Line 5000 of 5000 is bad: nothing was started, the line is named (the input is checked whole)."""
    lines = [json.dumps({"id": n}) for n in range(4999)] + ["not json"]
    job = write_yaml_job(
        tmp_path, "input: items.jsonl\nmap: {command: [echo]}\n", items="\n".join(lines) + "\n"
    )
    assert_refused(mrpool, run(mrpool, job), "items.jsonl:5000")


BAD_IDS = [True, 1.5, None, [1], {"a": 1}]
BAD_ID_NAMES = ["bool", "float", "null", "array", "object"]


@pytest.mark.parametrize("bad", BAD_IDS, ids=BAD_ID_NAMES)
@pytest.mark.parametrize("id_field", [None, "key"], ids=["default-id", "id_field"])
def test_an_item_id_that_is_not_a_string_or_integer_is_refused(mrpool, tmp_path, bad, id_field):
    """An id that is a bool, float, null, array or object: exit 2 naming the file and line 2."""
    # Phase 1: line 2's id is bad (under "id" by default, or the configured id_field).
    name = id_field or "id"
    items = f"{json.dumps({name: 'a'})}\n{json.dumps({name: bad})}\n{json.dumps({name: 'c'})}\n"
    extra = f"id_field: {id_field}\n" if id_field else ""
    job = write_yaml_job(
        tmp_path, f"input: items.jsonl\n{extra}map: {{command: [echo]}}\n", items=items
    )
    # Phase 2: refused, naming the line and the field.
    assert_refused(mrpool, run(mrpool, job), "items.jsonl:2", name)


def test_an_item_without_the_configured_id_field_is_refused(mrpool, tmp_path):
    """With ``id_field`` set, an item lacking it (or not an object) is named by its line."""
    items = '{"key": 1}\n{"other": 2}\n'
    job = write_yaml_job(
        tmp_path, "input: items.jsonl\nid_field: key\nmap: {command: [echo]}\n", items=items
    )
    assert_refused(mrpool, run(mrpool, job), "items.jsonl:2", "key")


@pytest.mark.parametrize("content", ["", "\n\n  \n"], ids=["empty", "blank-lines"])
def test_an_empty_input_is_refused(mrpool, tmp_path, content):
    """An input with no items is refused: exit 2, the file named."""
    job = write_yaml_job(tmp_path, "input: items.jsonl\nmap: {command: [echo]}\n", items=content)
    assert_refused(mrpool, run(mrpool, job), "items.jsonl")


@pytest.mark.parametrize(
    "document, json_path, needle",
    [
        ({"items": [1, 2]}, None, "data.json"),
        ("just a string", None, "data.json"),
        ([], None, "data.json"),
        ({"items": [1, 2]}, "$.items[", "json_path"),
        ({"items": [1, 2]}, "", "json_path"),
        ({"items": []}, "$.items[*]", "data.json"),
    ],
    ids=[
        "object-not-array",
        "string-not-array",
        "empty-array",
        "bad-json_path",
        "empty-json_path",
        "json_path-selects-nothing",
    ],
)
def test_bad_json_documents_and_json_paths(mrpool, tmp_path, document, json_path, needle):
    """A ``.json`` input that is not an array, a bad ``json_path``, or no items: exit 2, named."""
    # Phase 1: a .json input and (maybe) a json_path.
    extra = {"input": "data.json"}
    if json_path is not None:
        extra["json_path"] = json_path
    job = write_job(tmp_path, [], GOOD_MAP, extra=extra, files={"data.json": json.dumps(document)})
    # Phase 2: refused.
    assert_refused(mrpool, run(mrpool, job), needle)


def test_json_path_on_a_jsonl_input_is_refused(mrpool, tmp_path):
    """``json_path`` applies only to ``.json`` inputs: naming the field."""
    job = write_yaml_job(
        tmp_path, "input: items.jsonl\njson_path: '$[*]'\nmap: {command: [echo]}\n"
    )
    assert_refused(mrpool, run(mrpool, job), "json_path")


def test_invalid_json_in_a_json_input_names_the_line(mrpool, tmp_path):
    """A syntax error on line 3 of a ``.json`` input: ``data.json:3``."""
    job = write_job(
        tmp_path,
        [],
        GOOD_MAP,
        extra={"input": "data.json"},
        files={"data.json": '[\n {"id": 1},\n {"id": 2,,}\n]\n'},
    )
    assert_refused(mrpool, run(mrpool, job), "data.json:3")


# -- job ids -----------------------------------------------------------------------
def test_an_existing_job_id_is_refused_with_a_hint_to_resume(mrpool, tmp_path):
    """``run --job-id X`` when X exists: exit 2, a hint to ``resume``, and X is left untouched."""
    # Phase 1: a first, finished job.
    job = write_job(tmp_path, [{"id": 1}, {"id": 2}], GOOD_MAP)
    first = mrpool.run("run", str(job), "--job-id", "taken")
    assert first.returncode == 0, first.stderr
    job_json = (mrpool.job_dir("taken") / "job.json").read_bytes()
    journal = (mrpool.job_dir("taken") / "journal.log").read_bytes()

    # Phase 2: the same id again.
    r = mrpool.run("run", str(job), "--job-id", "taken")
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "taken" in lines[0] and "resume" in lines[0]

    # Phase 3: the existing job is untouched, the only job there is.
    assert (mrpool.job_dir("taken") / "job.json").read_bytes() == job_json
    assert (mrpool.job_dir("taken") / "journal.log").read_bytes() == journal
    assert os.listdir(mrpool.state_dir / "jobs") == ["taken"]


@pytest.mark.parametrize(
    "job_id",
    [
        "..",
        "a..b",
        "a/b",
        "../escape",
        "-rf",
        ".hidden",
        "",
        "x" * 129,
        "new\nline",
        "bell\x07",
        "sp ace",
    ],
    ids=[
        "dotdot",
        "inner-dotdot",
        "slash",
        "parent",
        "leading-dash",
        "leading-dot",
        "empty",
        "too-long",
        "newline",
        "bell",
        "space",
    ],
)
def test_a_job_id_that_is_not_a_plain_name_is_refused(mrpool, tmp_path, job_id):
    """Job ids with ``..``, ``/``, a leading ``-``, control characters...: exit 2, nothing created."""
    # Phase 1: a valid job file.
    job = write_job(tmp_path, [{"id": 1}], GOOD_MAP)
    # Phase 2: refused (``--job-id=`` so argparse hands a leading "-" through as a value).
    r = mrpool.run("run", str(job), f"--job-id={job_id}")
    assert_refused(mrpool, r, "job id")
    # Phase 3: nothing was created outside the state dir either.
    assert not (tmp_path / "escape").exists()
    assert not [
        p
        for p in mrpool.state_dir.parent.iterdir()
        if p.name not in ("state", "job.json", "items.jsonl")
    ]


def test_plain_job_ids_at_the_limits_are_accepted(mrpool, tmp_path):
    """The refusals above are not over-broad: 128 characters of ``[A-Za-z0-9._-]`` is a fine id."""
    job = write_job(tmp_path, [{"id": 1}], GOOD_MAP)
    job_id = "_" + "a.b-C9" * 21 + "x"  # 128 characters
    r = mrpool.run("run", str(job), "--job-id", job_id)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[0] == job_id
    assert mrpool.status(job_id)["state"] == "completed"


# -- the command line --------------------------------------------------------------
@pytest.mark.parametrize(
    "args",
    [
        ("status", "no-such-job"),
        ("results", "no-such-job"),
        ("resume", "no-such-job"),
    ],
    ids=["status", "results", "resume"],
)
def test_an_unknown_job_exits_4(mrpool, args):
    """``resume`` (and every reader) of an unknown job: exit 4, one line naming the job."""
    r = mrpool.run(*args)
    assert_refused(mrpool, r, "no-such-job", code=4)


@pytest.mark.parametrize(
    "args",
    [
        ("run", "JOB", "--bogus"),
        ("run", "JOB", "--workers", "0"),
        ("run",),
        ("frobnicate",),
    ],
    ids=["unknown-option", "workers-zero", "missing-jobfile", "unknown-command"],
)
def test_command_line_usage_errors_exit_2(mrpool, tmp_path, args):
    """An unknown option, a bad option value or a missing argument: exit 2, one line, nothing run."""
    job = write_job(tmp_path, [{"id": 1}], GOOD_MAP)
    r = mrpool.run(*[str(job) if a == "JOB" else a for a in args])
    assert_refused(mrpool, r)


# -- placeholders --------------------------------------------------------------------
def _render_reference(argv: list[str], item: object) -> list[str]:
    """The contract's rule written the slow, obvious way: one regex substitution per
    argument, values never re-scanned, JSON for anything that is not a string."""
    import re

    def fill(match: re.Match) -> str:
        key = match.group(1)
        if key is not None and not (isinstance(item, dict) and key in item):
            raise KeyError(key)
        value = item if key is None else item[key]
        return (
            value
            if isinstance(value, str)
            else json.dumps(value, separators=(",", ":"), ensure_ascii=False)
        )

    return [re.sub(r"\{item(?:\.([^{}]+))?\}", fill, arg) for arg in argv]


_pieces = st.sampled_from(
    [
        "{item}",
        "{item.a}",
        "{item.b c}",
        "{item.}",
        "{item",
        "item}",
        "{",
        "}",
        "x",
        "-",
        " ",
        "{item.a",
    ]
)
_args = st.lists(st.one_of(_pieces, st.text(max_size=3)), max_size=5).map("".join)
_values = st.one_of(
    st.text(max_size=5), st.integers(-5, 5), st.none(), st.lists(st.integers(0, 3), max_size=2)
)


@settings(max_examples=300, deadline=None)
@given(
    argv=st.lists(_args, min_size=1, max_size=4),
    item=st.one_of(
        st.dictionaries(st.sampled_from(["a", "b c", "z"]), _values, max_size=3), _values
    ),
)
def test_a_parsed_command_template_fills_exactly_as_the_rule_says(argv, item):
    """The worker parses ``map.command`` once and fills it per attempt; whatever the
    template, it must give what one substitution pass per argument gives, down to
    the missing key it names."""
    from mrpool.spec import argv_renderer

    try:
        expected = _render_reference(argv, item)
    except KeyError as e:
        with pytest.raises(KeyError) as raised:
            argv_renderer(argv)(item)
        assert raised.value.args == e.args
    else:
        assert argv_renderer(argv)(item) == expected


# -- hostile job files and inputs (issue 23: alias bombs, deep nesting, bad ids) ------------
def alias_bomb(levels: int = 9, fanout: int = 10, merge: bool = False) -> str:
    """YAML of ~300 bytes that stands for ``fanout ** levels`` values once expanded."""
    anchors = ["&v0 {k: 1}" if merge else "&v0 [lol]"]
    for n in range(1, levels + 1):
        refs = ", ".join([f"*v{n - 1}"] * fanout)
        anchors.append(f"&v{n} {{<<: [{refs}]}}" if merge else f"&v{n} [{refs}]")
    return f"name: [{', '.join(anchors)}]\ninput: items.jsonl\nmap: {{command: [echo]}}\n"


@pytest.mark.parametrize("merge", [False, True], ids=["lists", "merge-keys"])
def test_a_yaml_alias_bomb_is_refused_at_once(mrpool, tmp_path, merge):
    """Nine levels of ten aliases (10**9 values; with merge keys PyYAML itself would expand
    them while building mappings): refused in well under a second of work, one line naming
    the file and line, exit 2, nothing created -- not an hour of expansion."""
    job = write_yaml_job(tmp_path, alias_bomb(levels=9 if not merge else 7, merge=merge))
    started = time.monotonic()
    r = run(mrpool, job)
    elapsed = time.monotonic() - started
    assert_refused(mrpool, r, f"{job}:1: invalid YAML:", "alias bomb")
    assert elapsed < 20, f"{elapsed:.1f} s: the aliases were expanded, not weighed"
    assert not mrpool.state_dir.exists()


def test_yaml_aliases_a_job_file_really_uses_are_accepted(tmp_path):
    """An anchor shared by map and reduce, and a merge key for common settings, are fine."""
    from mrpool.spec import load_job_file

    shared = write_yaml_job(
        tmp_path / "shared",
        "input: items.jsonl\n"
        "map: {command: &cmd [python3, work.py, '{item.id}'], timeout: 30}\n"
        "reduce: {command: *cmd}\n",
    )
    spec = load_job_file(shared)
    assert spec.reduce.command == spec.map.command == ["python3", "work.py", "{item.id}"]
    merged = write_yaml_job(
        tmp_path / "merged",
        "input: items.jsonl\n"
        "name: &n merged\n"
        "map: {<<: {timeout: 30, retries: 2}, command: [echo, *n]}\n",
    )
    spec = load_job_file(merged)
    assert (spec.name, spec.map.command, spec.map.timeout, spec.map.retries) == (
        "merged",
        ["echo", "merged"],
        30.0,
        2,
    )


def test_a_recursive_alias_or_a_cyclic_job_dict_is_refused(tmp_path):
    """``&a [*a]`` (a list that holds itself) and, through the API, a dict that contains
    itself: a one-line JobSpecError, never a RecursionError."""
    from mrpool.errors import JobSpecError
    from mrpool.spec import load_job_file, spec_from_dict

    job = write_yaml_job(tmp_path, "input: items.jsonl\nname: &a [*a]\nmap: {command: [echo]}\n")
    with pytest.raises(JobSpecError, match=r"job\.yaml:2: invalid YAML: an alias names a value"):
        load_job_file(job)
    cyclic: dict = {"input": "items.jsonl", "map": {"command": ["echo"]}}
    cyclic["map"]["timeout"] = cyclic
    with pytest.raises(JobSpecError, match=r"<job>: map: is nested too deeply"):
        spec_from_dict(cyclic, base_dir=tmp_path)


@pytest.mark.parametrize("depth", [70, 900, 100_000])
def test_deep_nesting_is_refused_on_one_line(tmp_path, depth):
    """Nesting past 64 levels through the API, or in a JSON job file below orjson's own limit
    (1024): one line naming the field, not a RecursionError; past orjson's limit, the line."""
    from mrpool.errors import JobSpecError
    from mrpool.spec import load_job_file, spec_from_dict

    deep: list = []
    for _ in range(depth):
        deep = [deep]
    with pytest.raises(JobSpecError, match=r"<job>: name: is nested too deeply \(more than 64"):
        spec_from_dict({"name": deep, "input": "x.jsonl", "map": {}}, base_dir=tmp_path)
    job = tmp_path / "job.json"
    job.write_text('{"input": "items.jsonl", "name": ' + "[" * depth + "]" * depth + "}")
    needle = "name: is nested too deeply" if depth < 1024 else "job.json:1: invalid JSON"
    with pytest.raises(JobSpecError, match=re.escape(needle)):
        load_job_file(job)


@pytest.mark.parametrize(
    "line, needle",
    [
        ('{"id": "a\\u0000b"}', "field 'id' holds a NUL character"),
        ('{"id": 123456789012345678901234567890}', "field 'id' is an integer out of range"),
        ('{"id": -9223372036854775809}', "field 'id' is an integer out of range"),
    ],
    ids=["nul", "past-2**64", "below-minus-2**63"],
)
@pytest.mark.parametrize("id_field", [None, "id"], ids=["default-id", "id_field"])
def test_an_id_no_command_could_be_given_is_refused_naming_its_line(
    mrpool, tmp_path, line, needle, id_field
):
    """An id holding NUL (no environment variable can carry it: every attempt would fail
    with "embedded null byte") or an integer past 64 bits (read as a float, digits lost):
    refused at ingest, naming the line, whether the fast path or the item-by-item one reads
    it (2000 clean lines come first)."""
    items = "".join(json.dumps({"id": n}) + "\n" for n in range(2000)) + line + "\n"
    extra = f"id_field: {id_field}\n" if id_field else ""
    job = write_yaml_job(tmp_path, f"input: items.jsonl\n{extra}map: {{command: [echo]}}\n", items)
    assert_refused(mrpool, run(mrpool, job), "items.jsonl:2001: ", needle)


def test_64_bit_integer_ids_at_the_limits_are_accepted(mrpool, tmp_path):
    """The largest ids orjson reads exactly, -2**63 and 2**64-1, are ordinary integer ids."""
    items = f'{{"id": {-(2**63)}}}\n{{"id": {2**64 - 1}}}\n'
    job = write_yaml_job(tmp_path, "input: items.jsonl\nmap: {command: [echo, ok]}\n", items)
    r = run(mrpool, job)
    assert r.returncode == 0, r.stderr
    assert [row["id"] for row in mrpool.results("j")] == [-(2**63), 2**64 - 1]


@pytest.mark.parametrize("existing", [False, True], ids=["new-state-dir", "empty-state-dir"])
@pytest.mark.parametrize("problem", ["bad-line", "missing-input", "fifo-input", "bad-field"])
def test_a_refused_run_leaves_the_state_dir_as_it_found_it(mrpool, tmp_path, existing, problem):
    """A run refused for its job file or input creates nothing at all: a state dir that did
    not exist still does not, an empty one stays empty (no ``jobs/``, no ``tmp/``)."""
    text = "input: items.jsonl\nmap: {command: [echo]}\n"
    items: str | None = '{"id": 1}\n{"id": 2,\n'
    if problem == "bad-field":
        text += "workers: 0\n"
    elif problem != "bad-line":
        items = None
    job = write_yaml_job(tmp_path / "job", text, items)
    if problem == "fifo-input":
        os.mkfifo(tmp_path / "job" / "items.jsonl")
    if existing:
        mrpool.state_dir.mkdir(mode=0o700)
    r = run(mrpool, job)
    assert_refused(mrpool, r)
    if existing:
        assert os.listdir(mrpool.state_dir) == []
    else:
        assert not mrpool.state_dir.exists(), os.listdir(mrpool.state_dir)


# -- a newcomer's command line and typos (issue 24 item 6) ------------------------------------
@pytest.mark.parametrize(
    "args, abbreviation",
    [
        (("run", "JOB", "--worker", "3"), "--worker"),
        (("run", "JOB", "--job", "x"), "--job"),
        (("resume", "j", "--max-add", "2"), "--max-add"),
        (("dlq", "list", "j", "--js"), "--js"),
        (("status", "--js"), "--js"),
        (("status", "--state", "DIR"), "--state"),
    ],
    ids=["run-worker", "run-job", "resume-max-add", "dlq-list-js", "status-js", "state-dir"],
)
def test_abbreviated_options_are_refused_not_guessed(mrpool, tmp_path, args, abbreviation):
    """``--worker 3`` is not ``--workers 3``: an abbreviation is an unknown option (exit 2,
    one line naming it), on the top parser and every subcommand's, so no option silently
    changes meaning when a longer one is added; nothing runs and no job is created."""
    job = write_job(tmp_path, [{"id": 1}], GOOD_MAP)
    fill = {"JOB": str(job), "DIR": str(mrpool.state_dir)}
    r = mrpool.run(*[fill.get(a, a) for a in args])
    line = assert_refused(mrpool, r)
    assert abbreviation in line and "--help" in line, line
    assert not mrpool.state_dir.exists()


@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_the_version_is_printed(mrpool, flag):
    """``mrpool -V`` / ``--version``: the package version on stdout, exit 0."""
    from mrpool import __version__

    r = mrpool.run(flag)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"mrpool {__version__}\n", "")


@pytest.mark.parametrize(
    "text, field, suggestion",
    [
        ("input: items.jsonl\nworker: 3\nmap: {command: [echo]}\n", "worker", "workers"),
        ("input: items.jsonl\nmap: {command: [echo], timout: 3}\n", "map.timout", "timeout"),
        ("input: items.jsonl\nmap: {command: [echo], Retries: 1}\n", "map.Retries", "retries"),
        ("input: items.jsonl\nidfield: id\nmap: {command: [echo]}\n", "idfield", "id_field"),
        ("input: items.jsonl\nmap: {command: [echo]}\ndlq: {max: 3}\n", "dlq.max", "max_items"),
    ],
    ids=["worker", "timout", "Retries", "idfield", "dlq-max"],
)
def test_an_unknown_job_file_key_suggests_the_nearest_known_one(
    mrpool, tmp_path, text, field, suggestion
):
    """A misspelt key is refused naming it, with the nearest key of its section as a
    did-you-mean, and the keys it could be; nothing is created."""
    job = write_yaml_job(tmp_path, text)
    line = assert_refused(
        mrpool, run(mrpool, job), f"{job}: {field}: unknown key (did you mean {suggestion!r}?"
    )
    assert "expected one of: " in line, line


def test_an_unknown_key_far_from_every_known_one_gets_no_guess(mrpool, tmp_path):
    job = write_yaml_job(tmp_path, "input: items.jsonl\nzzz: 1\nmap: {command: [echo]}\n")
    line = assert_refused(mrpool, run(mrpool, job), f"{job}: zzz: unknown key (expected one of: ")
    assert "did you mean" not in line


@pytest.mark.parametrize(
    "argv, unknown, help_of",
    [
        (["resume", "j", "--bogus"], "--bogus", "mrpool resume --help"),
        (["dlq", "retry", "j", "--bogus"], "--bogus", "mrpool dlq retry --help"),
        (["status", "--worker", "3"], "--worker", "mrpool status --help"),
    ],
)
def test_an_unknown_option_points_at_its_commands_help(mrpool, argv, unknown, help_of):
    """One line, exit 2, naming the help of the command the option was given to."""
    r = mrpool.run(*argv)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"mrpool: unrecognized arguments: {unknown} (see '{help_of}')"
    ]


def test_an_unknown_job_id_suggests_the_nearest_job(mrpool, tmp_path):
    """A typo in a job id (exit 4) names the job the user most likely meant."""
    job = write_job(tmp_path, [{"id": 1}], {"command": ["true"]})
    assert mrpool.run("run", str(job), "--job-id", "thumbnails-2026").returncode == 0
    r = mrpool.run("status", "thumbnails-2062")
    assert r.returncode == 4
    assert r.stderr.strip().endswith("did you mean thumbnails-2026?"), r.stderr
    r = mrpool.run("status", "zzz")
    assert r.returncode == 4 and "did you mean" not in r.stderr
