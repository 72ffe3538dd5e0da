"""``mrpool fsck JOB_ID [--salvage]``: check every file of a job, say what damage means.

Checking reads only. Each finding names the file, where in it (bytes or line)
and what it means for the user's data; *damage* makes the exit status 5, a
*note* (a torn tail a crash left, a stray temp file, an earlier salvage) does not.

``--salvage`` takes the job's lock (it never races a resumer) and rebuilds a
readable job from what verifies:

* the journal is cut at its first damaged record (a record is trusted only with
  everything before it: a replay that skipped one could show an outcome that a
  lost record had changed). The lost part's facts -- its byte range, and the
  outcomes it held that are no longer recorded -- go into a ``salvage`` record
  at the new end, so ``events`` and every later ``fsck`` still show them. Items
  whose outcome was lost are pending again, and ``resume`` runs them;
* derived files (``checkpoint.json``, ``dlq.json``) that are damaged, or that
  describe the lost part, are removed (they are rebuilt from the journal);
* an unreadable ``reduce.json`` is removed and a failed reduce is journaled, so
  ``resume`` runs the reduce step again;
* temp files of dead writers are swept.

``job.json`` (the spec) and ``items.jsonl`` (the items) have no second copy:
damage there is reported and left alone; re-run the job from its input.
Every write is crash-safe: the new journal is written beside the old one,
fsynced and renamed over it; derived files are removed first.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import orjson

from . import records
from .checksums import verified_item_blocks
from .errors import CorruptStateError, MrpoolError
from .fsutil import TEMP_MARK, fsync_dir, open_private, sweep_temp_files
from .items import ITEMS_FILE
from .journal import JOURNAL_FILE, JournalScan, decode_line, encode_record, scan_journal
from .lock import HOLDER_FILE, LOCK_FILE, JobLock, live_holder
from .reduce import REDUCE_FILE, read_reduce_output
from .store import (
    CHECKPOINT_FILE,
    SUCCEEDED,
    JobInfo,
    JobState,
    JobStore,
    lost_outcomes,
    read_job_file,
    state_root,
)

__all__ = ["Finding", "FsckReport", "fsck"]

DLQ_SNAPSHOT = "dlq.json"
_SHOWN_IDS = 20  # ids named per finding; the count is always complete


@dataclass
class Finding:
    file: str
    where: str
    what: str
    damage: bool = True

    def line(self) -> str:
        place = f"{self.file}{' ' + self.where if self.where else ''}"
        return f"{'DAMAGED' if self.damage else 'note'}: {place}: {self.what}"


@dataclass
class FsckReport:
    job_id: str
    findings: list[Finding] = field(default_factory=list)
    repaired: list[str] = field(default_factory=list)
    unrepairable: bool = False

    @property
    def damaged(self) -> bool:
        return any(f.damage for f in self.findings)

    @property
    def exit_code(self) -> int:
        return CorruptStateError.exit_code if self.damaged else 0


@dataclass
class _Journal:
    """What the journal check learned, for a salvage."""

    scan: JournalScan
    cut: int | None = None  # where a salvage must cut (None: nothing to cut)
    lost: dict[str, Any] = field(default_factory=dict)


def fsck(job_id: str, *, salvage: bool = False, state_dir=None) -> FsckReport:
    store = JobStore.open(state_root(state_dir), job_id)
    if not salvage:
        return _check(store)[0]
    with JobLock(store.dir, command=f"mrpool fsck --salvage {job_id}").acquire():
        report, info, journal = _check(store)
        if report.damaged:
            _salvage(store, report, info, journal)
            after, _, _ = _check(store)
            after.repaired = report.repaired
            after.unrepairable = report.unrepairable
            report = after
    return report


# -- checking -----------------------------------------------------------------------------
def _check(store: JobStore) -> tuple[FsckReport, JobInfo | None, _Journal | None]:
    report = FsckReport(store.job_id)
    info = _check_job_file(store, report)
    ids = _check_items(store, info, report) if info else None
    journal = _check_journal(store, info, ids, report) if info else None
    _check_derived(store, report)
    _check_strays(store, report)
    return report, info, journal


def _check_job_file(store: JobStore, report: FsckReport) -> JobInfo | None:
    try:
        return read_job_file(store.dir)
    except CorruptStateError as e:
        report.findings.append(
            Finding("job.json", "", f"{_reason(e)}; the job's spec has no other copy")
        )
        return None


def _check_items(store: JobStore, info: JobInfo, report: FsckReport) -> list[Any] | None:
    path = store.dir / ITEMS_FILE
    ids: list[Any] = []
    try:
        for block in verified_item_blocks(path, info.items_table, info.total, "no other copy"):
            ids.extend(orjson.loads(line[: line.index(b"\t")]) for line in block)
    except (CorruptStateError, ValueError) as e:
        detail = _reason(e) if isinstance(e, CorruptStateError) else f"an unreadable id ({e})"
        report.findings.append(Finding(ITEMS_FILE, "", f"{detail}; items from there on cannot run"))
        return None
    size, table = path.stat().st_size, info.items_table
    if table is not None and size > table["size"]:
        report.findings.append(
            Finding(ITEMS_FILE, f"bytes {table['size']}-{size - 1}", "rows of an extension "
                    "that a crash cut short (job.json does not name them): ignored; the next "
                    "extend=True call removes them", False)
        )  # fmt: skip
    return ids


def _check_journal(
    store: JobStore, info: JobInfo, ids: list[Any] | None, report: FsckReport
) -> _Journal:
    scan = scan_journal(store.journal_path)
    journal = _Journal(scan)
    name = JOURNAL_FILE
    if scan.torn_tail:
        a, b = scan.torn_tail
        report.findings.append(
            Finding(name, f"bytes {a}-{b - 1}", "an unfinished last record (a crash during an "
                    "append): nothing acknowledged is in it; the next resume cuts it", False)
        )  # fmt: skip
    if scan.damaged:
        journal.cut = scan.good_end
        a, b = scan.damaged[0]
        parts = [f"{len(scan.damaged)} damaged run(s) of records, the first at bytes {a}-{b - 1}"]
        if scan.after:
            lost = _facts(JobState(info.total), scan.after, ids)
            parts.append(
                f"{len(scan.after)} valid records after it (bytes {scan.after[0][0]}-"
                f"{scan.after[-1][1] - 1}) cannot be trusted without it: {lost}"
            )
        report.findings.append(Finding(name, f"from byte {a}", "; ".join(parts)))
    kept = _replay_prefix(store, scan.good_end, info.total)
    first = _first_record(store)
    if first is None or first.get("k") != "job":
        journal.cut = 0 if journal.cut is None else journal.cut
        report.findings.append(
            Finding(name, "byte 0", "the job's first record is missing: every outcome is lost")
        )
    checkpoint = _sound_checkpoint(store, info.total)
    if checkpoint is not None and checkpoint.offset > scan.good_end:
        journal.cut = scan.good_end
        journal.lost = lost_outcomes(checkpoint, kept)
        report.findings.append(
            Finding(
                name,
                f"bytes {scan.good_end}-{checkpoint.offset - 1}",
                f"acknowledged records lost ({CHECKPOINT_FILE} proves the journal held "
                f"{checkpoint.offset} bytes, {scan.good_end} survive): "
                f"{_lost_text(journal.lost, ids)}; "
                f"{kept.counts[SUCCEEDED]} successes survive",
            )
        )
    for _, _, record in _salvage_records(store, scan.good_end):
        report.findings.append(Finding(name, "", f"salvaged earlier: {record['summary']}", False))
    return journal


def _check_derived(store: JobStore, report: FsckReport) -> None:
    for name, kind in ((CHECKPOINT_FILE, "checkpoint"), (DLQ_SNAPSHOT, "dlq")):
        try:
            record = decode_line((store.dir / name).read_bytes())
        except FileNotFoundError:
            continue
        if record is None or record.get("k") != kind:
            report.findings.append(
                Finding(name, "", "fails its checksum; derived: no data lost, it is rebuilt "
                        "from the journal")
            )  # fmt: skip
    try:
        read_reduce_output(store.dir)
    except CorruptStateError:
        report.findings.append(
            Finding(REDUCE_FILE, "", "unreadable: the reduce output is lost; a salvage lets "
                    "resume run the reduce step again")
        )  # fmt: skip


def _check_strays(store: JobStore, report: FsckReport) -> None:
    holder = live_holder(store.dir)
    for name in sorted(os.listdir(store.dir)):
        if TEMP_MARK in name:
            report.findings.append(Finding(name, "", "a temp file a writer left", False))
        elif name in (LOCK_FILE, HOLDER_FILE) and not holder:
            report.findings.append(Finding(name, "", "left by a process that died", False))


# -- what was lost ------------------------------------------------------------------------
def _facts(base: JobState, records, ids: list[Any] | None) -> str:
    """What ``records`` recorded that a replay without them does not show."""
    after = JobState(base.total)
    for _, _, record in records:
        after.apply(record)
    return _lost_text(lost_outcomes(after, base), ids)


def _lost_text(lost: dict[str, Any], ids: list[Any] | None) -> str:
    if not lost or not lost["indices"]:
        return "no settled outcome is lost"
    shown = [ids[i] if ids else f"#{i}" for i in lost["indices"][:_SHOWN_IDS]]
    more = len(lost["indices"]) - len(shown)
    names = ", ".join(map(str, shown)) + (f" and {more} more" if more else "")
    return (
        f"{lost['succeeded']} acknowledged successes and {lost['dlq']} DLQ parkings are no "
        f"longer recorded (items {names}): a salvage makes them pending, resume runs them"
    )


def _replay_prefix(store: JobStore, end: int, total: int) -> JobState:
    state = JobState(total)
    for _, rec_end, record in _records(store, end):
        state.apply(record)
        state.offset = rec_end
    return state


def _records(store: JobStore, end: int):
    from .journal import read_records

    if end <= 0:
        return
    try:
        for offset, rec_end, record in read_records(store.journal_path):
            if rec_end > end:
                return
            yield offset, rec_end, record
    except CorruptStateError:
        return  # raised past ``end``: the damage is after what is asked for


def _salvage_records(store: JobStore, end: int):
    return [r for r in _records(store, end) if r[2].get("k") == "salvage"]


def _first_record(store: JobStore) -> dict[str, Any] | None:
    try:
        with open(store.journal_path, "rb") as handle:
            return decode_line(handle.readline())
    except FileNotFoundError:
        return None


def _sound_checkpoint(store: JobStore, total: int) -> JobState | None:
    try:
        record = decode_line((store.dir / CHECKPOINT_FILE).read_bytes())
        if record is None or record.get("k") != "checkpoint":
            return None
        state = JobState.from_checkpoint(record)
        if state.total > total:
            return None
        state.grow(total)  # the job was extended since
        return state
    except (FileNotFoundError, ValueError, KeyError, TypeError, IndexError):
        return None
    except Exception:  # noqa: BLE001 - zlib.error and friends: a damaged derived file
        return None


def _reason(error: MrpoolError | Exception) -> str:
    """The middle of a CorruptStateError's message: no path, no hint."""
    text = str(error)
    text = text.split(": ", 1)[1] if ": " in text else text
    return text.split("; run 'mrpool fsck", 1)[0].split("; no other copy", 1)[0]


# -- salvaging ----------------------------------------------------------------------------
def _salvage(store: JobStore, report: FsckReport, info: JobInfo | None, journal) -> None:
    if info is None or any(f.file == ITEMS_FILE and f.damage for f in report.findings):
        report.unrepairable = True
        return
    for name in (CHECKPOINT_FILE, DLQ_SNAPSHOT):  # derived: removed first, rebuilt later
        if any(f.file == name for f in report.findings) or journal.cut is not None:
            (store.dir / name).unlink(missing_ok=True)
            report.repaired.append(f"removed {name} (derived; rebuilt from the journal)")
    fsync_dir(store.dir)
    extra: list[dict[str, Any]] = []
    if any(f.file == REDUCE_FILE for f in report.findings):
        (store.dir / REDUCE_FILE).unlink()
        extra.append(records.reduce(False, "reduce output lost (fsck --salvage)"))
        report.repaired.append(f"removed {REDUCE_FILE}; resume runs the reduce step again")
    if journal.cut is not None:
        extra.insert(0, _salvage_record(store, info, report, journal))
        kept = _replay_prefix(store, journal.cut, info.total)
        if kept.open_count:  # attempts the lost part closed: they count, none crashed
            extra.append(records.close("fsck --salvage", None))
        report.repaired.append(
            (
                f"cut {JOURNAL_FILE} to its first {journal.cut} bytes (its last good record)"
                if journal.cut
                else f"rebuilt {JOURNAL_FILE}'s first record from job.json (none survived)"
            )
            + "; what the rest held is recorded in a salvage record"
        )
    if extra:
        _rewrite_journal(store, info, journal.cut, extra)
    sweep_temp_files(store.dir)


def _salvage_record(store, info: JobInfo, report: FsckReport, journal) -> dict[str, Any]:
    lines = [f.line() for f in report.findings if f.damage and f.file == JOURNAL_FILE]
    summary = f"journal cut at byte {journal.cut} of {journal.scan.size}; " + " | ".join(lines)
    return records.salvage(journal.cut, journal.scan.size, journal.scan.damaged, summary)


def _rewrite_journal(store: JobStore, info: JobInfo, cut: int | None, extra) -> None:
    """The journal's first ``cut`` bytes (all of it if None) plus ``extra`` records, written
    beside it, fsynced and renamed over it: a crash leaves the old or the new file."""
    path = store.journal_path
    keep = path.stat().st_size if cut is None else cut
    now = time.time()
    tail = []
    if keep == 0:  # the first record was lost: it is rebuilt from job.json
        tail.append(records.job(info.job_id, info.total, info.duplicates_in_input, info.id_mode))
    tail.extend(extra)
    tmp = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    try:
        with open(path, "rb", buffering=0) as old:
            left = keep
            while left:
                block = old.read(min(left, 1 << 20))
                if not block:
                    raise CorruptStateError(f"{path}: shrank while being salvaged")
                os.write(fd, block)
                left -= len(block)
        os.write(fd, b"".join(encode_record({**r, "t": now}) for r in tail))
        os.fsync(fd)
        os.close(fd)
        fd = -1
        os.replace(tmp, path)
    finally:
        if fd >= 0:
            os.close(fd)
        if tmp.exists():
            tmp.unlink()
    fsync_dir(store.dir)
