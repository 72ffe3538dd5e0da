"""The command line: ``python -m mrpool ...`` / ``mrpool ...``.

Parsing and printing only; the work is in ``api``. Errors are ``MrpoolError``s
mapped to exit codes in ``main`` (see errors.py): one line on stderr, never a
traceback. stdout carries data (the job id, JSON, JSONL); humans get stderr.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shlex
import signal
import sys
import textwrap
import warnings
from datetime import datetime
from typing import Any

import orjson

from .errors import EXIT_FAILURES, EXIT_INTERRUPTED, MrpoolError, UsageError
from .progress import HEARTBEAT_ENV
from .spec import printable

__all__ = ["main"]


REFERENCE = "docs/reference.md"  # in the mrpool repository: every job-file key and command


class _Parser(argparse.ArgumentParser):
    """No abbreviated options: ``--worker 3`` must be an error, not ``--workers 3`` --
    an abbreviation that works today would silently change meaning once a new option
    shares its prefix. Descriptions and epilogs keep their line breaks (examples)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # one line, exit 2 (the contract)
        raise UsageError(f"{message} (see '{self.prog} --help')")


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, except that in descriptions and epilogs an indented line
    (an example command) is kept as written, and an exit-status line ("  3  the job
    is ...") wraps under its text. Plain lines are filled into paragraphs."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        out: list[str] = []
        paragraph: list[str] = []
        for line in [*text.splitlines(), ""]:
            if line and not line.startswith(" "):
                paragraph.append(line)
                continue
            if paragraph:
                out.append(
                    textwrap.fill(
                        " ".join(paragraph), width, initial_indent=indent, subsequent_indent=indent
                    )
                )
                paragraph = []
            code = re.match(r"  \d+ +", line)
            if code and len(line) > width:
                hang = indent + " " * code.end()
                out.append(
                    textwrap.fill(line, width, initial_indent=indent, subsequent_indent=hang)
                )
            elif line or out:
                out.append(indent + line if line else "")
        return "\n".join(out).rstrip("\n")


# What each exit status means, as a command's --help lists it (errors.py decides them).
_EXITS = {
    2: "usage error (a bad option or id, an invalid job file or input); nothing was done",
    3: "the job is locked by another live process (its pid, host and since when are named)",
    4: "no such job",
    5: "the job's state files are damaged (see 'mrpool fsck')",
    130: "interrupted (Ctrl-C or SIGTERM); the state is saved and 'resume' continues it",
}
_SESSION_EXITS = {
    0: "every item succeeded (and the reduce step, if any)",
    1: "finished, but some items are in the DLQ or failed, or the reduce step failed",
}


def _command(
    sub,
    name: str,
    summary: str,
    description: str,
    examples: list[str],
    exits: dict[int, str],
    common: list[argparse.ArgumentParser],
):
    """One subcommand's parser: its one-line summary (in ``mrpool --help``), what it
    does, examples and its exit statuses (in ``mrpool NAME --help``)."""
    codes = {**exits, **{code: _EXITS[code] for code in _EXITS if code not in exits}}
    shown = sorted(code for code, text in codes.items() if text)
    width = max(len(str(code)) for code in shown)
    epilog = "examples:\n" + "".join(f"  {line}\n" for line in examples)
    epilog += "\nexit status:\n" + "".join(f"  {c:<{width}}  {codes[c]}\n" for c in shown)
    epilog += f"\nEvery command and option: {REFERENCE} in the mrpool repository."
    return sub.add_parser(
        name, parents=common, help=summary, description=description, epilog=epilog
    )


def _only(*codes: int) -> dict[int, str]:
    """The standard meanings of ``codes`` (the others are left out of the help)."""
    table = {code: "" for code in _EXITS}
    table.update({code: _EXITS[code] for code in codes})
    return table


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument(
        "--state-dir",
        default=argparse.SUPPRESS,
        metavar="DIR",
        help="where job state lives (default: $MRPOOL_HOME, else $XDG_STATE_HOME/mrpool, "
        "else ~/.local/state/mrpool)",
    )
    parser = _Parser(
        prog="mrpool",
        description="A local MapReduce job runner that never loses work: every outcome is "
        "journaled, failing items are parked in a dead letter queue (DLQ), and an "
        "interrupted job resumes exactly where it stopped.",
        epilog="start with:\n  mrpool run examples/wordcount/job.yaml\n  mrpool COMMAND --help\n\n"
        f"The job file's keys, every command and option, exit codes and guarantees: "
        f"{REFERENCE} in the mrpool repository.",
        parents=[common],
    )
    from . import __version__

    parser.add_argument("-V", "--version", action="version", version=f"mrpool {__version__}")
    sub = parser.add_subparsers(
        dest="command", required=True, parser_class=_Parser, metavar="COMMAND"
    )
    for build in (
        _run_parser,
        _resume_parser,
        _status_parser,
        _results_parser,
        _events_parser,
        _joblog_parser,
        _dlq_parser,
        _unlock_parser,
        _fsck_parser,
        _rerun_parser,
        _rm_parser,
    ):
        build(sub, [common])
    return parser


def _run_parser(sub, common) -> None:
    p = _command(
        sub,
        "run",
        "start a new job from a job file",
        "Validates the job file and the whole input, creates the job, prints its id on the "
        "first line of stdout, and runs every item. Nothing exists until the id is printed: "
        "a refused or killed-before-that run can simply be repeated.",
        [
            "mrpool run examples/wordcount/job.yaml",
            "JOB=$(mrpool run jobs/thumbs.yaml --workers 8 | head -1)",
        ],
        _only(130)
        | _SESSION_EXITS
        | {
            2: "usage error (a bad option, an invalid job file or input, an existing --job-id); "
            "nothing was created"
        },
        common,
    )
    p.add_argument(
        "jobfile",
        metavar="JOBFILE",
        help=f"the job file (YAML or JSON; its keys: {REFERENCE})",
    )
    p.add_argument(
        "--job-id",
        metavar="ID",
        help="the new job's id (default: its name, a timestamp and 4 random hex digits)",
    )
    _workers_option(p)
    _pace_options(p)
    _executor_option(p)
    _halt_option(p, "kept with the job, overriding the job file's halt:")
    p.add_argument("--json", action="store_true", help="print the final report as JSON on stdout")
    _progress_options(p)


def _resume_parser(sub, common) -> None:
    p = _command(
        sub,
        "resume",
        "run what is left of a job",
        "Runs the job's pending, failed and DLQ items, each once (priority pending > failed > "
        "DLQ), holding the job's lock for its whole life. Nothing left: says so, exits 0.",
        [
            "mrpool resume thumbs",
            "mrpool resume thumbs --no-dlq --wait 10",
            "mrpool resume thumbs --max-additional-retries 3 --reset-failed",
        ],
        _SESSION_EXITS,
        common,
    )
    _job_id_argument(p)
    p.add_argument("--no-dlq", action="store_true", help="leave DLQ items parked")
    p.add_argument(
        "--reset-failed",
        action="store_true",
        help="restart the attempt numbers of failed and DLQ items at 1",
    )
    p.add_argument(
        "--max-additional-retries",
        type=_positive_int,
        metavar="N",
        help="attempts for failed and DLQ items in this resume (default: 1 + map.retries)",
    )
    _workers_option(p)
    _pace_options(p)
    _executor_option(p)
    _spec_change_options(p)
    _wait_option(p)
    p.add_argument(
        "--json", action="store_true", help="print the plan and final report as JSON on stdout"
    )
    _progress_options(p)


def _status_parser(sub, common) -> None:
    p = _command(
        sub,
        "status",
        "a job's counts and state, or a table of all jobs",
        "One job's counts (succeeded, DLQ, failed, pending, purged), state, lock holder and "
        "reduce step; without JOB_ID, one row per job in the state dir.",
        ["mrpool status", "mrpool status thumbs", "mrpool status thumbs --json | jq .state"],
        _only(2, 4, 5) | {0: "printed"},
        common,
    )
    p.add_argument("job_id", nargs="?", metavar="JOB_ID", help="the job (default: all jobs)")
    p.add_argument("--json", action="store_true", help="one JSON object (all jobs: an array)")


def _results_parser(sub, common) -> None:
    p = _command(
        sub,
        "results",
        "successful results as JSONL, in input order",
        'Prints {"id": ..., "result": ...} per succeeded item, in input order, each id once.',
        [
            "mrpool results thumbs > results.jsonl",
            "mrpool results thumbs --with-item | jq -c '[.item.path, .result]'",
            "mrpool results thumbs --reduce",
        ],
        _only(2, 4, 5) | {0: "printed", 1: "--reduce: the reduce step failed, or has not run yet"},
        common,
    )
    _job_id_argument(p)
    p.add_argument("--reduce", action="store_true", help="print the reduce step's output instead")
    p.add_argument(
        "--with-item",
        action="store_true",
        help='each row carries its item too: {"id": ..., "item": ..., "result": ...}',
    )


def _events_parser(sub, common) -> None:
    p = _command(
        sub,
        "events",
        "the job's event log as JSONL",
        "One JSON object per event (job_created, session_started, item_started, "
        "item_succeeded, item_parked, ...), each with t (epoch seconds).",
        [
            "mrpool events thumbs",
            "mrpool events thumbs --follow | jq -c 'select(.event == \"item_parked\")'",
        ],
        _only(2, 4, 5) | {0: "printed"},
        common,
    )
    _job_id_argument(p)
    p.add_argument(
        "--follow", action="store_true", help="keep printing until the job has no live holder"
    )


def _joblog_parser(sub, common) -> None:
    p = _command(
        sub,
        "joblog",
        "one row per attempt (id, attempt, host, start, duration, exit code, signal, outcome)",
        "One JSONL row per attempt, in the order attempts ended; streams the journal.",
        ["mrpool joblog thumbs", "mrpool joblog thumbs --tsv | column -t"],
        _only(2, 4, 5) | {0: "printed"},
        common,
    )
    _job_id_argument(p)
    p.add_argument(
        "--tsv", action="store_true", help="GNU parallel's --joblog columns, with a header"
    )


def _unlock_parser(sub, common) -> None:
    p = _command(
        sub,
        "unlock",
        "remove the lock files of a holder that is gone (--force: one on another host)",
        "Removes lock / holder.json left by a holder provably dead on this host. Refused "
        "while a live process holds the job.",
        ["mrpool unlock thumbs", "mrpool unlock thumbs --force"],
        _only(2, 4)
        | {
            0: "removed, or there was nothing to remove",
            3: "a live process holds the job, or (without --force) the holder is on another host",
        },
        common,
    )
    _job_id_argument(p)
    p.add_argument(
        "--force",
        action="store_true",
        help="also remove a holder recorded on another host (it cannot be checked from here)",
    )


def _fsck_parser(sub, common) -> None:
    p = _command(
        sub,
        "fsck",
        "check every file of a job; --salvage rebuilds a readable job from what verifies",
        "Checks job.json, items.jsonl, the journal record by record and the derived files; "
        "prints one line per finding.",
        ["mrpool fsck thumbs", "mrpool fsck thumbs || mrpool fsck thumbs --salvage"],
        _only(2, 4)
        | {
            0: "sound (notes, such as a torn tail a crash left, are harmless), or --salvage "
            "made it readable again (what was lost is printed and kept in its event log)",
            3: "--salvage: the job is locked by another live process",
            5: "damaged (with --salvage: not repairable; job.json and items.jsonl have no "
            "second copy)",
        },
        common,
    )
    _job_id_argument(p)
    p.add_argument(
        "--salvage", action="store_true", help="cut the journal at the damage, under the lock"
    )


def _dlq_parser(sub, common) -> None:
    p = sub.add_parser(
        "dlq",
        parents=common,
        help="inspect, retry, purge or export the dead letter queue",
        description="Items whose every attempt failed are parked in the job's dead letter "
        "queue (DLQ) until retried or purged.",
        epilog="examples:\n  mrpool dlq list thumbs\n  mrpool dlq retry thumbs\n\n"
        "'mrpool dlq COMMAND --help' for each command's options and exit status.",
    )
    dsub = p.add_subparsers(
        dest="dlq_command", required=True, parser_class=_Parser, metavar="COMMAND"
    )
    for build in (
        _dlq_list_parser,
        _dlq_show_parser,
        _dlq_stats_parser,
        _dlq_retry_parser,
        _dlq_purge_parser,
        _dlq_export_parser,
    ):
        build(dsub, common)


def _dlq_list_parser(sub, common) -> None:
    d = _command(
        sub,
        "list",
        "DLQ items: id, attempts, last error, signature",
        "A table of the parked items (id, attempts, error signature, last error), in input "
        "order; the count goes to stderr.",
        [
            "mrpool dlq list thumbs",
            "mrpool dlq list thumbs --kind timeout --json | jq -r '.[].id'",
        ],
        _only(2, 4, 5) | {0: "printed"},
        common,
    )
    _job_id_argument(d)
    _dlq_filter_options(d)
    d.add_argument("--json", action="store_true", help="a JSON array instead of a table")


def _dlq_show_parser(sub, common) -> None:
    d = _command(
        sub,
        "show",
        "one DLQ item whole, with its failure history",
        "The item's data and every failed attempt, as indented JSON.",
        ["mrpool dlq show thumbs sku-123"],
        _only(4, 5) | {0: "printed", 2: "ITEM_ID is not in the DLQ, or a bad id"},
        common,
    )
    _job_id_argument(d)
    d.add_argument("item_id", metavar="ITEM_ID", help="the item's id (compared as text)")


def _dlq_stats_parser(sub, common) -> None:
    d = _command(
        sub,
        "stats",
        "DLQ counts by error signature",
        "One line per error signature (failures that differ only in numbers, paths or ids "
        "share one), largest group first, with an example error.",
        ["mrpool dlq stats thumbs", "mrpool dlq stats thumbs --json"],
        _only(2, 4, 5) | {0: "printed"},
        common,
    )
    _job_id_argument(d)
    d.add_argument("--json", action="store_true", help="a JSON array instead of lines")


def _dlq_retry_parser(sub, common) -> None:
    d = _command(
        sub,
        "retry",
        "re-run DLQ items (all, or those named)",
        "Runs DLQ items again under the job's lock, 1 + map.retries attempts each; every "
        "success leaves the DLQ.",
        [
            "mrpool dlq retry thumbs",
            "mrpool dlq retry thumbs sku-123 sku-456 --wait 10",
            "mrpool dlq retry thumbs --signature 3f2a9c01b7de",
        ],
        _SESSION_EXITS | {2: "usage error (a bad option or id, an ITEM_ID not in the DLQ)"},
        common,
    )
    _job_id_argument(d)
    d.add_argument(
        "item_ids", nargs="*", metavar="ITEM_ID", help="the items to retry (default: all)"
    )
    _dlq_filter_options(d)
    _workers_option(d)
    _pace_options(d)
    _executor_option(d)
    _spec_change_options(d)
    _wait_option(d)
    d.add_argument(
        "--json", action="store_true", help="print the plan and final report as JSON on stdout"
    )
    _progress_options(d)


def _dlq_purge_parser(sub, common) -> None:
    d = _command(
        sub,
        "purge",
        "drop DLQ items for good (needs --yes)",
        "Removes DLQ items from the job (all, or those named): they no longer count in its "
        "total, and status reports them as purged.",
        ["mrpool dlq purge thumbs sku-123 --yes", "mrpool dlq purge thumbs --yes"],
        _only(3, 4, 5)
        | {0: "purged", 2: "usage error (no --yes, a bad option or id, an ITEM_ID not in the DLQ)"},
        common,
    )
    _job_id_argument(d)
    d.add_argument(
        "item_ids", nargs="*", metavar="ITEM_ID", help="the items to drop (default: all)"
    )
    d.add_argument("--yes", action="store_true", help="really drop them (required)")
    _wait_option(d)


def _dlq_export_parser(sub, common) -> None:
    d = _command(
        sub,
        "export",
        "DLQ items as JSONL",
        "One 'dlq show' object per line: each item's data and failure history.",
        ["mrpool dlq export thumbs > parked.jsonl", "mrpool dlq export thumbs -o parked.jsonl"],
        _only(4, 5)
        | {0: "exported", 2: "usage error (a bad option or id, -o naming no regular file)"},
        common,
    )
    _job_id_argument(d)
    d.add_argument(
        "-o",
        "--output",
        metavar="FILE",
        help="write into FILE (0600, put in place whole) instead of stdout",
    )


# -- arguments several commands share ----------------------------------------------------
def _dlq_filter_options(d: argparse.ArgumentParser) -> None:
    d.add_argument(
        "--signature",
        metavar="SIG",
        help="only items whose error signature is SIG, or starts with it ('dlq stats' lists them)",
    )
    d.add_argument(
        "--kind",
        metavar="KIND",
        help="only items whose last failure is of this kind (exit, timeout, exception, ...)",
    )


def _job_id_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("job_id", metavar="JOB_ID", help="the job's id (printed by 'mrpool run')")


def _workers_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="worker processes for this session (1 to 1024; default: the job file's workers)",
    )


def _wait_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wait",
        type=_seconds,
        default=0.0,
        metavar="SECONDS",
        help="wait up to this long for the job's lock instead of exiting 3",
    )


def _pace_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        metavar="K",
        help="attempts each worker runs at once (overrides map.concurrency; default 1)",
    )
    p.add_argument(
        "--rate",
        metavar="N/s|N/min|N/h",
        help="at most this many attempt starts across the job (overrides the job file's rate)",
    )


def _spec_change_options(p: argparse.ArgumentParser) -> None:
    """``--job-file`` / ``--set`` (a lasting change of the job's spec) and ``--halt``."""
    p.add_argument(
        "--job-file",
        metavar="FILE",
        help="take the job's map, reduce, timeout, retries, backoff, workers, dlq, executor "
        "and halt from this job file, for this and later sessions (input and ids stay)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        dest="overrides",
        help="change one job-file key for this and later sessions, e.g. --set map.timeout=60 "
        "(repeatable; applied after --job-file)",
    )
    _halt_option(p, "this session only; --set halt.fail=N keeps it")


def _halt_option(p: argparse.ArgumentParser, scope: str) -> None:
    p.add_argument(
        "--halt",
        metavar="fail=N|fail=N%",
        help=f"stop once N items (or N%% of those finished) were parked in the DLQ ({scope})",
    )


def _rerun_parser(sub, common) -> None:
    p = _command(
        sub,
        "rerun",
        "run succeeded items again on purpose; their new result replaces the old",
        "Makes the named succeeded items pending (an items_rerun event) and runs them under "
        "the job's lock: from then on results shows only their new result. --job-file / "
        "--set change the job's spec first, as for resume.",
        [
            "mrpool rerun thumbs sku-123 sku-456",
            "mrpool rerun thumbs sku-123 --set 'map.command=python3 thumb.py --hq {item.path}'",
        ],
        _SESSION_EXITS
        | {2: "usage error (a bad option, an ITEM_ID the job lacks or that has not succeeded)"},
        common,
    )
    _job_id_argument(p)
    p.add_argument(
        "item_ids", nargs="+", metavar="ITEM_ID", help="the succeeded items to run again"
    )
    _workers_option(p)
    _executor_option(p)
    _spec_change_options(p)
    _wait_option(p)
    _progress_options(p)
    p.add_argument(
        "--json", action="store_true", help="print the plan and final report as JSON on stdout"
    )


def _rm_parser(sub, common) -> None:
    p = _command(
        sub,
        "rm",
        "delete a job's state for good (needs --yes; not while the job runs)",
        "Deletes the job's directory: its items, journal, results and DLQ. Under the job's "
        "lock, one rename takes it out of jobs/ first, so a crash never leaves a job that "
        "looks valid.",
        ["mrpool rm thumbs --yes"],
        _only(3, 4, 5) | {0: "removed", 2: "usage error (no --yes, a bad id)"},
        common,
    )
    _job_id_argument(p)
    p.add_argument("--yes", action="store_true", help="really delete it (required)")
    _wait_option(p)


def _progress_options(p: argparse.ArgumentParser) -> None:
    """``--progress`` / ``--quiet``; neither: a live line on a terminal, else a heartbeat
    line every $MRPOOL_PROGRESS_SECONDS (mrpool/progress.py)."""
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--progress",
        action="store_const",
        const="always",
        dest="progress",
        default="auto",
        help="draw the live progress line even when stderr is not a terminal (default: "
        f"the line on a terminal, else one status line every ${HEARTBEAT_ENV} seconds, "
        "default 10)",
    )
    group.add_argument(
        "--quiet",
        action="store_const",
        const="off",
        dest="progress",
        help="no progress line, heartbeat or plan line; the final summary and errors still print",
    )


def _executor_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--executor",
        metavar="local|dask|dask://HOST:PORT",
        help="where attempts run in this session (overrides the job file's executor)",
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError("expected seconds >= 0")
    return value


def main(argv: list[str] | None = None) -> int:
    previous = signal.signal(signal.SIGTERM, _terminate)  # SIGTERM stops like Ctrl-C does
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            args = _parse(argv)
            return _dispatch(args)
    except MrpoolError as e:
        _say(f"mrpool: {e}")
        return e.exit_code
    except KeyboardInterrupt:
        _say("mrpool: interrupted")
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # stdout's reader went away (results | head): not an error
        _silence(sys.stdout)
        return 0
    except OSError as e:  # an unexpected system error: still one line, no traceback
        _say(f"mrpool: {e}")
        return EXIT_FAILURES
    finally:
        signal.signal(signal.SIGTERM, previous)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments; an option no command knows is refused pointing at the help of the
    command it was given to (argparse itself names only ``mrpool --help``)."""
    args, unknown = _build_parser().parse_known_args(argv)
    if unknown:
        words = ["mrpool", args.command, getattr(args, "dlq_command", None)]
        prog = " ".join(w for w in words if w)
        raise UsageError(f"unrecognized arguments: {' '.join(unknown)} (see '{prog} --help')")
    return args


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A library warning (a damaged derived file being rebuilt) as one line, no source."""
    _say(f"mrpool: {message}")


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _dispatch(args: argparse.Namespace) -> int:
    from . import api

    state_dir = getattr(args, "state_dir", None)
    if args.command == "run":
        report = api.run_job(
            args.jobfile,
            job_id=args.job_id,
            workers=args.workers,
            concurrency=args.concurrency,
            rate=args.rate,
            state_dir=state_dir,
            on_created=_print_job_id,
            progress=args.progress,
            executor=args.executor,
            halt=args.halt,
        )
        return _finish(report, args.json, state_dir)
    if args.command == "resume":
        report = api.resume_job(
            args.job_id,
            state_dir=state_dir,
            workers=args.workers,
            concurrency=args.concurrency,
            rate=args.rate,
            no_dlq=args.no_dlq,
            reset_failed=args.reset_failed,
            max_additional_retries=args.max_additional_retries,
            wait=args.wait,
            progress=args.progress,
            on_plan=_plan_printer(args),
            executor=args.executor,
            **_spec_changes(args),
        )
        return _finish(report, args.json, state_dir)
    if args.command == "status":
        return _status(args, state_dir)
    if args.command == "results":
        if args.reduce:
            output = api.reduce_output(args.job_id, state_dir=state_dir)
            if not output.get("ok"):
                _say(f"mrpool: the reduce step failed: {output.get('error')}")
                return EXIT_FAILURES
            _out(orjson.dumps(output["output"]) + b"\n")
            return 0
        from .gc_policy import fewer_collections

        with fewer_collections():  # decoded rows by the thousand, no cycles
            _write_blocks(
                api.iter_result_blocks(args.job_id, state_dir=state_dir, with_item=args.with_item)
            )
        return 0
    if args.command == "events":
        _write_lines(
            api.iter_event_lines(args.job_id, state_dir=state_dir, follow=args.follow),
            live=args.follow,
        )
        return 0
    if args.command == "joblog":
        return _joblog(args, state_dir)
    if args.command == "unlock":
        return _unlock(args, state_dir)
    if args.command == "fsck":
        return _fsck(args, state_dir)
    if args.command == "rerun":
        return _rerun(args, state_dir)
    if args.command == "rm":
        return _rm(args, state_dir)
    return _dlq(args, state_dir)


def _spec_changes(args: argparse.Namespace) -> dict[str, Any]:
    """The ``api`` keywords of ``--job-file``, ``--set`` and ``--halt``."""
    return {
        "job_file": args.job_file,
        "overrides": args.overrides,
        "halt": args.halt,
        "on_spec_change": _print_spec_change,
    }


def _print_spec_change(changes: dict[str, list[Any]]) -> None:
    if not changes:
        _say("spec: nothing changed")
    for key, (old, new) in changes.items():
        _say(f"spec changed: {key}: {_shown(old)} -> {_shown(new)}")


def _shown(value: Any) -> str:
    return "(unset)" if value is None else orjson.dumps(value).decode()


def _rerun(args: argparse.Namespace, state_dir: str | None) -> int:
    from . import api

    report = api.rerun_items(
        args.job_id,
        args.item_ids,
        state_dir=state_dir,
        workers=args.workers,
        wait=args.wait,
        progress=args.progress,
        on_plan=_plan_printer(args),
        executor=args.executor,
        **_spec_changes(args),
    )
    return _finish(report, args.json, state_dir)


def _rm(args: argparse.Namespace, state_dir: str | None) -> int:
    from . import api

    if not args.yes:
        again = _next_step("rm", args.job_id, state_dir) + " --yes"
        raise UsageError(
            f"rm deletes job {args.job_id} and all its results for good; confirm with: {again}"
        )
    api.remove_job(args.job_id, state_dir=state_dir, wait=args.wait)
    _say(f"removed job {args.job_id}")
    return 0


def _joblog(args: argparse.Namespace, state_dir: str | None) -> int:
    from . import api
    from .joblog import TSV_HEADER, tsv_line

    rows = api.iter_joblog(args.job_id, state_dir=state_dir)
    if args.tsv:
        _write_lines(itertools.chain((TSV_HEADER,), (tsv_line(row) for row in rows)))
    else:
        _write_lines(orjson.dumps(row) + b"\n" for row in rows)
    return 0


def _unlock(args: argparse.Namespace, state_dir: str | None) -> int:
    from . import api

    holder = api.unlock_job(
        args.job_id, state_dir=state_dir, force=args.force, on_remove=_say_holder
    )
    if holder is None:
        _say(f"job {args.job_id} has no lock files; nothing to do")
    else:
        _say(f"removed the lock files of job {args.job_id}")
    return 0


def _say_holder(holder: dict[str, Any]) -> None:
    from .lock import describe_holder

    _say(f"holder record: {describe_holder(holder) if holder else 'none (a lock file alone)'}")


def _fsck(args: argparse.Namespace, state_dir: str | None) -> int:
    """One line per finding on stdout, then a verdict; exit 0 sound, 5 damaged."""
    from .fsck import fsck

    report = fsck(args.job_id, salvage=args.salvage, state_dir=state_dir)
    for finding in report.findings:
        _out((_printable(finding.line()) + "\n").encode())
    for repair in report.repaired:
        _out(f"repaired: {repair}\n".encode())
    if report.unrepairable:
        _say(f"mrpool: {args.job_id}: cannot salvage: job.json or items.jsonl is damaged")
    elif report.damaged:
        salvage = _next_step("fsck", args.job_id, state_dir) + " --salvage"
        _say(f"mrpool: {args.job_id} is damaged; '{salvage}' cuts it")
    else:
        _say(f"{args.job_id}: {'salvaged: readable again' if report.repaired else 'sound'}")
    return report.exit_code


def _printable(text: str) -> str:
    """Ids in a finding can hold control characters: never let them forge output lines."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _dlq(args: argparse.Namespace, state_dir: str | None) -> int:
    from . import api

    cmd = args.dlq_command
    if cmd == "retry":
        report = api.retry_dlq(
            args.job_id,
            args.item_ids or None,
            signature=args.signature,
            kind=args.kind,
            state_dir=state_dir,
            workers=args.workers,
            concurrency=args.concurrency,
            rate=args.rate,
            wait=args.wait,
            progress=args.progress,
            on_plan=_plan_printer(args),
            executor=args.executor,
            **_spec_changes(args),
        )
        return _finish(report, args.json, state_dir)
    if cmd == "purge":
        if not args.yes:
            raise UsageError("dlq purge drops items for good; add --yes to confirm")
        count = api.purge_dlq(
            args.job_id, args.item_ids or None, state_dir=state_dir, wait=args.wait
        )
        _say(f"purged {count} item(s) from the DLQ of {args.job_id}")
        _say_reduce_due(api.job_status(args.job_id, state_dir=state_dir), state_dir)
        return 0
    dlq = api.open_dlq(args.job_id, state_dir=state_dir)
    if cmd == "list":
        listing = dlq.listing(args.signature, args.kind)
        if args.json:
            _out(orjson.dumps(listing.briefs()) + b"\n")
        else:
            _column_table(
                ["ID", "ATTEMPTS", "SIGNATURE", "ERROR"],
                [list(map(str, listing.ids)), list(map(str, listing.attempts)), listing.signatures,
                 listing.errors],
            )  # fmt: skip
            _say(f"{len(listing)} item(s) in the DLQ of {args.job_id}")
        return 0
    if cmd == "show":
        _out(orjson.dumps(dlq.get(args.item_id).full(), option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    if cmd == "stats":
        groups = dlq.stats()
        if args.json:
            _out(orjson.dumps(groups) + b"\n")
        else:
            for g in groups:
                _out(
                    _human_line(
                        f"{g['count']} item(s): {g['kind']}: {g['example']}  [signature {g['signature']}]"
                    )
                )
        return 0
    if cmd == "export":
        if args.output:
            count = api.export_dlq(args.job_id, args.output, state_dir=state_dir)
            _say(f"exported {count} item(s) from the DLQ of {args.job_id} to {args.output}")
        else:
            _write_lines(dlq.export())
        return 0
    raise UsageError(f"unknown dlq command {cmd!r}")


def _status(args: argparse.Namespace, state_dir: str | None) -> int:
    from . import api

    if args.job_id is not None:  # an empty id is a bad id, not "all jobs"
        status = api.job_status(args.job_id, state_dir=state_dir)
        if args.json:
            _out(orjson.dumps(status) + b"\n")
            return 0
        for key in (
            "job_id",
            "name",
            "state",
            "total",
            "succeeded",
            "dlq",
            "failed",
            "pending",
            "purged",
            "duplicates_in_input",
        ):
            _out(_human_line(f"{key:20} {status[key]}"))
        _out(_human_line(f"{'reduce':20} {_reduce_text(status, state_dir)}"))
        lock = status["lock"]
        _out(_human_line(f"{'lock':20} {'-' if not lock else _holder_text(lock)}"))
        if status.get("halted"):
            _out(_human_line(f"{'halted':20} {status['halted']['reason']}"))
        return 0
    rows = api.list_jobs(state_dir=state_dir)
    if args.json:
        _out(orjson.dumps(rows) + b"\n")
        return 0
    _table(
        ["JOB ID", "STATE", "TOTAL", "OK", "DLQ", "FAILED", "PENDING", "CREATED"],
        [
            [
                r["job_id"],
                r["state"],
                r.get("total", ""),
                r.get("succeeded", ""),
                r.get("dlq", ""),
                r.get("failed", ""),
                r.get("pending", ""),
                _when(r.get("created_at")),
            ]
            for r in rows
        ],
    )
    return 0


# -- output helpers ----------------------------------------------------------------
def _print_job_id(job_id: str) -> None:
    """The job id on stdout as soon as the job exists. A reader that went away
    (``mrpool run job.yaml | head -c0``) must not stop the run it names: stdout is
    silenced and the job runs on, ending with its own exit code."""
    _out_or_silence(job_id.encode() + b"\n")


def _plan_printer(args: argparse.Namespace):
    return None if args.progress == "off" else _print_plan


def _print_plan(plan) -> None:
    _say(f"plan: {plan.summary()}")


def _finish(report, as_json: bool, state_dir: str | None = None) -> int:
    c = report.counts
    if as_json:
        _out_or_silence(
            orjson.dumps(
                {
                    "job_id": report.job_id,
                    "state": report.state,
                    "exit_code": report.exit_code,
                    **c,
                    "plan": report.plan,
                    "message": report.message,
                    "reduce": report.reduce,
                }
            )
            + b"\n"
        )
    job = report.job_id
    if report.message:
        _say(f"mrpool: {report.message}")
    _say(
        f"job {job}: {report.state} - {c['succeeded']} succeeded, {c['dlq']} in the DLQ, {c['failed']} failed, "
        f"{c['pending']} pending, {c['total']} total"
    )
    if report.state == "interrupted" or c["pending"] or c["failed"]:
        _say(f"continue with: {_next_step('resume', job, state_dir)}")
    elif c["dlq"]:
        _say(
            f"inspect with: {_next_step('dlq list', job, state_dir)}  |  "
            f"retry with: {_next_step('dlq retry', job, state_dir)}"
        )
    elif report.reduce is not None and not report.reduce.get("ok"):
        _say(f"run the reduce step again with: {_next_step('resume', job, state_dir)}")
    else:  # every item succeeded
        if report.reduce is not None:
            _say(f"reduce: ran; its output: {_next_step('results --reduce', job, state_dir)}")
        _say(f"results: {_next_step('results', job, state_dir)}")
    return report.exit_code


def _reduce_text(status: dict[str, Any], state_dir: str | None) -> str:
    """Where a job's reduce step stands (``status`` is ``api.job_status``'s object)."""
    job, reduce = status["job_id"], status["reduce"]
    if not status["has_reduce"]:
        return "- (the job has no reduce step)"
    if reduce and reduce["ok"]:
        return f"ran; its output: {_next_step('results --reduce', job, state_dir)}"
    if status["state"] == "completed":  # every item has succeeded
        done = f"failed: {reduce['error']}" if reduce else "not run yet"
        return f"{done}; run it with: {_next_step('resume', job, state_dir)}"
    return "not run yet: it runs once every item has succeeded"


def _say_reduce_due(status: dict[str, Any], state_dir: str | None) -> None:
    """After a purge: every item left has succeeded and the reduce has not run. Purge
    runs no user code; ``resume`` runs the reduce step (and nothing else)."""
    reduce = status["reduce"]
    if status["has_reduce"] and status["state"] == "completed" and not (reduce and reduce["ok"]):
        _say(
            "every item has succeeded; run the reduce step with: "
            + _next_step("resume", status["job_id"], state_dir)
        )


def _next_step(command: str, job: str, state_dir: str | None) -> str:
    """A command line to paste as is: with the ``--state-dir`` this one was given (a
    state dir from ``$MRPOOL_HOME`` is found again by the same environment). Options in
    ``command`` go after the job id: ``results --reduce`` -> ``mrpool results JOB --reduce``."""
    words = command.split()
    options = [w for w in words if w.startswith("-")]
    words = ["mrpool", *(w for w in words if not w.startswith("-")), job, *options]
    if state_dir:
        words += ["--state-dir", state_dir]
    return shlex.join(words)


def _holder_text(lock: dict[str, Any]) -> str:
    return f"pid {lock['pid']} on {lock['hostname']} since {_when(lock['acquired_at'])} ({lock.get('command')})"


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).isoformat(sep=" ", timespec="seconds") if ts else "-"


def _table(header: list[str], rows: list[list[Any]]) -> None:
    """Aligned columns from rows of cells (``_column_table`` does the work); control
    characters in a cell are escaped (an id or error holding a newline or an ANSI escape
    must not forge a row or repaint the terminal)."""
    columns = [list(map(str, col)) for col in zip(*rows)] if rows else [[] for _ in header]
    _column_table(header, columns)


def _column_table(header: list[str], columns: list[list[str]]) -> None:
    """``_table`` from columns of text: each column checked and measured at once, rows
    formatted by one format string (a DLQ of 100k items lists in ~0.1 s)."""
    shown = [[h, *(col if "".join(col).isprintable() else map(printable, col))]
             for h, col in zip(header, columns)]  # fmt: skip
    del columns
    widths = [max(map(len, col)) for col in shown[:-1]]
    row = "".join(f"%-{w}s  " for w in widths) + "%s"
    out = sys.stdout.buffer
    for at in range(0, len(shown[0]), 8192):  # a block of rows a write
        rows = zip(*(col[at : at + 8192] for col in shown))
        out.write(("\n".join(map(str.rstrip, map(row.__mod__, rows))) + "\n").encode())
    out.flush()


def _out(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def _out_or_silence(data: bytes) -> None:
    """``_out`` for a command that runs items: its stdout is a report, not the product,
    so a closed pipe silences it instead of ending the command."""
    try:
        _out(data)
    except BrokenPipeError:
        _silence(sys.stdout)


def _silence(stream) -> None:
    """Point a stream whose reader went away at /dev/null: later writes, and the flush
    at exit, succeed quietly instead of raising EPIPE again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, stream.fileno())
    finally:
        os.close(devnull)


def _write_lines(lines, *, live: bool = False) -> None:
    """Print JSONL lines: in 64 KiB blocks, one write each (with -u or PYTHONUNBUFFERED,
    a write per line would be a system call per line), or, ``live`` (a --follow tail),
    each line the moment it comes, also into a pipe."""
    out = sys.stdout.buffer
    if live:
        for line in lines:
            out.write(line)
            out.flush()
        return
    block: list[bytes] = []
    size = 0
    for line in lines:
        if len(line) >= 1 << 16:  # a big row goes out as it is: no copy into a block
            out.write(b"".join(block))
            block.clear()
            size = 0
            out.write(line)
            continue
        block.append(line)
        size += len(line)
        if size >= 1 << 16:
            out.write(b"".join(block))
            block.clear()
            size = 0
    out.write(b"".join(block))
    out.flush()


def _write_blocks(blocks) -> None:
    """Print pieces of JSONL as they come, one write each (they are large already)."""
    out = sys.stdout.buffer
    for block in blocks:
        out.write(block)
    out.flush()


def _say(message: str) -> None:
    """One line for a human on stderr, control characters escaped. A stderr whose reader
    went away (``2>&1 | head -1``) is silenced: a message is never worth an exit code or
    an unfinished command."""
    try:
        print(printable(message), file=sys.stderr, flush=True)
    except BrokenPipeError:
        _silence(sys.stderr)


def _human_line(text: str) -> bytes:
    """A line for a human on stdout, control characters escaped."""
    return printable(text).encode() + b"\n"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
