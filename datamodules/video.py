"""CSV of videos -> decoded, temporally resampled clips, decoded inside DataLoader workers.

A row of the CSV becomes one `semtrack.records.Clip` (`VideoCSVDataset.__getitem__`): read and
validated by `semtrack.video.csv`, its frames chosen by `semtrack.video.frames` and decoded by
`semtrack.video.decode` (see those modules for the rules). Any per-video failure is a clip with
`frames=None` and a one-line `error`; CSV problems are ValueErrors naming the file.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import Iterable, Sequence

import torch
from torch.utils.data import Dataset

from semtrack.config import (
    DECODERS,
    FPS,
    FPS_RULES,
    MIN_FRAMES,
    NATIVE_FPS_DATASETS,
    NUM_FRAMES_CLUSTERING,
)
from semtrack.records import Clip
from semtrack.stopping import detach_worker
from semtrack.video import (
    FramePlan,
    VideoRow,
    cluster_frame_indices,
    decode_video,
    read_video_csv,
    read_video_paths,
)


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
        decoder: "auto" (PyAV, decord if PyAV cannot open or decode the file), "decord" or "pyav" (that one only).
        video_id_rule: default `video_id` when the CSV has none: "stem" (`a/clip.v2.mp4` ->
            `clip.v2`) or "research" (the file name cut at its first '.': `clip`).
        video_path, dataset: rows without a CSV (`csv_path` is then not read): a file, folder or
            glob, and the dataset name (default: the folder's name); see `read_video_paths`.
        limit: only the first `limit` rows (None: all).
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
        video_path: str | None = None,
        dataset: str | None = None,
        limit: int | None = None,
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
        rows = read_video_csv(csv_path, video_id_rule) if video_path is None else read_video_paths(
            video_path, dataset, video_id_rule)
        self.rows: list[VideoRow] = rows[:limit]

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
        plan = FramePlan(self.target_fps(row), self.fps_rule, self.max_frames)
        decoded, decoder, error = decode_video(row.video_path, plan, self.decoder)
        clip = Clip(row.index, row.video_id, row.dataset, row.video_path, decoder=decoder, error=error, fps=plan.fps)
        if decoded is None:
            return clip
        if len(decoded.frames) < MIN_FRAMES:  # per row: a row's own fps can leave a clip one frame
            rate = "the native rate" if plan.fps is None else f"fps {plan.fps:g}"
            return dataclasses.replace(clip, error=f"{len(decoded.frames)} frame(s) at {rate}; a track needs at "
                                                   f"least {MIN_FRAMES} (give this row a higher fps)")
        frames = torch.from_numpy(decoded.frames).permute(0, 3, 1, 2)  # a zero-copy view of (T, H, W, 3)
        return dataclasses.replace(
            clip, frames=frames, frame_times=torch.from_numpy(decoded.times), source_fps=float(decoded.source_fps),
            fps=decoded.fps, cluster_frames=torch.from_numpy(cluster_frame_indices(len(frames),
                                                                                   self.num_frames_clustering)),
        )


class PendingRows(Dataset):
    """The clips of the CSV rows `rows` (indices into `dataset`): what the extraction job's DataLoader
    workers unpickle, so it lives beside the Dataset, in a module without Lightning."""

    def __init__(self, dataset: VideoCSVDataset, rows: list[int]):
        self.dataset, self.rows = dataset, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Clip:
        return self.dataset[self.rows[i]]


def worker_start(parent: int, worker_id: int) -> None:
    """A DataLoader worker's start (`worker_init_fn`, with `parent` bound): `semtrack.stopping.detach_worker`.
    Here, beside `PendingRows`, so a spawned worker imports no Lightning for it."""
    detach_worker(parent)


def collate_videos(items: Sequence[Clip]) -> list[Clip]:
    """Pass-through collate: clips differ in size, failed ones (frames None) are kept."""
    return list(items)
