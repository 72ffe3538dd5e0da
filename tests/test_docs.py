"""The reference lives in the repo, and says what the code does.

A clone must be enough: README.md and docs/ link only to files inside the repository
(no ``../shared/...``, no absolute paths), every link resolves, ``--help`` names the
reference, and the reference documents every job-file key ``spec`` accepts and every
command and option the CLI parser has -- so a key or option added without its
documentation fails here, naming it.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from pathlib import Path

import pytest
from conftest import PY, REPO

from mrpool import cli, spec

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("**/*.md"))]
REFERENCE = REPO / "docs" / "reference.md"
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)|^\[[^\]]+\]:\s*(\S+)", re.MULTILINE)


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_docs_link_only_to_files_inside_the_repo(doc: Path) -> None:
    """Every link in README.md and docs/ is a web address, an anchor, or a repo file that
    exists; no text points at ``../shared`` or an absolute path a clone does not have."""
    text = doc.read_text()
    assert "../shared" not in text and "/work/" not in text, f"{doc} points outside the repo"
    for match in LINK.finditer(text):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+://|mailto:|#", target):
            continue
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(REPO), f"{doc.name}: {target} leads outside the repo"
        assert path.exists(), f"{doc.name}: {target} does not exist"


def test_help_names_the_reference() -> None:
    """``mrpool --help`` and ``mrpool run --help`` tell where every key is described."""
    for args in (["--help"], ["run", "--help"]):
        r = subprocess.run(
            [PY, "-m", "mrpool", *args], capture_output=True, text=True, cwd=REPO, timeout=60
        )
        assert r.returncode == 0, r.stderr
        assert "docs/reference.md" in r.stdout, r.stdout
    assert (REPO / cli.REFERENCE).is_file()


def test_the_reference_documents_every_job_file_key() -> None:
    """Each key the validator accepts has its own heading (``### `key` `` or
    ``#### `map.key` ``) in the reference."""
    text = REFERENCE.read_text()
    keys = sorted(spec._TOP_KEYS) + [
        f"{section}.{key}"
        for section, allowed in (("map", spec._MAP_KEYS), ("dlq", spec._DLQ_KEYS))
        for key in sorted(allowed)
    ]
    missing = [key for key in keys if not re.search(rf"^#+ `{re.escape(key)}`$", text, re.M)]
    assert not missing, f"docs/reference.md has no section for job-file key(s) {missing}"
    for key in spec._REDUCE_KEYS:  # reduce shares command/callable/timeout with the map
        assert f"`{key}`" in text.split("### `reduce`", 1)[1].split("\n## ", 1)[0], key


def _commands(parser: argparse.ArgumentParser, prefix: str = "") -> dict[str, list[str]]:
    """``{"dlq retry": ["--workers", "--wait", ...], ...}`` from the real parser."""
    found: dict[str, list[str]] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.update(_commands(sub, f"{prefix}{name} "))
    if prefix and not found:
        options = [
            option
            for action in parser._actions
            for option in action.option_strings
            if option.startswith("--") and option not in ("--help", "--state-dir")
        ]
        found[prefix.strip()] = options
    return found


def test_the_reference_documents_every_command_and_option() -> None:
    """Each subcommand has a ``### `command ...` `` section naming each of its options."""
    text = REFERENCE.read_text()
    commands = _commands(cli._build_parser())
    assert {"run", "resume", "status", "results", "events", "dlq list", "dlq export"} <= set(
        commands
    )
    for command, options in commands.items():
        heading = re.search(rf"^### `{re.escape(command)}( [^`]*)?`$", text, re.M)
        assert heading, f"docs/reference.md has no section for 'mrpool {command}'"
        section = re.split(r"\n#{2,3} ", text[heading.end() :], maxsplit=1)[0]
        missing = [o for o in options if o not in heading.group(0) and o not in section]
        assert not missing, f"'mrpool {command}': option(s) {missing} not in docs/reference.md"
    for option in ("--state-dir", "-V", "--version"):
        assert option in text, option
