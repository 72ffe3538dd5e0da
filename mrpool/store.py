"""The job store: one job's directory, its replayed state, and its checkpoint.

Layout of ``<state dir>/jobs/<job id>/`` (all files 0600, the directory 0700)::

    job.json         what the job is: spec, item count, duplicates (written once)
    items.jsonl      the job's copy of its items (see items.py)
    journal.log      every event and outcome, append-only (see journal.py)
    checkpoint.json  the replayed state as of a journal offset (derived, optional)
    dlq.json         the DLQ's entries as of a journal offset (derived, see dlq.py)
    lock, holder.json  only while a command holds the job (see lock.py)

Truth lives in the journal alone; every other file is derived from it and can
be rebuilt, which is what makes the crash story short: an outcome is recorded
by one append, so there is never a moment where two files disagree.

Checkpoint format (``checkpoint.json``, version 1): a single journal-codec
record ``{"k":"checkpoint","v":1,"journal_offset":N,"total":T,"status":B64,
"attempts":B64,"streak":B64,"open":[[index,attempt],...],"reduce":R,"executor":E?,"spec":S?,
"halt":H?}``, where each B64 is a zlib-compressed array (status: one byte per item; attempts:
uint32 per item; streak: one byte per item), ``executor``, only when the last session
ran on a remote executor, its ``executor`` record's fields, ``spec``, only once the spec was
changed (``--job-file`` / ``--set``), the last ``spec`` record's spec, and ``halt``, only when
the last session halted, its ``halt`` record. A checkpoint that fails its checksum is
reported and ignored: the state is rebuilt from the journal, losing nothing.
"""

from __future__ import annotations

import base64
import difflib
import os
import re
import secrets
import shutil
import time
import warnings
import zlib
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import compress
from pathlib import Path
from typing import Any

import orjson

from .checksums import job_checksum
from .errors import (
    CorruptStateError,
    JobExists,
    NoSuchJob,
    StateRebuiltWarning,
    UsageError,
    command_line,
    fsck_hint,
)
from .fsutil import atomic_write, fsync_dir, make_private_dir, missing_dirs, sweep_temp_files
from .journal import (
    FORMAT_VERSION,
    JOURNAL_FILE,
    crc_of_bytes,
    decode_line,
    encode_record,
    read_records,
    scan_journal,
)
from .records import named_indices, succeeded_indices
from .spec import JobSpec, spec_from_stored

__all__ = [
    "PENDING",
    "SUCCEEDED",
    "FAILED",
    "DLQ",
    "PURGED",
    "JobState",
    "JobStore",
    "state_root",
    "validate_job_id",
    "list_job_ids",
]

PENDING, SUCCEEDED, FAILED, DLQ, PURGED = range(5)
JOB_FILE = "job.json"
CHECKPOINT_FILE = "checkpoint.json"
_OK_PREFIX, _RERUN_PREFIX = b'{"k":"ok"', b'{"k":"rerun"'  # records are written with k first
_NO_BEGAN = object()  # an ``open`` record written before crash evidence named begun attempts
_JOB_ID_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$")


def state_root(state_dir: str | os.PathLike | None = None) -> Path:
    """``--state-dir``, else ``$MRPOOL_HOME``, else ``~/.local/state/mrpool``."""
    if state_dir:
        return Path(state_dir).expanduser().resolve()
    env = os.environ.get("MRPOOL_HOME")
    if env:
        return Path(env).expanduser().resolve()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return (base / "mrpool").resolve()


def validate_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _JOB_ID_RE.fullmatch(job_id) or ".." in job_id:
        raise UsageError(
            f"invalid job id {job_id!r}: use letters, digits, '_', '.', '-' (at most 128, no '..', not starting with '.' or '-')"
        )
    return job_id


def list_job_ids(root: Path) -> list[str]:
    try:
        names = os.listdir(root / "jobs")
    except FileNotFoundError:
        return []
    return sorted(
        n for n in names if _JOB_ID_RE.match(n) and (root / "jobs" / n / JOB_FILE).exists()
    )


class JobState:
    """Per-item state replayed from the journal: compact arrays, O(1) per record.

    ``status`` holds each item's last *settled* place (pending / succeeded /
    failed / dlq / purged). ``opened`` flags the items whose attempt started
    with no outcome recorded: in flight now, or cut short by a crash. The open
    attempt is always the item's highest, ``attempts[index]`` (a start record
    never goes back to a lower number), so a flag byte is all it takes -- and
    the hot records (a run of starts, a batch of successes) become a few slice
    operations instead of a dict insert and a pop for every item (which was
    the largest share of the supervisor's time with fast items, NOTES.md).
    ``streak`` counts how many
    sessions in a row ended (by crash) with the item in flight -- the
    poison-item detector (the rules: crashes.py).
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self.status = bytearray(total)
        self.attempts = array("I", bytes(4 * total))
        self.streak = bytearray(total)
        self.opened = bytearray(total)
        self.open_count = 0
        self.counts = [total, 0, 0, 0, 0]
        self.reduce: dict[str, Any] | None = None
        self.executor: dict[str, Any] | None = None  # the last session's, None: local
        self.spec: dict[str, Any] | None = None  # the last ``spec`` record's (None: job.json's)
        self.halt: dict[str, Any] | None = None  # why the last session halted (halt:), if it did
        self.offset = 0  # journal bytes applied
        # CRC-32 of the journal's bytes 0 to crc_offset (None: not known yet), which the
        # checkpoint records so that readers can re-check the prefix they skip
        self.crc_offset, self.crc = 0, 0
        self.journal_stat: list[int] | None = None  # the journal's [size, mtime_ns] then
        # the item count the journal's last ``job`` / ``extend`` record names: less than
        # job.json's after a crash between an extension's commit and its record
        self.journal_total = total

    def grow(self, total: int) -> None:
        """Make room for items added by an extension: pending, never attempted."""
        more = total - self.total
        if more <= 0:
            return
        self.status.extend(bytes(more))
        self.attempts.frombytes(bytes(4 * more))
        self.streak.extend(bytes(more))
        self.opened.extend(bytes(more))
        self.counts[PENDING] += more
        self.total = total

    # -- transitions -----------------------------------------------------
    def set_status(self, index: int, new: int) -> None:
        old = self.status[index]
        if old != new:
            self.counts[old] -= 1
            self.counts[new] += 1
            self.status[index] = new

    def apply(self, record: dict[str, Any]) -> None:
        kind = record["k"]
        if kind == "s":  # hot: one per dispatch batch
            for first, count, attempt in record.get("r", ()):
                self._start_run(first, first + count, attempt)
            opened, attempts = self.opened, self.attempts
            for index, attempt in record.get("b", ()):
                if not opened[index]:
                    opened[index] = 1
                    self.open_count += 1
                if attempt > attempts[index]:
                    attempts[index] = attempt
        elif kind == "ok":  # hot: one per outcome batch
            self.succeeded(succeeded_indices(record))
        elif kind == "f":
            index = record["i"]
            if self.opened[index]:
                self.opened[index] = 0
                self.open_count -= 1
            self.streak[index] = 0
            if record.get("a", 0) > self.attempts[index]:
                self.attempts[index] = record["a"]
            self.set_status(index, DLQ if record["next"] == "dlq" else FAILED)
        elif kind == "open":  # a new session began while attempts were open: the last one
            if record.get("after") == "abort":  # ended by exception, not a crash (crashes.py)
                self._settle_open(None, crashed=False)
            else:  # crashed
                self._settle_open(record.get("cut"), True, record.get("began", _NO_BEGAN))
            self.executor = None
            self.halt = None
        elif kind == "executor":  # which executor this session runs on (absent: local)
            self.executor = {k: v for k, v in record.items() if k not in ("k", "t")}
        elif kind == "close":  # a clean stop: open attempts were interrupted, not crashed
            self._settle_open(record.get("cut"), crashed=False)
        elif kind == "reset":
            for index in named_indices(record):
                self.attempts[index] = 0
        elif kind == "purge":
            for index in named_indices(record):
                if self.status[index] == DLQ:
                    self.set_status(index, PURGED)
        elif kind == "reduce":
            self.reduce = record
        elif kind == "spec":  # resume/dlq retry/rerun --job-file/--set changed the spec
            self.spec = record["spec"]
        elif kind == "rerun":  # succeeded items to run again on purpose (mrpool rerun)
            for index in named_indices(record):
                if self.status[index] == SUCCEEDED:
                    self.set_status(index, PENDING)
                    self.streak[index] = 0
            self.reduce = None  # its input changes: it runs again once the job completes
        elif kind == "halt":
            self.halt = {k: v for k, v in record.items() if k != "k"}
        elif kind == "job":
            self.journal_total = record["total"]
        elif kind == "extend":  # new items, pending (job.json, written first, sized us)
            self.grow(record["total"])
            self.journal_total = record["total"]
            self.reduce = None  # of fewer results

    def succeeded(self, indices: list[int]) -> None:
        """The attempts of these items succeeded (an ``ok`` record)."""
        if not indices:
            return
        first, stop = indices[0], indices[0] + len(indices)
        if indices[-1] == stop - 1 and indices == list(range(first, stop)):
            self._succeeded_run(first, stop)  # the common case: a batch of consecutive items
            return
        status, counts, streak, opened = self.status, self.counts, self.streak, self.opened
        closed = 0
        for index in indices:
            if opened[index]:
                opened[index] = 0
                closed += 1
            streak[index] = 0
            old = status[index]
            if old != SUCCEEDED:
                counts[old] -= 1
                counts[SUCCEEDED] += 1
                status[index] = SUCCEEDED
        self.open_count -= closed

    def _succeeded_run(self, start: int, stop: int) -> None:
        """Items ``start`` to ``stop - 1`` succeeded: slice operations, not a loop."""
        n, status, counts = stop - start, self.status, self.counts
        before = status[start:stop]
        already = before.count(SUCCEEDED)
        if already != n:
            for code in (PENDING, FAILED, DLQ, PURGED):
                counts[code] -= before.count(code)
            counts[SUCCEEDED] += n - already
            status[start:stop] = bytes((SUCCEEDED,)) * n
        self.streak[start:stop] = bytes(n)
        self.open_count -= self.opened.count(1, start, stop)
        self.opened[start:stop] = bytes(n)

    def _start_run(self, start: int, stop: int, attempt: int) -> None:
        """Items ``start`` to ``stop - 1`` started ``attempt``: slice operations, not a loop."""
        n = stop - start
        self.open_count += n - self.opened.count(1, start, stop)
        self.opened[start:stop] = b"\x01" * n
        attempts = self.attempts
        if max(attempts[start:stop]) < attempt:  # always, when the record was written live
            attempts[start:stop] = array("I", [attempt]) * (stop - start)
        else:
            for index in range(start, stop):
                if attempt > attempts[index]:
                    attempts[index] = attempt

    def _settle_open(
        self, cut: list[int] | None, crashed: bool, began: list[int] | None | object = _NO_BEGAN
    ) -> None:
        """Close the open attempts of an ended session.

        A session's ``open`` record settles those of a crashed predecessor, from its
        crash evidence (``slots.crash_evidence``): ``began`` lists the open items
        whose attempt a worker had begun -- it counts -- (None: unknown, every open
        attempt counts), and ``cut`` those it was running at the crash, which also
        extend their crash streak. Any other open item was only queued behind them:
        its attempt number is given back, and it gets no streak.

        A ``close`` record (a clean stop), and an ``open`` record from before
        ``began`` was kept, has ``cut`` alone: the items whose attempt counts (None:
        all of them), each also getting a streak when the session crashed.
        """
        if began is _NO_BEGAN:
            counted = None if cut is None else set(cut)
            streaked = counted
        else:
            streaked = set(cut or ())
            counted = None if began is None else streaked.union(began)  # type: ignore[arg-type]
        for index in self.open_indices():
            if counted is None or index in counted:
                if crashed and (streaked is None or index in streaked) and self.streak[index] < 255:
                    self.streak[index] += 1
            elif self.attempts[index] > 0:
                self.attempts[index] -= 1  # the open attempt is the highest: give it back
            self.opened[index] = 0
        self.open_count = 0

    # -- views -----------------------------------------------------------
    def open_indices(self) -> list[int]:
        """The items with an open attempt, in index order."""
        return list(compress(range(self.total), self.opened)) if self.open_count else []

    def open_attempts(self) -> dict[int, int]:
        """``{index: open attempt}`` of the items with an open attempt."""
        return {index: self.attempts[index] for index in self.open_indices()}

    def summary(self) -> dict[str, int]:
        c = self.counts
        return {
            "total": self.total - c[PURGED],
            "succeeded": c[SUCCEEDED],
            "dlq": c[DLQ],
            "failed": c[FAILED],
            "pending": c[PENDING],
            "purged": c[PURGED],
            "in_flight": self.open_count,
        }

    def finished_state(self) -> str:
        c = self.counts
        if c[PENDING] or c[FAILED]:
            return "interrupted"
        return "completed_with_failures" if c[DLQ] else "completed"

    # -- checkpoint codec ------------------------------------------------
    def to_checkpoint(self) -> bytes:
        pack = lambda raw: base64.b64encode(zlib.compress(raw, 1)).decode()  # noqa: E731
        return encode_record(
            {
                "k": "checkpoint",
                "v": FORMAT_VERSION,
                "t": time.time(),
                "journal_offset": self.offset,
                "total": self.total,
                "status": pack(bytes(self.status)),
                "attempts": pack(self.attempts.tobytes()),
                "streak": pack(bytes(self.streak)),
                "open": list(self.open_attempts().items()),
                "reduce": self.reduce,
                **({"executor": self.executor} if self.executor else {}),
                **({"spec": self.spec} if self.spec else {}),
                **({"halt": self.halt} if self.halt else {}),
                "journal_crc": self.crc if self.crc_offset == self.offset else None,
                "journal_stat": self.journal_stat,
                "journal_total": self.journal_total,
            }
        )

    @classmethod
    def from_checkpoint(cls, record: dict[str, Any]) -> JobState:
        unpack = lambda text: zlib.decompress(base64.b64decode(text))  # noqa: E731
        state = cls(record["total"])
        state.status = bytearray(unpack(record["status"]))
        state.attempts = array("I")
        state.attempts.frombytes(unpack(record["attempts"]))
        state.streak = bytearray(unpack(record["streak"]))
        if not (len(state.status) == len(state.attempts) == len(state.streak) == state.total):
            raise ValueError("array lengths disagree with total")
        for index, attempt in record["open"]:
            index = int(index)
            state.opened[index] = 1
            state.attempts[index] = max(state.attempts[index], attempt)
        state.open_count = state.opened.count(1)
        state.counts = [state.status.count(s) for s in range(5)]
        state.reduce = record.get("reduce")
        state.executor = record.get("executor")
        state.spec = record.get("spec")
        state.halt = record.get("halt")
        state.offset = record["journal_offset"]
        crc = record.get("journal_crc")  # absent in checkpoints of mrpool <= 0.1
        state.crc_offset, state.crc = (state.offset, crc) if isinstance(crc, int) else (0, None)
        state.journal_stat = record.get("journal_stat")
        state.journal_total = record.get("journal_total", state.total)  # absent before 0.2
        return state


@dataclass
class JobInfo:
    """What ``job.json`` says: fixed at creation."""

    job_id: str
    name: str
    created_at: float
    total: int
    duplicates_in_input: int
    id_mode: str
    spec: JobSpec
    items_table: dict[str, Any] | None = None  # items.jsonl's checksums; None before 0.2


_LEGACY_JOB_KEYS = {
    "v", "job_id", "name", "created_at", "total", "duplicates_in_input", "id_mode", "spec"
}  # fmt: skip


def read_job_file(job_dir: Path) -> JobInfo:
    """``job.json``, verified: its checksum (when it has one) and every field's type.
    Any damage is one ``CorruptStateError`` naming the file, never a KeyError."""
    path = job_dir / JOB_FILE
    try:
        raw = orjson.loads(path.read_bytes())
        if not isinstance(raw, dict):
            raise ValueError("not a JSON object")
        if "checksum" in raw:
            if raw["checksum"] != job_checksum(raw):
                raise ValueError("checksum mismatch")
        elif set(raw) != _LEGACY_JOB_KEYS or raw["v"] != 1:
            raise ValueError("no checksum, and not the fields of an older mrpool's job.json")
        info = _job_info(raw)
        if info.job_id != job_dir.name:
            raise ValueError(f"it names job {info.job_id!r}")
    except FileNotFoundError:
        raise NoSuchJob(f"no such job: {job_dir.name} (no {path})") from None
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        why = "invalid JSON" if isinstance(e, orjson.JSONDecodeError) else str(e)
        raise CorruptStateError(
            f"{path}: damaged ({why or type(e).__name__}); {fsck_hint(job_dir)}"
        ) from None
    except OSError as e:
        raise CorruptStateError(f"{path}: cannot read: {e.strerror}") from None
    return info


def _job_info(raw: dict[str, Any]) -> JobInfo:
    def typed(key: str, *kinds: type) -> Any:
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise ValueError(f"field {key!r} has the wrong type")
        return value

    total, duplicates = typed("total", int), typed("duplicates_in_input", int)
    if total < 0 or duplicates < 0:
        raise ValueError("a negative count")
    table = raw.get("items")
    if table is not None and not (
        isinstance(table, dict)
        and isinstance(table.get("crc"), list)
        and isinstance(table.get("size"), int)
        and table.get("lines") == total
        and isinstance(table.get("chunk"), int)
        and table["chunk"] > 0
    ):
        raise ValueError("field 'items' is not a checksum table of the items")
    return JobInfo(
        job_id=typed("job_id", str),
        name=typed("name", str),
        created_at=typed("created_at", int, float),
        total=total,
        duplicates_in_input=duplicates,
        id_mode=typed("id_mode", str),
        spec=spec_from_stored(typed("spec", dict)),
        items_table=table,
    )


class JobStore:
    """One job's directory. Reading is safe at any time; writing needs the job lock."""

    def __init__(self, root: Path, job_id: str) -> None:
        validate_job_id(job_id)
        self.root = root
        self.job_id = job_id
        self.dir = root / "jobs" / job_id
        self.journal_path = self.dir / JOURNAL_FILE

    # -- lookup ----------------------------------------------------------
    @classmethod
    def open(cls, root: Path, job_id: str) -> JobStore:
        store = cls(root, job_id)
        if not (store.dir / JOB_FILE).is_file():
            near = difflib.get_close_matches(job_id, list_job_ids(root), n=1)
            hint = f"; did you mean {near[0]}?" if near else ""
            raise NoSuchJob(f"no such job: {job_id} (state dir {root}){hint}")
        return store

    def info(self) -> JobInfo:
        return read_job_file(self.dir)

    # -- state -----------------------------------------------------------
    def load_state(self, total: int) -> JobState:
        """Checkpoint (if sound) plus every journal record after it.

        Refuses (``CorruptStateError``) when the journal lost data the checkpoint
        proves it held, or the prefix the checkpoint covers no longer matches."""
        state = self._load_checkpoint(total)
        if state.offset:
            self._check_prefix(state)
        for _, end, record in read_records(self.journal_path, state.offset):
            state.apply(record)
            state.offset = end
        return state

    def _load_checkpoint(self, total: int) -> JobState:
        path = self.dir / CHECKPOINT_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return JobState(total)
        record = decode_line(raw)
        try:
            if record is None or record.get("k") != "checkpoint":
                raise ValueError("checksum or format mismatch")
            state = JobState.from_checkpoint(record)
            if state.total > total:
                raise ValueError("item count differs from job.json")
            state.grow(total)  # the job was extended since
            size = self.journal_path.stat().st_size if self.journal_path.exists() else 0
        except (ValueError, KeyError, TypeError, zlib.error, OSError) as e:
            message = f"{path}: damaged checkpoint ({e}); rebuilding state from the journal"
            warnings.warn(message, StateRebuiltWarning, stacklevel=2)
            return JobState(total)
        if state.offset > size:
            raise self._lost_records(state, size)
        return state

    def _check_prefix(self, state: JobState) -> None:
        """Re-check the journal bytes the checkpoint covers, unless the file is as it was
        when the checkpoint was written (a finished job: ``status`` stays cheap)."""
        if state.crc is None:
            return  # a checkpoint of mrpool <= 0.1: nothing to compare with
        st = self.journal_path.stat()
        if state.journal_stat == [st.st_size, st.st_mtime_ns]:
            return
        if crc_of_bytes(self.journal_path, 0, state.offset) == state.crc:
            return
        scan = scan_journal(self.journal_path)
        bad = [start for start, _ in scan.damaged if start < state.offset]
        where = f"at byte {bad[0]}" if bad else f"before byte {state.offset}"
        raise CorruptStateError(
            f"{self.journal_path}: damaged {where} (it no longer matches the checksum "
            f"{CHECKPOINT_FILE} recorded of it); refusing to skip data: {fsck_hint(self.dir)}"
        )

    def _lost_records(self, checkpoint: JobState, size: int) -> CorruptStateError:
        """The journal is shorter than the checkpoint proves it was: acknowledged records
        are gone. Say how many outcomes, and what survives."""
        survived = JobState(checkpoint.total)
        try:
            for _, end, record in read_records(self.journal_path):
                survived.apply(record)
                survived.offset = end
        except CorruptStateError:
            pass  # the message below is about the loss; fsck lists every damage
        lost = lost_outcomes(checkpoint, survived)
        return CorruptStateError(
            f"{self.journal_path}: acknowledged records lost: the journal ends at byte {size} "
            f"but {CHECKPOINT_FILE} proves it held {checkpoint.offset} bytes; "
            f"{lost['succeeded']} recorded successes and {lost['dlq']} DLQ items are no longer "
            f"in it ({survived.counts[SUCCEEDED]} successes survive); {fsck_hint(self.dir)}"
        )

    def write_checkpoint(self, state: JobState) -> None:
        """Persist ``state`` atomically; the journal must be fsynced up to ``state.offset``."""
        self._extend_crc(state)
        st = self.journal_path.stat()
        state.journal_stat = [st.st_size, st.st_mtime_ns]
        atomic_write(self.dir / CHECKPOINT_FILE, state.to_checkpoint(), failpoint="checkpoint")

    def _extend_crc(self, state: JobState) -> None:
        """Bring ``state.crc`` up to ``state.offset``: the bytes since the last checkpoint
        were replayed or written by this process (checked), and are still in the page cache."""
        if state.crc is None:  # a checkpoint of mrpool <= 0.1: check the prefix once
            state.crc = verified_crc(self.journal_path, state.offset)
        elif state.offset > state.crc_offset:
            state.crc = crc_of_bytes(self.journal_path, state.crc_offset, state.offset, state.crc)
        elif state.offset < state.crc_offset:
            state.crc = crc_of_bytes(self.journal_path, 0, state.offset)
        state.crc_offset = state.offset

    # -- results ---------------------------------------------------------
    def iter_results(self, total: int) -> Iterator[tuple[int, Any]]:
        """``(index, result)`` of every success, in input order, each index once."""
        for index, raw in self.iter_result_json(total):
            yield index, orjson.loads(raw)

    def iter_result_json(self, total: int) -> Iterator[tuple[int, bytes | memoryview]]:
        """``(index, result as stored JSON)`` of every success, in input order, each once
        (results.py: two sequential reads of the ``ok`` records, memory about one record)."""
        from .results import result_json

        return result_json(self.journal_path, total)

    # -- housekeeping ----------------------------------------------------
    def sweep(self) -> None:
        sweep_temp_files(self.dir)


def create_job_dir(root: Path, job_id: str, build) -> JobStore:
    """Build a job in a private temp directory, then publish it with one rename.

    ``build(tmp_dir)`` does the slow, fallible work (reading the input, taking
    the lock); until the rename nothing exists under ``jobs/``, so a crash or a
    refusal leaves no job behind, only a temp dir the next command sweeps. A
    refusal also removes the directories this call created (the state dir,
    ``tmp/``): a refused ``run`` leaves the disk as it found it, and ``jobs/``
    is only made once there is a job to put in it.
    """
    store = JobStore(root, job_id)
    if store.dir.exists():
        raise _exists(store)
    tmp_root = root / "tmp"
    created = missing_dirs(tmp_root)
    try:
        tmp = _new_build_dir(root, tmp_root)
        try:
            build(tmp)
            fsync_dir(tmp)
            _publish(tmp, store, job_id)
            fsync_dir(tmp_root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    except BaseException:
        _remove_empty_dirs(created)
        raise
    return store


def _remove_empty_dirs(paths: list[Path]) -> None:
    """Remove these directories (deepest first) where still empty: another ``run`` that
    started in the same new state dir meanwhile keeps them (rmdir refuses)."""
    for path in paths:
        try:
            os.rmdir(path)
        except OSError:
            return


def _new_build_dir(root: Path, tmp_root: Path) -> Path:
    """A fresh private dir under ``tmp/`` (retried: a refused ``run`` in the same new state
    dir may remove ``tmp/`` between our mkdirs)."""
    for attempt in range(3):
        make_private_dir(root)  # a new state dir is the owner's alone, like jobs/ and tmp/
        make_private_dir(tmp_root)
        if attempt == 0:
            sweep_stale_build_dirs(tmp_root)
        tmp = tmp_root / f"{os.getpid()}-{secrets.token_hex(4)}"
        try:
            tmp.mkdir(mode=0o700)
        except FileNotFoundError:
            continue
        return tmp
    raise FileNotFoundError(f"{tmp_root} keeps disappearing")


def _publish(tmp: Path, store: JobStore, job_id: str) -> None:
    jobs = make_private_dir(store.dir.parent)
    try:
        os.rename(tmp, store.dir)
    except OSError:
        if store.dir.exists():
            raise _exists(store) from None
        raise
    fsync_dir(jobs)


def _exists(store: JobStore) -> JobExists:
    return JobExists(
        f"job {store.job_id!r} already exists; use "
        f"'{command_line(store.dir, 'resume')}' to continue it"
    )


def write_job_file(
    tmp: Path,
    job_id: str,
    spec: JobSpec,
    total: int,
    duplicates: int,
    id_mode: str,
    items_table: dict[str, Any] | None = None,
    created_at: float | None = None,
    failpoint: str | None = None,
) -> None:
    info = {
        "v": FORMAT_VERSION,
        "job_id": job_id,
        "name": spec.name,
        "created_at": time.time() if created_at is None else created_at,
        "total": total,
        "duplicates_in_input": duplicates,
        "id_mode": id_mode,
        "spec": spec.to_dict(),
    }
    if items_table is not None:
        info["items"] = items_table
    info["checksum"] = job_checksum(info)
    data = orjson.dumps(info, option=orjson.OPT_INDENT_2)
    atomic_write(tmp / JOB_FILE, data, failpoint=failpoint)


def rewrite_job_file(
    job_dir: Path,
    info: JobInfo,
    total: int,
    duplicates: int,
    items_table: dict[str, Any],
    failpoint: str | None = "extend",
) -> JobInfo:
    """Replace ``job.json`` (atomically, durably) with one naming ``total`` items
    whose copy ``items_table`` checksums -- an extension's commit point (the rows
    are already in ``items.jsonl``, fsynced). Everything else stays as created."""
    write_job_file(
        job_dir,
        info.job_id,
        info.spec,
        total,
        duplicates,
        info.id_mode,
        items_table,
        created_at=info.created_at,
        failpoint=failpoint,
    )
    return read_job_file(job_dir)


def sweep_stale_build_dirs(tmp_root: Path) -> None:
    """Remove half-built job dirs left by a ``run`` that was killed early."""
    from .fsutil import _pid_alive

    try:
        names = os.listdir(tmp_root)
    except FileNotFoundError:
        return
    for name in names:
        pid = name.split("-", 1)[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(tmp_root / name, ignore_errors=True)


def lost_outcomes(before: JobState, after: JobState) -> dict[str, Any]:
    """The settled outcomes ``before`` holds that ``after`` does not (by item)."""
    lost: dict[str, Any] = {"succeeded": 0, "dlq": 0, "indices": []}
    for index in range(min(before.total, after.total)):
        was = before.status[index]
        if was in (SUCCEEDED, DLQ) and after.status[index] != was:
            lost["succeeded" if was == SUCCEEDED else "dlq"] += 1
            lost["indices"].append(index)
    return lost


def verified_crc(path: Path, stop: int) -> int:
    """CRC-32 of the journal's bytes up to ``stop``, every record in them checked."""
    for _ in read_records(path, kind="\0"):  # checks every record's checksum, decodes none
        pass
    return crc_of_bytes(path, 0, stop)
