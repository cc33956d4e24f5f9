"""The extraction job's Lightning pieces: `SemanticTracker` (features -> clusters -> points ->
tracks in `predict_step`) and `ExtractionDataModule` (the CSV rows still to do, decoded in workers).

A batch is the list of items from `datamodules.video.collate_videos`. Videos that share a shape
go through DINOv2 and the tracker in one call; every stage runs per group, and when a group call
raises (CUDA out of memory included) its videos are retried one by one, so a failure is pinned on
one video (stage + one-line reason) and the others go on. Results leave the device once, at the
end of the step, for the writer.

Before tracking, each group's tracking memory is estimated (`tracking_bytes`) against the budget
`config.max_tracking_memory_gb` (`tracking_budget`): a group over it is split into smaller groups,
and a video that alone is over it is a recorded failure that names the fix, without being tried —
a CPU rank would otherwise be killed by the kernel with nothing recorded.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Hashable

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.video import VideoCSVDataset, collate_videos
from semtrack.clustering import bipartite_clusters, kmeans_clusters, video_seed
from semtrack.config import ExtractConfig
from semtrack.points import grid_query_points, select_query_points
from semtrack.resources import available_memory
from semtrack.trackfile import TrackFileError, load_tracks

STAGES = ("features", "clustering", "points", "tracking")
TRACKER_PRECISION = {"32-true": "fp32", "32": "fp32", "16-mixed": "fp32", "bf16-mixed": "bf16"}
GB = 1e9
CUDA_BUDGET_BYTES = 10 * GB  # issue 6: peak GPU memory <= 10 GB per rank


def one_line(exc: BaseException) -> str:
    """`TypeName: first line of the message` (at most 300 characters)."""
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    line = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return line if len(line) <= 300 else line[:297] + "..."


def tracker_weights_id(config: ExtractConfig) -> str:
    """What the tracker loads: the `cotracker_checkpoint` path/URL, else `weights`."""
    return config.cotracker_checkpoint or config.weights


def dinov2_weights_id(config: ExtractConfig) -> str:
    """What DINOv2 loads: the `dinov2_checkpoint` path, else timm's hub weights or the stand-ins."""
    if config.dinov2_checkpoint:
        return config.dinov2_checkpoint
    return "random" if config.weights == "random" else "timm-hub"


# ---------------------------------------------------------------------------- tracking memory
# Until the tracker publishes `estimate_tracking_bytes`: its peak live memory as counted in
# benchmarks/NOTES.md ("Long clips", fp32, 384x512, 36 support points added to the queries): per
# frame 25 MB that scale with the tracker resolution (feature pyramids, their reversed copy for
# the backward pass, the resized video) plus 70 kB per tracked point (correlation patches, their
# einsum copy, the two bmm products). Rounded up from 24.3 MB and 69.4 kB.
_SUPPORT_POINTS = 36
_FRAME_BYTES = 25e6
_POINT_FRAME_BYTES = 70e3


def _fallback_tracking_bytes(T: int, N: int, H: int = 384, W: int = 512, backward: bool = True,
                             dtype_bytes: int = 4, batch: int = 1) -> float:
    """Conservative tracker peak bytes for `batch` clips of T frames and N queries at H x W. Counts
    fp32 and the backward pass whatever `backward` and `dtype_bytes` say (an upper bound for both)."""
    per_frame = _FRAME_BYTES * (H * W) / (384 * 512) + _POINT_FRAME_BYTES * (N + _SUPPORT_POINTS)
    return batch * T * per_frame


def _tracker_estimate() -> Callable[..., float]:
    try:
        from semtrack.tracker import estimate_tracking_bytes
    except ImportError:
        return _fallback_tracking_bytes
    return estimate_tracking_bytes


def tracking_bytes(frames: int, points: int, clip_size: tuple[int, int], resolution: tuple[int, int],
                   backward: bool, dtype_bytes: int, batch: int = 1) -> float:
    """Estimated peak bytes of one tracking call on `batch` clips of (frames, 3, *clip_size) uint8
    with `points` queries each: the tracker's estimate at `resolution` (H, W) plus the float32 video
    (and its uint8 stack) that `SemanticTracker._tracking` hands it."""
    tracker = _tracker_estimate()(frames, points, *resolution, backward=backward, dtype_bytes=dtype_bytes, batch=batch)
    return float(tracker) + batch * frames * 3 * clip_size[0] * clip_size[1] * (1 + 4)


@dataclass
class VideoResult:
    """One video's outcome. On success the CPU tensors the writer needs; else stage + reason."""

    index: int
    video_id: str
    dataset: str
    video_path: str
    stage: str | None = None  # failed stage, None on success
    reason: str | None = None
    tracks: torch.Tensor | None = None  # (T, N, 2) float32 clip pixels (x, y)
    visibility: torch.Tensor | None = None  # (T, N) bool
    obj_ids: torch.Tensor | None = None  # (N,) int64
    query_frames: torch.Tensor | None = None  # (N,) int64
    num_dropped: int = 0
    labels: torch.Tensor | None = None  # (K, P, Q) int64, debug mode only
    source_frames: torch.Tensor | None = None  # (N,) int64 clustering frame of each point, debug only

    @property
    def ok(self) -> bool:
        return self.stage is None


@dataclass
class _Work:
    """Device-side state of one video inside `predict_step`."""

    result: VideoResult
    video: torch.Tensor  # (T, 3, H, W) uint8 on the device
    cluster_frames: torch.Tensor  # (K,) int64 on the device
    tokens: torch.Tensor | None = None  # (K, 16, 16, D)
    labels: torch.Tensor | None = None  # (K, 16, 16) int64
    queries: torch.Tensor | None = None  # (N, 3) float32 (t, x, y)
    obj_ids: torch.Tensor | None = None
    query_frames: torch.Tensor | None = None
    source_frames: torch.Tensor | None = None
    tracks: torch.Tensor | None = None
    visibility: torch.Tensor | None = None


# Grouping keys: videos with equal keys share one call of a stage.
def _together(w: _Work) -> int:
    return 0


def _frame_size(w: _Work) -> tuple[int, int]:
    return tuple(w.video.shape[-2:])  # (H, W): one DINOv2 call


def _clip_shape(w: _Work) -> tuple[int, ...]:
    return tuple(w.video.shape)  # (T, 3, H, W): one tracker call (grid mode)


def _clip_shape_and_points(w: _Work) -> tuple:
    # The tracker's points attend to each other, so videos are only batched at equal N (no padding).
    return tuple(w.video.shape), w.queries.shape[0]


class _StageClock:
    """Per-stage seconds without synchronising the device: CUDA events, read after the step's copy."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, int, object, object]] = []

    @contextlib.contextmanager
    def __call__(self, stage: str, videos: int):
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
        else:
            start = time.perf_counter()
            yield
            end = time.perf_counter()
        self.marks.append((stage, videos, start, end))

    def totals(self) -> dict[str, list[float]]:
        """{stage: [seconds, videos]}; call after the device has caught up (the step's final copy)."""
        out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for stage, videos, start, end in self.marks:
            seconds = start.elapsed_time(end) / 1000.0 if self.cuda else end - start
            out[stage][0] += seconds
            out[stage][1] += videos
        return dict(out)


class SemanticTracker(L.LightningModule):
    """DINOv2 + clustering + query points + CoTracker3 for a batch of decoded videos.

    `predict_step(batch: list[item])` -> `{"results": [VideoResult] (batch order), "timings":
    {stage: [seconds, videos]}}`. Models are built in `configure_model` (weights fail there, before
    any video is read). Grid mode (`use_grid`) skips DINOv2 and clustering.
    """

    def __init__(self, config: ExtractConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ExtractConfig()
        self.features: torch.nn.Module | None = None
        self.tracker: torch.nn.Module | None = None
        self.tracker_precision = "fp32"  # set from the Trainer's precision in configure_model
        self._model_bytes = 0  # CUDA memory the models hold, read at predict start

    def configure_model(self) -> None:
        if self.tracker is not None:
            return
        # Imported here: spawned DataLoader workers import this module (PendingRows) and need neither.
        from semtrack.features import DinoV2Extractor
        from semtrack.tracker import load_tracker

        cfg = self.config
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        if precision not in TRACKER_PRECISION:
            raise ValueError(f"precision {precision!r} is not supported; use one of {sorted(TRACKER_PRECISION)}")
        if not cfg.use_grid:
            checkpoint = cfg.dinov2_checkpoint or ("random" if cfg.weights == "random" else None)
            self.features = DinoV2Extractor(cfg.dinov2_model, checkpoint=checkpoint)
        self.tracker_precision = TRACKER_PRECISION[precision]
        self.tracker = load_tracker(
            tracker_weights_id(cfg), precision=self.tracker_precision, interp_shape=tuple(cfg.tracker_resolution)
        )

    def on_predict_start(self) -> None:
        if self.device.type == "cuda":
            self._model_bytes = torch.cuda.memory_allocated(self.device)

    # ------------------------------------------------------------------ tracking memory
    def tracking_budget(self) -> float | None:
        """Bytes one tracking call may use: `max_tracking_memory_gb`, else on CUDA 10 GB minus what
        the models hold, elsewhere half the memory still available (None: unknown, no guard)."""
        if self.config.max_tracking_memory_gb is not None:
            return self.config.max_tracking_memory_gb * GB
        if self.device.type == "cuda":
            return max(0.0, CUDA_BUDGET_BYTES - self._model_bytes)
        available = available_memory()
        return None if available is None else available / 2

    def _num_points(self, w: _Work) -> int:
        return self.config.cotracker_grid_size**2 if self.config.use_grid else w.queries.shape[0]

    def _tracking_need(self, w: _Work, batch: int = 1, frames: int | None = None) -> float:
        """Estimated bytes to track `batch` videos shaped like `w` (optionally cut to `frames`)."""
        cfg = self.config
        t, _, h, wd = w.video.shape
        return tracking_bytes(
            frames or t, self._num_points(w), (h, wd), cfg.tracker_resolution, backward=not cfg.use_grid,
            dtype_bytes=2 if self.tracker_precision == "bf16" else 4, batch=batch,
        )

    def _over_budget(self, w: _Work, budget: float) -> str:
        """The failure reason for a video that alone needs more than `budget` bytes, naming the fix:
        the largest --max_frames that fits, or a budget that would."""
        need, frames = self._tracking_need(w), w.video.shape[0]
        lo, hi = 1, frames  # lo: the largest frame count that fits (estimates grow with frames), or 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self._tracking_need(w, frames=mid) <= budget else (lo, mid - 1)
        h, wd = self.config.tracker_resolution
        # The Dataset needs max_frames >= 2; max_frames changes outputs, so the sidecar wants a new folder.
        fix = f"use --max_frames {lo} (with a new --base_feat_path) or " if lo >= 2 else "use "
        return (
            f"needs ≈{need / GB:.3g} GB to track {frames} frames x {self._num_points(w)} points at {h}x{wd}; "
            f"budget {budget / GB:.3g} GB; {fix}--max_tracking_memory_gb {math.ceil(need / GB * 100) / 100:g}"
        )

    def _fit_budget(self, group: list[_Work]) -> list[list[_Work]]:
        """Split a tracking group (videos of one shape and point count) into calls that fit the
        budget; videos that do not fit alone are failed here, untried."""
        budget = self.tracking_budget()
        if budget is None:
            return [group]
        if self._tracking_need(group[0]) > budget:
            reason = self._over_budget(group[0], budget)
            for w in group:
                self._fail(w, "tracking", reason)
            return []
        size = len(group)
        while self._tracking_need(group[0], batch=size) > budget:
            size -= 1
        chunk = math.ceil(len(group) / math.ceil(len(group) / size))  # balanced calls of <= size videos
        return [group[i:i + chunk] for i in range(0, len(group), chunk)]

    # ------------------------------------------------------------------ stage plumbing
    def _run(self, stage: str, works: list[_Work], key: Callable[[_Work], Hashable], fn, clock,
             split: Callable[[list[_Work]], list[list[_Work]]] | None = None) -> list[_Work]:
        """Apply `fn(group)` to the groups of live works sharing `key` (each cut into calls by
        `split`, which may also fail videos); on an exception retry each video alone and mark the
        ones that still fail. Returns the works still alive."""
        groups: dict[Hashable, list[_Work]] = defaultdict(list)
        for w in works:
            groups[key(w)].append(w)
        calls = [call for group in groups.values() for call in (split(group) if split else [group])]
        for group in calls:
            try:
                with clock(stage, len(group)):
                    fn(group)
                continue
            except Exception as exc:  # noqa: BLE001 - any failure is pinned on a video below
                self._release(exc)
                if len(group) == 1:
                    self._fail(group[0], stage, exc)
                    continue
            for w in group:
                try:
                    with clock(stage, 0):
                        fn([w])
                except Exception as exc:  # noqa: BLE001
                    self._release(exc)
                    self._fail(w, stage, exc)
        return [w for w in works if w.result.ok]

    @staticmethod
    def _release(exc: BaseException) -> None:
        if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
            torch.cuda.empty_cache()

    @staticmethod
    def _fail(w: _Work, stage: str, exc: BaseException | str) -> None:
        w.result.stage = stage
        w.result.reason = exc if isinstance(exc, str) else one_line(exc)

    # ------------------------------------------------------------------ stages
    def _features(self, group: list[_Work]) -> None:
        frames = torch.cat([w.video[w.cluster_frames] for w in group])  # (sum K, 3, H, W) uint8
        tokens = self.features(frames)  # (sum K, 16, 16, D)
        for w, t in zip(group, tokens.split([len(w.cluster_frames) for w in group])):
            w.tokens = t

    def _clustering(self, group: list[_Work]) -> None:
        cfg = self.config
        if cfg.clustering_method == "bipartite":
            labels = bipartite_clusters([w.tokens for w in group], cfg.merge_ratio, cfg.num_iters)
        else:
            labels = [
                kmeans_clusters(w.tokens, cfg.n_clusters, video_seed(w.result.video_id), init=cfg.kmeans_init)
                for w in group
            ]
        for w, lab in zip(group, labels):
            w.labels, w.tokens = lab, None

    def _points(self, group: list[_Work]) -> None:
        cfg = self.config
        for w in group:
            qp = select_query_points(
                w.labels, w.cluster_frames, tuple(w.video.shape[-2:]),
                num_points_per_entity=cfg.num_points_per_entity, sampler=cfg.sampler,
                use_connected_components=cfg.use_connected_components,
                legacy_query_frames=cfg.legacy_query_frames, min_point_distance=cfg.min_point_distance,
            )
            if len(qp) == 0:
                raise ValueError("no query points: every entity vanished at this clip size")
            w.queries, w.obj_ids, w.source_frames = qp.queries, qp.obj_ids, qp.source_frames
            w.query_frames = qp.queries[:, 0].long()
            w.result.num_dropped = qp.num_dropped

    def _grid_points(self, group: list[_Work]) -> None:
        for w in group:
            grid = grid_query_points(self.config.cotracker_grid_size, 0, device=w.video.device)
            w.obj_ids, w.query_frames = grid.obj_ids, grid.query_frames

    def _tracking(self, group: list[_Work]) -> None:
        video = torch.stack([w.video for w in group]).float()  # (B, T, 3, H, W) 0..255
        with torch.autocast(video.device.type, enabled=False):  # the tracker runs its own precision
            if self.config.use_grid:
                tracks, vis = self.tracker(video, grid_size=self.config.cotracker_grid_size, grid_query_frame=0)
            else:
                queries = torch.stack([w.queries for w in group])  # (B, N, 3)
                tracks, vis = self.tracker(video, queries=queries, backward_tracking=True)
        for w, tr, vi in zip(group, tracks, vis):
            w.tracks, w.visibility = tr, vi

    # ------------------------------------------------------------------ the step
    def predict_step(self, batch: list[dict], batch_idx: int = 0, dataloader_idx: int = 0) -> dict:
        cfg = self.config
        clock = _StageClock(self.device)
        results, works = [], []
        for item in batch:
            r = VideoResult(int(item["index"]), item["video_id"], item["dataset"], item["video_path"])
            results.append(r)
            if item["video"] is None:
                r.stage, r.reason = "decode", item["error"] or "no frames decoded"
                continue
            works.append(_Work(
                r,
                item["video"].to(self.device, non_blocking=True),
                item["cluster_frames"].to(self.device, non_blocking=True),
            ))
        if cfg.use_grid:
            works = self._run("points", works, _together, self._grid_points, clock)
            works = self._run("tracking", works, _clip_shape, self._tracking, clock, self._fit_budget)
        else:
            works = self._run("features", works, _frame_size, self._features, clock)
            works = self._run("clustering", works, _together, self._clustering, clock)
            works = self._run("points", works, _together, self._points, clock)
            works = self._run("tracking", works, _clip_shape_and_points, self._tracking, clock, self._fit_budget)
        for w in works:  # the one device -> host copy per video
            r = w.result
            r.tracks, r.visibility = w.tracks.cpu(), w.visibility.cpu()
            r.obj_ids, r.query_frames = w.obj_ids.cpu(), w.query_frames.cpu()
            if cfg.debug_mode and w.labels is not None:
                r.labels, r.source_frames = w.labels.cpu(), w.source_frames.cpu()
        if clock.cuda:
            torch.cuda.current_stream().synchronize()  # no-op after the copies; needed if all failed
        return {"results": results, "timings": clock.totals()}


class PendingRows(Dataset):
    """The CSV rows to process, padded with no-op entries (None items) to at least `min_len`.

    Lightning skips the whole predict loop, hooks included, on a rank whose shard is empty; the
    padding gives every rank at least one batch, so every rank reaches the writer's end-of-run
    merge. `collate_pending` drops the no-ops.
    """

    def __init__(self, dataset: VideoCSVDataset, rows: list[int], min_len: int = 1):
        self.dataset = dataset
        self.rows = list(rows) + [-1] * max(0, min_len - len(rows))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict | None:
        row = self.rows[i]
        return None if row < 0 else self.dataset[row]


def collate_pending(items: list[dict | None]) -> list[dict]:
    """`collate_videos` without the no-op padding entries (a batch may become empty)."""
    return collate_videos([item for item in items if item is not None])


class ExtractionDataModule(L.LightningDataModule):
    """The CSV rows this run still has to do, decoded by `VideoCSVDataset` in DataLoader workers.

    Rows whose pickle already loads with `semtrack.trackfile.load_tracks` are skipped (counted in
    `num_skipped`) unless `config.rerun`; a corrupt pickle is redone. Global rank 0 decides and
    broadcasts the list, so every rank sees the same rows; Lightning's predict sampler then gives
    each row to exactly one rank. Debug mode keeps only the first CSV row.
    """

    def __init__(self, config: ExtractConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ExtractConfig()
        self.dataset: VideoCSVDataset | None = None
        self.pending: list[int] = []
        self.num_rows = 0
        self.num_skipped = 0

    def make_dataset(self) -> VideoCSVDataset:
        """The full dataset (validates the CSV: ValueError naming the file and the culprit)."""
        cfg = self.config
        kwargs = {"native_fps_datasets": cfg.native_fps_datasets} if cfg.native_fps_datasets is not None else {}
        return VideoCSVDataset(
            cfg.csv_path, fps=cfg.fps, num_frames_clustering=cfg.num_frames_clustering,
            fps_rule=cfg.fps_rule, max_frames=cfg.max_frames, **kwargs,
        )

    def pending_rows(self, dataset: VideoCSVDataset) -> tuple[list[int], int]:
        """-> (row indices to process, number skipped because a valid pickle exists)."""
        rows = dataset.rows[:1] if self.config.debug_mode else dataset.rows
        pending, skipped = [], 0
        for row in rows:
            path = self.config.pickle_path(row.dataset, row.video_id)
            if not self.config.rerun and path.is_file():
                try:
                    load_tracks(path)
                    skipped += 1
                    continue
                except TrackFileError:
                    pass  # corrupt or truncated: redo it
            pending.append(row.index)
        return pending, skipped

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        dataset = self.make_dataset()
        trainer = self.trainer
        if trainer is None or trainer.is_global_zero:
            decision = self.pending_rows(dataset)
        else:
            decision = None
        if trainer is not None:
            decision = trainer.strategy.broadcast(decision, src=0)
        self.pending, self.num_skipped = decision
        self.num_rows = len(dataset.rows[:1] if self.config.debug_mode else dataset.rows)
        self.dataset = dataset

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        cfg = self.config
        accelerated = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        world = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(
            PendingRows(self.dataset, self.pending, min_len=world),
            batch_size=cfg.batch_size,
            shuffle=False,
            num_workers=cfg.num_workers,
            collate_fn=collate_pending,
            pin_memory=accelerated,
        )
