"""The output folder's ledger: what every run did to every video, appended as each video finishes.

    <root>/ledger/<run_id>.r<rank>.jsonl      one file per process of a run, one JSON object a line

Each process appends only to its own file (no two writers share one, so nothing needs a lock that a
network filesystem might not honour), in whole lines, fsynced after every batch; a write that fails
half-way is cut back to the last whole line. A process killed mid-line leaves at most one torn last
line, which readers skip. Records (`kind`):

* `start`: run, rank, world_size, shard [index, count], host, pid, time, csv_path, csv_rows,
  csv_keys (SHA-256 of the CSV's sorted (dataset, video_id) pairs), rows (this run's), assigned and
  skipped (this process's), output_format, make_vis, semtrack_version.
* `video`: run, rank, row, dataset, video_id, status (`done` | `failed`), time; done: frames T,
  points N, outputs {"pickle": {bytes, sha256}, "gif": {bytes}} (tar shards: also shard, member,
  offset, shard_bytes), stats {name: number or None} (`semtrack.trackstats`); failed: stage, reason,
  video_path, and for decode failures file {ino, size, mtime_ns, ctime_ns} (`file_identity`).
  `adopted: true` marks a pickle found valid on disk without a record (written by an older
  semtrack); `restated: true` a done record repeated with the `stats` that `--verify_outputs`
  (`semtrack-report`, or a resumed run) computed from its pickle (no part of any run's figures).
* `end`: run, rank, time, status (`complete` | `stopped` | `failed`), reason, done, failed,
  stage_totals {stage: [seconds, videos]}, wall_s, data_wait_s, points_dropped, startup_s.

Every record also holds `seq`, its writer's Lamport sequence: a process starts one above the highest
`seq` in the folder's ledger when it planned its rows, and counts up by one per record. So a record
written after another was read always sorts after it, whatever the clocks of the two hosts say; and
(run, rank, seq) names a record once, so the copy of a ledger file adds nothing (`unique_records`).

A video's state is its latest record (by `seq`, then time; records without `seq`, of older semtrack,
come first). A row is done when that record is `done`, was made at the row's frame rate (`fps`, the
per-row target: None = native), and every output this run asks for (the pickle, and the GIF under
--make_vis) is listed there and still has the recorded size on disk (one `lstat`); `verify=True`
also re-reads and validates the pickle (and restates a record without statistics with those of its
pickle). A pickle found without a record is adopted only when it
validates and its metadata (if any) names the row's dataset and video id, the folder's options and
the row's frame rate.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import stat
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Container, Iterable, Iterator, Sequence

from semtrack.layout import OutputLayout
from semtrack.ledger_schema import parse_record
from semtrack.safeio import (
    LEDGER_FILE_MAX,
    LEDGER_LINE_MAX,
    UnsafeFile,
    iter_lines,
    open_append,
    open_regular,
    read_bytes,
    shown,
)
from semtrack.trackfile import MAX_FILE_BYTES, loads_tracks
from semtrack.trackstats import file_stats
from semtrack.util import one_line

DONE, FAILED = "done", "failed"


def new_run_id() -> str:
    """`<UTC start time>-<6 random hex>`, e.g. `20261124T100000Z-3fa2c1`: sorts by start time."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + secrets.token_hex(3)


def csv_keys(rows: Iterable) -> str:
    """SHA-256 (hex) of the sorted `dataset \\x1f video_id` pairs of `rows`: which CSV a run read."""
    digest = hashlib.sha256()
    for key in sorted(f"{r.dataset}\x1f{r.video_id}" for r in rows):
        digest.update(key.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Records
# ---------------------------------------------------------------------------------------------


def output_entry(data: bytes) -> dict:
    """What a `done` record says of an output it lists: {"bytes", "sha256" (hex)} of `data`."""
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def done_record(row: int, dataset: str, video_id: str, frames: int, points: int, outputs: dict | None = None,
                stats: dict | None = None, **extra) -> dict:
    """A `video` record of a done row: T `frames`, N `points`, its `outputs` (filled in by the output
    sink when None), its track statistics `stats` (`semtrack.trackstats`; left out when None); `extra`
    e.g. `adopted=True`."""
    record = {"kind": "video", "row": row, "dataset": dataset, "video_id": video_id, "status": DONE,
              "frames": frames, "points": points}
    if outputs is not None:
        record["outputs"] = outputs
    if stats is not None:
        record["stats"] = stats
    return {**record, **extra}


def file_identity(path: str) -> dict | None:
    """What tells a file's content changed, without reading it: {ino, size, mtime_ns, ctime_ns} of
    `path` now (ints; no device number, which differs between the hosts mounting one folder), or None
    if it cannot be stat'ed."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return {"ino": info.st_ino, "size": info.st_size, "mtime_ns": info.st_mtime_ns, "ctime_ns": info.st_ctime_ns}


def failed_record(row: int, dataset: str, video_id: str, stage: str, reason: str, video_path: str) -> dict:
    """A `video` record of a failed row: the `stage` that failed and a one-line `reason`; a decode
    failure also records the file's `file_identity` as it is now, which `is_permanent` compares."""
    record = {"kind": "video", "row": row, "dataset": dataset, "video_id": video_id, "status": FAILED,
              "stage": stage, "reason": reason, "video_path": video_path}
    identity = file_identity(video_path) if stage == "decode" and video_path else None
    if identity is not None:
        record["file"] = identity
    return record


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


class LedgerPart:
    """One process's ledger file. `append` writes whole lines and fsyncs them, or raises OSError
    having cut the file back to its length before the call."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def append(self, records: Sequence[dict]) -> None:
        if not records:
            return
        data = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records).encode("ascii")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Opened per call, not held: a folder with no file open for writing can be remounted or unmounted.
        fd = open_append(self.path)  # never through a link, never a FIFO
        try:
            size = os.fstat(fd).st_size
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            except OSError:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)


def fallback_path(run_id: str, rank: int) -> Path:
    """Where records go that the output folder could not take: the system's temporary folder, under a
    name no ledger file of the folder has (copied into `<root>/ledger/` as it is, it is read with them)."""
    return Path(tempfile.gettempdir()) / f"semtrack-ledger-{run_id}.r{rank}.saved.jsonl"


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def iter_records(layout: OutputLayout, problems: list[str] | None = None) -> Iterator[dict]:
    """Every record of every ledger file of the folder (files in name order, lines in order) that
    passes the schema (`semtrack.ledger_schema`). Lines that do not (torn, foreign, mistyped, longer
    than `LEDGER_LINE_MAX`: the rest of that file too) are skipped, and files that cannot be read
    safely (links, FIFOs, devices, larger than `LEDGER_FILE_MAX`); each adds one line to `problems`
    ("N unreadable ledger lines in FILE", or why the file was skipped). Never raises for what a ledger file holds."""
    folder = layout.ledger_dir
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.jsonl")):
        bad = 0
        try:
            for line in iter_lines(path, LEDGER_LINE_MAX, LEDGER_FILE_MAX):
                record = None if line is None or not line.strip() else parse_record(line)
                if record is not None:
                    yield record
                elif line is None or line.strip():
                    bad += 1
        except (OSError, ValueError) as exc:
            if problems is not None:
                problems.append(f"skipped the ledger file {shown(path)}: {one_line(exc)}")
        if bad and problems is not None:
            problems.append(f"{bad} unreadable ledger line{'s' if bad > 1 else ''} in {shown(path)}")


class LedgerTail:
    """Reads the records appended to one ledger file since the last `read` (whole lines that parse as
    records, `parse_record`; a file not there yet, or not a regular file, reads as empty)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self) -> list[dict]:
        try:
            with os.fdopen(open_regular(self.path, LEDGER_FILE_MAX), "rb") as f:
                f.seek(self.offset)
                data = f.read(LEDGER_FILE_MAX - self.offset)
        except (OSError, ValueError):  # ValueError: UnsafeFile
            return []
        whole = data[:data.rfind(b"\n") + 1]
        self.offset += len(whole)
        records = (parse_record(line) for line in whole.splitlines() if len(line) <= LEDGER_LINE_MAX)
        return [r for r in records if r is not None]


def read_records(layout: OutputLayout, problems: list[str] | None = None) -> list[dict]:
    """`iter_records` as a list."""
    return list(iter_records(layout, problems))


def order(record: dict) -> tuple:
    """The sort key of a record among others: its `seq` (0 for older records), then its time."""
    return record.get("seq", 0), record["time"]


def latest_videos(records: Iterable[dict], keys: Container[tuple[str, str]] | None = None
                  ) -> dict[tuple[str, str], dict]:
    """{(dataset, video_id): its latest `video` record} (by `order`, ties to the one read last), of
    the videos in `keys` (default all). Holds one record per video while reading."""
    latest: dict[tuple[str, str], dict] = {}
    for r in records:
        if r["kind"] != "video":
            continue
        key = (r["dataset"], r["video_id"])
        if (keys is None or key in keys) and (key not in latest or order(r) >= order(latest[key])):
            latest[key] = r
    return latest


def unique_records(records: Iterable[dict]) -> list[dict]:
    """`records` less repeats (the same record read from a copied ledger file): one per (run, rank,
    seq, time) (a record restated later keeps its seq, not its time), or for records without `seq`
    one per identical content."""
    seen: set = set()
    kept = []
    for r in records:
        key = (r["run"], r.get("rank"), r["seq"], r["time"]) if "seq" in r else json.dumps(r, sort_keys=True)
        if key not in seen:
            seen.add(key)
            kept.append(r)
    return kept


class SequenceTracker:
    """Passes records through, noting the highest `seq` seen (`last`, 0 if none)."""

    def __init__(self):
        self.last = 0

    def watch(self, records: Iterable[dict]) -> Iterator[dict]:
        for r in records:
            self.last = max(self.last, r.get("seq", 0))
            yield r


# ---------------------------------------------------------------------------------------------
# The done rule
# ---------------------------------------------------------------------------------------------


def output_file(layout: OutputLayout, record: dict, kind: str) -> tuple[Path, int] | None:
    """(path, size in bytes it must have) of output `kind` ("pickle" | "gif") of a done record, or None
    when the record lists none: the pickle or GIF file, or the tar shard holding it."""
    entry = (record.get("outputs") or {}).get(kind)
    if not isinstance(entry, dict):
        return None
    if "shard" in entry:
        return layout.root / entry["shard"], entry["shard_bytes"]
    path = layout.pickle(record["dataset"], record["video_id"]) if kind == "pickle" else \
        layout.gif(record["dataset"], record["video_id"])
    return path, entry["bytes"]


def read_output(layout: OutputLayout, record: dict, kind: str) -> bytes:
    """The bytes of output `kind` of a done record (a file, or its slice of a tar shard), read as
    `semtrack.safeio` reads (no link, FIFO or device; at most a track file's `MAX_FILE_BYTES`).
    OSError or ValueError (`UnsafeFile`) naming the file when it cannot be."""
    path, _ = output_file(layout, record, kind)
    entry = record["outputs"][kind]
    if "shard" not in entry:
        return read_bytes(path, MAX_FILE_BYTES)
    return read_slice(path, entry["offset"], entry["bytes"])


def read_slice(path: Path, offset: int, size: int) -> bytes:
    """`size` bytes at `offset` of the regular file `path` (a tar member), at most `MAX_FILE_BYTES`;
    UnsafeFile when the file is no regular file or too short to hold them."""
    if size > MAX_FILE_BYTES:
        raise UnsafeFile(f"{shown(path)}: a member of {size} bytes, more than a track file holds ({MAX_FILE_BYTES})")
    fd = open_regular(path, None)
    try:
        length = os.fstat(fd).st_size
        if offset + size > length:
            raise UnsafeFile(f"{shown(path)}: {length} bytes, too short for a member of {size} bytes at {offset}")
        chunks, done = [], 0
        while done < size:
            chunk = os.pread(fd, min(size - done, 2**24), offset + done)
            if not chunk:
                raise UnsafeFile(f"{shown(path)}: cut short at byte {offset + done}")
            chunks.append(chunk)
            done += len(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


@dataclass
class ResumePlan:
    """One process's share of a run: `pending` row indices to process, `skipped` rows already done or
    failed without a retry (`not_retried` of them), `adopted` records to append to the ledger: for
    valid pickles found without a record, and (when verifying) done records without statistics
    repeated with those of their pickles (`restated`)."""

    pending: list[int] = field(default_factory=list)
    skipped: int = 0
    adopted: list[dict] = field(default_factory=list)
    not_retried: int = 0  # of `skipped`: rows whose latest record is a failure the rule does not retry


def is_permanent(record: dict) -> bool:
    """Whether a `failed` record's failure would recur: the file failed to decode (not a video, empty,
    truncated, undecodable) and is unchanged since: its `file_identity` equals the one recorded (no
    clock is compared, so hosts whose clocks disagree agree), or, for records without one (older
    semtrack), its mtime and ctime precede the record's time. Failures of the model stages, of
    writing, of a decoder that broke unexpectedly, or of a file that is gone or changed are transient
    (worth a retry)."""
    if record.get("stage") != "decode" or str(record.get("reason", "")).startswith("unexpected"):
        return False
    now = file_identity(record.get("video_path") or "")
    if now is None:
        return False
    if "file" in record:
        return record["file"] == now
    return max(now["mtime_ns"], now["ctime_ns"]) / 1e9 < record.get("time", 0.0)


class DoneRule:
    """Decides which rows are done: the ledger's latest record and one `lstat` per output (cached per
    tar shard); `verify` re-reads and validates each pickle; `want_gif`: --make_vis asks for GIFs.
    `options`: the folder's output options (`ExtractConfig.output_options`), which an adopted pickle's
    metadata must hold; `row_fps`: {row index: its target frame rate (None = native)}, which a done
    record (and an adopted pickle's metadata, where `check_fps`) must match; None: not checked.
    `retry_failed` says which failed rows are redone: "always", "never", or "transient" (not those
    whose failure `is_permanent`)."""

    def __init__(self, layout: OutputLayout, latest: dict[tuple[str, str], dict], want_gif: bool, verify: bool,
                 options: dict | None = None, row_fps: dict[int, float | None] | None = None, check_fps: bool = True,
                 retry_failed: str = "always"):
        self.layout, self.latest, self.want_gif, self.verify = layout, latest, want_gif, verify
        self.options, self.row_fps, self.check_fps = options, row_fps, check_fps
        self.retry_failed = retry_failed
        self._sizes: dict[Path, int | None] = {}
        self.refused: list[str] = []  # one line per pickle found without a record and not adopted, why
        self.restated: list[dict] = []  # verified done records that had no statistics, with them

    def plan(self, rows: Iterable, rerun: bool = False) -> ResumePlan:
        """`rows`: objects with `index`, `dataset`, `video_id`."""
        plan, self.restated = ResumePlan(), []
        for row in rows:
            if rerun:
                plan.pending.append(row.index)
                continue
            record = self.latest.get((row.dataset, row.video_id))
            if record is not None and record.get("status") == FAILED and not self.retries(record):
                plan.skipped += 1
                plan.not_retried += 1
                continue
            if record is not None:
                done = self.is_done(record) and self._same_fps(record, row)
            else:
                adopted = self.adopt(row)
                done = adopted is not None
                if done:
                    plan.adopted.append(adopted)
            if done:
                plan.skipped += 1
            else:
                plan.pending.append(row.index)
        plan.adopted += self.restated
        return plan

    def _same_fps(self, record: dict, row) -> bool:
        """Whether a record made at frame rate `fps` (absent in older records: not checked) fits the row."""
        return self.row_fps is None or "fps" not in record or record["fps"] == self.row_fps.get(row.index)

    def _disagreement(self, meta: dict, row) -> str | None:
        """What in an adopted pickle's metadata disagrees with the row and the folder, or None."""
        for key, want in (("dataset", row.dataset), ("video_id", row.video_id)):
            if meta.get(key) != want:
                return f"its metadata names {key} {shown(str(meta.get(key)))!r}, the row {shown(want)!r}"
        config = meta.get("config")
        if self.options is not None:
            differing = sorted(k for k, v in self.options.items() if not isinstance(config, dict) or config.get(k) != v)
            if differing:
                return f"it was made with other options ({', '.join(differing[:5])})"
        if self.check_fps and self.row_fps is not None and "fps" in meta and meta["fps"] != self.row_fps.get(row.index):
            return f"it was made at fps {meta['fps']}, the row asks for {self.row_fps.get(row.index)}"
        return None

    def retries(self, record: dict) -> bool:
        """Whether the failed `record`'s row is redone."""
        return self.retry_failed == "always" or (self.retry_failed == "transient" and not is_permanent(record))

    def is_done(self, record: dict) -> bool:
        if record.get("status") != DONE:
            return False
        kinds = ("pickle", "gif") if self.want_gif else ("pickle",)
        for kind in kinds:
            where = output_file(self.layout, record, kind)
            if where is None or self._size(where[0]) != where[1]:
                return False
        return not self.verify or self._valid(record)

    def _size(self, path: Path) -> int | None:
        """The size of the regular file `path` (not through a link); None for anything else."""
        if path not in self._sizes:
            try:
                info = os.lstat(path)
                self._sizes[path] = info.st_size if stat.S_ISREG(info.st_mode) else None
            except (OSError, ValueError):
                self._sizes[path] = None
        return self._sizes[path]

    def _valid(self, record: dict) -> bool:
        try:
            data = read_output(self.layout, record, "pickle")
            tracks = loads_tracks(data, record["video_id"])
        except (OSError, ValueError):  # UnsafeFile, TrackFileError
            return False
        if output_entry(data)["sha256"] != record["outputs"]["pickle"].get("sha256"):
            return False
        if not isinstance(record.get("stats"), dict):
            self.restated.append({**record, "stats": file_stats(tracks), "restated": True})
        return True

    def adopt(self, row) -> dict | None:
        """A `done` record (with its `stats`) for a row with no record whose pickle (and GIF, if wanted)
        exists and whose pickle validates with `loads_tracks`; else None."""
        path = self.layout.pickle(row.dataset, row.video_id)
        gif_size = self._size(self.layout.gif(row.dataset, row.video_id)) if self.want_gif else None
        if self._size(path) is None or (self.want_gif and gif_size is None):
            if self._size(path) is None and os.path.lexists(path):
                self.refused.append(f"{shown(path)}: not a regular file (a link, FIFO or device); not adopted")
            return None
        try:
            data = read_bytes(path, MAX_FILE_BYTES)  # a link, FIFO or device is refused before it is read
            tracks = loads_tracks(data, str(path))
        except (OSError, ValueError) as exc:  # UnsafeFile, TrackFileError
            self.refused.append(one_line(exc) if isinstance(exc, OSError) else str(exc))
            return None
        disagreement = self._disagreement(tracks.meta, row) if tracks.meta else None
        if disagreement is not None:
            self.refused.append(f"{shown(path)}: not adopted: {disagreement}")
            return None
        outputs = {"pickle": output_entry(data)}
        if self.want_gif:
            outputs["gif"] = {"bytes": gif_size}
        extra = {} if self.row_fps is None else {"fps": self.row_fps.get(row.index)}
        return done_record(row.index, row.dataset, row.video_id, tracks.num_frames, tracks.num_points, outputs,
                           stats=file_stats(tracks), adopted=True, **extra)
