"""``mrpool.map`` / ``mrpool.imap``: a durable, resumable map over a Python iterable.

    results = mrpool.map(score, prompts, job="eval-1")   # the kernel dies half-way ...
    results = mrpool.map(score, prompts, job="eval-1")   # ... run it again: only the rest runs

How a call runs::

    caller (holds the job's lock)                        session process (forked)
      items --stream--> items.jsonl (the job's copy)
            --fork-------------------------------------> api.run_held_session
                                                           |  workers, forked again:
                                                           |  they have ``fn`` in memory
      journal.log <------ "ok" / "f" records --------------+
        '--tail--> (index, result) as recorded --> imap yields / map collects
      at the end: the job's state --> Failed markers, MapFailures

Why a separate session process: a session owns its process's SIGINT/SIGTERM
(Ctrl-C stops it cleanly, as for the CLI), and ``imap`` must hand results to
its caller while the session runs -- a generator cannot yield from inside
``Session.run``. So the caller keeps the lock and reads the journal, the job's
only truth, as the session appends to it; everything the caller returns was
recorded first. The session process and its workers are forks of the caller,
so a lambda, a ``functools.partial`` or a notebook cell's function runs without
being imported (``spec.provide_callable``); the job's stored spec names the
function ``module:qualname`` when another process could import it, so the
CLI's ``resume`` and ``dlq retry`` work too, and otherwise refuse (exit 2).

Items follow the contract's identity rules (``key``: a field name, a callable,
or the default: ``"id"`` when every item has one, else a content hash). A new
job streams the iterable once to a scratch file, which ``items.ingest`` reads
like any job's input; a later call with the same ``job`` streams the iterable
again only to match its identities against the job's, and refuses a
difference -- except that ``extend=True`` adds the identities the job lacks
(``_extend``: rows appended, then ``job.json`` replaced as the one commit, then
an ``extend`` journal record). Items and results travel as JSON: a tuple comes
back as a list.
"""

from __future__ import annotations

import builtins
import functools
import hashlib
import itertools
import multiprocessing
import operator
import os
import re
import signal
import sys
import traceback
from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.connection import wait as wait_for_any
from pathlib import Path
from typing import Any

import orjson

from . import failpoints, records
from .checksums import ChunkedCrcWriter
from .errors import CorruptStateError, InputError, MrpoolError, UsageError, command_line
from .gc_policy import fewer_collections
from .items import (
    ITEMS_FILE,
    append_rows,
    content_id,
    identity_text,
    ingest,
    items_table_of,
    read_ids,
)
from .items import _item_id as checked_field_id
from .journal import JOURNAL_FILE, JournalWriter, decode_line
from .lock import JobLock
from .spec import IN_PROCESS_PREFIX, JobSpec, provide_callable, spec_from_dict
from .store import (
    FAILED,
    JOB_FILE,
    PENDING,
    PURGED,
    JobInfo,
    JobStore,
    create_job_dir,
    rewrite_job_file,
    state_root,
    validate_job_id,
    write_job_file,
)

__all__ = ["map", "imap", "MapFailures", "Failed"]

_each = builtins.map  # this module defines its own ``map``
_KEY_CALLABLE = "key:callable"  # the id mode of a job whose ids come from a ``key`` function
_NOTHING = object()


@dataclass(frozen=True)
class Failed:
    """Stands where a result would be for an item whose every attempt failed (it is
    parked in the job's DLQ): the same fields as ``mrpool dlq list``."""

    id: Any
    attempts: int
    error: str
    signature: str


class MapFailures(MrpoolError):
    """Some items failed every attempt. Every other item ran; ``results`` holds all the
    results in input order with a ``Failed`` in each failed place, ``failures`` the
    ``Failed`` markers alone (input order)."""

    def __init__(self, job: str, failures: list[Failed], results: list[Any], job_dir=None) -> None:
        self.job, self.failures, self.results = job, failures, results
        first = failures[0]
        listing = command_line(job_dir, "dlq list") if job_dir else f"mrpool dlq list {job}"
        super().__init__(
            f"{len(failures)} of {len(results)} item(s) of job {job} failed every attempt "
            f"(first: id {first.id!r} after {first.attempts} attempt(s): {first.error}); "
            f"they are in the DLQ ('{listing}'); call mrpool.map again to retry them"
        )


# -- the public calls ------------------------------------------------------------
def map(  # noqa: A001 - the name users reach for, as Pool.map
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    job: str,
    key: str | Callable[[Any], str | int] | None = None,
    workers: int | None = None,
    concurrency: int | None = None,
    retries: int = 0,
    backoff: float = 0,
    timeout: float | None = None,
    state_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    include_dlq: bool = True,
    extend: bool = False,
    on_failure: str = "raise",
) -> list[Any]:
    """``[fn(item) for item in items]``, run by mrpool's workers and journaled: in input
    order, one result per input item. Called again with the same ``job`` (after a
    crash, Ctrl-C or kernel restart) it resumes: recorded results are not run again.
    Items whose every attempt failed raise one ``MapFailures`` at the end (or, with
    ``on_failure="return"``, stand as ``Failed`` markers in the list)."""
    call = _Call(
        fn, items, job, key, workers, retries, backoff, timeout, state_dir, progress, concurrency
    )
    call.check(on_failure)
    with fewer_collections():
        run = _prepare(call, extend, keep_items=False)
        if run is None:
            return []
        by_index: list[Any] = [_NOTHING] * run.total
        recorded = _recorded_results(run, call, include_dlq)
        filled = 0
        try:
            for indices, results in recorded:
                _put(by_index, indices, results)
                filled += len(indices)
            failures = _failures(run, by_index) if filled < run.total else []
        finally:
            recorded.close()  # the session has ended (or is stopped now) before the lock goes
            run.lock.release()
        results = _in_input_order(run, by_index)
    if failures and on_failure == "raise":
        raise MapFailures(job, failures, results, run.store.dir)
    return results


def imap(
    fn: Callable[[Any], Any],
    items: Iterable[Any],
    *,
    job: str,
    key: str | Callable[[Any], str | int] | None = None,
    workers: int | None = None,
    concurrency: int | None = None,
    retries: int = 0,
    backoff: float = 0,
    timeout: float | None = None,
    state_dir: str | os.PathLike | None = None,
    progress: bool | None = None,
    include_dlq: bool = True,
    extend: bool = False,
    on_failure: str = "raise",
    ordered: bool = False,
) -> Iterator[tuple[Any, Any]]:
    """``(item, result)`` for every input item, each once, as the results are recorded
    (``ordered=True``: in input order). A re-run yields the results recorded before
    first, then the rest as they come. Like any generator it starts on the first
    ``next()``; closing it early stops the session (what ran is kept)."""
    call = _Call(
        fn, items, job, key, workers, retries, backoff, timeout, state_dir, progress, concurrency
    )
    call.check(on_failure)
    run = _prepare(call, extend, keep_items=True)
    if run is None:
        return
    by_index: list[Any] = [_NOTHING] * run.total
    order = _InputOrder(run) if ordered else None
    recorded = _recorded_results(run, call, include_dlq)
    try:
        for indices, results in recorded:
            for index, result in zip(indices, results):
                by_index[index] = result
                for position in order.ready(by_index) if order else run.positions_of(index):
                    yield (
                        run.originals[position],
                        result if order is None else _at(run, by_index, position),
                    )
        failures = _failures(run, by_index)
    finally:  # also when the caller closes this generator early
        recorded.close()  # the session has ended (or is stopped now) before the lock goes
        run.lock.release()
    # what is left: in input order, the successes held back behind a failed item (ordered)
    # and, with on_failure="return", the failed items themselves
    rest = (
        order.ready(by_index)
        if order
        else [p for p in range(run.count) if _failed_at(run, by_index, p)]
    )
    for position in rest:
        result = _at(run, by_index, position)
        if on_failure == "return" or not isinstance(result, Failed):
            yield run.originals[position], result
    if failures and on_failure == "raise":
        raise MapFailures(job, failures, _in_input_order(run, by_index), run.store.dir)


def _put(by_index: list[Any], indices: list[int], results: list[Any]) -> None:
    """``by_index[i] = r`` for each pair; a run of consecutive indices (most batches) in
    one slice assignment."""
    if _consecutive(indices):
        by_index[indices[0] : indices[0] + len(indices)] = results
    else:
        for index, result in zip(indices, results):
            by_index[index] = result


def _consecutive(indices: list[int]) -> bool:
    first, n = indices[0], len(indices)
    return indices[-1] == first + n - 1 and all(
        _each(operator.eq, indices, range(first, first + n))
    )


def _at(run: _Run, by_index: list[Any], position: int) -> Any:
    return by_index[run.index_at(position)]


def _failed_at(run: _Run, by_index: list[Any], position: int) -> bool:
    return isinstance(by_index[run.index_at(position)], Failed)


def _in_input_order(run: _Run, by_index: list[Any]) -> list[Any]:
    """The results by position in the caller's iterable (a duplicate gets its first's)."""
    return by_index if run.positions is None else [by_index[i] for i in run.positions]


# -- checking the call -----------------------------------------------------------
@dataclass
class _Call:
    fn: Callable[[Any], Any]
    items: Iterable[Any]
    job: str
    key: str | Callable[[Any], Any] | None
    workers: int | None
    retries: int
    backoff: float
    timeout: float | None
    state_dir: str | os.PathLike | None
    progress: bool | None
    concurrency: int | None = None  # map.concurrency: attempts each worker runs at once

    @property
    def where(self) -> str:
        return f"mrpool.map(job={self.job!r})"

    def check(self, on_failure: str) -> None:
        """Refuse a bad argument before anything is read or created."""
        validate_job_id(self.job)
        if not callable(self.fn):
            raise UsageError(f"{self.where}: fn must be callable, got {type(self.fn).__name__}")
        if on_failure not in ("raise", "return"):
            raise UsageError(f"{self.where}: on_failure must be 'raise' or 'return'")
        if not (self.key is None or callable(self.key) or (isinstance(self.key, str) and self.key)):
            raise UsageError(f"{self.where}: key must be a field name or a function of the item")
        self.spec()  # the option values, checked by the job file's own rules

    def spec(self) -> JobSpec:
        """The job's spec: a callable job, its function named as ``callable_name`` says."""
        name, base_dir = callable_name(self.fn)
        step: dict[str, Any] = {"callable": "mrpool.pymap:map", "retries": self.retries}
        step.update(backoff=self.backoff, timeout=self.timeout)
        data: dict[str, Any] = {"name": self.job, "input": "items.jsonl", "map": step}
        if self.workers is not None:
            data["workers"] = self.workers
        if self.concurrency is not None:
            step["concurrency"] = self.concurrency
        if isinstance(self.key, str):
            data["id_field"] = self.key
        spec = spec_from_dict(data, base_dir=base_dir, source=self.where)
        return replace(spec, input="(python iterable)", map=replace(spec.map, callable=name))


def callable_name(fn: Callable[..., Any]) -> tuple[str, str]:
    """``("module:qualname", the module's sys.path root)`` when another process can
    import ``fn`` by that name; else an ``in-process:`` name (a lambda, a ``__main__``
    or notebook function, a partial, a bound method) and the working directory."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", None)
    if isinstance(module, str) and isinstance(qualname, str) and module != "__main__":
        target: Any = sys.modules.get(module)
        file = getattr(target, "__file__", None)
        for part in qualname.split("."):
            target = getattr(target, part, None)
        if target is fn and file:
            return f"{module}:{qualname}", str(_import_root(module, Path(file)))
    return IN_PROCESS_PREFIX + _describe(fn), os.getcwd()


def _import_root(module: str, file: Path) -> Path:
    """The directory ``module`` is imported from: its file's folder, up one per dot."""
    root = file.resolve().parent
    for _ in range(module.count(".") + (file.name == "__init__.py")):
        root = root.parent
    return root


def _describe(fn: Any) -> str:
    inner = getattr(fn, "func", None)  # functools.partial
    if inner is not None:
        return f"functools.partial({_describe(inner)})"
    module, qualname = getattr(fn, "__module__", "?"), getattr(fn, "__qualname__", None)
    return f"{module}:{qualname}" if qualname else " ".join(repr(fn).split())[:100]


# -- items: a new job's copy, or a match against the job's --------------------------
@dataclass
class _Run:
    """A job ready to run, its lock held: how the caller's items map onto its items."""

    store: JobStore
    lock: JobLock
    total: int  # items in the job
    count: int  # items in the caller's iterable
    positions: array | None  # position in the iterable -> the job's index; None: the same
    originals: list[Any] | None  # imap: the caller's items, by position
    _by_index: dict[int, list[int]] | None = None

    def index_at(self, position: int) -> int:
        return position if self.positions is None else self.positions[position]

    def positions_of(self, index: int) -> list[int]:
        """The positions holding the job's item ``index`` (several for a duplicate)."""
        if self.positions is None:
            return [index]
        if self._by_index is None:
            self._by_index = {}
            for position, at in enumerate(self.positions):
                self._by_index.setdefault(at, []).append(position)
        return self._by_index.get(index, [])


def _prepare(call: _Call, extend: bool, keep_items: bool) -> _Run | None:
    """Create the job from the items, or match them against it; the lock is held on
    return. None: the iterable is empty and no job of that name exists."""
    store = JobStore(state_root(call.state_dir), call.job)
    originals: list[Any] | None = [] if keep_items else None
    chunks = _encoded_chunks(call, originals)
    first = next(chunks, None)
    exists = (store.dir / JOB_FILE).is_file()
    if first is None and not exists:
        return None
    stream = chunks if first is None else itertools.chain([first], chunks)
    if not exists:
        return _create(call, store, stream, _id_mode_known(call, first[1][0]), originals)
    lock = JobLock(store.dir, command=f"mrpool.map {call.job}").acquire()
    try:
        total, positions, count = _match(call, store, stream, extend)
    except BaseException:
        lock.release()
        raise
    return _Run(store, lock, total, count, positions, originals)


_CHUNK = 4096
_STRICT = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
# (an item is JSON or refused: a dataclass or a datetime would otherwise become an object
# or a string without a word, and the map would get something else than it was given)


def _encoded_chunks(
    call: _Call, originals: list[Any] | None
) -> Iterator[tuple[int, list[Any], list[bytes]]]:
    """``(first position, items, their JSON)`` a few thousand items at a time (one
    comprehension each, not a generator step per item); an item that is not JSON is
    refused, naming its position."""
    dumps, iterator, position = orjson.dumps, iter(call.items), 0
    while items := list(itertools.islice(iterator, _CHUNK)):
        try:
            if _NUMBERS.issuperset(_each(type, items)):  # one call, split at the commas
                raws = dumps(items, option=_STRICT)[1:-1].split(b",")
            else:
                raws = [dumps(item, option=_STRICT) for item in items]
        except TypeError:
            raws = [_one_encoded(call, position + k, item) for k, item in enumerate(items)]
        if originals is not None:
            originals.extend(items)
        yield position, items, raws
        position += len(items)


def _one_encoded(call: _Call, position: int, item: Any) -> bytes:
    try:
        return orjson.dumps(item, option=_STRICT)
    except TypeError as e:
        raise InputError(f"{call.where}: item at position {position} is not JSON: {e}") from None


def _id_mode_known(call: _Call, first: Any) -> str | None:
    """The id mode when the call and the first item settle it before the rest is read:
    a key function, or content hashes by default once the first item has no ``"id"``
    (the contract's default needs every item to have one). None: ``items.ingest``
    decides, reading them all."""
    if callable(call.key):
        return _KEY_CALLABLE
    if call.key is None and not (isinstance(first, dict) and "id" in first):
        return "content-hash"
    return None


def _create(
    call: _Call, store: JobStore, stream: Iterator, id_mode: str | None, originals: list | None
) -> _Run:
    """A new job: its copy of the items, ``job.json``, the journal's header, the lock --
    all in a private temp directory published with one rename (as ``api.run_job``)."""
    spec = call.spec()
    made: dict[str, Any] = {}  # and "lock": taken in the build directory, follows its rename

    def build(tmp: Path) -> None:
        nonlocal id_mode
        if id_mode is None:
            copied = _copy_by_ingest(call, spec, stream, tmp)
            total, duplicates, id_mode, positions, table = copied
        else:
            copied = _copy_with_ids(stream, tmp, _id_maker(call, id_mode))
            total, duplicates, positions, table = copied
        made.update(total=total, positions=positions)
        write_job_file(tmp, call.job, spec, total, duplicates, id_mode, table)
        journal = JournalWriter(tmp / JOURNAL_FILE, 0)
        journal.append(records.job(call.job, total, duplicates, id_mode))
        journal.close()
        made["lock"] = JobLock(tmp, command=f"mrpool.map {call.job}").acquire()

    try:
        store = create_job_dir(store.root, call.job, build)
    except BaseException:
        if "lock" in made:
            made["lock"].release()
        raise
    lock = made["lock"]
    lock.relocate(store.dir)
    positions = made["positions"]
    count = made["total"] if positions is None else len(positions)
    return _Run(store, lock, made["total"], count, positions, originals)


def _copy_by_ingest(
    call: _Call, spec: JobSpec, stream: Iterator, tmp: Path
) -> tuple[int, int, str, array | None, dict[str, Any] | None]:
    """The items to a scratch ``.jsonl``, then ``items.ingest`` over it: the contract's
    identity rules, duplicate counting and fast paths, exactly as for a job file."""
    scratch = tmp / "iterable.jsonl"
    with open(scratch, "wb", buffering=1 << 20) as out:
        for _, _, raws in stream:
            out.write(b"\n".join(raws) + b"\n")
    try:
        report = ingest(replace(spec, input=str(scratch)), tmp)
    except InputError as e:  # "<scratch>:<line>: ..." -> the item's position
        pattern = re.escape(str(scratch)) + r":(\d+): "
        message = re.sub(pattern, lambda m: f"item at position {int(m[1]) - 1}: ", str(e))
        raise InputError(f"{call.where}: {message}") from None
    positions = None
    if report.duplicates:  # collapsed identities: which job item each position became
        id_of = _raw_identifier(call, report.id_mode)
        index_of = _index_of_ids(read_ids(tmp))
        with open(scratch, "rb") as lines:
            items = (orjson.loads(line) for line in lines)
            positions = array(
                "q", (index_of[identity_text(id_of(p, x))] for p, x in enumerate(items))
            )
    scratch.unlink()
    return report.total, report.duplicates, report.id_mode, positions, report.items_table


def _copy_with_ids(
    stream: Iterator, tmp: Path, id_of: Callable[[int, list[Any], list[bytes]], list[Any]]
) -> tuple[int, int, array | None, dict[str, Any]]:
    """Write the job's ``items.jsonl`` rows (``id TAB item``, see items.py) with the ids
    ``id_of`` gives, the first item of each identity kept (the rule ``ingest`` follows).
    A chunk whose ids are all new (one set update tells) is written in one join; the
    index of each identity and the positions are kept only from the first duplicate
    on, which shows that positions differ from the job's indices."""
    seen: set[Any] = set()
    order: list[Any] = []  # identity texts by index, until the first duplicate
    index_of: dict[Any, int] | None = None  # from the first duplicate on
    positions: array | None = None
    count = 0
    hex_ids = id_of is _content_ids
    with open(tmp / ITEMS_FILE, "wb", buffering=1 << 20) as handle:
        out = ChunkedCrcWriter(handle)
        for first, items, raws in stream:
            raw_ids = id_of(first, items, raws)
            texts = raw_ids if _all_str(raw_ids) else list(_each(identity_text, raw_ids))
            if index_of is None:
                before = len(seen)
                seen.update(texts)
                if len(seen) == before + len(texts):  # all new: the common case
                    order.extend(texts)
                    out.write(_rows(raw_ids, raws, hex_ids))
                    count += len(items)
                    continue
                index_of = {text: index for index, text in enumerate(order)}
                positions = array("q", range(count))
                seen.clear()
            for raw_id, text, raw in zip(raw_ids, texts, raws):  # a duplicate: item by item
                index = index_of.get(text)
                if index is None:
                    index = index_of[text] = len(index_of)
                    out.write(orjson.dumps(raw_id) + b"\t" + raw + b"\n")
                positions.append(index)
            count += len(items)
        handle.flush()
        os.fsync(handle.fileno())
    total = count if index_of is None else len(index_of)
    return total, count - total, positions, out.table(total)


def _rows(raw_ids: list[Any], raws: list[bytes], hex_ids: bool) -> bytes:
    """``id TAB item LF`` rows. Ids whose JSON holds no comma (content hashes, integers)
    are encoded in one call and split at its commas, the rows in one join."""
    n = len(raws)
    if hex_ids or _all_int(raw_ids):
        parts = [b"\t"] * (4 * n)
        parts[0::4] = orjson.dumps(raw_ids)[1:-1].split(b",")
        parts[2::4] = raws
        parts[3::4] = itertools.repeat(b"\n", n)
        return b"".join(parts)
    return b"\n".join(_each(b"\t".join, zip(_each(orjson.dumps, raw_ids), raws))) + b"\n"


def _all_int(values: list[Any]) -> bool:
    return {int} == set(_each(type, values))


def _id_maker(call: _Call, id_mode: str) -> Callable[[int, list[Any], list[bytes]], list[Any]]:
    """``ids(first position, items, their JSON)`` for ``_copy_with_ids``."""
    if id_mode == _KEY_CALLABLE:
        return lambda first, items, _raws: [
            _key_id(call, first + k, item) for k, item in enumerate(items)
        ]
    return _content_ids


_SCALARS = frozenset({int, str, float, bool, type(None)})
_NUMBERS = frozenset({int, float, bool, type(None)})  # JSON without a comma or a quote


def _content_ids(_first: int, items: list[Any], raws: list[bytes]) -> list[str]:
    """``items.content_id`` of each; a scalar's JSON is already canonical, hashed as is."""
    blake2b, scalars = hashlib.blake2b, _SCALARS
    if scalars.issuperset(_each(type, items)):  # (a chunk of numbers or strings: no test each)
        return list(_each(_hexdigest, _each(_blake2b_16, raws)))
    return [
        blake2b(raw, digest_size=16).hexdigest() if type(item) in scalars else content_id(item)
        for item, raw in zip(items, raws)
    ]


_blake2b_16 = functools.partial(hashlib.blake2b, digest_size=16)
_hexdigest = hashlib.blake2b.hexdigest


def _all_str(values: list[Any]) -> bool:
    return all(_each(str.__instancecheck__, values))


def _key_id(call: _Call, position: int, item: Any) -> str | int:
    """``key(item)``, which must be an id as the contract allows: a string or an integer."""
    value = call.key(item)  # type: ignore[misc]
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise InputError(
            f"{call.where}: item at position {position}: key returned a "
            f"{type(value).__name__}; an id must be a string or an integer"
        )
    return value


def _raw_identifier(call: _Call, id_mode: str) -> Callable[[int, Any], Any]:
    """``id_of(position, item)``: the item's id value in a job of ``id_mode``."""
    if id_mode == _KEY_CALLABLE:
        return lambda position, item: _key_id(call, position, item)
    if id_mode.startswith("field:"):
        name = id_mode[len("field:") :]
        return lambda position, item: checked_field_id(
            f"{call.where}: item at position {position}", item, name, True
        )
    return lambda _position, item: content_id(item)


def _index_of_ids(ids: list[Any]) -> dict[str, int]:
    return {identity_text(value): index for index, value in enumerate(ids)}


def _match(
    call: _Call, store: JobStore, stream: Iterator, extend: bool
) -> tuple[int, array | None, int]:
    """``(job's item count, positions, items in the iterable)`` for a job that exists.

    The iterable must hold every item of the job (duplicates collapse as in the
    first call); an identity the job lacks is refused, or with ``extend=True``
    added to the job (``_extend``) -- once the whole iterable has been matched, so
    a refusal changes nothing."""
    info = store.info()
    _check_same_key(call, info.id_mode)
    id_of = _raw_identifier(call, info.id_mode)
    ids = read_ids(store.dir)
    index_of = _index_of_ids(ids)
    old_total = info.total
    positions = array("q")
    seen = bytearray(old_total)
    new_rows: list[bytes] = []
    first_new: tuple[int, str] | None = None
    for first, items, raws in stream:
        for position, item, raw in zip(itertools.count(first), items, raws):
            raw_id = id_of(position, item)
            text = identity_text(raw_id)
            index = index_of.get(text)
            if index is None:
                first_new = first_new or (position, text)
                index = index_of[text] = len(index_of)
                new_rows.append(orjson.dumps(raw_id) + b"\t" + raw + b"\n")
            elif index < old_total:
                seen[index] = 1
            positions.append(index)
    if first_new and not extend:
        position, text = first_new
        raise InputError(
            f"{call.where}: {len(new_rows)} item(s) are not in job {call.job} (first: position "
            f"{position}, id {text!r}); pass extend=True to add them, or use a new job name"
        )
    missing = seen.count(0)
    if missing:
        first = ids[seen.index(0)]
        raise InputError(
            f"{call.where}: job {call.job} holds {missing} item(s) the iterable lacks (first: "
            f"id {first!r}); pass every item of the job (extend=True only adds), or use a new "
            "job name"
        )
    total = old_total
    if new_rows:
        repeats = sum(1 for index in positions if index >= old_total) - len(new_rows)
        total = _extend(store, info, new_rows, repeats).total
    count = len(positions)
    if count == total and positions == array("q", range(count)):
        return total, None, count
    return total, positions, count


def _extend(store: JobStore, info: JobInfo, rows: list[bytes], repeats: int) -> JobInfo:
    """Add ``rows`` (new items, as ``items.jsonl`` lines) to the job; the lock is held.

    Crash-safe by order, with one commit point: (1) the rows are appended to
    ``items.jsonl`` and fsynced -- readers read only the bytes ``job.json``'s
    table covers, so they still see the old job whole; (2) ``job.json`` is
    replaced (atomic rename) with the new item count and table: from now on every
    reader -- resume, status, results, the DLQ -- sees the extended job, its new
    items pending; (3) an ``extend`` record is journaled. A crash between (2) and
    (3) leaves the record out; the next session writes it (api._run_session)."""
    state = store.load_state(info.total)
    journal = JournalWriter(store.journal_path, state.offset)  # (cuts a torn tail)
    try:
        table = info.items_table
        if table is None:  # a job from before items.jsonl had checksums: give it them
            table = items_table_of(store.dir, info.total)
            info = rewrite_job_file(
                store.dir, info, info.total, info.duplicates_in_input, table, failpoint=None
            )
        total = info.total + len(rows)
        table = append_rows(store.dir, table, b"".join(rows), total)
        if failpoints.ENABLED:
            failpoints.hit("extend.after_items")
        info = rewrite_job_file(store.dir, info, total, info.duplicates_in_input + repeats, table)
        if failpoints.ENABLED:
            failpoints.hit("extend.before_record")
        extension = records.extend(state.journal_total, info.total, info.duplicates_in_input)
        records.Recorder(journal, state).record(extension)
    finally:
        journal.close()
    return info


def _check_same_key(call: _Call, id_mode: str) -> None:
    if callable(call.key):
        same = id_mode == _KEY_CALLABLE
    elif isinstance(call.key, str):
        same = id_mode == f"field:{call.key}"
    else:
        same = id_mode != _KEY_CALLABLE
    if not same:
        how = {_KEY_CALLABLE: "a key function", "content-hash": "content hash"}.get(
            id_mode, f"field {id_mode[len('field:') :]!r}"
        )
        raise UsageError(
            f"{call.where}: job {call.job} identifies its items by {how}; pass the same key "
            "as the first call"
        )


# -- running: the session process, and the journal as it grows ----------------------
def _recorded_results(
    run: _Run, call: _Call, include_dlq: bool
) -> Iterator[tuple[list[int], list[Any]]]:
    """``(indices, results)`` of the job's recorded successes, a batch at a time, each
    index once: those of earlier sessions first, then this session's as the journal
    records them. After a Ctrl-C (or a closed generator) the session is stopped -- it
    saves -- and the interruption goes on up."""
    tail = _JournalTail(run.store.journal_path)
    session = _SessionProcess(run.store, call, include_dlq)
    seen = bytearray(run.total)
    try:
        session.start()
        while True:
            running = session.running()
            for rows in tail.successes():
                batch = _first_successes(rows, seen)
                if batch[0]:
                    yield batch
            if not running:
                break
            session.wait(0.05)
        tail.check_read_to_end()
    except BaseException:
        session.stop()
        raise
    finally:
        tail.close()
    session.raise_outcome()


_INDEX, _RESULT = operator.itemgetter(0), operator.itemgetter(3)  # of an ``ok`` row


def _first_successes(rows: list[list[Any]], seen: bytearray) -> tuple[list[int], list[Any]]:
    """``(indices, results)`` of the ``ok`` rows whose index is not in ``seen`` yet (an
    item's first success counts), marked in it. A run of consecutive new indices (most
    batches) is taken whole, with no step per row in Python."""
    indices = list(_each(_INDEX, rows))
    first, n = indices[0], len(indices)
    if _consecutive(indices) and seen.find(1, first, first + n) < 0:
        seen[first : first + n] = b"\x01" * n
        return indices, list(_each(_RESULT, rows))
    kept: tuple[list[int], list[Any]] = ([], [])
    for index, row in zip(indices, rows):
        if not seen[index]:
            seen[index] = 1
            kept[0].append(index)
            kept[1].append(row[3])
    return kept


class _JournalTail:
    """The ``ok`` rows of a journal another process is appending to.

    Reads whole lines only, up to the size the file has at that moment: a record
    ends with its LF and is written before it, so a line seen whole is a record
    written whole. A line that fails its checksum is not passed (it is a torn
    tail the session is about to cut, or damage ``check_read_to_end`` reports)."""

    CHUNK = 8 << 20

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self.offset = 0

    def successes(self) -> list[list[list[Any]]]:
        """The rows of each whole ``ok`` record appended since the last call."""
        rows: list[list[list[Any]]] = []
        while True:
            size = os.fstat(self._fd).st_size
            want = min(size - self.offset, self.CHUNK)
            data = os.pread(self._fd, want, self.offset) if want > 0 else b""
            while b"\n" not in data and want < size - self.offset:  # one record past CHUNK
                want *= 2
                data = os.pread(self._fd, want, self.offset)
            end = data.rfind(b"\n") + 1
            if not end:
                return rows
            for line in data[:end].splitlines(keepends=True):
                record = decode_line(line)
                if record is None:
                    return rows
                self.offset += len(line)
                if record["k"] == "ok":
                    found = records.success_rows(record)
                    if found:
                        rows.append(found)

    def check_read_to_end(self) -> None:
        """After the session: everything was read (else a record in the middle is bad)."""
        if self.offset < os.fstat(self._fd).st_size:
            raise CorruptStateError(
                f"{self.path}: corrupt record at byte {self.offset} (checksum or format "
                "mismatch) followed by more data"
            )

    def close(self) -> None:
        os.close(self._fd)


class _SessionProcess:
    """The forked process that runs the job's session (see the module docstring)."""

    def __init__(self, store: JobStore, call: _Call, include_dlq: bool) -> None:
        self.store, self.call, self.include_dlq = store, call, include_dlq
        self.process: Any = None
        self._receiver: Any = None
        self.message: tuple[str, Any] | None = None

    def start(self) -> None:
        from . import api  # noqa: F401 - here, once a process: not in every session's fork

        ctx = multiprocessing.get_context("fork")
        self._receiver, sender = ctx.Pipe(duplex=False)
        stored_name = self.store.info().spec.map.callable  # what the spec's check resolves
        args = (self.store, stored_name, self.call, self.include_dlq, sender, os.getpid())
        process = ctx.Process(target=_session_main, args=args, name="mrpool-map")
        try:
            process.start()
        finally:
            sender.close()
        self.process = process  # only a started one: stop() and the end wait for it

    def running(self) -> bool:
        return self.process.is_alive()

    def wait(self, timeout: float) -> None:
        ready = wait_for_any([self.process.sentinel, self._receiver], timeout)
        if self._receiver in ready:
            self._take_message()

    def _take_message(self) -> None:
        try:
            self.message = self._receiver.recv()
        except (EOFError, OSError):
            pass

    def stop(self) -> None:
        """Stop the session as Ctrl-C stops one (it saves), and wait for it; a second
        Ctrl-C kills it -- what was recorded is kept either way."""
        if self.process is None:  # it never started
            if self._receiver is not None:
                self._receiver.close()
            return
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGINT)
        while True:
            try:
                self.process.join()
                break
            except KeyboardInterrupt:
                self.process.kill()
        self._receiver.close()

    def raise_outcome(self) -> None:
        """Raise what ended the session early, if anything did."""
        self.process.join()
        if self.message is None and self._receiver.poll():
            self._take_message()
        self._receiver.close()
        code = self.process.exitcode
        if self.message is None:
            how = f"signal {-code}" if code and code < 0 else f"exit status {code}"
            raise MrpoolError(
                f"{self.call.where}: the session process ended by {how}; everything recorded "
                "is kept: call mrpool.map again to resume"
            )
        kind, payload = self.message
        if kind == "interrupted":
            raise KeyboardInterrupt
        if kind == "error":
            raise payload
        exit_code, state, text = payload
        if exit_code == 130:
            raise KeyboardInterrupt
        if state == "interrupted" and text:  # stopped by a condition (a full DLQ)
            raise MrpoolError(f"{self.call.where}: {text}")


def _session_main(
    store: JobStore, stored_name: str, call: _Call, include_dlq: bool, conn, parent: int
) -> None:
    """In the session process: provide the function to the forked workers, run one
    session, send back how it ended. Dies with its caller (a killed kernel)."""
    from . import api
    from .containment import die_with_parent

    die_with_parent()
    if os.getppid() != parent:
        os._exit(70)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    provide_callable(stored_name, call.fn)
    progress = True if call.progress is None else bool(call.progress)
    try:
        with fewer_collections():
            report = api.run_held_session(
                store,
                "mrpool.map",
                include_dlq=include_dlq,
                workers=call.workers,
                concurrency=call.concurrency,
                progress=progress,
            )
        message: tuple[str, Any] = ("report", (report.exit_code, report.state, report.message))
    except KeyboardInterrupt:
        message = ("interrupted", None)
    except MrpoolError as e:
        message = ("error", e)
    except BaseException as e:  # noqa: BLE001 - a bug: tell the caller in one piece
        traceback.print_exc()
        message = (
            "error",
            MrpoolError(f"{call.where}: the session failed: {type(e).__name__}: {e}"),
        )
    conn.send(message)


# -- the end: failed items ---------------------------------------------------------
def _failures(run: _Run, by_index: list[Any]) -> list[Failed]:
    """Put a ``Failed`` where no result was recorded; return them in input order."""
    missing = [index for index, result in enumerate(by_index) if result is _NOTHING]
    if not missing:
        return []
    from .dlq import DeadLetterQueue

    state = run.store.load_state(run.total)
    parked = {e.index: e for e in DeadLetterQueue(run.store, state).entries(missing)}
    ids = read_ids(run.store.dir) if len(parked) < len(missing) else []
    for index in missing:
        entry = parked.get(index)
        if entry is not None:
            by_index[index] = Failed(entry.id, entry.attempts, entry.error, entry.signature)
        else:
            reason = _NOT_RUN.get(state.status[index], "not run")
            by_index[index] = Failed(ids[index], state.attempts[index], reason, "")
    return [by_index[index] for index in missing]


_NOT_RUN = {
    FAILED: "its last attempt failed; kept as failed, not parked (the DLQ is full)",
    PENDING: "not run: the session stopped before it",
    PURGED: "purged from the DLQ",
}


class _InputOrder:
    """``imap(ordered=True)``: the positions whose results can go out, in input order."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.next = 0

    def ready(self, by_index: list[Any]) -> list[int]:
        run, out = self.run, []
        while self.next < run.count and by_index[run.index_at(self.next)] is not _NOTHING:
            out.append(self.next)
            self.next += 1
        return out
