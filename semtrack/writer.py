"""The job's side effects: each video's pickle (and GIF, debug overlays) as its batch finishes, the
run report at the end (merged over DDP ranks), and the progress bar that shows the writer's counts."""
from __future__ import annotations

import json
import sys
import time
import uuid
from collections import defaultdict

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar

import semtrack
from semtrack.config import ExtractConfig
from semtrack.gif import save_cluster_overlay, save_trail_gif
from semtrack.pipeline import BatchResult
from semtrack.records import Failure, VideoResult
from semtrack.report import failures_csv, format_report, merge_parts
from semtrack.sidecar import run_options
from semtrack.trackfile import save_tracks
from semtrack.util import one_line, write_text_atomic


class TrackWriter(BasePredictionWriter):
    """Writes each batch's results as soon as the step returns (`write_interval="batch"`).

    Publishes its counts (`done`, `failed`, `elapsed`) for the progress bar and `last_write_s`, the
    seconds the last batch took to write (for benchmarks). After the loop every
    rank writes its report part; after a barrier rank 0 merges them into `run_report.json` and
    `failures.csv`, and broadcasts the merged report (`.report`).
    """

    def __init__(self, config: ExtractConfig):
        super().__init__(write_interval="batch")
        self.config = config
        self.layout = config.layout
        self.report: dict | None = None
        self._reset()

    def _reset(self) -> None:
        self.done = self.failed = self.points_dropped = 0
        self.failures: list[dict] = []
        self.stage_totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.data_wait = self.last_write_s = 0.0
        self._start = self._last = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def on_predict_start(self, trainer, pl_module) -> None:
        self._reset()
        self.report = None
        self.options = run_options(self.config, trainer.precision)
        self.weights = pl_module.weights_ids()  # what was loaded, for each pickle's metadata
        # Names this run's per-rank report parts, so jobs sharing an output folder never mix them.
        self._run_id = trainer.strategy.broadcast(uuid.uuid4().hex[:12] if trainer.is_global_zero else None, src=0)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.data_wait += time.perf_counter() - self._last  # waiting for the DataLoader

    def write_on_batch_end(self, trainer, pl_module, prediction: BatchResult, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        start = time.perf_counter()
        for stage, (seconds, videos) in prediction.timings.items():
            self.stage_totals[stage][0] += seconds
            self.stage_totals[stage][1] += videos
        for result in prediction.results:
            self._record(self._write(result) if result.ok else result)
        self._last = time.perf_counter()
        self.last_write_s = self._last - start

    def _write(self, result: VideoResult) -> VideoResult:
        """Write a successful result's files; -> the result, or a "write" failure."""
        start = time.perf_counter()
        try:
            self._write_files(result)
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            result = VideoResult(result.clip, failure=Failure("write", one_line(exc)))
        self.stage_totals["write"][0] += time.perf_counter() - start
        self.stage_totals["write"][1] += 1
        return result

    def _record(self, result: VideoResult) -> None:
        if result.ok:
            self.done += 1
            self.points_dropped += result.tracks.num_dropped
            return
        clip, failure = result.clip, result.failure
        self.failed += 1
        self.failures.append({"row": clip.row, "video_id": clip.video_id, "dataset": clip.dataset,
                              "video_path": clip.video_path, "stage": failure.stage, "reason": failure.reason})

    def _write_files(self, result: VideoResult) -> None:
        cfg, clip, tr = self.config, result.clip, result.tracks
        meta = {
            "frame_times": clip.frame_times.to(torch.float64),
            "source_fps": float(clip.source_fps),
            "fps": None if clip.fps is None else float(clip.fps),
            "fps_rule": cfg.fps_rule,
            "clip_size": list(clip.size),
            "video_path": clip.video_path,
            "dataset": clip.dataset,
            "video_id": clip.video_id,
            "decoder": clip.decoder,
            "mode": "grid" if cfg.use_grid else "semantic",
            "num_dropped_points": int(tr.num_dropped),
            "version": semtrack.__version__,
            "tracker_weights": self.weights["tracker"],
            "dinov2_weights": self.weights["dinov2"],
            "config": dict(self.options),
        }
        if tr.confidence is not None:
            meta["confidence"] = tr.confidence.to(torch.float16)  # (T, N)
        save_tracks(self.layout.pickle(clip.dataset, clip.video_id), {
            "pred_tracks": tr.tracks.to(torch.float16),  # (T, N, 2)
            "pred_visibility": tr.visibility.to(torch.bool),  # (T, N)
            "obj_ids": tr.obj_ids.to(torch.int64),  # (N,)
            "point_queries": tr.query_frames.to(torch.int64),  # (N,) query frame of each point
            "semtrack": meta,
        })
        if not (cfg.make_vis or cfg.debug_mode):
            return
        frames = clip.frames.permute(0, 2, 3, 1).numpy()  # (T, H, W, 3) uint8
        save_trail_gif(self.layout.gif(clip.dataset, clip.video_id), frames, tr.tracks.float().numpy(),
                       tr.visibility.numpy(), tr.obj_ids.numpy(), clip.frame_times.numpy(), cfg.vis_max_width)
        if cfg.debug_mode and result.clusters is not None:
            self._write_overlays(result, frames)

    def _write_overlays(self, result: VideoResult, frames) -> None:
        """One PNG per clustering frame that points were sampled in: its labels and those points."""
        clip, tr, view = result.clip, result.tracks, result.clusters
        cluster_frames = clip.cluster_frames.tolist()
        for k in sorted(set(view.source_frames.tolist())):
            idx = (view.source_frames == k).nonzero()[:, 0]
            points = tr.tracks[tr.query_frames[idx], idx]  # (M, 2) the query pixels (x, y)
            save_cluster_overlay(self.layout.debug_png(clip.dataset, clip.video_id, cluster_frames[k]),
                                 frames[cluster_frames[k]], view.labels[k].numpy(), points.numpy(),
                                 tr.obj_ids[idx].numpy(), self.config.vis_max_width)

    # ------------------------------------------------------------------ end of run
    def on_predict_end(self, trainer, pl_module) -> None:
        part = {
            "rank": trainer.global_rank, "done": self.done, "failed": self.failed, "failures": self.failures,
            "stage_totals": {k: list(v) for k, v in self.stage_totals.items()}, "wall_s": self.elapsed,
            "data_wait_s": self.data_wait, "points_dropped": self.points_dropped,
        }
        write_text_atomic(self.layout.report_part(self._run_id, trainer.global_rank), json.dumps(part))
        trainer.strategy.barrier("semtrack_report")
        report = None
        if trainer.is_global_zero:
            paths = [self.layout.report_part(self._run_id, r) for r in range(trainer.world_size)]
            parts = [json.loads(path.read_text()) for path in paths]
            dm = trainer.datamodule
            report = merge_parts(parts, getattr(dm, "num_rows", self.done + self.failed),
                                 getattr(dm, "num_skipped", 0), self.layout.root, self.config.csv_path)
            write_text_atomic(self.layout.failures, failures_csv(report["failures"]))
            write_text_atomic(self.layout.report, json.dumps(report, indent=2) + "\n")
            for path in paths:
                path.unlink(missing_ok=True)
            print("\n" + format_report(report), file=sys.stderr, flush=True)  # after the bar line
        self.report = trainer.strategy.broadcast(report, src=0)


class ExtractionProgressBar(TQDMProgressBar):
    """TQDM bar over batches with the writer's done / failed counts, skipped rows and videos per second."""

    def __init__(self, writer: TrackWriter):
        super().__init__()
        self.writer = writer

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        w = self.writer
        if self.predict_progress_bar is not None:
            skipped = getattr(trainer.datamodule, "num_skipped", 0)
            rate = (w.done + w.failed) / max(w.elapsed, 1e-9)
            self.predict_progress_bar.set_postfix(
                {"done": w.done, "failed": w.failed, "skipped": skipped, "videos/s": f"{rate:.2f}"}, refresh=False
            )
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
