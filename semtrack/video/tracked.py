"""Which decoded frames a track file covers: the plan that decodes exactly the frames its tracks were
made on, for `semtrack.video.decode_video` (the `plan(times, average_rate)` protocol of `FramePlan`).

A semtrack track file records the source timestamps of its T tracked frames (`meta["frame_times"]`,
seconds from the first decoded frame): each is matched to the decoded frame with that timestamp, so
track frame t is the video frame that was tracked, whatever resampling rule the extraction used. A
research pickle records none: the research training rule picks `linspace(0, n - 1, T)` (truncated) of
the n decoded frames, which can be off by a few frames (REFERENCE 13.2).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

TIME_TOLERANCE_S = 1e-3  # a recorded frame time must match a decoded timestamp this closely (seconds)


@dataclass(frozen=True)
class TrackedFramePlan:
    """The decoded frames that track frames `track_frames` of a T-frame track file were tracked on.

    frame_times: the recorded times (seconds) of those track frames, one per entry of `track_frames`,
        or None for a research pickle (research rule over T = `num_track_frames`).
    num_track_frames: T, the track file's frame count.
    track_frames: indices into T of the frames wanted, in the order they are returned.
    Build it with `of`.
    """

    frame_times: tuple[float, ...] | None
    num_track_frames: int
    track_frames: tuple[int, ...]

    @classmethod
    def of(cls, frame_times, num_track_frames: int, track_frames: Sequence[int] | None = None) -> TrackedFramePlan:
        """The plan for `track_frames` (indices into T; default all T, in order) of a track file with
        T = `num_track_frames` frames whose recorded times are `frame_times` ((T,) seconds, anything
        `np.asarray` takes, e.g. the file's float64 tensor; None for a research pickle)."""
        picks = tuple(range(num_track_frames)) if track_frames is None else tuple(int(i) for i in track_frames)
        times = None
        if frame_times is not None:
            times = tuple(np.asarray(frame_times, dtype=np.float64)[list(picks)].tolist())
        return cls(times, num_track_frames, picks)

    def __call__(self, times: np.ndarray, average_rate: float | None) -> tuple[np.ndarray, None]:
        """-> (indices (F,) int64 into the decoded timestamps `times` (N,) seconds, None: no target rate).
        ValueError when a recorded time has no decoded frame within `TIME_TOLERANCE_S` (another video)."""
        if self.frame_times is None:
            idx = np.linspace(0, len(times) - 1, self.num_track_frames).astype(np.int64)
            return idx[list(self.track_frames)], None
        wanted = np.asarray(self.frame_times, dtype=np.float64)  # (F,)
        hi = np.clip(np.searchsorted(times, wanted), 0, len(times) - 1)
        lo = np.clip(hi - 1, 0, len(times) - 1)
        idx = np.where(np.abs(times[hi] - wanted) < np.abs(times[lo] - wanted), hi, lo)
        gap = np.abs(times[idx] - wanted)
        if np.any(gap > TIME_TOLERANCE_S):
            k = int(np.argmax(gap))
            raise ValueError(
                f"no decoded frame at the tracked time {wanted[k]:.4f} s (nearest {times[idx[k]]:.4f} s): "
                "the video differs from the one the tracks were extracted from"
            )
        return idx.astype(np.int64), None
