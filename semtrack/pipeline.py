"""The extraction stages for a batch of clips, without Lightning.

    tokens  = features(frames[cluster_frames])         DINOv2, per clip      (K, 16, 16, D)
    labels  = cluster(tokens)                          all clips at once     (K, 16, 16)
    points  = select_query_points(labels, ...)         per clip              (N, 3) (t, x, y)
    tracks  = tracker.track_many(frames, points)       clips of any shape    (T, N, 2), (T, N)

Grid mode skips the first three. Each stage is `StageRunner.run`: a failing call is retried clip by
clip and a failure is pinned on its clip. The tracker takes the batch in as few calls as fit the
memory budget (clips in order of length, so a call pads little). Results leave the device once, at
the end.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from semtrack.clustering import cluster
from semtrack.config import ExtractConfig
from semtrack.points import QueryPoints, grid_query_points, select_query_points
from semtrack.records import Clip, ClusterView, Failure, Tracks, VideoResult
from semtrack.resources import available_memory
from semtrack.runner import GB, StageRunner, TrackingBudget
from semtrack.tracker import estimate_tracking_bytes

TRACKER_PRECISION = {"32-true": "fp32", "32": "fp32", "16-mixed": "fp32", "bf16-mixed": "bf16"}
CUDA_BUDGET_BYTES = 10 * GB  # tracking memory per GPU rank, models included
# On a GPU, fewer and larger chunks of the tracker's ops launch fewer kernels (exact either way): each
# tracking call takes the largest of CUDA_CHUNK_CHOICES (None: unchunked) whose estimate fits the
# budget (`chunk_bytes_for_call`). The smallest, which the calls are grouped by, fits 8 SSV2 clips of
# 88 frames with 300 points at 8.8 GB in bf16, inside CUDA_BUDGET_BYTES with the models
# (semtrack.tracker.estimate_tracking_bytes).
CUDA_ENCODER_CHUNK = 32  # frames per encoder call
CUDA_CHUNK_CHOICES = (None, 8 * GB, 4 * GB, 2 * GB, 1_500_000_000)  # one chunk's intermediates, largest first


@dataclass
class BatchResult:
    """What one step hands the writer: a result per clip (batch order), {stage: (seconds, videos)}
    and, per tracker call, (clips, frames, frames after padding)."""

    results: list[VideoResult]
    timings: dict[str, tuple[float, int]]
    tracking_calls: list[tuple[int, int, int]]


def chunk_choices(device: torch.device) -> tuple[int | None, ...]:
    """The chunk budgets a tracking call may use, largest first: `CUDA_CHUNK_CHOICES` on CUDA; elsewhere
    only the tracker's default (a CPU gains nothing from big chunks)."""
    return CUDA_CHUNK_CHOICES if device.type == "cuda" else ()


def tune_tracker(tracker, device: torch.device) -> None:
    """Chunk sizes for the device: on CUDA `CUDA_ENCODER_CHUNK` and the smallest of `chunk_choices`,
    elsewhere the tracker's defaults."""
    if device.type == "cuda":
        tracker.model.encoder_chunk = CUDA_ENCODER_CHUNK
        tracker.model.chunk_bytes = chunk_choices(device)[-1]


def chunk_bytes_for_call(estimate: Callable[[int | None], float], budget: float | None,
                         choices: Sequence[int | None], default: int | None) -> int | None:
    """The first of `choices` (largest first) whose `estimate(chunk_bytes)` fits `budget` bytes;
    `default` when there are no choices, no budget, or none fits (the call was grouped to fit it)."""
    if budget is None:
        return default
    return next((c for c in choices if estimate(c) <= budget), default)


def tracking_budget(config: ExtractConfig, device: torch.device, model_bytes: int) -> float | None:
    """Bytes one tracking call may use: `max_tracking_memory_gb`, else on CUDA `CUDA_BUDGET_BYTES`
    minus what the models hold, elsewhere half the memory still available (None: unknown, no guard)."""
    if config.max_tracking_memory_gb is not None:
        return config.max_tracking_memory_gb * GB
    if device.type == "cuda":
        return max(0.0, CUDA_BUDGET_BYTES - model_bytes)
    available = available_memory()
    return None if available is None else available / 2


class Pipeline:
    """features -> clustering -> points -> tracking for batches of clips (see the module docstring).

    features: a `DinoV2Extractor` (None in grid mode); tracker: an `OfflineTracker`, both on `device`;
    tracker_precision: "fp32" | "bf16"; budget: bytes one tracking call may use (None: no limit);
    chunks: chunk budgets a call may use, largest first (`chunk_choices`); calls are grouped at the
    tracker's own `chunk_bytes`, and each then runs with the largest choice that fits the budget.
    """

    def __init__(self, config: ExtractConfig, features, tracker, device: torch.device, tracker_precision: str,
                 budget: float | None, chunks: Sequence[int | None] = ()):
        self.config, self.features, self.tracker = config, features, tracker
        self.device, self.tracker_precision, self.budget = device, tracker_precision, budget
        self.chunks, self.base_chunk_bytes = tuple(chunks), tracker.model.chunk_bytes

    # ------------------------------------------------------------------ the batch
    def __call__(self, clips: Sequence[Clip]) -> BatchResult:
        cfg, run = self.config, StageRunner(self.device)
        for clip in clips:
            if clip.frames is None:
                run.fail(clip, "decode", clip.error or "no frames decoded")
        live = run.alive(clips)
        frames = {c.row: c.frames.to(self.device, non_blocking=True) for c in live}  # (T, 3, H, W) uint8
        points, labels, self._calls = {}, {}, []
        if cfg.use_grid:
            budget = self.tracking_budget({c.row: cfg.cotracker_grid_size**2 for c in live})
            tracks = run.run("tracking", live, self._grid_tracking, frames, calls=budget.calls_by_length)
        else:
            cluster_frames = {c.row: c.cluster_frames.to(self.device, non_blocking=True) for c in live}
            tokens = run.run("features", live, self._features, frames, cluster_frames)
            labels = run.run("clustering", live, self._clustering, tokens)
            points = run.run("points", live, self._points, labels, cluster_frames)
            budget = self.tracking_budget({row: len(qp) for row, qp in points.items()})
            tracks = run.run("tracking", live, self._tracking, frames, points, calls=budget.calls_by_length)
        results = [self._result(clip, tracks, points, labels, run.failures.get(clip.row)) for clip in clips]
        if run.clock.cuda:
            torch.cuda.current_stream().synchronize()  # the stage clocks' events are complete
        return BatchResult(results, run.clock.totals(), self._calls)

    def _result(self, clip: Clip, tracks: dict, points: dict, labels: dict, failure: Failure | None) -> VideoResult:
        """The clip's result, its tensors copied to the CPU (the one device -> host copy)."""
        if failure is not None:
            return VideoResult(clip, failure=failure)
        tr, vis, obj_ids, query_frames, probs = (None if t is None else t.cpu() for t in tracks[clip.row])
        qp = points.get(clip.row)
        view = None
        if self.config.debug_mode and qp is not None:
            view = ClusterView(labels[clip.row].cpu(), qp.source_frames.cpu())
        dropped = qp.num_dropped if qp else 0
        return VideoResult(clip, Tracks(tr, vis, obj_ids, query_frames, dropped, probs), clusters=view)

    # ------------------------------------------------------------------ stages
    def _features(self, clips, frames, cluster_frames) -> list[torch.Tensor]:
        """-> tokens (K, 16, 16, D) float32 per clip (DINOv2 per clip: batch-independent tokens), in
        `features_precision` whatever autocast the Trainer's precision set."""
        bf16 = self.config.features_precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return [self.features(f[k]) for f, k in zip(frames, cluster_frames)]

    def _clustering(self, clips, tokens) -> list[torch.Tensor]:
        cfg = self.config
        return cluster(tokens, [c.video_id for c in clips], cfg.clustering_method, cfg.n_clusters, cfg.merge_ratio,
                       cfg.num_iters, cfg.kmeans_init)

    def _points(self, clips, labels, cluster_frames) -> list[QueryPoints]:
        cfg, out = self.config, []
        for clip, lab, k in zip(clips, labels, cluster_frames):
            qp = select_query_points(
                lab, k, clip.size, num_points_per_entity=cfg.num_points_per_entity, sampler=cfg.sampler,
                use_connected_components=cfg.use_connected_components,
                legacy_query_frames=cfg.legacy_query_frames, min_point_distance=cfg.min_point_distance,
                n_init=cfg.sklearn_n_init,
            )
            if len(qp) == 0:
                raise ValueError("no query points: every entity vanished at this clip size")
            out.append(qp)
        return out

    def _tracking(self, clips, frames, points) -> list[tuple]:
        """uint8 clips (T_i, 3, H_i, W_i) and their points, in one tracker call -> per clip (tracks,
        visibility, obj_ids, query_frames, visibility probabilities or None)."""
        out = self._track(frames, max(len(qp) for qp in points), queries=[qp.queries for qp in points],
                          backward_tracking=True)
        return [(*tr, qp.obj_ids, qp.queries[:, 0].long(), probs) for (*tr, probs), qp in zip(out, points)]

    def _grid_tracking(self, clips, frames) -> list[tuple]:
        """Grid mode: a grid_size^2 grid at frame 0 of every clip, no backward pass."""
        size = self.config.cotracker_grid_size
        out = self._track(frames, size**2, grid_size=size, grid_query_frame=0, backward_tracking=False)
        grid = grid_query_points(size, 0, device=self.device)
        return [(*tr, grid.obj_ids, grid.query_frames, probs) for *tr, probs in out]

    def _track(self, frames: list[torch.Tensor], num_points: int, **options) -> list[tuple]:
        """`track_many` on uint8 clips (T_i, 3, H_i, W_i) with at most `num_points` points each, in the
        tracker's own precision (not the Trainer's autocast) and the largest chunks that fit the
        budget -> per clip (tracks, visibility, probabilities or None); records the call's padding."""
        lengths = [len(f) for f in frames]
        self._calls.append((len(frames), sum(lengths), max(lengths) * len(frames)))
        size = (max(f.shape[-2] for f in frames), max(f.shape[-1] for f in frames))
        model = self.tracker.model
        model.chunk_bytes = chunk_bytes_for_call(
            lambda chunk: self._estimate(max(lengths), num_points, size, len(frames), chunk),
            self.budget, self.chunks, self.base_chunk_bytes)
        try:
            with torch.autocast(self.device.type, enabled=False):
                out = self.tracker.track_many(frames, return_probs=self.config.save_confidence, **options)
        finally:
            model.chunk_bytes = self.base_chunk_bytes
        return [o if self.config.save_confidence else (*o, None) for o in out]

    # ------------------------------------------------------------------ tracking memory
    def _estimate(self, num_frames: int, num_points: int, size: tuple[int, int], batch: int,
                  chunk_bytes: int | None) -> float:
        """`estimate_tracking_bytes` of one call of this job's tracker with `chunk_bytes` chunks."""
        cfg = self.config
        return estimate_tracking_bytes(
            num_frames, num_points, size, cfg.tracker_resolution, backward=not cfg.use_grid,
            dtype_bytes=2 if self.tracker_precision == "bf16" else 4, batch=batch,
            encoder_chunk=self.tracker.model.encoder_chunk, chunk_bytes=chunk_bytes)

    def tracking_budget(self, num_points: dict[int, int]) -> TrackingBudget:
        """The memory guard for clips with `num_points` {row: N} points each (at the base chunk size)."""
        height, width = self.config.tracker_resolution

        def need(clips: Sequence[Clip], frames: int | None) -> float:
            size = (max(c.size[0] for c in clips), max(c.size[1] for c in clips))
            return self._estimate(frames or max(c.num_frames for c in clips), max(num_points[c.row] for c in clips),
                                  size, len(clips), self.base_chunk_bytes)

        def describe(clip: Clip) -> str:
            return f"{clip.num_frames} frames x {num_points[clip.row]} points at {height}x{width}"

        return TrackingBudget(self.budget, need, describe)
