"""WebDataset output: tar shards of per-video members, and the manifest that says where each video is.

    <root>/shards/<run_id>.r<rank>.<seq>.tar     members <key>.pkl, <key>.json [, <key>.gif]
    <root>/manifest.csv                          MANIFEST_COLUMNS, one line per video

`<key>` is a hash of (dataset, video_id) without dots (WebDataset groups a sample's members by the
name up to the first dot; video ids may hold dots). `.pkl` holds exactly the bytes of the video's
pickle (`semtrack.trackfile.dumps_tracks`), `.json` its dataset, video_id, row, frames T and points N,
`.gif` the trail GIF (--make_vis).

Crash safety: a shard is written under a temporary name (`semtrack.safeio.create_temporary`) and renamed
when closed, after `videos_per_tar` videos or at the end of the run; only then are its videos'
ledger records written. A process killed mid-shard leaves a temporary file (swept by a later run)
and no record, so those videos are redone. A member whose write fails is cut off again.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Iterable

from semtrack.layout import OutputLayout
from semtrack.ledger import output_entry, read_slice
from semtrack.ledger_schema import MAX_INT as MAX_OFFSET
from semtrack.ledger_schema import SHARD_PATH as _SHARD_PATH
from semtrack.safeio import (
    MANIFEST_MAX,
    commit_temporary,
    create_temporary,
    discard_temporary,
    read_text,
    real_folder,
    shown,
)
from semtrack.trackfile import MAX_FILE_BYTES

MEMBER_ORDER = ("pickle", "json", "gif")  # a sample's members, in the order they are written
MANIFEST_COLUMNS = ("video_id", "dataset", "shard", "member", "offset", "bytes", "T", "N", "status")
_END_OF_ARCHIVE = b"\0" * (2 * tarfile.BLOCKSIZE)


def member_key(dataset: str, video_id: str) -> str:
    """The members' common name: 20 hex digits of SHA-256 of `dataset \\x1f video_id`."""
    return hashlib.sha256(f"{dataset}\x1f{video_id}".encode("utf-8", "surrogatepass")).hexdigest()[:20]


def _write_all(f, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


class TarShards:
    """One process's tar shards (an output sink, `semtrack.sinks`). `add` appends a video's members
    and holds its ledger record; the records come back (completed with `shard_bytes`) from the `add`
    that closes the shard, or from `close`. `pending` is the number of records held."""

    format = "webdataset"

    def __init__(self, layout: OutputLayout, run_id: str, rank: int, videos_per_tar: int):
        self.layout, self.run_id, self.rank, self.videos_per_tar = layout, run_id, rank, videos_per_tar
        self._seq = 0
        self._file = None
        self._final: Path | None = None
        self._tmp: Path | None = None
        self._held: list[dict] = []

    @property
    def pending(self) -> int:
        return len(self._held)

    def _open(self) -> None:
        self._final = self.layout.shards_dir / f"{self.run_id}.r{self.rank}.{self._seq:05d}.tar"
        real_folder(self.layout.root, self._final.parent)
        self._file, self._tmp = create_temporary(self._final)
        self._seq += 1

    def add(self, record: dict, members: dict[str, bytes]) -> list[dict]:
        """Append `members` {kind ("pickle" | "json" | "gif"): bytes} of the video of `record` (a
        `video` ledger record, whose `outputs` this fills in; the `.json` member is `sample_json` of it
        unless given), in `MEMBER_ORDER` -> the records of a shard this closed."""
        if self._file is None:
            self._open()
        start = self._file.tell()
        key = member_key(record["dataset"], record["video_id"])
        members = {"json": sample_json(record), **members}
        outputs = {}
        try:
            for kind in (k for k in MEMBER_ORDER if k in members):
                data = members[kind]
                name = f"{key}.{'pkl' if kind == 'pickle' else kind}"
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                header = info.tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
                offset = self._file.tell() + len(header)
                _write_all(self._file, header + data + b"\0" * (-len(data) % tarfile.BLOCKSIZE))
                if kind != "json":
                    outputs[kind] = {"shard": self.layout.relative(self._final), "member": name, "offset": offset,
                                     **output_entry(data)}
        except OSError:
            self._file.truncate(start)
            self._file.seek(start)
            raise
        record["outputs"] = outputs
        self._held.append(record)
        return self.close() if len(self._held) >= self.videos_per_tar else []

    def close(self) -> list[dict]:
        """Finish the open shard (end-of-archive blocks, fsync, rename) -> its videos' records."""
        if self._file is None:
            return []
        file, tmp, final, held = self._file, self._tmp, self._final, self._held
        self._file, self._held = None, []
        try:
            _write_all(file, _END_OF_ARCHIVE)
            commit_temporary(file, tmp, final)
        except OSError:
            discard_temporary(file, tmp)
            raise
        size = final.stat().st_size
        for record in held:
            for entry in record["outputs"].values():
                entry["shard_bytes"] = size
        return held

    def abandon(self) -> list[dict]:
        """Drop the open shard (after a failed `close`, or to give up) -> the records it held."""
        held, self._held = self._held, []
        if self._file is not None:
            discard_temporary(self._file, self._tmp)
            self._file = None
        return held


def sample_json(record: dict) -> bytes:
    """The `.json` member of a video: dataset, video_id, row, frames T, points N."""
    keys = ("dataset", "video_id", "row", "frames", "points")
    return json.dumps({k: record.get(k) for k in keys}, sort_keys=True).encode("utf-8")


# ---------------------------------------------------------------------------------------------
# Manifest
# ---------------------------------------------------------------------------------------------


def manifest_csv(latest: Iterable[dict]) -> str:
    """`manifest.csv` from the latest ledger record of each video: done videos with their shard,
    member, offset and size, failed ones with those fields empty. Ordered by dataset, video id."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for r in sorted(latest, key=lambda r: (r["dataset"], r["video_id"])):
        entry = (r.get("outputs") or {}).get("pickle") or {}
        done = r["status"] == "done" and "shard" in entry
        writer.writerow({"video_id": r["video_id"], "dataset": r["dataset"], "shard": entry.get("shard", ""),
                         "member": entry.get("member", ""), "offset": entry.get("offset", ""),
                         "bytes": entry.get("bytes", ""), "T": r.get("frames", "") if done else "",
                         "N": r.get("points", "") if done else "", "status": r["status"]})
    return out.getvalue()


def _manifest_int(text: str, high: int, path, line: int, column: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        value = -1
    if not 0 <= value <= high:
        raise ValueError(f"{shown(path)}: line {line}: {column} {shown(str(text))[:40]!r} is not an integer "
                         f"in 0..{high}")
    return value


def read_manifest(path: str | os.PathLike) -> dict[tuple[str, str], dict]:
    """{(dataset, video_id): manifest row} of the done videos of a `manifest.csv` (offset and bytes as
    ints), read as `semtrack.safeio` reads (no link, FIFO or device; at most `MANIFEST_MAX` bytes).
    Raises ValueError naming the file (and line) for missing columns, malformed CSV, a shard outside
    `shards/`, an offset or size out of bounds (a member holds at most a track file's bytes)."""
    try:
        reader = csv.DictReader(io.StringIO(read_text(path, MANIFEST_MAX), newline=""))
        missing = set(MANIFEST_COLUMNS) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{shown(path)}: not a semtrack manifest (missing columns {sorted(missing)})")
        rows = {}
        for row in reader:
            if None in row or any(row.get(c) is None for c in MANIFEST_COLUMNS):
                raise ValueError(f"{shown(path)}: line {reader.line_num}: not {len(MANIFEST_COLUMNS)} fields")
            if row["status"] == "done" and row["shard"]:
                if not _SHARD_PATH.fullmatch(row["shard"]):
                    raise ValueError(f"{shown(path)}: line {reader.line_num}: shard {shown(row['shard'])[:80]!r} "
                                     "is not a tar file under shards/")
                row["offset"] = _manifest_int(row["offset"], MAX_OFFSET, path, reader.line_num, "offset")
                row["bytes"] = _manifest_int(row["bytes"], MAX_FILE_BYTES, path, reader.line_num, "bytes")
                rows[(row["dataset"], row["video_id"])] = row
    except csv.Error as exc:
        raise ValueError(f"{shown(path)}: malformed CSV: {exc}") from None
    return rows


def read_member(root: str | os.PathLike, entry: dict) -> bytes:
    """The bytes of a manifest row's member (`root`: the folder the manifest's shard paths start from);
    `semtrack.ledger.read_slice` (ValueError when the shard is no regular file or too short)."""
    return read_slice(Path(root) / entry["shard"], entry["offset"], entry["bytes"])
