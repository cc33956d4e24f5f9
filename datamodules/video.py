"""CSV of videos -> decoded, temporally resampled clips, decoded inside DataLoader workers.

A row of the CSV becomes one `semtrack.records.Clip` (`VideoCSVDataset.__getitem__`). With
`decoder="auto"` decoding uses decord (its frame index for the timestamps, then one `get_batch` of only
the selected frames); if decord cannot open or decode a file, PyAV is tried once. `decoder="decord"` or
`"pyav"` uses only that one. The item's `decoder` records which one served.

Any per-video failure is a clip with `frames=None` and a one-line `error` giving the reason:
unusable path (not found, permission denied, name too long, symlink loop, broken link, a path
component that is not a folder, a folder, a FIFO/socket/device, an empty file), not a video, audio
only, truncated, no decodable frames, unusable frame rate or timestamps, an unsupported display
matrix, or more frames than fit in memory. `decode_video` never raises. CSV problems are ValueErrors
naming the file (`read_video_csv`).

Frames are returned as a player shows them: the stream's display matrix (rotation by a multiple of
90 degrees, mirroring) is applied by both decoders, so a 90-degree clip coded W x H comes out H x W.

Temporal rule (`fps_rule="timestamp"`, default): with frame timestamps `t_i` (seconds, relative to
the first frame) and target rate `f`, output frame k (k = 0 .. K-1, K = floor(t_last * f + 0.5) + 1)
is the frame whose timestamp is nearest to k / f; ties go to the earlier frame. `fps_rule="interval"`
reproduces the research code's integer stride: interval = round(average_rate / f) (Python round,
half to even), keep decoded frames 0, interval, 2 * interval, ...; interval 0 is an error item.

Memory: before any frame (or frame list) is allocated, the output size (K frames of H x W x 3 bytes
plus `_INDEX_BYTES_PER_FRAME` of index bookkeeping each) must fit in half the available memory
(`semtrack.resources.available_memory`), shared equally between the DataLoader workers.

Frames an mp4 lists past the end of its edit list never decode (decord still indexes them and hands
back a stale image); they are not frames here. An mp4 whose header lists more samples than the file
holds is truncated: an error item.
"""
from __future__ import annotations

import codecs
import contextlib
import csv
import dataclasses
import errno
import itertools
import math
import numbers
import os
import re
import stat
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import IO, Iterable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from semtrack.config import (
    DECODERS,
    FPS,
    FPS_RULES,
    MIN_FRAMES,
    NATIVE_FPS_DATASETS,
    NUM_FRAMES_CLUSTERING,
    VIDEO_ID_RULES,
)
from semtrack.records import Clip
from semtrack.resources import available_memory
from semtrack.util import clip_line

REQUIRED_COLUMNS = ("video_path", "dataset")
_MAX_LISTED = 10  # culprits listed in one CSV error message
_INDEX_BYTES_PER_FRAME = 128  # frame plan, index lists and sets per output frame (measured: ~100)
_PROBE_PACKETS = 64  # packets decoded at most to find the first frame's display matrix


class _ItemError(Exception):
    """A per-video failure that becomes an error item (never retried with another decoder)."""


@dataclass(frozen=True)
class VideoRow:
    """One validated CSV row. `fps`: per-row target rate, None = native, `...` = dataset default."""

    index: int
    video_path: str  # resolved path (see `read_video_csv`)
    video_id: str
    dataset: str
    fps: float | None | type(Ellipsis)


@dataclass(frozen=True)
class _Orientation:
    """How a player shows coded frames (an axis-aligned display matrix): swap rows and columns, then
    mirror top <-> bottom, then mirror left <-> right. `quarter_turns`: the matrix's rotation part in
    counter-clockwise quarter turns (0..3), mirroring ignored: what decord applies by itself."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    quarter_turns: int = 0

    @classmethod
    def from_display_matrix(cls, matrix: np.ndarray) -> _Orientation:
        """`matrix`: FFmpeg's display matrix, (3, 3) int32 row-major [[a, b, u], [c, d, v], [x, y, w]],
        a..d in 16.16 fixed point; a coded pixel at column p, row q is shown at column a p + c q, row
        b p + d q (plus an offset). Scale is ignored; a degenerate matrix is ignored (as players do).
        Raises `_ItemError` for a rotation that is not a multiple of 90 degrees."""
        a, b, c, d = (float(v) / 65536 for v in (matrix[0, 0], matrix[0, 1], matrix[1, 0], matrix[1, 1]))
        scale_p, scale_q = math.hypot(a, c), math.hypot(b, d)
        if not (scale_p > 0 and scale_q > 0):
            return cls()
        a, c, b, d = a / scale_p, c / scale_p, b / scale_q, d / scale_q
        degrees = -math.degrees(math.atan2(b, a))  # counter-clockwise, as FFmpeg's av_display_rotation_get
        turns = round(degrees / 90) % 4
        if max(abs(b), abs(c)) < 1e-3:
            return cls(False, d < 0, a < 0, turns)
        if max(abs(a), abs(d)) < 1e-3:
            return cls(True, b < 0, c < 0, turns)
        raise _ItemError(f"the display matrix rotates by {degrees:.1f} degrees, not a multiple of 90: not supported")

    @property
    def is_identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def display_size(self, height: int, width: int) -> tuple[int, int]:
        """Coded (H, W) -> shown (H, W)."""
        return (width, height) if self.transpose else (height, width)

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """(T, H, W, C) coded -> (T, H', W', C) shown; a strided view, no copy."""
        if self.transpose:
            frames = frames.swapaxes(1, 2)
        if self.flip_rows:
            frames = frames[:, ::-1]
        if self.flip_cols:
            frames = frames[:, :, ::-1]
        return frames

    def from_decord(self, frames: np.ndarray) -> np.ndarray:
        """decord's (T, H, W, 3) frames, which it has turned by `quarter_turns` itself -> shown frames,
        C-contiguous (no copy when decord's turn already is the whole transform)."""
        coded = np.rot90(frames, -self.quarter_turns, axes=(1, 2))
        return np.ascontiguousarray(self.apply(coded))


@dataclass(frozen=True)
class _StreamInfo:
    """PyAV header facts about the first video stream, and its first frame's display matrix."""

    time_base: Fraction | None
    end_s: float | None  # mp4/mov edit-list end: (start_time + duration) * time_base; else None
    frames: int | None  # mp4/mov: sample count in the header (decodable or not); else None
    average_rate: float | None
    height: int  # coded
    width: int  # coded
    orientation: _Orientation

    @property
    def display_size(self) -> tuple[int, int]:
        return self.orientation.display_size(self.height, self.width)

    def check_complete(self, present: int) -> None:
        """Raise `_ItemError` if fewer samples are in the file than its mp4 header lists."""
        if self.frames and present < self.frames:
            raise _ItemError(f"truncated file: the header lists {self.frames} frames, only {present} are present")


@dataclass
class _Decoded:
    frames: np.ndarray  # (T, H, W, 3) uint8, as shown (display matrix applied)
    times: np.ndarray  # (T,) float64 seconds relative to the first decoded frame
    source_fps: float
    fps: float | None  # target rate actually used (None = native)


# ---------------------------------------------------------------------------------------------
# CSV
# ---------------------------------------------------------------------------------------------


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


def _read_records(csv_path: Path) -> list[tuple[int, list[str]]]:
    """-> [(line number, fields)] of the non-blank records, header first. Raises ValueError naming the
    file for unreadable files, bad bytes and malformed quoting."""
    records: list[tuple[int, list[str]]] = []
    try:
        with open(csv_path, "rb") as handle:
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
    duplicates = sorted({name for name in header if name and header.count(name) > 1})
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

    for column in ("dataset", "video_id"):  # both become output folder / file names
        bad = [(r.index, getattr(r, column)) for r in rows if not _is_plain_name(getattr(r, column))]
        if bad:
            raise ValueError(
                f"{csv_path}: column {column!r} must be a plain file name (no '/' or '\\', not '.' or '..'): "
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
            f"{csv_path}: {len(duplicates)} duplicate (dataset, video_id) pair(s) in columns "
            f"('dataset', 'video_id'): {shown}. Outputs would overwrite each other; add a unique "
            "'video_id' column."
        )
    return rows


# ---------------------------------------------------------------------------------------------
# Frame selection (pure functions of timestamps)
# ---------------------------------------------------------------------------------------------


def _tolerance(t: np.ndarray | float) -> np.ndarray | float:
    """Seconds under which two distances count as equal: covers decord's float32 timestamps."""
    return 1e-6 + 2e-7 * np.abs(t)


def timestamp_frame_count(last: float, fps: float) -> int:
    """K = floor(last * fps + 0.5) + 1 (within float32 precision of a tie): frames the timestamp rule
    gives for a clip whose last frame is at `last` seconds. Computed without allocating."""
    return math.floor(last * fps + 0.5 + _tolerance(last) * fps) + 1


def select_by_timestamp(times: np.ndarray, fps: float) -> np.ndarray:
    """Indices (K,) int64 into `times` for target rate `fps` (module docstring rule).

    `times`: (N,) float64 seconds, non-decreasing, times[0] == 0. Ties (within float32 precision)
    go to the earlier frame; equal timestamps resolve to their first frame. Allocates about
    `_INDEX_BYTES_PER_FRAME` * K bytes: check K (`timestamp_frame_count`) first.
    """
    targets = np.arange(timestamp_frame_count(float(times[-1]), fps), dtype=np.float64) / fps
    hi = np.clip(np.searchsorted(times, targets, side="left"), 0, len(times) - 1)
    lo = np.clip(hi - 1, 0, len(times) - 1)
    later = (times[hi] - targets) < (targets - times[lo]) - _tolerance(targets)
    chosen = np.where(later, hi, lo)
    return np.searchsorted(times, times[chosen], side="left").astype(np.int64)


def _interval(average_rate: float | None, fps: float) -> int:
    """Research stride i = int(round(average_rate / fps)); raises `_ItemError` when the rate is
    unknown or i is 0 (source rate <= fps / 2)."""
    if average_rate is None or not math.isfinite(average_rate) or average_rate <= 0:
        raise _ItemError(f"fps_rule='interval' needs the stream's average frame rate, got {average_rate}")
    interval = int(round(average_rate / fps))
    if interval == 0:
        raise _ItemError(
            f"fps_rule='interval': interval round({average_rate:g} / {fps:g}) = 0 "
            "(source rate <= half the target rate); use fps_rule='timestamp'"
        )
    return interval


def select_by_interval(num_frames: int, average_rate: float | None, fps: float | None) -> np.ndarray:
    """Research rule (REFERENCE 4.2): frames 0, i, 2i, ... with i = int(round(average_rate / fps)).

    Raises `_ItemError` when the rate is unknown or the interval is 0 (source rate <= fps / 2).
    """
    if fps is None:
        return np.arange(num_frames, dtype=np.int64)
    return np.arange(0, num_frames, _interval(average_rate, fps), dtype=np.int64)


def cluster_frame_indices(num_frames: int, num_frames_clustering: int) -> np.ndarray:
    """`linspace(0, T-1, K)` truncated to int64, K = min(num_frames_clustering, T): (K,) indices into T."""
    k = min(num_frames_clustering, num_frames)
    return np.linspace(0, num_frames - 1, k).astype(np.int64)


def _worker_count() -> int:
    """DataLoader workers sharing this machine's memory (1 outside a worker)."""
    info = get_worker_info()
    return 1 if info is None else max(int(info.num_workers), 1)


def _check_memory(count: int, height: int, width: int) -> None:
    """Refuse (error item) an output of `count` (H, W, 3) uint8 frames plus their index bookkeeping
    that would take more than this worker's share of half the memory still available, instead of
    letting the worker be killed. Call it before allocating anything of size `count`."""
    need = count * (height * width * 3 + _INDEX_BYTES_PER_FRAME)
    available = available_memory()
    if available is None:
        return
    workers = _worker_count()
    allowance = available // (2 * workers)
    if need > allowance:
        share = "half the available memory" if workers == 1 else f"1/{2 * workers} of the available memory"
        raise _ItemError(
            f"{count} frames of {height}x{width} need {need / 2**30:.1f} GiB, more than {share} "
            f"({allowance / 2**30:.1f} of {available / 2**30:.1f} GiB"
            f"{'' if workers == 1 else f', shared by {workers} DataLoader workers'}); set max_frames"
        )


@dataclass(frozen=True)
class _Plan:
    """Which of the decoded frames (timestamps `times`) an item keeps.

    The decoders' plan protocol: `plan(times, average_rate) -> (indices, rate used)`; a plan whose
    output can be longer than `times` also has `frames_needed(times, average_rate) -> T`, computed
    without allocating, which the decoders check against the memory allowance first.
    """

    fps: float | None
    fps_rule: str
    max_frames: int | None

    def _timestamp_target(self, times: np.ndarray) -> tuple[float | None, int]:
        """-> (target rate, None = native; frame count K) of the timestamp rule, with max_frames applied."""
        last, fps = float(times[-1]), self.fps
        if not math.isfinite(last):
            raise _ItemError(f"the last frame's timestamp is not finite ({last})")
        count = len(times) if fps is None else timestamp_frame_count(last, fps)
        if self.max_frames is not None and count > self.max_frames:
            if last <= 0:
                raise _ItemError(f"{count} frames exceed max_frames={self.max_frames} and all share one timestamp")
            fps = (self.max_frames - 1) / last  # K = floor(last * fps + 0.5) + 1 = max_frames
            count = timestamp_frame_count(last, fps)
        return fps, count

    def frames_needed(self, times: np.ndarray, average_rate: float | None) -> int:
        """T the call below returns, without allocating (0 where the call raises instead)."""
        if self.fps_rule == "timestamp":
            return self._timestamp_target(times)[1]
        if self.fps is None:
            return len(times)
        try:
            count = len(range(0, len(times), _interval(average_rate, self.fps)))
        except _ItemError:
            return 0
        return 0 if self.max_frames is not None and count > self.max_frames else count

    def __call__(self, times: np.ndarray, average_rate: float | None) -> tuple[np.ndarray, float | None]:
        """-> (indices (T,) int64 into `times`, target rate actually used)."""
        if self.fps_rule == "interval":
            idx = select_by_interval(len(times), average_rate, self.fps)
            if self.max_frames is not None and len(idx) > self.max_frames:
                raise _ItemError(
                    f"{len(idx)} frames exceed max_frames={self.max_frames}; fps_rule='interval' "
                    "reproduces the research frames exactly and does not subsample further"
                )
            return idx, self.fps
        fps, _ = self._timestamp_target(times)
        idx = np.arange(len(times), dtype=np.int64) if fps is None else select_by_timestamp(times, fps)
        return idx, fps


def _select_frames(plan, times: np.ndarray, average_rate: float | None, frame_size: tuple[int, int]):
    """Run `plan` (see `_Plan`) on the decoded timestamps; `_ItemError` if its T frames of
    `frame_size` (H, W) do not fit in memory: checked before the plan runs where it can tell T."""
    if hasattr(plan, "frames_needed"):
        _check_memory(plan.frames_needed(times, average_rate), *frame_size)
        return plan(times, average_rate)
    idx, fps = plan(times, average_rate)
    _check_memory(len(idx), *frame_size)
    return idx, fps


# ---------------------------------------------------------------------------------------------
# Decoders
# ---------------------------------------------------------------------------------------------


def _one_line(exc: BaseException, path: str) -> str:
    """First non-empty line of an exception message, without decord's "[hh:mm:ss] file.cc:N: " or an
    "[Errno N] " prefix, the (already recorded) path shortened to its file name."""
    text = str(exc) or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = re.sub(r"^(\[[0-9:]+\] \S+:\d+: |\[Errno -?\d+\] )", "", lines[0] if lines else type(exc).__name__)
    return clip_line(line.replace(path, Path(path).name) if path else line)


_OS_REASONS = {
    errno.ENOENT: "file not found",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "symlink loop (too many levels of symbolic links)",
    errno.ENOTDIR: "a component of the path is not a directory",
}


def _os_reason(exc: OSError | ValueError, path: str) -> str:
    """A few words for why `os.stat`/`open` failed on `path`."""
    if isinstance(exc, ValueError):  # e.g. an embedded NUL byte
        return f"invalid path ({exc})"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return "broken symbolic link (its target does not exist)"
    return _OS_REASONS.get(exc.errno, exc.strerror or type(exc).__name__)


def _file_problem(path: str) -> str | None:
    """Why `path` cannot be read as a non-empty regular file (one line naming the true reason and the
    path), or None. Only stats and opens the file (never blocks: FIFOs and devices are refused)."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            return clip_line(f"is a directory, not a video file: {path}")
        if not stat.S_ISREG(info.st_mode):
            return clip_line(f"not a regular file (a FIFO, socket or device): {path}")
        if info.st_size == 0:
            return clip_line(f"empty file (0 bytes): {path}")
        with open(path, "rb"):
            pass
    except (OSError, ValueError) as exc:
        return clip_line(f"{_os_reason(exc, path)}: {path}")
    return None


def _decoder_threads() -> int:
    """1 inside DataLoader workers (the workers are the parallelism), else 0 = decoder's choice."""
    return 1 if get_worker_info() is not None else 0


def _first_frame_orientation(container, stream) -> _Orientation:
    """The display matrix the decoder attaches to the first frame; identity if there is none or no
    frame decodes from the first `_PROBE_PACKETS` packets. Raises `_ItemError` for unsupported ones."""
    import av

    stream.codec_context.thread_count = 1  # the first frame without frame-threading delay
    try:
        for packet in itertools.islice(container.demux(stream), _PROBE_PACKETS):
            for frame in packet.decode():
                side_data = frame.side_data.get("DISPLAYMATRIX")
                matrix = np.frombuffer(bytes(side_data), dtype=np.int32) if side_data is not None else None
                if matrix is None or matrix.size != 9:
                    return _Orientation()
                return _Orientation.from_display_matrix(matrix.reshape(3, 3))
    except av.FFmpegError:  # undecodable: the decoders report it
        pass
    return _Orientation()


def _probe_stream(path: str) -> _StreamInfo:
    """Read the container header with PyAV and decode the first frame (for its display matrix, once
    one coded frame is known to fit in memory). Raises `_ItemError` if it has no video stream or the
    frame does not fit; other exceptions (cannot open) propagate."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise _ItemError(f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        tb = Fraction(stream.time_base) if stream.time_base else None
        is_mov = container.format.name.startswith("mov")  # the mov,mp4,m4a,3gp,3g2,mj2 demuxer
        end_s = None
        if is_mov and tb is not None and stream.duration:
            end_s = float(((stream.start_time or 0) + stream.duration) * tb)
        frames = stream.frames if is_mov and stream.frames > 0 else None
        rate = float(stream.average_rate) if stream.average_rate else None
        height, width = stream.codec_context.height, stream.codec_context.width
        _check_memory(1, height, width)
        return _StreamInfo(tb, end_s, frames, rate, height, width, _first_frame_orientation(container, stream))


def _relative_seconds(stamps: np.ndarray, time_base: Fraction | None) -> np.ndarray:
    """decord's float32 start times (N,) -> float64 seconds relative to the first frame, snapped to
    the stream's time-base ticks when known (exact for normal lengths: 0.1 stays 0.1)."""
    if time_base is None:
        return stamps - stamps[0]
    ticks = np.round(stamps / float(time_base))
    return (ticks - ticks[0]) * time_base.numerator / time_base.denominator


def _rate_from_times(times: np.ndarray) -> float:
    return (len(times) - 1) / float(times[-1]) if len(times) > 1 and times[-1] > 0 else float("nan")


@contextlib.contextmanager
def _quiet_stderr():
    """Inside a DataLoader worker, send what native code writes to stderr (FFmpeg's and decord's log
    lines about a broken file) to /dev/null for the duration; elsewhere do nothing."""
    if get_worker_info() is None:
        yield
        return
    import decord.logging

    decord.logging.set_level(decord.logging.QUIET)  # its FFmpeg; its own LOG(ERROR) needs the redirect
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _decode_decord(path: str, info: _StreamInfo | None, plan: _Plan) -> _Decoded:
    """decord: frame timestamps from its index, then one `get_batch` of the selected frames.

    decord lists frames the decoder never outputs (packets past the end of an mp4 edit list) and
    returns a stale image for them; those trailing frames (timestamp >= the stream's end) are dropped.
    decord turns frames by the display matrix's rotation itself but ignores its mirroring; the frames
    are brought to the full display transform (`_Orientation.from_decord`). Without `info` (PyAV
    cannot open the file) decord's own frames are kept.
    """
    import decord

    with _quiet_stderr():  # a failure is recorded in one line; decord's own log lines add nothing
        reader = decord.VideoReader(path, num_threads=_decoder_threads())
    try:
        if info is not None:
            info.check_complete(len(reader))
        stamps = reader.get_frame_timestamp(np.arange(len(reader)))[:, 0].astype(np.float64)  # (N,)
        if info is not None and info.end_s is not None:
            stamps = stamps[stamps < info.end_s - _tolerance(info.end_s)]
        if len(stamps) == 0:
            raise RuntimeError("decord found no frames before the stream's end")
        if np.any(np.diff(stamps) < 0):
            raise RuntimeError("decord frame timestamps are not in presentation order")
        times = _relative_seconds(stamps, info.time_base if info else None)  # (N,)
        rate = info.average_rate if info and info.average_rate else float(reader.get_avg_fps())
        size = info.display_size if info is not None else tuple(reader[0].shape[:2])
        idx, fps = _select_frames(plan, times, rate, size)
        frames = reader.get_batch(idx.tolist()).asnumpy()  # (T, H, W, 3) uint8
    finally:
        del reader
    if info is not None and not info.orientation.is_identity:
        frames = info.orientation.from_decord(frames)
        if frames.shape[1:3] != info.display_size:
            raise RuntimeError(f"decord returned {frames.shape[1]}x{frames.shape[2]} frames for a "
                               f"{info.display_size[0]}x{info.display_size[1]} display")
    return _Decoded(frames, times[idx], rate, fps)


def _decode_pyav(path: str, info: _StreamInfo, plan: _Plan) -> _Decoded:
    """PyAV: timestamps of the decoded frames, converting only the selected frames to RGB and then
    to the displayed orientation.

    Timestamps come from the demuxer (no decoding); if the decoder then drops frames the selection is
    redone on the frames it did output (a second pass only in that case).
    """
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        tb = Fraction(stream.time_base)
        present, pts = 0, []
        for packet in container.demux(stream):
            if packet.pts is not None:
                present += 1
                if not packet.is_discard:  # outside the mp4 edit list: never decoded
                    pts.append(packet.pts)
        info.check_complete(present)
        pts.sort()
    rate, orient = info.average_rate, info.orientation
    for _ in range(2):
        if not pts:
            raise _ItemError("no decodable video frames")
        times = np.array([float((p - pts[0]) * tb) for p in pts], dtype=np.float64)
        source_fps = rate if rate else _rate_from_times(times)
        idx, fps = _select_frames(plan, times, source_fps, info.display_size)
        wanted = {pts[i] for i in idx.tolist()}
        kept: dict[int, np.ndarray] = {}
        decoded: list[int] = []
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            if _decoder_threads():
                stream.codec_context.thread_count = 1
            for frame in container.decode(stream):
                if frame.pts is None:
                    raise _ItemError("PyAV decoded a frame without a timestamp")
                decoded.append(frame.pts)
                if frame.pts in wanted and frame.pts not in kept:
                    kept[frame.pts] = orient.apply(frame.to_ndarray(format="rgb24")[None])[0]  # (H, W, 3) view
        decoded.sort()
        if decoded == pts:  # the decoder output exactly the demuxed frames
            frames = np.stack([kept[pts[i]] for i in idx.tolist()])
            return _Decoded(frames, times[idx], source_fps, fps)
        pts = decoded
    raise _ItemError("PyAV frame timestamps changed between two decodes")


def decode_video(path: str, plan: _Plan, decoder: str = "auto") -> tuple[_Decoded | None, str, str | None]:
    """-> (decoded or None, decoder name, one-line error or None). Never raises: a bad path, file or
    stream, and any unexpected failure, is an error. `decoder`: one of `DECODERS`; the name returned
    is the one that served (for failures the last one tried; "decord" under "auto" if the file was
    rejected before decoding)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    first = "pyav" if decoder == "pyav" else "decord"
    try:
        return _decode(path, plan, decoder, first)
    except Exception as exc:  # a failure nobody foresaw is still one video's failure, not the run's
        return None, first, clip_line(f"unexpected {type(exc).__name__}: {_one_line(exc, str(path))}")


def _decode(path: str, plan: _Plan, decoder: str, first: str) -> tuple[_Decoded | None, str, str | None]:
    """`decode_video` for a valid `decoder`; `first`: the decoder named for files rejected before decoding."""
    problem = _file_problem(path)
    if problem is not None:
        return None, first, problem
    info, probe_error = None, None
    try:
        info = _probe_stream(path)
    except _ItemError as exc:
        return None, "decord" if decoder == "decord" else "pyav", str(exc)
    except Exception as exc:  # PyAV cannot open it; decord may still
        probe_error = _one_line(exc, path)
    if decoder == "pyav":
        return _try_pyav(path, info, plan, probe_error, decord_error=None)
    try:
        return _decode_decord(path, info, plan), "decord", None
    except _ItemError as exc:
        return None, "decord", str(exc)
    except Exception as exc:
        decord_error = _one_line(exc, path)
    if decoder == "decord":
        rotated = info is not None and not info.orientation.is_identity
        hint = " (decord mis-sizes some rotated frames; try decoder='pyav')" if rotated else ""
        return None, "decord", clip_line(f"cannot decode: decord: {decord_error}{hint}")
    return _try_pyav(path, info, plan, probe_error, decord_error)


def _try_pyav(
    path: str, info: _StreamInfo | None, plan: _Plan, probe_error: str | None, decord_error: str | None
) -> tuple[_Decoded | None, str, str | None]:
    """PyAV's decode, its errors joined with decord's (if decord was tried)."""
    tried = "" if decord_error is None else f"decord: {decord_error}; "
    if probe_error is not None:
        return None, "pyav", clip_line(f"cannot open as video: {tried}pyav: {probe_error}")
    try:
        return _decode_pyav(path, info, plan), "pyav", None
    except _ItemError as exc:
        return None, "pyav", clip_line(str(exc) if decord_error is None else f"{exc} (decord: {decord_error})")
    except Exception as exc:
        return None, "pyav", clip_line(f"cannot decode: {tried}pyav: {_one_line(exc, path)}")


# ---------------------------------------------------------------------------------------------
# Dataset, collate, DataModule
# ---------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


class VideoCSVDataset(Dataset):
    """Map-style Dataset over a CSV of videos; each item is one decoded, resampled clip.

    Args:
        csv_path: CSV with columns `video_path`, `dataset` and optionally `video_id` (default: from
            the file name by `video_id_rule`) and `fps` (per-row target rate; empty = the default
            below, `native` = every frame). See `read_video_csv`.
        fps: target rate in frames per second (None: native rate for every video).
        native_fps_datasets: dataset names (case-insensitive) kept at their native rate unless the
            row sets `fps`.
        num_frames_clustering: number of clustering frames K (fewer if the clip is shorter).
        fps_rule: "timestamp" (nearest timestamp to k / fps) or "interval" (research stride rule).
        max_frames: cap on T (>= 2). A longer clip is resampled evenly over its whole duration at
            the rate that gives exactly max_frames frames (the item's `fps` records that rate);
            with fps_rule="interval" it is an error item instead. Independently, a clip whose
            decoded frames would need more than half the available memory (shared between the
            DataLoader workers) is an error item.
        decoder: "auto" (decord, PyAV if decord fails), "decord" or "pyav" (that one only).
        video_id_rule: default `video_id` when the CSV has none: "stem" (`a/clip.v2.mp4` ->
            `clip.v2`) or "research" (the file name cut at its first '.': `clip`).
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        fps: float | None = FPS,
        native_fps_datasets: Iterable[str] = NATIVE_FPS_DATASETS,
        num_frames_clustering: int = NUM_FRAMES_CLUSTERING,
        fps_rule: str = "timestamp",
        max_frames: int | None = None,
        decoder: str = "auto",
        video_id_rule: str = "stem",
    ):
        if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be a positive number or None, got {fps!r}")
        if fps_rule not in FPS_RULES:
            raise ValueError(f"fps_rule must be one of {FPS_RULES}, got {fps_rule!r}")
        if not _is_int(num_frames_clustering) or num_frames_clustering < 1:
            raise ValueError(f"num_frames_clustering must be an int >= 1, got {num_frames_clustering!r}")
        if max_frames is not None and (not _is_int(max_frames) or max_frames < MIN_FRAMES):
            raise ValueError(f"max_frames must be None or an int >= {MIN_FRAMES}, got {max_frames!r}")
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if isinstance(native_fps_datasets, str):
            native_fps_datasets = (native_fps_datasets,)
        self.csv_path = str(csv_path)
        self.fps = None if fps is None else float(fps)
        self.native_fps_datasets = frozenset(name.lower() for name in native_fps_datasets)
        self.num_frames_clustering = int(num_frames_clustering)
        self.fps_rule = fps_rule
        self.max_frames = None if max_frames is None else int(max_frames)
        self.decoder = decoder
        self.video_id_rule = video_id_rule
        self.rows: list[VideoRow] = read_video_csv(csv_path, video_id_rule)

    def __len__(self) -> int:
        return len(self.rows)

    def target_fps(self, row: VideoRow) -> float | None:
        """Per-row `fps` if given, else native for `native_fps_datasets`, else the dataset's `fps`."""
        if row.fps is not ...:
            return row.fps
        if row.dataset.lower() in self.native_fps_datasets:
            return None
        return self.fps

    def __getitem__(self, index: int) -> Clip:
        """The row's `Clip`: frames (T, 3, H, W) uint8 (channels-last strides, as displayed: the display
        matrix applied) or None with a one-line `error`. `decoder` is the one that served (for failures
        the last one tried; under decoder="auto" "decord" if the file was rejected before decoding);
        `fps` the target rate used (None = native; with fps_rule="interval" the requested rate, the kept
        rate being source_fps / interval)."""
        row = self.rows[index]
        plan = _Plan(self.target_fps(row), self.fps_rule, self.max_frames)
        decoded, decoder, error = decode_video(row.video_path, plan, self.decoder)
        clip = Clip(row.index, row.video_id, row.dataset, row.video_path, decoder=decoder, error=error, fps=plan.fps)
        if decoded is None:
            return clip
        frames = torch.from_numpy(decoded.frames).permute(0, 3, 1, 2)  # a zero-copy view of (T, H, W, 3)
        return dataclasses.replace(
            clip, frames=frames, frame_times=torch.from_numpy(decoded.times), source_fps=float(decoded.source_fps),
            fps=decoded.fps, cluster_frames=torch.from_numpy(cluster_frame_indices(len(frames),
                                                                                   self.num_frames_clustering)),
        )


def collate_videos(items: Sequence[Clip]) -> list[Clip]:
    """Pass-through collate: clips differ in size, failed ones (frames None) are kept."""
    return list(items)
