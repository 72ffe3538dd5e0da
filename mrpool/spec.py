"""The job file: parse, validate and normalise it into a ``JobSpec``.

Every error names the job file and the field (or the YAML line) so the user can
fix it at once; nothing here touches the state directory. The validated spec is
stored in the job directory (``JobSpec.to_dict``) so ``resume`` runs exactly the
job that ``run`` started, even if the job file has changed since.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import math
import os
import re
import shlex
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

from .errors import JobSpecError, UsageError
from .fsutil import NotRegularFileError, open_regular_file
from .rate import parse_rate, rate_text

__all__ = [
    "MapSpec",
    "ReduceSpec",
    "DlqSpec",
    "ExecutorSpec",
    "JobSpec",
    "load_job_file",
    "spec_from_dict",
    "import_callable",
    "resolve_callable",
    "provide_callable",
    "IN_PROCESS_PREFIX",
    "HaltSpec",
    "FROZEN_KEYS",
    "changed_spec",
    "with_stored_changes",
    "halt_from_option",
    "check_commands",
    "check_placeholders",
]

MAX_WORKERS = 1024  # one process each: beyond this a typo, not a plan
MAX_CONCURRENCY = 1024  # attempts in flight per worker (threads, tasks or child processes)
_TOP_KEYS = {
    "name",
    "input",
    "json_path",
    "id_field",
    "workers",
    "map",
    "reduce",
    "dlq",
    "executor",
    "rate",
    "halt",
}
_HALT_KEYS = {"fail"}
_MAP_KEYS = {"command", "callable", "timeout", "retries", "backoff", "concurrency"}
_REDUCE_KEYS = {"command", "callable", "timeout"}
_DLQ_KEYS = {"max_items", "on_full"}
_EXECUTOR_KEYS = {"kind", "address"}
_EXECUTOR_KINDS = ("local", "dask")
_ADDRESS_RE = re.compile(r"^(tcp|tls)://[^\s/]+:\d+$")
_CALLABLE_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_MAX_TIMEOUT = 2_147_483.0  # (2**31 - 1) ms: a longer wait raises OverflowError in a worker
_PLACEHOLDER_RE = re.compile(r"\{item(?:\.([^{}]+))?\}")


@dataclass(frozen=True)
class MapSpec:
    command: list[str] | None = None
    callable: str | None = None
    timeout: float | None = None
    retries: int = 0
    backoff: float = 0.0
    concurrency: int = 1  # attempts one worker runs at once (see worker.py)


@dataclass(frozen=True)
class ReduceSpec:
    command: list[str] | None = None
    callable: str | None = None
    timeout: float | None = None


@dataclass(frozen=True)
class DlqSpec:
    max_items: int | None = None
    on_full: str = "stop"  # "stop": end the run with an error; "keep_failed": leave the item failed


@dataclass(frozen=True)
class ExecutorSpec:
    """Where attempts run: ``local`` worker processes, or ``dask`` (a scheduler at
    ``address``, or with no address a local cluster of ``workers`` processes)."""

    kind: str = "local"
    address: str | None = None


@dataclass(frozen=True)
class HaltSpec:
    """``halt: {fail: N}`` or ``{fail: "X%"}``: stop a session once N items (or X % of the
    items it finished, once 3 have) were parked in the DLQ by it. ``fail`` is kept as
    written: a whole number, or a string ending in ``%``."""

    fail: int | str

    @property
    def percent(self) -> float | None:
        return float(self.fail[:-1]) if isinstance(self.fail, str) else None

    def reached(self, parked: int, finished: int) -> bool:
        """Whether ``parked`` items parked of ``finished`` finished (this session) halts it."""
        percent = self.percent
        if percent is None:
            return parked >= self.fail  # type: ignore[operator]
        return parked > 0 and finished >= HALT_MIN_FINISHED and parked * 100 >= percent * finished

    def text(self) -> str:
        return f"fail={self.fail}"


HALT_MIN_FINISHED = 3  # a percentage is judged once this many items finished (GNU parallel's 3)


@dataclass(frozen=True)
class JobSpec:
    name: str
    input: str  # absolute path
    base_dir: str  # the job file's directory: cwd of commands, sys.path entry for callables
    map: MapSpec
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    json_path: str | None = None
    id_field: str | None = None
    reduce: ReduceSpec | None = None
    dlq: DlqSpec = field(default_factory=DlqSpec)
    executor: ExecutorSpec = field(default_factory=ExecutorSpec)
    rate: float | None = None  # attempt starts per second across the job (rate.py); None: no cap
    source: str = ""  # the job file it came from, for messages
    halt: HaltSpec | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_job_file(path: str | os.PathLike) -> JobSpec:
    """Read and validate a YAML or JSON job file."""
    path = Path(path)
    return spec_from_dict(
        _read_document(path),
        base_dir=path.resolve().parent,
        source=str(path),
        default_name=path.stem,
    )


def _read_document(path: Path) -> Any:
    """The parsed content of the job file at ``path``, or a ``JobSpecError`` naming it."""
    try:
        with open_regular_file(path) as handle:
            text = handle.read()
    except FileNotFoundError:
        raise JobSpecError(f"{path}: no such job file") from None
    except NotRegularFileError as e:
        raise JobSpecError(f"{path}: the job file is {e.kind}, not a regular file") from None
    except OSError as e:
        raise JobSpecError(f"{path}: cannot read job file: {e.strerror}") from None
    return _parse_document(path, text)


def _parse_document(path: Path, text: bytes) -> Any:
    if path.suffix == ".json":
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError as e:
            raise JobSpecError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from None
    import yaml

    try:
        return _load_yaml(text)
    except _AliasBomb as e:
        raise JobSpecError(f"{path}:{e.line}: invalid YAML: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(e.problem or e.context or "invalid YAML").split())
        raise JobSpecError(f"{path}{line}: invalid YAML: {problem}") from None
    except yaml.reader.ReaderError as e:  # bad bytes: name the line, not a byte offset
        if e.encoding == "unicode":  # a character index into the decoded text
            head = text.decode("utf-8", "replace")[: e.position].encode()
        else:  # a byte offset
            head = text[: e.position]
        line = head.count(b"\n") + 1
        raise JobSpecError(f"{path}:{line}: invalid YAML: {str(e).splitlines()[0]}") from None
    except yaml.YAMLError as e:
        raise JobSpecError(f"{path}: invalid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise JobSpecError(f"{path}: invalid YAML: nested too deeply") from None
    except UnicodeDecodeError:
        raise JobSpecError(f"{path}: job file is not valid UTF-8") from None


# A job file is a few dozen values, four levels deep; these limits are far past any real
# one and keep a hostile document (an alias bomb, 10**9 values from 100 bytes of YAML, or
# a cycle given through the API) from hanging validation.
MAX_VALUES = 100_000  # values in the document, every YAML alias counted as a copy
MAX_DEPTH = 64


class _AliasBomb(Exception):
    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.line = line


def _load_yaml(text: bytes) -> Any:
    """``yaml.safe_load``, but aliases are weighed before anything is built.

    PyYAML composes a node graph in which an alias is the node it names, shared;
    building Python values from it expands merge keys (``<<: [*a, *a]``) into
    copies, and every later walk over the values meets each alias in full. So
    the graph's expanded size is counted first (each shared node once, memoised),
    and a document past ``MAX_VALUES`` is refused before it is built.
    """
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: Any, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """The number of values ``node`` stands for with every alias expanded."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise _AliasBomb("an alias names a value that contains it", node.start_mark.line + 1)
    open_nodes.add(key)
    children = node.value if isinstance(node.value, list) else ()
    total = 1
    for child in children:
        for part in child if isinstance(child, tuple) else (child,):  # mapping: (key, value)
            total += _expanded_size(part, sizes, open_nodes)
            if total > MAX_VALUES:
                raise _AliasBomb(
                    f"this value's aliases expand to more than {MAX_VALUES} values (an alias bomb?)",
                    node.start_mark.line + 1,
                )
    open_nodes.discard(key)
    sizes[key] = total
    return total


def spec_from_dict(
    data: Any, base_dir: str | os.PathLike, source: str = "<job>", default_name: str = "job"
) -> JobSpec:
    """Validate a job description (the job file's content) and resolve its paths."""
    where = _Where(source)
    if not isinstance(data, dict):
        raise where.error("", "the job file must be a mapping of keys to values")
    where.unknown_keys("", data, _TOP_KEYS)
    _check_values(where, data)
    base = Path(base_dir).resolve()
    name = data.get("name", default_name)
    if not isinstance(name, str) or not name.strip():
        raise where.error("name", "must be a non-empty string")
    if "input" not in data:
        raise where.error("input", "is required")
    inp = data["input"]
    if not isinstance(inp, str) or not inp:
        raise where.error("input", "must be a path (string)")
    if any(c < " " or "\x7f" <= c <= "\x9f" or c in "\u2028\u2029" for c in inp):
        raise where.error("input", f"must not contain control characters, got {inp!r}")
    input_path = (base / inp).resolve()
    if input_path.suffix not in (".jsonl", ".json"):
        link = "" if (base / inp).suffix == input_path.suffix else f" (a link to {input_path})"
        raise where.error("input", f"must be a .jsonl or .json file, got {inp!r}{link}")
    json_path = data.get("json_path")
    if json_path is not None:
        if not isinstance(json_path, str) or not json_path:
            raise where.error("json_path", 'must be a JSONPath string such as "$.items[*]"')
        if input_path.suffix != ".json":
            raise where.error("json_path", "applies only to a .json input")
        _check_json_path(where, json_path)
    id_field = data.get("id_field")
    if id_field is not None and (not isinstance(id_field, str) or not id_field):
        raise where.error("id_field", "must be a non-empty string (the key holding each item's id)")
    workers = data.get("workers", os.cpu_count() or 1)
    if not _is_int(workers) or not 1 <= workers <= MAX_WORKERS:
        raise where.error("workers", f"must be a whole number from 1 to {MAX_WORKERS}")
    if "map" not in data:
        raise where.error("map", "is required")
    map_spec = _map_spec(where, data["map"])
    reduce_spec = None if data.get("reduce") is None else _reduce_spec(where, data["reduce"])
    dlq_spec = _dlq_spec(where, data.get("dlq"))
    executor_spec = _executor_spec(where, data.get("executor"))
    rate = None
    if data.get("rate") is not None:
        try:
            rate = parse_rate(data["rate"])
        except ValueError as e:
            raise where.error("rate", str(e)) from None
    halt_spec = _halt_spec(where, data.get("halt"))
    return JobSpec(
        name=name.strip(),
        input=str(input_path),
        base_dir=str(base),
        map=map_spec,
        workers=workers,
        json_path=json_path,
        id_field=id_field,
        reduce=reduce_spec,
        dlq=dlq_spec,
        executor=executor_spec,
        rate=rate,
        source=str(source),
        halt=halt_spec,
    )


def spec_from_stored(data: dict[str, Any]) -> JobSpec:
    """Rebuild the spec saved in a job directory (already validated once)."""
    reduce = data.get("reduce")
    return JobSpec(
        name=data["name"],
        input=data["input"],
        base_dir=data["base_dir"],
        map=MapSpec(**data["map"]),
        workers=data["workers"],
        json_path=data.get("json_path"),
        id_field=data.get("id_field"),
        reduce=ReduceSpec(**reduce) if reduce else None,
        dlq=DlqSpec(**data.get("dlq", {})),
        executor=ExecutorSpec(**data.get("executor", {})),
        rate=data.get("rate"),
        source=data.get("source", ""),
        halt=HaltSpec(**data["halt"]) if data.get("halt") else None,
    )


def import_callable(path: str, base_dir: str) -> Callable[..., Any]:
    """Import ``pkg.module:function`` with ``base_dir`` on ``sys.path``.

    Raises ``ImportError``/``AttributeError``/``TypeError`` with a readable message;
    callers turn them into a ``JobSpecError`` naming the field.
    """
    module_name, _, attr_path = path.partition(":")
    if base_dir not in sys.path:
        sys.path.insert(0, base_dir)
    module = _running_script(module_name) or importlib.import_module(module_name)
    target: Any = module
    for part in attr_path.split("."):
        target = getattr(target, part)
    if not callable(target):
        raise TypeError(f"{path} is not callable")
    return target


def _running_script(module_name: str) -> Any:
    """The ``__main__`` module when it *is* ``module_name``: the script that started the
    job names its own function (``script:fn``). Importing ``script`` would run the
    script's top-level code a second time -- a script without an ``if __name__ ==
    "__main__"`` guard would start its job again from inside the check."""
    main = sys.modules.get("__main__")
    if main is None or module_name in sys.modules:
        return None
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == module_name:  # python -m module_name
        return main
    script = getattr(main, "__file__", None)
    if spec is not None or not script:
        return None
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        return None
    origin = found.origin if found is not None else None
    same = origin and os.path.realpath(origin) == os.path.realpath(script)
    return main if same else None


# A function that only exists in one Python process (a lambda, a notebook cell's or a
# script's ``__main__`` function, a ``functools.partial``) is stored under a name with this
# prefix: no other process can import it, so only that process (and the workers it forks)
# can run the job's map -- see ``provide_callable`` and mrpool/pymap.py.
IN_PROCESS_PREFIX = "in-process:"
_PROVIDED: dict[str, Callable[..., Any]] = {}


def provide_callable(name: str, function: Callable[..., Any]) -> None:
    """Make ``name`` resolve to ``function`` here and in every process forked from here on
    (``mrpool.map``'s session process does this, so its forked workers need no import)."""
    _PROVIDED[name] = function


def resolve_callable(path: str, base_dir: str) -> Callable[..., Any]:
    """The function provided under ``path`` in this process, else ``import_callable``."""
    provided = _PROVIDED.get(path)
    return provided if provided is not None else import_callable(path, base_dir)


def check_callables(spec: JobSpec) -> None:
    """Import every callable the job names, so a typo fails before anything runs."""
    for field_name, dotted in (
        ("map.callable", spec.map.callable),
        ("reduce.callable", spec.reduce and spec.reduce.callable),
    ):
        if not dotted:
            continue
        if dotted.startswith(IN_PROCESS_PREFIX) and dotted not in _PROVIDED:
            raise JobSpecError(
                f"{spec.source}: {field_name}: {dotted[len(IN_PROCESS_PREFIX) :]} exists only in "
                "the Python process that started the job; resume it from Python: call "
                "mrpool.map(fn, items, job=...) again with the same job"
            )
        try:
            resolve_callable(dotted, spec.base_dir)
        except (Exception, SystemExit) as e:  # noqa: BLE001 - any import-time error is the user's to see
            detail = " ".join(f"{type(e).__name__}: {e}".split())
            raise JobSpecError(
                f"{spec.source}: {field_name}: cannot import {dotted!r}: {detail}"
            ) from None


class _Where:
    """Builds ``file: field: message`` errors."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, field_name: str, message: str) -> JobSpecError:
        text = f"{self.source}: {field_name + ': ' if field_name else ''}{message}"
        return JobSpecError(printable(text))

    def unknown_keys(self, prefix: str, data: dict, allowed: set[str]) -> None:
        for key in data:
            if key not in allowed:
                name = f"{prefix}{key if isinstance(key, str) and key else repr(key)}"
                raise self.error(name, f"unknown key{_did_you_mean(key, allowed)}")


def _did_you_mean(key: Any, allowed: set[str]) -> str:
    """`` (did you mean 'workers'? expected one of: ...)``: the known key this one is the
    start of, or else the nearest by difflib's ratio if any is near (a typo), then all."""
    expected = f"expected one of: {', '.join(sorted(allowed))}"
    if not isinstance(key, str):
        return f" ({expected})"
    typed = key.lower()
    near = [k for k in sorted(allowed) if len(typed) >= 3 and k.startswith(typed)]
    near = near or difflib.get_close_matches(typed, sorted(allowed), n=1, cutoff=0.6)
    return f" (did you mean {near[0]!r}? {expected})" if near else f" ({expected})"


def _check_values(where: _Where, data: Any) -> None:
    """Refuse a document no job file needs before looking at its fields: more than
    ``MAX_VALUES`` values, nesting deeper than ``MAX_DEPTH`` (a cycle, through the API),
    or a string that cannot be encoded -- YAML's ``"\\ud800"`` is one -- which would fail
    far from here, in a path, an exec or the journal. Iterative: a deep document must
    not meet Python's recursion limit. Errors name the first such field in file order."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    count = 0
    while stack:
        value, at, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise where.error("", f"the job file holds more than {MAX_VALUES} values")
        if isinstance(value, str):
            try:
                value.encode()
            except UnicodeEncodeError:
                raise where.error(
                    at or "(the document)",
                    "is not valid Unicode text (it holds an unpaired surrogate, such as \\ud800)",
                ) from None
        elif isinstance(value, (dict, list)) and value:
            if depth >= MAX_DEPTH:
                top = at.split(".")[0].split("[")[0]
                raise where.error(top, f"is nested too deeply (more than {MAX_DEPTH} levels)")
            stack.extend(reversed(_children(value, at, depth + 1)))


def _children(value: dict | list, at: str, depth: int) -> list[tuple[Any, str, int]]:
    if isinstance(value, list):
        return [(item, f"{at}[{n}]", depth) for n, item in enumerate(value)]
    found = []
    for key, item in value.items():
        shown = key if isinstance(key, str) and key else repr(key)
        name = f"{at}.{shown}" if at else shown
        found += [(key, name, depth), (item, name, depth)]
    return found


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and -(2**63) <= value < 2**63


def _is_number(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, float) and math.isfinite(value))


def printable(text: str) -> str:
    """``text`` with control characters escaped, so a message stays on one line."""
    if text.isprintable():  # the common case, at C speed (a table of 100k DLQ rows)
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _exactly_one_step(where: _Where, section: str, data: Any, allowed: set[str]) -> dict:
    if not isinstance(data, dict):
        raise where.error(section, "must be a mapping with exactly one of: command, callable")
    where.unknown_keys(section + ".", data, allowed)
    present = [k for k in ("command", "callable") if data.get(k) is not None]
    if len(present) != 1:
        raise where.error(section, "needs exactly one of: command, callable")
    return data


def _command(where: _Where, field_name: str, value: Any) -> list[str]:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as e:
            raise where.error(field_name, f"cannot split command: {e}") from None
    elif isinstance(value, list) and all(isinstance(a, str) for a in value):
        argv = list(value)
    else:
        raise where.error(field_name, "must be a list of strings or one string")
    if not argv or not argv[0]:
        raise where.error(field_name, "must name a program to run")
    if any("\0" in a for a in argv):
        raise where.error(field_name, "must not contain NUL characters")
    return argv


def _callable(where: _Where, field_name: str, value: Any) -> str:
    if not isinstance(value, str) or not _CALLABLE_RE.fullmatch(value):
        got = repr(value) if isinstance(value, str) else f"a {type(value).__name__}"
        raise where.error(field_name, f"must look like 'package.module:function', got {got}")
    return value


def _timeout(where: _Where, field_name: str, value: Any) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or value <= 0:
        raise where.error(field_name, "must be a positive number of seconds")
    if value > _MAX_TIMEOUT:  # subprocess waits poll() in milliseconds held in a C int
        raise where.error(field_name, f"must be at most {_MAX_TIMEOUT:.0f} seconds (24.8 days)")
    return float(value)


def _map_spec(where: _Where, data: Any) -> MapSpec:
    data = _exactly_one_step(where, "map", data, _MAP_KEYS)
    retries = data.get("retries", 0)
    if not _is_int(retries) or retries < 0:
        raise where.error("map.retries", "must be a whole number >= 0")
    backoff = data.get("backoff", 0.0)
    if not _is_number(backoff) or backoff < 0:
        raise where.error("map.backoff", "must be a number of seconds >= 0")
    concurrency = data.get("concurrency", 1)
    if not _is_int(concurrency) or not 1 <= concurrency <= MAX_CONCURRENCY:
        raise where.error("map.concurrency", f"must be a whole number from 1 to {MAX_CONCURRENCY}")
    return MapSpec(
        command=_command(where, "map.command", data["command"])
        if data.get("command") is not None
        else None,
        callable=_callable(where, "map.callable", data["callable"])
        if data.get("callable") is not None
        else None,
        timeout=_timeout(where, "map.timeout", data.get("timeout")),
        retries=retries,
        backoff=float(backoff),
        concurrency=concurrency,
    )


def _reduce_spec(where: _Where, data: Any) -> ReduceSpec:
    data = _exactly_one_step(where, "reduce", data, _REDUCE_KEYS)
    return ReduceSpec(
        command=_command(where, "reduce.command", data["command"])
        if data.get("command") is not None
        else None,
        callable=_callable(where, "reduce.callable", data["callable"])
        if data.get("callable") is not None
        else None,
        timeout=_timeout(where, "reduce.timeout", data.get("timeout")),
    )


def _dlq_spec(where: _Where, data: Any) -> DlqSpec:
    if data is None:
        return DlqSpec()
    if not isinstance(data, dict):
        raise where.error("dlq", "must be a mapping (max_items, on_full)")
    where.unknown_keys("dlq.", data, _DLQ_KEYS)
    max_items = data.get("max_items")
    if max_items is not None and (not _is_int(max_items) or max_items < 0):
        raise where.error("dlq.max_items", "must be a whole number >= 0")
    on_full = data.get("on_full", "stop")
    if on_full not in ("stop", "keep_failed"):
        raise where.error("dlq.on_full", "must be 'stop' or 'keep_failed'")
    return DlqSpec(max_items=max_items, on_full=on_full)


def _executor_spec(where: _Where, data: Any) -> ExecutorSpec:
    if data is None or data == "local":
        return ExecutorSpec()
    if data == "dask":
        return ExecutorSpec(kind="dask")
    if not isinstance(data, dict):
        raise where.error(
            "executor",
            "must be 'local', 'dask' or a mapping {kind: dask, address: tcp://HOST:PORT}",
        )
    where.unknown_keys("executor.", data, _EXECUTOR_KEYS)
    kind = data.get("kind", "local")
    if kind not in _EXECUTOR_KINDS:
        raise where.error("executor.kind", f"must be one of: {', '.join(_EXECUTOR_KINDS)}")
    address = data.get("address")
    if address is not None:
        if kind != "dask":
            raise where.error("executor.address", "applies only to kind: dask")
        if not isinstance(address, str) or not _ADDRESS_RE.fullmatch(address):
            raise where.error(
                "executor.address", f"must look like 'tcp://HOST:PORT' (or tls://), got {address!r}"
            )
    return ExecutorSpec(kind=kind, address=address)


def _halt_spec(where: _Where, data: Any) -> HaltSpec | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise where.error("halt", 'must be a mapping such as {fail: 5} or {fail: "5%"}')
    where.unknown_keys("halt.", data, _HALT_KEYS)
    if "fail" not in data:
        raise where.error("halt", 'needs fail: a number of items, or a percentage such as "5%"')
    fail = data["fail"]
    if _is_int(fail) and fail >= 1:
        return HaltSpec(fail=fail)
    if isinstance(fail, str) and re.fullmatch(r"\d+(\.\d+)?%", fail.strip()):
        percent = float(fail.strip()[:-1])
        if 0 < percent <= 100:
            return HaltSpec(fail=f"{fail.strip()[:-1]}%")
    raise where.error(
        "halt.fail",
        f'must be a whole number >= 1 or a percentage from 0 to 100 such as "5%", got {fail!r}',
    )


def halt_from_option(text: str) -> HaltSpec:
    """``--halt fail=5`` / ``--halt fail=5%``."""
    key, sep, value = text.partition("=")
    if not sep or key.strip() != "fail":
        raise ValueError(f"expected fail=N or fail=N%, got {printable(text)!r}")
    value = value.strip()
    fail: Any = int(value) if value.isdigit() else value
    return _halt_spec(_Where("--halt"), {"fail": fail})  # type: ignore[return-value]


def executor_from_option(text: str) -> ExecutorSpec:
    """``--executor local|dask|dask://HOST:PORT`` (``dask+tls://HOST:PORT`` for TLS)."""
    if text in _EXECUTOR_KINDS:
        return ExecutorSpec(kind=text)
    for prefix, scheme in (("dask://", "tcp://"), ("dask+tls://", "tls://")):
        if text.startswith(prefix) and _ADDRESS_RE.fullmatch(scheme + text[len(prefix) :]):
            return ExecutorSpec(kind="dask", address=scheme + text[len(prefix) :])
    raise ValueError(f"must be 'local', 'dask' or 'dask://HOST:PORT', got {printable(text)!r}")


def _check_json_path(where: _Where, expr: str) -> None:
    from jsonpath_ng.ext import parse

    try:
        parse(expr)
    except Exception as e:  # noqa: BLE001 - the parser raises several exception types
        raise where.error(
            "json_path", f"invalid JSONPath {expr!r}: {' '.join(str(e).split())}"
        ) from None


def argv_renderer(argv: list[str]) -> Callable[[Any], list[str]]:
    """``render(item)``: ``argv`` with ``{item.KEY}`` / ``{item}`` inside each element
    filled from ``item``. Raises ``KeyError`` naming the first missing key.

    A filled-in value is never re-scanned, so a value containing ``{item.x}``
    stays literal, and a value never reaches a shell. The template is parsed
    here, once: a worker renders it for every attempt, and a regex substitution
    with a callback per attempt would be a visible share of a short command."""
    parts = [_template_parts(arg) for arg in argv]

    def render(item: Any) -> list[str]:
        return [part if part.__class__ is str else _filled(part, item) for part in parts]

    return render


def _template_parts(arg: str) -> str | tuple[str | _Key, ...]:
    """``arg`` itself when it holds no placeholder, else its literal and placeholder pieces."""
    pieces: list[str | _Key] = []
    end = 0
    for match in _PLACEHOLDER_RE.finditer(arg):
        pieces += [arg[end : match.start()], _Key(match.group(1))]
        end = match.end()
    if not pieces:
        return arg
    pieces.append(arg[end:])
    return tuple(piece for piece in pieces if piece != "")


class _Key:
    """A placeholder in a parsed template (a plain class: building a dataclass is a
    cost every start-up pays)."""

    __slots__ = ("name",)

    def __init__(self, name: str | None) -> None:
        self.name = name  # None: the whole item


def _filled(parts: tuple[str | _Key, ...], item: Any) -> str:
    return "".join(
        part if part.__class__ is str else _placeholder_value(part.name, item) for part in parts
    )


def _placeholder_value(key: str | None, item: Any) -> str:
    if key is None:
        value = item
    elif isinstance(item, dict) and key in item:
        value = item[key]
    else:
        raise KeyError(key)
    return value if isinstance(value, str) else orjson.dumps(value).decode()


# -- changing a job's spec after `run` ---------------------------------------------------
# `resume`, `dlq retry` and `rerun` take `--job-file FILE` and `--set KEY=VALUE`: they may
# change how each attempt runs (the map step, timeout, retries, backoff, the reduce step,
# workers, the DLQ's bounds, the executor, halt) but never what the job is -- its input and
# the items' identities, which its journal and its copy of the items are keyed by.
FROZEN_KEYS = ("name", "input", "json_path", "id_field")
_STEP_KEYS = ("command", "callable")  # setting one of a step's drops the other


def spec_document(spec: JobSpec) -> dict[str, Any]:
    """``spec`` as a job file's content (what ``--set`` edits): ``spec_from_dict`` of it
    with the same ``base_dir`` gives ``spec`` back."""
    doc = spec.to_dict()
    for key in ("base_dir", "source"):
        doc.pop(key)
    for section in ("map", "reduce", "dlq", "executor", "halt"):
        if isinstance(doc.get(section), dict):
            doc[section] = {k: v for k, v in doc[section].items() if v is not None}
    if doc.get("rate") is not None:  # kept as starts a second; the file's form is "N/s"
        doc["rate"] = rate_text(doc["rate"])
    return {k: v for k, v in doc.items() if v is not None}


def changed_spec(
    current: JobSpec, *, job_file: str | os.PathLike | None = None, sets: list[str] = ()
) -> tuple[JobSpec, dict[str, list[Any]]]:
    """The spec ``current`` becomes with the job file ``job_file`` (if any) and the
    ``--set KEY=VALUE`` assignments applied on top, validated as a job file is, and what
    changed: ``{"map.timeout": [30.0, 60.0], ...}`` (empty: nothing). A change to a key in
    ``FROZEN_KEYS`` is refused naming the key."""
    if job_file is not None:
        path = Path(job_file)
        base, source = path.resolve().parent, str(path)
        new = spec_from_dict(
            _read_document(path), base_dir=base, source=source, default_name=current.name
        )
        doc = spec_document(new)
    else:
        doc, base, source = spec_document(current), Path(current.base_dir), current.source
    for assignment in sets:
        key, value = parse_assignment(assignment)
        _assign(doc, key, value)
    where = "--set" if sets else source
    new = spec_from_dict(doc, base_dir=base, source=where, default_name=current.name)
    new = replace_spec(new, source=source)
    for key in FROZEN_KEYS:
        if getattr(new, key) != getattr(current, key):
            raise JobSpecError(
                f"{where}: {key}: cannot change after run (the job's is "
                f"{getattr(current, key)!r}, this would make it {getattr(new, key)!r}); "
                "the input and the items' identities are fixed -- start a new job with 'mrpool run'"
            )
    before, after = _flat(spec_document(current)), _flat(spec_document(new))
    before["base_dir"], after["base_dir"] = current.base_dir, new.base_dir
    changes = {
        key: [before.get(key), after.get(key)]
        for key in sorted(set(before) | set(after))
        if before.get(key) != after.get(key)
    }
    return new, changes


def parse_assignment(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of ``--set``: VALUE is read as YAML (a number, true/false, null, a
    ``[list]``), except that a command not written as a ``[list]`` is taken as text (it
    is split like a shell would, as in a job file). A frozen KEY is refused here."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"--set: expected KEY=VALUE (such as map.timeout=60), got {text!r}")
    if key.split(".")[0] in FROZEN_KEYS:
        raise UsageError(
            f"--set: {key}: cannot change after run (the input and the items' identities "
            "are fixed); start a new job with 'mrpool run'"
        )
    if key.split(".")[-1] in _STEP_KEYS + ("input", "address") and not raw.lstrip().startswith("["):
        return key, raw
    import yaml

    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def _assign(doc: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    target = doc
    for n, part in enumerate(parts[:-1]):
        inner = target.get(part)
        if inner is None:
            inner = target[part] = {}
        if not isinstance(inner, dict):
            raise UsageError(f"--set: {'.'.join(parts[: n + 1])} is not a mapping")
        target = inner
    last = parts[-1]
    if last in _STEP_KEYS and len(parts) == 2 and parts[0] in ("map", "reduce"):
        for other in _STEP_KEYS:
            target.pop(other, None)
    if value is None and len(parts) > 1:
        target.pop(last, None)  # back to the default
    else:
        target[last] = value


def _flat(doc: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def replace_spec(spec: JobSpec, **changes: Any) -> JobSpec:
    from dataclasses import replace

    return replace(spec, **changes)


def with_stored_changes(spec: JobSpec, stored: dict[str, Any] | None) -> JobSpec:
    """The spec a job runs with: ``job.json``'s, or the last one a ``spec`` record of its
    journal holds (``stored``, a ``JobSpec.to_dict``); the frozen keys always job.json's."""
    if not stored:
        return spec
    changed = spec_from_stored(stored)
    return replace_spec(changed, **{key: getattr(spec, key) for key in FROZEN_KEYS})


# -- fail-fast: what can be checked before any item runs ---------------------------------
def check_commands(spec: JobSpec) -> None:
    """The program of the map and reduce commands must resolve as a worker would resolve
    it (a path holding "/" from the job file's directory, else on PATH) and be executable.
    Only for attempts run on this machine (a Dask worker has its own PATH)."""
    for field_name, step in (("map.command", spec.map), ("reduce.command", spec.reduce)):
        argv = step.command if step is not None else None
        if not argv or _PLACEHOLDER_RE.search(argv[0]):
            continue
        program = argv[0]
        if "/" in program:
            path = Path(spec.base_dir, program)
            if not path.is_file():
                why = "does not exist" if not path.exists() else "is not a file"
                raise JobSpecError(
                    printable(
                        f"{spec.source}: {field_name}: {program!r} {why} (from {spec.base_dir})"
                    )
                )
            if not os.access(path, os.X_OK):
                raise JobSpecError(
                    printable(
                        f"{spec.source}: {field_name}: {program!r} is not executable "
                        f"(chmod +x it, or run it through its interpreter, e.g. ['python3', {program!r}])"
                    )
                )
            continue
        search = os.pathsep.join(
            str(Path(spec.base_dir, entry or "."))
            for entry in os.environ.get("PATH", "").split(os.pathsep)
        )
        if shutil.which(program, path=search) is None:
            raise JobSpecError(
                printable(
                    f"{spec.source}: {field_name}: {program!r} is not an executable program on PATH"
                )
            )


def check_placeholders(spec: JobSpec, first_item: Any, first_id: Any) -> None:
    """Every ``{item.KEY}`` of the map command must be a key of the first item: a typo
    would otherwise fail every item into the DLQ."""
    if not spec.map.command:
        return
    keys = list(item_keys(spec.map.command))
    if not keys:
        return
    have = sorted(str(k) for k in first_item) if isinstance(first_item, dict) else []
    for key in keys:
        if isinstance(first_item, dict) and key in first_item:
            continue
        if have:
            near = difflib.get_close_matches(key, have, n=1)
            hint = f"{f'did you mean {near[0]!r}? ' if near else ''}it has: {', '.join(have)}"
        else:
            hint = f"it is a {type(first_item).__name__}, not an object"
        raise JobSpecError(
            printable(
                f"{spec.source}: map.command: placeholder {{item.{key}}} names a key the "
                f"first item (id {first_id!r}) does not have ({hint})"
            )
        )


def item_keys(argv: list[str]) -> Iterator[str]:
    """The KEYs of the ``{item.KEY}`` placeholders in ``argv``, each once, in order."""
    seen: set[str] = set()
    for arg in argv:
        for match in _PLACEHOLDER_RE.finditer(arg):
            key = match.group(1)
            if key is not None and key not in seen:
                seen.add(key)
                yield key
