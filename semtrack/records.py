"""The per-video records of the extraction job: a `Clip` (built by the Dataset) and its `VideoResult`
(built by the pipeline, written by the writer)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

COMPUTE_STAGES = ("features", "clustering", "points", "tracking")  # what the pipeline runs, in order
STAGES = ("decode", *COMPUTE_STAGES, "write")  # every stage a video passes (and can fail in), in order


def _empty(dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(0, dtype=dtype)


@dataclass(frozen=True)
class Clip:
    """One CSV row, decoded and resampled (or not: `error` says why).

    frames: (T, 3, H, W) uint8 RGB (channels-last strides), None when decoding failed.
    frame_times: (T,) float64 seconds of the source frames used, from the first decoded frame.
    source_fps: the stream's average frame rate (NaN if unknown).
    fps: the target rate used (None: every decoded frame).
    cluster_frames: (K,) int64 indices into T of the clustering frames.
    decoder: "decord" | "pyav", the decoder that served (or was tried last).
    """

    row: int
    video_id: str
    dataset: str
    video_path: str
    frames: torch.Tensor | None = None
    frame_times: torch.Tensor = dataclasses.field(default_factory=lambda: _empty(torch.float64))
    source_fps: float = math.nan
    fps: float | None = None
    cluster_frames: torch.Tensor = dataclasses.field(default_factory=lambda: _empty(torch.int64))
    decoder: str = "pyav"
    error: str | None = None

    @property
    def num_frames(self) -> int:
        return 0 if self.frames is None else int(self.frames.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        """(H, W) of the frames."""
        return (int(self.frames.shape[-2]), int(self.frames.shape[-1]))

    def pin_memory(self) -> Clip:
        """A copy with the frames in page-locked memory (the DataLoader calls this with pin_memory=True)."""
        if self.frames is None:
            return self
        return dataclasses.replace(self, frames=self.frames.pin_memory())


@dataclass(frozen=True)
class Failure:
    """Why a video has no tracks: the stage that failed (one of `STAGES`) and a one-line reason."""

    stage: str
    reason: str


@dataclass(frozen=True)
class Tracks:
    """A video's tracks, on the CPU.

    tracks: (T, N, 2) float32 (x, y) clip pixels; visibility: (T, N) bool; obj_ids: (N,) int64
    entity of each point; query_frames: (N,) int64 frame each point was queried at (index into T);
    num_dropped: points removed as redundant (`min_point_distance`); confidence: (T, N) float32
    CoTracker3's visibility probabilities (`--save_confidence`), else None.
    """

    tracks: torch.Tensor
    visibility: torch.Tensor
    obj_ids: torch.Tensor
    query_frames: torch.Tensor
    num_dropped: int = 0
    confidence: torch.Tensor | None = None


@dataclass(frozen=True)
class ClusterView:
    """What the debug overlays draw: labels (K, 16, 16) int64 of the clustering frames and, per point,
    the clustering frame (index into K) it was sampled in, `source_frames` (N,) int64."""

    labels: torch.Tensor
    source_frames: torch.Tensor


@dataclass(frozen=True)
class VideoResult:
    """The outcome of one clip: tracks, or the failure that stopped it."""

    clip: Clip
    tracks: Tracks | None = None
    failure: Failure | None = None
    clusters: ClusterView | None = None  # debug mode only

    @property
    def ok(self) -> bool:
        return self.failure is None
