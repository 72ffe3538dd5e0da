"""Every command's ``--help`` says what it does, what each argument means, shows an
example and lists its exit statuses (issue 24, item 6).

Read from the real parser (cheap, in-process) so a command or option added without
its help fails here, naming it; one subprocess checks the text a user really sees.
"""

from __future__ import annotations

import argparse
import subprocess

import pytest
from conftest import PY, REPO

from mrpool import cli


def _leaf_parsers(parser: argparse.ArgumentParser, prefix: str = "mrpool"):
    """``("mrpool dlq retry", parser)`` for every command that takes no subcommand."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield prefix, parser
    for action in subs:
        for name, sub in action.choices.items():
            yield from _leaf_parsers(sub, f"{prefix} {name}")


LEAVES = dict(_leaf_parsers(cli._build_parser()))


def test_every_command_is_covered() -> None:
    assert {"mrpool run", "mrpool resume", "mrpool status", "mrpool dlq retry"} <= set(LEAVES)
    assert len(LEAVES) >= 14, sorted(LEAVES)


@pytest.mark.parametrize("command", sorted(LEAVES))
def test_a_commands_help_has_a_description_argument_help_an_example_and_exit_codes(
    command: str,
) -> None:
    parser = LEAVES[command]
    assert parser.description and len(parser.description) > 20, command
    unhelped = [
        a.option_strings or a.dest
        for a in parser._actions
        if not a.help or a.help == argparse.SUPPRESS
    ]
    assert not unhelped, f"{command}: arguments without help: {unhelped}"
    text = parser.format_help()
    examples = text.split("examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert examples and all(command.split()[-1] in line for line in examples), text
    codes = text.split("exit status:\n", 1)[1].split("\n\n", 1)[0]
    assert "  0  " in codes or "  0    " in codes, codes
    assert "  2  " in codes or "  2    " in codes, codes
    assert "docs/reference.md" in text


@pytest.mark.parametrize("columns", ["50", "100"])
def test_help_fits_the_terminal_and_keeps_examples_whole(columns: str) -> None:
    """Help text wraps to $COLUMNS, except example command lines (kept pasteable)."""
    import os

    env = {**os.environ, "COLUMNS": columns, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [PY, "-m", "mrpool", "dlq", "retry", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    examples = r.stdout.split("examples:\n", 1)[1].split("\n\n", 1)[0].splitlines()
    assert "  mrpool dlq retry thumbs sku-123 sku-456 --wait 10" in examples
    long = [
        line
        for line in r.stdout.splitlines()
        if len(line) > int(columns) and line not in examples and "[" not in line
    ]
    assert not long, long
    assert "exit status:" in r.stdout and "  3  " in r.stdout
