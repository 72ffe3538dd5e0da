#!/usr/bin/env python3
"""Bad-input fuzzing, long run: tests/test_fuzz_input.py with many more examples.

    python scripts/fuzz_inputs.py [--examples 5000] [--seed N] [-- extra pytest args]
    python scripts/fuzz_inputs.py --damage     # every byte flip and cut of real state dirs

``--examples`` is the total number of generated cases over the in-process fuzz
tests (``MRPOOL_FUZZ_EXAMPLES``, split by weight; the default suite runs 1200).
Every executed case appends its test's name to a counter file
(``MRPOOL_FUZZ_COUNT_FILE``), so the figures printed at the end are the cases
that really ran -- hypothesis may stop early when a strategy's space is
exhausted -- independent of hypothesis' own statistics.

The cases include YAML alias bombs (nested anchors and merge keys, up to 12**12 values,
under every field: each must be refused within seconds) and job files or inputs that are
not regular files (FIFOs, /dev/zero-like devices, sockets, directories, symlinks to them:
each must be refused without blocking or reading).

Each case must be refused with exit 2 and one line naming the file and the line
or field, with no traceback and no job state (or, when the test's oracle knows
the input is valid, accepted). Exit status: pytest's (0 = every case held).

``--damage`` runs the exhaustive damage fuzzer instead (tests/test_damage.py,
``test_every_flip_and_cut_is_named_or_harmless``): every single-byte flip and
every truncation point of every file of two small real jobs, each followed by
every read command and ``fsck``.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=5000, help="total generated cases")
    parser.add_argument("--seed", help="hypothesis seed (default: random)")
    parser.add_argument(
        "--damage", action="store_true", help="every flip and cut of state files instead"
    )
    parser.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = parser.parse_args()
    if args.damage:
        return _damage(args.pytest_args)

    with tempfile.TemporaryDirectory(prefix="mrpool-fuzz-") as tmp:
        counter = Path(tmp) / "cases.txt"
        counter.touch()
        env = dict(os.environ)
        env.update(
            MRPOOL_FUZZ_EXAMPLES=str(args.examples),
            MRPOOL_FUZZ_COUNT_FILE=str(counter),
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
        )
        command = [
            sys.executable,
            "-m",
            "pytest",
            str(REPO / "tests" / "test_fuzz_input.py"),
            "-q",
            "-p",
            "no:cacheprovider",
            "-W",
            "ignore::DeprecationWarning",
            *(["--hypothesis-seed", args.seed] if args.seed else []),
            *args.pytest_args,
        ]
        started = time.monotonic()
        code = subprocess.call(command, cwd=REPO, env=env)
        elapsed = time.monotonic() - started
        cases = collections.Counter(counter.read_text().split())

    print(f"\nfuzz cases run, by test ({elapsed:.1f} s):")
    for name, count in sorted(cases.items()):
        print(f"  {name:14} {count:7}")
    print(f"  {'total':14} {sum(cases.values()):7}")
    print("result:", "all cases held" if code == 0 else f"FAILED (pytest exit {code})")
    return code


def _damage(pytest_args: list[str]) -> int:
    env = dict(os.environ, MRPOOL_STRESS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    test = "tests/test_damage.py::test_every_flip_and_cut_is_named_or_harmless"
    command = [sys.executable, "-m", "pytest", str(REPO / test), "-q", *pytest_args]
    started = time.monotonic()
    code = subprocess.call(command, cwd=REPO, env=env)
    print(f"damage fuzz: {time.monotonic() - started:.1f} s,", "held" if code == 0 else "FAILED")
    return code


if __name__ == "__main__":
    sys.exit(main())
