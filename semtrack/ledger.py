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
  video_path. `adopted: true` marks a pickle found valid on disk without a record (written by an older
  semtrack); `restated: true` a done record repeated with the `stats` that `semtrack-report
  --verify_outputs` computed from its pickle (not counted in any run's figures).
* `end`: run, rank, time, status (`complete` | `stopped` | `failed`), reason, done, failed,
  stage_totals {stage: [seconds, videos]}, wall_s, data_wait_s, points_dropped, startup_s.

A video's state is its latest record (by time). A row is done when that record is `done` and
every output this run asks for (the pickle, and the GIF under --make_vis) is listed there and still
has the recorded size on disk (one `stat`); `verify=True` also re-reads and validates the pickle (and
restates a record without statistics with those of its pickle).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Container, Iterable, Iterator, Sequence

from semtrack.layout import OutputLayout
from semtrack.trackfile import TrackFileError, loads_tracks
from semtrack.trackstats import file_stats

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


def failed_record(row: int, dataset: str, video_id: str, stage: str, reason: str, video_path: str) -> dict:
    """A `video` record of a failed row: the `stage` that failed and a one-line `reason`."""
    return {"kind": "video", "row": row, "dataset": dataset, "video_id": video_id, "status": FAILED,
            "stage": stage, "reason": reason, "video_path": video_path}


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
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
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


def iter_records(layout: OutputLayout) -> Iterator[dict]:
    """Every record of every ledger file of the folder (files in name order, lines in order); torn
    or foreign lines are skipped."""
    folder = layout.ledger_dir
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.jsonl")):
        try:
            lines = path.read_bytes().splitlines()
        except OSError:
            continue
        for line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if _well_formed(record):
                yield record


class LedgerTail:
    """Reads the records appended to one ledger file since the last `read` (whole lines only; a file
    not there yet reads as empty)."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self) -> list[dict]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        whole = data[:data.rfind(b"\n") + 1]
        self.offset += len(whole)
        out = []
        for line in whole.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if _well_formed(record):
                out.append(record)
        return out


def read_records(layout: OutputLayout) -> list[dict]:
    """`iter_records` as a list."""
    return list(iter_records(layout))


_REQUIRED = {"start": ("time",), "end": ("time",), "video": ("time", "row", "dataset", "video_id", "status")}


def _well_formed(record) -> bool:
    """A record of a known kind with the fields readers rely on."""
    if not isinstance(record, dict) or not isinstance(record.get("run"), str):
        return False
    return all(key in record for key in _REQUIRED.get(record.get("kind"), ("-",)))


def latest_videos(records: Iterable[dict], keys: Container[tuple[str, str]] | None = None
                  ) -> dict[tuple[str, str], dict]:
    """{(dataset, video_id): its latest `video` record} (by `time`, ties to the one read last), of
    the videos in `keys` (default all). Holds one record per video while reading."""
    latest: dict[tuple[str, str], dict] = {}
    for r in records:
        if r["kind"] != "video":
            continue
        key = (r["dataset"], r["video_id"])
        if (keys is None or key in keys) and (key not in latest or r["time"] >= latest[key]["time"]):
            latest[key] = r
    return latest


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
    """The bytes of output `kind` of a done record (a file, or its slice of a tar shard)."""
    path, _ = output_file(layout, record, kind)
    entry = record["outputs"][kind]
    with open(path, "rb") as f:
        if "shard" in entry:
            f.seek(entry["offset"])
            return f.read(entry["bytes"])
        return f.read()


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
    truncated, undecodable) and is unchanged since (its mtime and ctime before the record's time).
    Failures of the model stages, of writing, of a decoder that broke unexpectedly, or of a file that
    is gone or changed are transient (worth a retry)."""
    if record.get("stage") != "decode" or str(record.get("reason", "")).startswith("unexpected"):
        return False
    try:
        info = os.stat(record.get("video_path") or "")
    except (OSError, ValueError):
        return False
    return max(info.st_mtime, info.st_ctime) < record.get("time", 0.0)


class DoneRule:
    """Decides which rows are done: the ledger's latest record and one `stat` per output (cached per
    tar shard); `verify` re-reads and validates each pickle; `want_gif`: --make_vis asks for GIFs.
    `retry_failed` says which failed rows are redone: "always", "never", or "transient" (not those
    whose failure `is_permanent`)."""

    def __init__(self, layout: OutputLayout, latest: dict[tuple[str, str], dict], want_gif: bool, verify: bool,
                 retry_failed: str = "always"):
        self.layout, self.latest, self.want_gif, self.verify = layout, latest, want_gif, verify
        self.retry_failed = retry_failed
        self._sizes: dict[Path, int | None] = {}
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
                done = self.is_done(record)
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
        if path not in self._sizes:
            try:
                self._sizes[path] = os.stat(path).st_size
            except (OSError, ValueError):
                self._sizes[path] = None
        return self._sizes[path]

    def _valid(self, record: dict) -> bool:
        try:
            data = read_output(self.layout, record, "pickle")
            tracks = loads_tracks(data, record["video_id"])
        except (OSError, TrackFileError):
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
            return None
        try:
            data = path.read_bytes()
            tracks = loads_tracks(data, str(path))
        except (OSError, TrackFileError):
            return None
        outputs = {"pickle": output_entry(data)}
        if self.want_gif:
            outputs["gif"] = {"bytes": gif_size}
        return done_record(row.index, row.dataset, row.video_id, tracks.num_frames, tracks.num_points, outputs,
                           stats=file_stats(tracks), adopted=True)
