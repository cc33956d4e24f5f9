"""The input rows: a CSV read, validated and resolved (`read_video_csv` -> `VideoRow`s), or videos
named without a CSV (`read_video_paths`: a file, a folder, a glob).

CSV problems are ValueErrors naming the file and the culprit (unreadable, empty or non-UTF-8 file,
malformed quoting, duplicate or missing columns, ragged rows, bad cells, duplicate outputs).
"""
from __future__ import annotations

import codecs
import csv
import glob
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Iterator

from semtrack.config import VIDEO_ID_RULES
from semtrack.safeio import check_regular

REQUIRED_COLUMNS = ("video_path", "dataset")
_MAX_LISTED = 10  # culprits listed in one CSV error message
CSV_MAX = 2**32  # bytes of an input CSV, at most (tens of millions of rows)
VIDEO_SUFFIXES = (".mp4", ".webm", ".mkv", ".avi", ".mov", ".m4v", ".mpg", ".mpeg", ".wmv", ".flv", ".ogv")


@dataclass(frozen=True)
class VideoRow:
    """One validated CSV row. `fps`: per-row target rate, None = native, `...` = dataset default."""

    index: int
    video_path: str  # resolved path (see `read_video_csv`)
    video_id: str
    dataset: str
    fps: float | None | type(Ellipsis)


def _parse_fps(value: str, csv_path: Path, row: int) -> float | None | type(Ellipsis):
    """'' -> dataset default (`...`); 'native'/'none' -> None; else a positive number."""
    text = value.strip()
    if text == "":
        return ...
    if text.lower() in ("native", "none"):
        return None
    try:
        fps = float(text)
    except ValueError:
        fps = float("nan")
    if not math.isfinite(fps) or fps <= 0:
        raise ValueError(
            f"{csv_path}: column 'fps' row {row}: {value!r} is not a positive number, 'native' or empty"
        )
    return fps


def _is_plain_name(name: str) -> bool:
    return name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def video_id_from_path(video_path: str, rule: str = "stem") -> str:
    """'stem': `Path(video_path).stem` (`a/clip.v2.mp4` -> `clip.v2`); 'research': the last
    '/'-separated component cut at its first '.' (`a/clip.v2.mp4` -> `clip`)."""
    if rule not in VIDEO_ID_RULES:
        raise ValueError(f"video_id_rule must be one of {VIDEO_ID_RULES}, got {rule!r}")
    if rule == "research":
        return video_path.split("/")[-1].split(".")[0]
    return Path(video_path).stem


def _resolve(video_path: str, csv_dir: Path) -> str:
    """As given (absolute, or relative to the working directory) if it exists there, else relative
    to the CSV's folder if it exists there, else as given. Returned absolute and normalised (`..`
    removed, symlinks kept). Never raises for unreadable or impossible paths."""
    given = Path(video_path).expanduser()
    if not given.is_absolute() and not os.path.exists(given) and os.path.exists(csv_dir / given):
        given = csv_dir / given
    return os.path.abspath(given)


def _utf8_lines(csv_path: Path, handle: IO[bytes]) -> Iterator[str]:
    """Lines of a binary file as text (UTF-8, a leading byte-order mark dropped). Raises ValueError
    naming the file, line and column of the first byte that is not UTF-8."""
    for number, raw in enumerate(handle, start=1):
        if number == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(
                f"{csv_path}: line {number}: byte {exc.start + 1} ({raw[exc.start:exc.start + 1]!r}) is not "
                "UTF-8; save the CSV as UTF-8"
            ) from None


def _open_csv(csv_path: Path) -> IO[bytes]:
    """The CSV opened for reading; ValueError naming it when it cannot be read, is not a regular file
    (a FIFO does not block, `/dev/zero` is refused) or holds more than `CSV_MAX` bytes."""
    try:
        fd = os.open(csv_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise ValueError(f"{csv_path}: cannot read the CSV: {exc}") from exc
    try:
        check_regular(fd, csv_path, CSV_MAX)
    except (OSError, ValueError) as exc:
        os.close(fd)
        raise ValueError(f"cannot read the CSV: {exc}") from None
    return os.fdopen(fd, "rb")


def _read_records(csv_path: Path) -> list[tuple[int, list[str]]]:
    """-> [(line number, fields)] of the non-blank records, header first. Raises ValueError naming the
    file for unreadable files, bad bytes and malformed quoting."""
    records: list[tuple[int, list[str]]] = []
    try:
        with _open_csv(csv_path) as handle:
            reader = csv.reader(_utf8_lines(csv_path, handle), skipinitialspace=True, strict=True)
            try:
                for fields in reader:
                    if fields and (len(fields) > 1 or fields[0].strip()):
                        records.append((reader.line_num, fields))
            except csv.Error as exc:
                raise ValueError(f"{csv_path}: line {reader.line_num}: malformed CSV: {exc}") from None
    except OSError as exc:
        raise ValueError(f"{csv_path}: cannot read the CSV: {exc}") from exc
    return records


def _read_table(csv_path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """-> (header names, stripped; rows as {column: value}, columns without a name dropped).
    Raises ValueError naming the file for an empty file, duplicate column names, and rows with more
    or fewer fields than the header (an unquoted ',' in a value shifts every later field)."""
    records = _read_records(csv_path)
    if not records:
        raise ValueError(f"{csv_path}: the CSV is empty (expected columns {list(REQUIRED_COLUMNS)})")
    header = [name.strip() for name in records[0][1]]
    counts = Counter(header)  # linear: a header of 100,000 columns is checked at once
    duplicates = sorted(name for name, n in counts.items() if name and n > 1)
    if duplicates:
        raise ValueError(f"{csv_path}: duplicate column(s) {duplicates} in the header {header}")
    ragged = [(i, line, len(fields)) for i, (line, fields) in enumerate(records[1:]) if len(fields) != len(header)]
    if ragged:
        shown = ", ".join(f"row {i} (line {line}): {n} fields" for i, line, n in ragged[:_MAX_LISTED])
        raise ValueError(
            f"{csv_path}: {len(ragged)} row(s) do not have the header's {len(header)} fields: {shown}. "
            "Quote values that contain ',' (\"a,b.mp4\")."
        )
    return header, [{name: value for name, value in zip(header, fields) if name} for _, fields in records[1:]]


def read_video_csv(csv_path: str | os.PathLike, video_id_rule: str = "stem") -> list[VideoRow]:
    """Read and validate the input CSV (see the README for the columns).

    Raises ValueError naming the file and the culprit for: unreadable, empty or non-UTF-8 file,
    malformed quoting, duplicate column names, rows with more or fewer fields than the header, missing
    required columns, empty `video_path`/`dataset` cells, bad `fps` values, a `dataset` or `video_id`
    that is not a plain file name (they name output folders/files), duplicate (dataset, video_id).
    Blank lines are skipped; rows are numbered from 0 over the others. `video_id` defaults to the
    file name under `video_id_rule` (see `video_id_from_path`). A relative `video_path` is taken as
    given (relative to the working directory) if it exists there, else relative to the CSV's folder;
    rows hold the absolute path.
    """
    if video_id_rule not in VIDEO_ID_RULES:
        raise ValueError(f"video_id_rule must be one of {VIDEO_ID_RULES}, got {video_id_rule!r}")
    csv_path = Path(csv_path)
    header, table = _read_table(csv_path)
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing:
        raise ValueError(f"{csv_path}: missing required column(s) {missing}; found {header}")
    if len(table) == 0:
        raise ValueError(f"{csv_path}: the CSV has a header but no rows")
    for column in REQUIRED_COLUMNS:
        empty = [i for i, rec in enumerate(table) if not rec[column].strip()]
        if empty:
            raise ValueError(f"{csv_path}: column {column!r} is empty in row(s) {empty[:_MAX_LISTED]}")

    csv_dir = csv_path.resolve().parent
    rows: list[VideoRow] = []
    for i, rec in enumerate(table):
        video_path = rec["video_path"].strip()
        video_id = rec.get("video_id", "").strip() or video_id_from_path(video_path, video_id_rule)
        fps = _parse_fps(rec.get("fps", ""), csv_path, i)
        rows.append(VideoRow(i, _resolve(video_path, csv_dir), video_id, rec["dataset"].strip(), fps))

    _check_names(rows, csv_path)
    return rows


def _check_names(rows: list[VideoRow], source: object) -> None:
    """ValueError naming `source` for a dataset or video id that is not a plain file name, or a
    (dataset, video_id) pair given twice: both name output folders and files."""
    for column in ("dataset", "video_id"):
        bad = [(r.index, getattr(r, column)) for r in rows if not _is_plain_name(getattr(r, column))]
        if bad:
            raise ValueError(
                f"{source}: column {column!r} must be a plain file name (no '/' or '\\', not '.' or '..'): "
                + ", ".join(f"row {i} {v!r}" for i, v in bad[:_MAX_LISTED])
            )
    seen: dict[tuple[str, str], list[int]] = {}
    for row in rows:
        seen.setdefault((row.dataset, row.video_id), []).append(row.index)
    duplicates = {key: idx for key, idx in seen.items() if len(idx) > 1}
    if duplicates:
        shown = "; ".join(
            f"dataset={d!r} video_id={v!r} rows {idx}" for (d, v), idx in list(duplicates.items())[:_MAX_LISTED]
        )
        raise ValueError(
            f"{source}: {len(duplicates)} duplicate (dataset, video_id) pair(s) in columns "
            f"('dataset', 'video_id'): {shown}. Outputs would overwrite each other; add a unique "
            "'video_id' column."
        )


def read_video_paths(spec: str, dataset: str | None = None, video_id_rule: str = "stem") -> list[VideoRow]:
    """Rows without a CSV: `spec` is a video file, a folder (its files with a `VIDEO_SUFFIXES`
    suffix, not its subfolders) or a glob pattern (`clips/*.mp4`, `**` recursive), in sorted order.
    `dataset`: every row's dataset (default: each video's folder name); video ids by
    `video_id_rule`; every row at the default frame rate. ValueError when nothing matches or the
    names cannot be output names (see `read_video_csv`)."""
    if video_id_rule not in VIDEO_ID_RULES:
        raise ValueError(f"video_id_rule must be one of {VIDEO_ID_RULES}, got {video_id_rule!r}")
    given = Path(spec).expanduser()
    if given.is_dir():
        paths = sorted(p for p in given.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES and not p.is_dir())
        what = f"no videos ({', '.join(VIDEO_SUFFIXES)}) in the folder {given}"
    elif given.exists():
        paths, what = [given], ""
    else:
        paths = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if not os.path.isdir(p))
        what = f"--video_path {spec!r} is neither a file nor a folder, and matches no file as a glob"
    if not paths:
        raise ValueError(what)
    rows = []
    for i, path in enumerate(paths):
        path = Path(os.path.abspath(path))
        rows.append(VideoRow(i, str(path), video_id_from_path(str(path), video_id_rule),
                             dataset or path.parent.name, ...))
    _check_names(rows, f"--video_path {spec}")
    return rows
