"""Decoding one video file into its selected frames, inside DataLoader workers (`decode_video`).

With `decoder="auto"` decoding uses decord (its frame index for the timestamps, then one `get_batch`
of only the selected frames); if decord cannot open or decode a file, PyAV is tried once.
`decoder="decord"` or `"pyav"` uses only that one. The result names the decoder that served.

Any per-video failure is an error (one line giving the reason): unusable path (not found, permission
denied, name too long, symlink loop, broken link, a path component that is not a folder, a folder, a
FIFO/socket/device, an empty file), not a video, audio only, truncated, no decodable frames, unusable
frame rate or timestamps, an unsupported display matrix, or more frames than fit in memory.
`decode_video` never raises.

Frames are returned as a player shows them: the stream's display matrix (rotation by a multiple of
90 degrees, mirroring) is applied by both decoders, so a 90-degree clip coded W x H comes out H x W.

Frames an mp4 lists past the end of its edit list never decode (decord still indexes them and hands
back a stale image); they are not frames here. An mp4 whose header lists more samples than the file
holds is truncated: an error.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import stat
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
from torch.utils.data import get_worker_info

from semtrack.config import DECODERS
from semtrack.util import clip_line
from semtrack.video.frames import FramePlan, ItemError, check_memory, select_frames, tolerance
from semtrack.video.orientation import Orientation, frame_orientation

_PROBE_PACKETS = 64  # packets decoded at most to find the first frame's display matrix


@dataclass(frozen=True)
class _StreamInfo:
    """PyAV header facts about the first video stream, and its first frame's display matrix."""

    time_base: Fraction | None
    end_s: float | None  # mp4/mov edit-list end: (start_time + duration) * time_base; else None
    frames: int | None  # mp4/mov: sample count in the header (decodable or not); else None
    average_rate: float | None
    height: int  # coded
    width: int  # coded
    orientation: Orientation

    @property
    def display_size(self) -> tuple[int, int]:
        return self.orientation.display_size(self.height, self.width)

    def check_complete(self, present: int) -> None:
        """Raise `ItemError` if fewer samples are in the file than its mp4 header lists."""
        if self.frames and present < self.frames:
            raise ItemError(f"truncated file: the header lists {self.frames} frames, only {present} are present")


@dataclass
class Decoded:
    """A decoded clip: its selected frames and their source timestamps."""

    frames: np.ndarray  # (T, H, W, 3) uint8, as shown (display matrix applied)
    times: np.ndarray  # (T,) float64 seconds relative to the first decoded frame
    source_fps: float
    fps: float | None  # target rate actually used (None = native)



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


def _first_frame_orientation(container, stream) -> Orientation:
    """The display matrix the decoder attaches to the first frame; identity if there is none or no
    frame decodes from the first `_PROBE_PACKETS` packets. Raises `ItemError` for unsupported ones."""
    import av

    stream.codec_context.thread_count = 1  # the first frame without frame-threading delay
    try:
        for packet in itertools.islice(container.demux(stream), _PROBE_PACKETS):
            for frame in packet.decode():
                return frame_orientation(frame)
    except av.FFmpegError:  # undecodable: the decoders report it
        pass
    return Orientation()


def _probe_stream(path: str) -> _StreamInfo:
    """Read the container header with PyAV and decode the first frame (for its display matrix, once
    one coded frame is known to fit in memory). Raises `ItemError` if it has no video stream or the
    frame does not fit; other exceptions (cannot open) propagate."""
    import av

    with av.open(path) as container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise ItemError(f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        tb = Fraction(stream.time_base) if stream.time_base else None
        is_mov = container.format.name.startswith("mov")  # the mov,mp4,m4a,3gp,3g2,mj2 demuxer
        end_s = None
        if is_mov and tb is not None and stream.duration:
            end_s = float(((stream.start_time or 0) + stream.duration) * tb)
        frames = stream.frames if is_mov and stream.frames > 0 else None
        rate = float(stream.average_rate) if stream.average_rate else None
        height, width = stream.codec_context.height, stream.codec_context.width
        check_memory(1, height, width)
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


def _decode_decord(path: str, info: _StreamInfo | None, plan: FramePlan) -> Decoded:
    """decord: frame timestamps from its index, then one `get_batch` of the selected frames.

    decord lists frames the decoder never outputs (packets past the end of an mp4 edit list) and
    returns a stale image for them; those trailing frames (timestamp >= the stream's end) are dropped.
    decord turns frames by the display matrix's rotation itself but ignores its mirroring; the frames
    are brought to the full display transform (`Orientation.from_decord`). Without `info` (PyAV
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
            stamps = stamps[stamps < info.end_s - tolerance(info.end_s)]
        if len(stamps) == 0:
            raise RuntimeError("decord found no frames before the stream's end")
        if np.any(np.diff(stamps) < 0):
            raise RuntimeError("decord frame timestamps are not in presentation order")
        times = _relative_seconds(stamps, info.time_base if info else None)  # (N,)
        rate = info.average_rate if info and info.average_rate else float(reader.get_avg_fps())
        size = info.display_size if info is not None else tuple(reader[0].shape[:2])
        idx, fps = select_frames(plan, times, rate, size)
        frames = reader.get_batch(idx.tolist()).asnumpy()  # (T, H, W, 3) uint8
    finally:
        del reader
    if info is not None and not info.orientation.is_identity:
        frames = info.orientation.from_decord(frames)
        if frames.shape[1:3] != info.display_size:
            raise RuntimeError(f"decord returned {frames.shape[1]}x{frames.shape[2]} frames for a "
                               f"{info.display_size[0]}x{info.display_size[1]} display")
    return Decoded(frames, times[idx], rate, fps)


def _decode_pyav(path: str, info: _StreamInfo, plan: FramePlan) -> Decoded:
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
            raise ItemError("no decodable video frames")
        times = np.array([float((p - pts[0]) * tb) for p in pts], dtype=np.float64)
        source_fps = rate if rate else _rate_from_times(times)
        idx, fps = select_frames(plan, times, source_fps, info.display_size)
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
                    raise ItemError("PyAV decoded a frame without a timestamp")
                decoded.append(frame.pts)
                if frame.pts in wanted and frame.pts not in kept:
                    kept[frame.pts] = orient.apply(frame.to_ndarray(format="rgb24")[None])[0]  # (H, W, 3) view
        decoded.sort()
        if decoded == pts:  # the decoder output exactly the demuxed frames
            frames = np.stack([kept[pts[i]] for i in idx.tolist()])
            return Decoded(frames, times[idx], source_fps, fps)
        pts = decoded
    raise ItemError("PyAV frame timestamps changed between two decodes")


def decode_video(path: str, plan: FramePlan, decoder: str = "auto") -> tuple[Decoded | None, str, str | None]:
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


def _decode(path: str, plan: FramePlan, decoder: str, first: str) -> tuple[Decoded | None, str, str | None]:
    """`decode_video` for a valid `decoder`; `first`: the decoder named for files rejected before decoding."""
    problem = _file_problem(path)
    if problem is not None:
        return None, first, problem
    info, probe_error = None, None
    try:
        info = _probe_stream(path)
    except ItemError as exc:
        return None, "decord" if decoder == "decord" else "pyav", str(exc)
    except Exception as exc:  # PyAV cannot open it; decord may still
        probe_error = _one_line(exc, path)
    if decoder == "pyav":
        return _try_pyav(path, info, plan, probe_error, decord_error=None)
    try:
        return _decode_decord(path, info, plan), "decord", None
    except ItemError as exc:
        return None, "decord", str(exc)
    except Exception as exc:
        decord_error = _one_line(exc, path)
    if decoder == "decord":
        rotated = info is not None and not info.orientation.is_identity
        hint = " (decord mis-sizes some rotated frames; try decoder='pyav')" if rotated else ""
        return None, "decord", clip_line(f"cannot decode: decord: {decord_error}{hint}")
    return _try_pyav(path, info, plan, probe_error, decord_error)


def _try_pyav(
    path: str, info: _StreamInfo | None, plan: FramePlan, probe_error: str | None, decord_error: str | None
) -> tuple[Decoded | None, str, str | None]:
    """PyAV's decode, its errors joined with decord's (if decord was tried)."""
    tried = "" if decord_error is None else f"decord: {decord_error}; "
    if probe_error is not None:
        return None, "pyav", clip_line(f"cannot open as video: {tried}pyav: {probe_error}")
    try:
        return _decode_pyav(path, info, plan), "pyav", None
    except ItemError as exc:
        return None, "pyav", clip_line(str(exc) if decord_error is None else f"{exc} (decord: {decord_error})")
    except Exception as exc:
        return None, "pyav", clip_line(f"cannot decode: {tried}pyav: {_one_line(exc, path)}")

