"""The decord decoder: frame timestamps from decord's index, then one `get_batch` of the selected
frames (decord seeks to the keyframe before a selected frame when that is shorter than decoding on).

decord gives wrong frames, silently, in two kinds of stream, which PyAV's demux (`probe`) tells
apart: streams with open GOPs (a keyframe followed in decode order by frames shown before it) once
it has to skip frames, and streams whose timestamps its index gets wrong (in AVI: H.264, or MPEG-4
with B-frames). decord refuses both (an exception: `decoder="auto"` then decodes with PyAV).
"""
from __future__ import annotations

import contextlib
import os
from fractions import Fraction

import numpy as np
from torch.utils.data import get_worker_info
from torch.utils.dlpack import from_dlpack

from semtrack.video.frames import FramePlan, select_frames, tolerance
from semtrack.video.orientation import Orientation
from semtrack.video.stream import Decoded, Probe, decoder_threads


def _relative_seconds(stamps: np.ndarray, time_base: Fraction | None) -> np.ndarray:
    """decord's float32 start times (N,) -> float64 seconds relative to the first frame, snapped to
    the stream's time-base ticks when known (exact for normal lengths: 0.1 stays 0.1)."""
    if time_base is None:
        return stamps - stamps[0]
    ticks = np.round(stamps / float(time_base))
    return (ticks - ticks[0]) * time_base.numerator / time_base.denominator


def _check_index(times: np.ndarray, probed: Probe) -> None:
    """Raise RuntimeError unless decord's frame times (N,) are the demuxer's, to float32 precision."""
    pts, tb = probed.packets.frame_pts, probed.info.time_base
    if tb is None or not pts:
        return
    expected = np.array([float((p - pts[0]) * tb) for p in pts])
    if len(expected) != len(times):
        raise RuntimeError(f"decord's frame index lists {len(times)} frames, the demuxer {len(expected)}; "
                           "use decoder='pyav'")
    wrong = np.flatnonzero(np.abs(expected - times) > tolerance(expected) + float(tb))
    if len(wrong):
        k = int(wrong[0])
        raise RuntimeError(f"decord's timestamp of frame {k} is {times[k]:.6g} s, the demuxer's {expected[k]:.6g} s; "
                           "use decoder='pyav'")


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


def decode_decord(path: str, probed: Probe | None, plan: FramePlan) -> Decoded:
    """decord's frames for `plan`, with `probed` = `semtrack.video.stream.probe(path)` (None when
    PyAV cannot open the file: decord's own index and frames are taken as they are).

    decord lists frames the decoder never outputs (packets past the end of an mp4 edit list) and
    returns a stale image for them; those trailing frames (timestamp >= the stream's end) are dropped.
    decord turns frames by the display matrix's rotation itself but ignores its mirroring; the frames
    are brought to the full display transform (`Orientation.from_decord`). Exceptions propagate.
    """
    import decord

    info, orientation = (probed.info, probed.orientation) if probed is not None else (None, Orientation())
    with _quiet_stderr():  # a failure is recorded in one line; decord's own log lines add nothing
        reader = decord.VideoReader(path, num_threads=decoder_threads())
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
        if probed is not None:
            _check_index(times, probed)
        rate = info.average_rate if info and info.average_rate else float(reader.get_avg_fps())
        display = orientation.display_size(info.height, info.width) if info is not None else None
        idx, fps = select_frames(plan, times, rate, display or tuple(reader[0].shape[:2]))
        if probed is not None and probed.packets.open_gop and not np.array_equal(idx, np.arange(len(times))):
            raise RuntimeError("decord skips frames wrongly in streams with open GOPs; use decoder='pyav'")
        batch = reader.get_batch(idx.tolist())  # (T, H, W, 3) uint8, decord's memory
        frames = from_dlpack(batch.to_dlpack()).numpy()  # the same memory, no copy
    finally:
        del reader
    if not orientation.is_identity:
        frames = orientation.from_decord(frames)
        if frames.shape[1:3] != display:
            raise RuntimeError(f"decord returned {frames.shape[1]}x{frames.shape[2]} frames for a "
                               f"{display[0]}x{display[1]} display")
    return Decoded(frames, times[idx], rate, fps)
