"""The extraction stages for a batch of clips, without Lightning.

    tokens  = features.forward_clips(frames[cluster_frames])  all clips at once   (V, K, 16, 16, D)
    labels  = cluster_batch(tokens)                           all clips at once   (V, K, 16, 16)
    points  = select_query_points_batch(labels, ...)          all clips at once   (V, N, 3) (t, x, y)
    tracks  = tracker.track_many(frames, points)              clips of any shape  (T, N, 2), (T, N)

Grid mode skips the first three. Each stage is `StageRunner.run`: a failing call is retried clip by
clip and a failure is pinned on its clip. The tracker takes the batch in as few calls as fit the
memory budget (clips in order of length, so a call pads little), each call with the chunk sizes
`semtrack.tracking_memory` gives it.

On a GPU the host waits for the device twice per batch, whatever the number of clips, frames or
points: once to read every clip's point count before tracking (`_query_points`), once for the
results' copy back (`transfer.download`). Uploads are pinned and non-blocking, the stages read no
value back (`tests/test_step_syncs.py` counts it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from semtrack.batched import Labels, Row, Tokens, per_group, rows
from semtrack.clustering import cluster_batch
from semtrack.config import ExtractConfig
from semtrack.features import GPU_BATCH_FRAMES, DinoV2Extractor
from semtrack.points import QueryPoints, grid_query_points, select_query_points_batch
from semtrack.records import Clip, ClusterView, Failure, Tracks, VideoResult
from semtrack.runner import StageRunner
from semtrack.tracker import load_tracker
from semtrack.tracking_memory import TrackingMemory
from semtrack.transfer import download, upload
from semtrack.util import one_line

NO_POINTS = "no query points: every entity vanished at this clip size"
# The Trainer's precision -> the tracker's.
TRACKER_PRECISION = {"32-true": "fp32", "32": "fp32", "16-mixed": "fp32", "bf16-mixed": "bf16"}


@dataclass
class BatchResult:
    """What one step hands the writer: a result per clip (batch order), {stage: (seconds, videos)}
    and, per tracker call, (clips, frames, frames after padding)."""

    results: list[VideoResult]
    timings: dict[str, tuple[float, int]]
    tracking_calls: list[tuple[int, int, int]]


def tracker_precision(precision: str) -> str:
    """The tracker's precision ("fp32" | "bf16") for the Trainer's `precision` (`TRACKER_PRECISION`)."""
    if str(precision) not in TRACKER_PRECISION:
        raise ValueError(f"precision {precision!r} is not supported; use one of {sorted(TRACKER_PRECISION)}")
    return TRACKER_PRECISION[str(precision)]


def build_models(config: ExtractConfig, device: torch.device, precision: str) -> tuple:
    """(DINOv2 extractor or None in grid mode, tracker) on `device`, the tracker in `precision` ("fp32" |
    "bf16"), each from its weights source by the one rule of `semtrack.weights` (`config.dinov2_weights`,
    `config.tracker_weights`: "official", "random", a path or a URL); a bad source raises `WeightsError`.
    Each model's `weights_id` says what it loaded. `config.compile`: the tracker's compiled buckets."""
    features = None
    if not config.use_grid:
        features = DinoV2Extractor(config.dinov2_model, checkpoint=config.dinov2_weights,
                                   preprocess=config.dinov2_preprocess).to(device)
    tracker = load_tracker(config.tracker_weights, device=device, precision=precision,
                           interp_shape=config.tracker_resolution)
    if config.compile:
        tracker.compile_buckets()
    return features, tracker


def set_matmul_precision(choice: str) -> None:
    """Process-wide: fp32 matmuls and convolutions on GPUs strict ("highest") or in TF32 ("high"), the
    `matmul_precision` option. Every process that runs a pipeline calls it once, before the first batch."""
    torch.set_float32_matmul_precision(choice)
    torch.backends.cudnn.allow_tf32 = choice != "highest"


class Pipeline:
    """features -> clustering -> points -> tracking for batches of clips (see the module docstring).

    features: a `DinoV2Extractor` (None in grid mode); tracker: an `OfflineTracker`, both on `device`;
    memory: the job's tracking-memory policy (how clips are grouped into tracker calls, and the chunk
    sizes of each call).
    """

    def __init__(self, config: ExtractConfig, features, tracker, device: torch.device, memory: TrackingMemory):
        self.config, self.features, self.tracker = config, features, tracker
        self.device, self.memory = device, memory

    @classmethod
    def build(cls, config: ExtractConfig, device: torch.device, precision: str = "32-true") -> Pipeline:
        """The job's pipeline on `device` for the Trainer's `precision` ("32-true", "bf16-mixed", ...):
        the models (`build_models`) and the tracking-memory policy, given what the models hold on a GPU.
        Sets no process-wide state (the TF32 switch is `set_matmul_precision`)."""
        precision = tracker_precision(precision)
        features, tracker = build_models(config, device, precision)
        model_bytes = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
        return cls(config, features, tracker, device, TrackingMemory.plan(config, device, precision, model_bytes))

    def weights_ids(self) -> dict[str, str | None]:
        """What the models loaded: {"tracker": id, "dinov2": id or None in grid mode} (see `weights_id`)."""
        return {"tracker": self.tracker.weights_id,
                "dinov2": None if self.features is None else self.features.weights_id}

    # ------------------------------------------------------------------ the batch
    def __call__(self, clips: Sequence[Clip]) -> BatchResult:
        cfg, run = self.config, StageRunner(self.device)
        for clip in clips:
            if clip.frames is None:
                run.fail(clip, "decode", clip.error or "no frames decoded")
        live = run.alive(clips)
        frames = {c.row: upload(c.frames, self.device) for c in live}  # (T, 3, H, W) uint8
        points, labels, self._calls = {}, {}, []
        if cfg.use_grid:
            budget = self.memory.guard({c.row: cfg.cotracker_grid_size**2 for c in live})
            tracks = run.run("tracking", live, self._grid_tracking, frames, calls=budget.calls_by_length)
        else:
            tokens = run.run("features", live, self._features, frames)
            labels = run.run("clustering", live, self._clustering, tokens)
            points = self._query_points(run, live, run.run("points", live, self._points, labels))
            budget = self.memory.guard({row: len(qp) for row, qp in points.items()})
            tracks = run.run("tracking", live, self._tracking, frames, points, calls=budget.calls_by_length)
        copied = self._download(clips, tracks, points, labels)
        results = [self._result(clip, copied.get(clip.row), points.get(clip.row), run.failures.get(clip.row))
                   for clip in clips]
        if run.clock.cuda and not copied:
            torch.cuda.current_stream().synchronize()  # the stage clocks' events are complete (else the copy did it)
        return BatchResult(results, run.clock.totals(), self._calls)

    def _download(self, clips: Sequence[Clip], tracks: dict, points: dict, labels: dict) -> dict[int, tuple]:
        """{row: (tracks, visibility, obj_ids, query_frames, probabilities or None, debug labels or None,
        debug source frames or None)} on the CPU, for the clips tracked: one device -> host copy."""
        tensors, done = [], [c.row for c in clips if c.row in tracks]
        for row in done:
            view = (None, None)
            if self.config.debug_mode and row in points:
                view = (labels[row].batch.clip_labels(labels[row].index), points[row].source_frames)
            tensors += [*tracks[row], *view]
        host = download(tensors, self.device)
        return {row: tuple(host[7 * i: 7 * i + 7]) for i, row in enumerate(done)}

    def _result(self, clip: Clip, host: tuple | None, qp: QueryPoints | None, failure: Failure | None) -> VideoResult:
        """The clip's result from its tensors on the CPU (`_download`)."""
        if failure is not None:
            return VideoResult(clip, failure=failure)
        tr, vis, obj_ids, query_frames, probs, view_labels, view_frames = host
        view = None if view_labels is None else ClusterView(view_labels, view_frames)
        dropped = qp.num_dropped if qp else 0
        return VideoResult(clip, Tracks(tr, vis, obj_ids, query_frames, dropped, probs), clusters=view)

    # ------------------------------------------------------------------ stages
    def _features(self, clips, frames) -> list[Row]:
        """-> per clip its `Row` of one `Tokens` batch: DINOv2 on every clustering frame of the call at
        once (tokens are per image), in `features_precision` whatever autocast the Trainer's precision
        set; on a GPU `GPU_BATCH_FRAMES` frames per network call."""
        bf16 = self.config.features_precision == "bf16"
        lengths = [len(c.cluster_frames) for c in clips]
        picks = [f.index_select(0, upload(c.cluster_frames, self.device)) for c, f in zip(clips, frames)]
        batch_size = GPU_BATCH_FRAMES if self.device.type == "cuda" else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            flat = self.features.forward_clips(picks, batch_size)  # (sum K_v, 16, 16, D)
        k, starts = max(lengths), [sum(lengths[:v]) for v in range(len(lengths))]
        index = torch.tensor([[s + min(j, n - 1) for j in range(k)] for s, n in zip(starts, lengths)])  # (V, K)
        cluster_frames = torch.zeros(len(clips), k, dtype=torch.long)
        for v, c in enumerate(clips):
            cluster_frames[v, : lengths[v]] = c.cluster_frames
        tokens = flat[upload(index, self.device)]  # (V, K, 16, 16, D): padded with each clip's last frame
        return rows(Tokens(tokens, lengths, upload(cluster_frames, self.device)), len(clips))

    def _clustering(self, clips, tokens: list[Row]) -> list[Row]:
        """-> per clip its `Row` of a `Labels` batch: `cluster_batch` once for the call."""
        cfg = self.config

        def stage(batch: Tokens, members: list[int]) -> Labels:
            result = cluster_batch(batch.tokens, batch.lengths, [clips[m].video_id for m in members],
                                   cfg.clustering_method, cfg.n_clusters, cfg.merge_ratio, cfg.num_iters,
                                   cfg.kmeans_init, sync_free=self.device.type != "cpu")
            return Labels(result.labels, result.num_labels, batch.lengths, batch.cluster_frames)

        return per_group(tokens, stage)

    def _points(self, clips, labels: list[Row]) -> list[Row]:
        """-> per clip its `Row` of a `QueryPointsBatch`: `select_query_points_batch` once for the call
        (the exact sampler runs clip by clip inside it)."""
        cfg = self.config

        def stage(batch: Labels, members: list[int]):
            return select_query_points_batch(
                batch.labels, batch.cluster_frames, [clips[m].size for m in members], batch.num_labels,
                num_points_per_entity=cfg.num_points_per_entity, sampler=cfg.sampler,
                use_connected_components=cfg.use_connected_components,
                legacy_query_frames=cfg.legacy_query_frames, min_point_distance=cfg.min_point_distance,
                n_init=cfg.sklearn_n_init, tie_rule=cfg.tie_rule, sync_free=self.device.type != "cpu",
            )

        return per_group(labels, stage)

    def _query_points(self, run: StageRunner, clips: Sequence[Clip], selected: dict[int, Row]
                      ) -> dict[int, QueryPoints]:
        """Every clip's `QueryPoints` from the points stage's batches, reading all point and drop counts
        in one device -> host copy (the step's one read before tracking); a clip without points fails
        its points stage."""
        batches = list({id(r.batch): r.batch for r in selected.values()}.values())
        if not batches:
            return {}
        counts = torch.cat([torch.stack([b.counts, b.num_dropped]) for b in batches], dim=1).tolist()
        offset = {id(b): sum(len(x.counts) for x in batches[:i]) for i, b in enumerate(batches)}
        out = {}
        for clip in clips:
            if clip.row not in selected:
                continue
            b, i = selected[clip.row].batch, selected[clip.row].index
            n, dropped = counts[0][offset[id(b)] + i], counts[1][offset[id(b)] + i]
            if n == 0:
                run.fail(clip, "points", one_line(ValueError(NO_POINTS)))
                continue
            out[clip.row] = QueryPoints(b.queries[i, :n], b.obj_ids[i, :n], b.source_frames[i, :n],
                                        b.clusters[i, :n], b.components[i, :n], dropped)
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
        tracker's own precision (not the Trainer's autocast) and the chunk sizes `memory` gives the call
        -> per clip (tracks, visibility, probabilities or None); records the call's padding."""
        lengths = [len(f) for f in frames]
        clips, padded, _ = self.tracker.padded_shape(len(frames), max(lengths), 0)
        self._calls.append((len(frames), sum(lengths), padded * clips))
        chunks = self.memory.chunk_sizes(frames, num_points)
        with torch.autocast(self.device.type, enabled=False):
            out = self.tracker.track_many(frames, return_probs=self.config.save_confidence, **options, **chunks)
        return [o if self.config.save_confidence else (*o, None) for o in out]
