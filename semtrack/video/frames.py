"""Which decoded frames a clip keeps: pure functions of the frame timestamps, and the memory allowance
checked before anything of the clip's size is allocated.

Temporal rule (`fps_rule="timestamp"`, default): with frame timestamps `t_i` (seconds, relative to
the first frame) and target rate `f`, output frame k (k = 0 .. K-1, K = floor(t_last * f + 0.5) + 1)
is the frame whose timestamp is nearest to k / f; ties go to the earlier frame. `fps_rule="interval"`
reproduces the research code's integer stride: interval = round(average_rate / f) (Python round,
half to even), keep decoded frames 0, interval, 2 * interval, ...; interval 0 is an error item.

Memory: before any frame (or frame list) is allocated, the output size (K frames of H x W x 3 bytes
plus `INDEX_BYTES_PER_FRAME` of index bookkeeping each) must fit in half the available memory
(`semtrack.resources.available_memory`), shared equally between the DataLoader workers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch.utils.data import get_worker_info

from semtrack.resources import available_memory

INDEX_BYTES_PER_FRAME = 128  # frame plan, index lists and sets per output frame (measured: ~100)


class ItemError(Exception):
    """A per-video failure that becomes an error item (never retried with another decoder)."""


def tolerance(t: np.ndarray | float) -> np.ndarray | float:
    """Seconds under which two distances count as equal: covers decord's float32 timestamps."""
    return 1e-6 + 2e-7 * np.abs(t)


def timestamp_frame_count(last: float, fps: float) -> int:
    """K = floor(last * fps + 0.5) + 1 (within float32 precision of a tie): frames the timestamp rule
    gives for a clip whose last frame is at `last` seconds. Computed without allocating."""
    return math.floor(last * fps + 0.5 + tolerance(last) * fps) + 1


def select_by_timestamp(times: np.ndarray, fps: float) -> np.ndarray:
    """Indices (K,) int64 into `times` for target rate `fps` (module docstring rule).

    `times`: (N,) float64 seconds, non-decreasing, times[0] == 0. Ties (within float32 precision)
    go to the earlier frame; equal timestamps resolve to their first frame. Allocates about
    `INDEX_BYTES_PER_FRAME` * K bytes: check K (`timestamp_frame_count`) first.
    """
    targets = np.arange(timestamp_frame_count(float(times[-1]), fps), dtype=np.float64) / fps
    hi = np.clip(np.searchsorted(times, targets, side="left"), 0, len(times) - 1)
    lo = np.clip(hi - 1, 0, len(times) - 1)
    later = (times[hi] - targets) < (targets - times[lo]) - tolerance(targets)
    chosen = np.where(later, hi, lo)
    return np.searchsorted(times, times[chosen], side="left").astype(np.int64)


def _interval(average_rate: float | None, fps: float) -> int:
    """Research stride i = int(round(average_rate / fps)); raises `ItemError` when the rate is
    unknown or i is 0 (source rate <= fps / 2)."""
    if average_rate is None or not math.isfinite(average_rate) or average_rate <= 0:
        raise ItemError(f"fps_rule='interval' needs the stream's average frame rate, got {average_rate}")
    interval = int(round(average_rate / fps))
    if interval == 0:
        raise ItemError(
            f"fps_rule='interval': interval round({average_rate:g} / {fps:g}) = 0 "
            "(source rate <= half the target rate); use fps_rule='timestamp'"
        )
    return interval


def select_by_interval(num_frames: int, average_rate: float | None, fps: float | None) -> np.ndarray:
    """Research rule (REFERENCE 4.2): frames 0, i, 2i, ... with i = int(round(average_rate / fps)).

    Raises `ItemError` when the rate is unknown or the interval is 0 (source rate <= fps / 2).
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


def check_memory(count: int, height: int, width: int) -> None:
    """Refuse (error item) an output of `count` (H, W, 3) uint8 frames plus their index bookkeeping
    that would take more than this worker's share of half the memory still available, instead of
    letting the worker be killed. Call it before allocating anything of size `count`."""
    need = count * (height * width * 3 + INDEX_BYTES_PER_FRAME)
    available = available_memory()
    if available is None:
        return
    workers = _worker_count()
    allowance = available // (2 * workers)
    if need > allowance:
        share = "half the available memory" if workers == 1 else f"1/{2 * workers} of the available memory"
        raise ItemError(
            f"{count} frames of {height}x{width} need {need / 2**30:.1f} GiB, more than {share} "
            f"({allowance / 2**30:.1f} of {available / 2**30:.1f} GiB"
            f"{'' if workers == 1 else f', shared by {workers} DataLoader workers'}); set max_frames"
        )


@dataclass(frozen=True)
class FramePlan:
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
            raise ItemError(f"the last frame's timestamp is not finite ({last})")
        count = len(times) if fps is None else timestamp_frame_count(last, fps)
        if self.max_frames is not None and count > self.max_frames:
            if last <= 0:
                raise ItemError(f"{count} frames exceed max_frames={self.max_frames} and all share one timestamp")
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
        except ItemError:
            return 0
        return 0 if self.max_frames is not None and count > self.max_frames else count

    def __call__(self, times: np.ndarray, average_rate: float | None) -> tuple[np.ndarray, float | None]:
        """-> (indices (T,) int64 into `times`, target rate actually used)."""
        if self.fps_rule == "interval":
            idx = select_by_interval(len(times), average_rate, self.fps)
            if self.max_frames is not None and len(idx) > self.max_frames:
                raise ItemError(
                    f"{len(idx)} frames exceed max_frames={self.max_frames}; fps_rule='interval' "
                    "reproduces the research frames exactly and does not subsample further"
                )
            return idx, self.fps
        fps, _ = self._timestamp_target(times)
        idx = np.arange(len(times), dtype=np.int64) if fps is None else select_by_timestamp(times, fps)
        return idx, fps


def select_frames(plan, times: np.ndarray, average_rate: float | None, frame_size: tuple[int, int]):
    """Run `plan` (see `FramePlan`) on the decoded timestamps; `ItemError` if its T frames of
    `frame_size` (H, W) do not fit in memory: checked before the plan runs where it can tell T."""
    if hasattr(plan, "frames_needed"):
        check_memory(plan.frames_needed(times, average_rate), *frame_size)
        return plan(times, average_rate)
    idx, fps = plan(times, average_rate)
    check_memory(len(idx), *frame_size)
    return idx, fps
