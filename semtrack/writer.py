"""The job's side effects: each video's outputs and its ledger record as its batch finishes, the
folder's report at the end (and when a run stops early), start-up lines, and the progress bar.

Order of a run, per process: `setup` (signal handlers, the folder lock on global rank 0, "loading
models"), the models load (`SemanticTracker.configure_model`), `on_predict_start` (the config sidecar
on rank 0, the sweep of dead runs' temporary files once per host, the ledger's `start` record,
"decoding the first videos"), each batch (outputs, then its records appended and fsynced; a stop
request is honoured at each batch boundary), then `on_predict_end` (the `end` record; rank 0
rebuilds `run_report.json` / `failures.csv` from the ledger) or, when the run stops or fails,
`on_exception` (the same, without waiting for the other ranks).
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import sys
import time
from collections import defaultdict

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar

import semtrack
from semtrack.config import ExtractConfig
from semtrack.gif import save_cluster_overlay, save_trail_gif
from semtrack.hygiene import is_folder_error, sweep
from semtrack.layout import job_layout
from semtrack.ledger import DONE, FAILED, LedgerPart, fallback_path, new_run_id
from semtrack.pipeline import BatchResult
from semtrack.records import Clip, Failure, VideoResult
from semtrack.report import format_report, rebuild
from semtrack.shards import FolderBusy, FolderLock, Shard, resolve_shard
from semtrack.sidecar import run_options, write_sidecar
from semtrack.stopping import Stopped, StopRequest
from semtrack.trackfile import dumps_tracks
from semtrack.util import atomic_write, one_line, temporary_path
from semtrack.webdataset import TarShards, member_key, sample_json


def say(trainer, text: str) -> None:
    """One line on stderr from global rank 0: what the run is doing while the bar has nothing to show."""
    if trainer.is_global_zero:
        print(f"semtrack: {text}", file=sys.stderr, flush=True)


class TrackWriter(BasePredictionWriter):
    """Writes each batch's results as soon as the step returns (`write_interval="batch"`).

    Publishes its counts (`done`, `failed`, `elapsed`) for the progress bar, `last_write_s` (the
    seconds the last batch took to write, for benchmarks), `started` (videos are being processed),
    `stop` (the `StopRequest`), `errors` (one line per thing the run could not write) and, after the
    run, `report` (the folder's report, on every rank).
    """

    def __init__(self, config: ExtractConfig):
        super().__init__(write_interval="batch")
        self.config = config
        self.layout = job_layout(config)
        self.stop = StopRequest()
        self.report: dict | None = None
        self.started = False
        self.run_id: str | None = None
        self._lock: FolderLock | None = None
        self._finished = False
        self._reset()

    def _reset(self) -> None:
        self.done = self.failed = self.points_dropped = 0
        self.stage_totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.data_wait = self.last_write_s = 0.0
        self.startup_s: float | None = None
        self.errors: list[str] = []
        self._unrecorded: list[dict] = []
        self._start = self._last = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    @property
    def shard(self) -> Shard:
        cfg = self.config
        return Shard() if cfg.debug_mode else resolve_shard(cfg.num_shards, cfg.shard_index)

    # ------------------------------------------------------------------ start
    def setup(self, trainer, pl_module, stage: str) -> None:
        self._setup_time = time.perf_counter()
        self.stop.install()
        refusal = None
        if trainer.is_global_zero:
            lock = FolderLock(self.layout, self.shard)
            try:
                lock.acquire()
                self._lock = lock
            except FolderBusy as exc:
                refusal = str(exc)
        refusal = trainer.strategy.broadcast(refusal, src=0)
        if refusal:
            raise FolderBusy(refusal)
        say(trainer, f"{self._plan_line(trainer)}; loading models")

    def _plan_line(self, trainer) -> str:
        plan = getattr(trainer.datamodule, "plan", None)
        if plan is None:
            return "starting"
        counts = torch.tensor([len(plan.pending), plan.skipped], device=trainer.strategy.root_device)
        pending, skipped = (int(v) for v in trainer.strategy.reduce(counts, reduce_op="sum"))
        where = "" if self.shard.count == 1 else f"{self.shard.describe()}: "
        return f"{where}{plan.rows} rows, {pending} to do, {skipped} done already"

    def on_predict_start(self, trainer, pl_module) -> None:
        self._reset()
        self.report, self._finished = None, False
        cfg = self.config
        self.options = run_options(cfg, trainer.precision)
        self.weights = pl_module.weights_ids()  # what was loaded, for each pickle's metadata
        self.run_id = trainer.strategy.broadcast(new_run_id() if trainer.is_global_zero else None, src=0)
        self.rank, self.world_size = trainer.global_rank, trainer.world_size
        self.ledger = LedgerPart(self.layout.ledger_part(self.run_id, self.rank))
        datamodule = trainer.datamodule
        plan = getattr(datamodule, "plan", None)
        if trainer.is_global_zero and not cfg.debug_mode:
            write_sidecar(cfg, trainer.precision)
        if trainer.local_rank == 0:
            datasets = [r.dataset for r in datamodule.dataset.rows] if plan is not None else []
            sweep(self.layout, datasets)
        webdataset = cfg.output_format == "webdataset" and not cfg.debug_mode
        self.tars = TarShards(self.layout, self.run_id, self.rank, cfg.videos_per_tar) if webdataset else None
        start = {"kind": "start", "world_size": self.world_size, "shard": [self.shard.index, self.shard.count],
                 "host": socket.gethostname(), "pid": os.getpid(), "csv_path": os.path.abspath(cfg.csv_path),
                 "output_format": "pickle" if self.tars is None else "webdataset", "make_vis": cfg.make_vis,
                 "debug": cfg.debug_mode, "semtrack_version": semtrack.__version__}
        if plan is not None:
            start.update(csv_rows=plan.csv_rows, csv_keys=plan.csv_keys, rows=plan.rows, assigned=plan.assigned,
                         skipped=plan.skipped)
        try:
            self.ledger.append([self._stamp(start), *(self._stamp(r) for r in (plan.adopted if plan else []))])
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write the ledger {self.ledger.path}: {one_line(exc)}") from None
        self.started = self.stop.started = True
        say(trainer, f"models loaded in {time.perf_counter() - self._setup_time:.1f} s; decoding the first videos")
        self.stop.check()

    def _stamp(self, record: dict) -> dict:
        return {**record, "run": self.run_id, "rank": self.rank, "time": time.time()}

    # ------------------------------------------------------------------ batches
    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.data_wait += time.perf_counter() - self._last  # waiting for the DataLoader
        self.stop.check()  # a batch decoded after a stop request is abandoned

    def write_on_batch_end(self, trainer, pl_module, prediction: BatchResult, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        start = time.perf_counter()
        for stage, (seconds, videos) in prediction.timings.items():
            self.stage_totals[stage][0] += seconds
            self.stage_totals[stage][1] += videos
        records = []
        for result in prediction.results:
            records += self._write(result) if result.ok else [self._failure(result.clip, result.failure)]
        self._commit(records)
        self._last = time.perf_counter()
        self.last_write_s = self._last - start
        if self.startup_s is None:
            self.startup_s = self._last - self._setup_time
        self.stop.check()

    def _write(self, result: VideoResult) -> list[dict]:
        """Write a successful result's outputs -> the ledger records now durable (a failure record if
        writing failed; a folder-level error also requests a stop)."""
        start = time.perf_counter()
        try:
            records = self._write_outputs(result)
            self.points_dropped += result.tracks.num_dropped
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            self._remove_outputs(result.clip)
            if is_folder_error(exc):
                self.stop.fail(f"cannot write into {self.layout.root}: {one_line(exc)}")
            records = [self._failure(result.clip, Failure("write", one_line(exc)))]
        self.stage_totals["write"][0] += time.perf_counter() - start
        self.stage_totals["write"][1] += 1
        return records

    def _failure(self, clip: Clip, failure: Failure) -> dict:
        return {"kind": "video", "row": clip.row, "dataset": clip.dataset, "video_id": clip.video_id,
                "status": FAILED, "stage": failure.stage, "reason": failure.reason, "video_path": clip.video_path}

    def _commit(self, records: list[dict]) -> None:
        """Append `records` to the ledger (fsynced); if the folder cannot take them they are kept for
        the fallback file and the run stops at this boundary."""
        records = [self._stamp(r) for r in records]
        self.done += sum(r["status"] == DONE for r in records)
        self.failed += sum(r["status"] == FAILED for r in records)
        try:
            self.ledger.append(records)
        except OSError as exc:
            self._unrecorded += records
            self.stop.fail(f"cannot write the ledger {self.ledger.path}: {one_line(exc)}")

    # ------------------------------------------------------------------ outputs
    def _tracks(self, result: VideoResult) -> dict:
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
        return {
            "pred_tracks": tr.tracks.to(torch.float16),  # (T, N, 2)
            "pred_visibility": tr.visibility.to(torch.bool),  # (T, N)
            "obj_ids": tr.obj_ids.to(torch.int64),  # (N,)
            "point_queries": tr.query_frames.to(torch.int64),  # (N,) query frame of each point
            "semtrack": meta,
        }

    def _write_outputs(self, result: VideoResult) -> list[dict]:
        cfg, clip, layout = self.config, result.clip, self.layout
        data = dumps_tracks(self._tracks(result))
        record = {"kind": "video", "row": clip.row, "dataset": clip.dataset, "video_id": clip.video_id,
                  "status": DONE, "frames": int(result.tracks.tracks.shape[0]),
                  "points": int(result.tracks.tracks.shape[1])}
        gif = cfg.make_vis or cfg.debug_mode
        if self.tars is not None:
            members = {"pickle": data, "json": sample_json(record)}
            if gif:
                members["gif"] = self._gif_bytes(result)
            return self.tars.add(record, members)
        with atomic_write(layout.pickle(clip.dataset, clip.video_id)) as tmp:
            tmp.write_bytes(data)
        record["outputs"] = {"pickle": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
        if gif:
            path = layout.gif(clip.dataset, clip.video_id)
            self._save_gif(result, path)
            record["outputs"]["gif"] = {"bytes": path.stat().st_size}
        if cfg.debug_mode and result.clusters is not None:
            self._write_overlays(result)
        return [record]

    def _save_gif(self, result: VideoResult, path) -> None:
        clip, tr = result.clip, result.tracks
        frames = clip.frames.permute(0, 2, 3, 1).numpy()  # (T, H, W, 3) uint8
        save_trail_gif(path, frames, tr.tracks.float().numpy(), tr.visibility.numpy(), tr.obj_ids.numpy(),
                       clip.frame_times.numpy(), self.config.vis_max_width)

    def _gif_bytes(self, result: VideoResult) -> bytes:
        """The GIF's bytes, through a scratch file named like a temporary (swept if the run dies)."""
        clip = result.clip
        scratch = temporary_path(self.layout.shards_dir / f"{member_key(clip.dataset, clip.video_id)}.gif")
        try:
            self._save_gif(result, scratch)
            return scratch.read_bytes()
        finally:
            scratch.unlink(missing_ok=True)

    def _write_overlays(self, result: VideoResult) -> None:
        """One PNG per clustering frame that points were sampled in: its labels and those points."""
        clip, tr, view = result.clip, result.tracks, result.clusters
        frames = clip.frames.permute(0, 2, 3, 1).numpy()
        cluster_frames = clip.cluster_frames.tolist()
        for k in sorted(set(view.source_frames.tolist())):
            idx = (view.source_frames == k).nonzero()[:, 0]
            points = tr.tracks[tr.query_frames[idx], idx]  # (M, 2) the query pixels (x, y)
            save_cluster_overlay(self.layout.debug_png(clip.dataset, clip.video_id, cluster_frames[k]),
                                 frames[cluster_frames[k]], view.labels[k].numpy(), points.numpy(),
                                 tr.obj_ids[idx].numpy(), self.config.vis_max_width)

    def _remove_outputs(self, clip: Clip) -> None:
        """A video whose outputs could not all be written keeps none of them (best effort)."""
        if self.tars is None:
            for path in (self.layout.pickle(clip.dataset, clip.video_id), self.layout.gif(clip.dataset, clip.video_id)):
                with contextlib.suppress(OSError):
                    path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ end of run
    def _finish(self, status: str, reason: str | None) -> None:
        """Close the open tar shard, append the `end` record, save what the folder could not take."""
        if self._finished or not self.started:
            return
        self._finished = True
        if self.tars is not None:
            try:
                self._commit(self.tars.close())
            except OSError as exc:
                lost = f"the tar shard being written was lost: {one_line(exc)}"
                self._commit([{**r, "status": FAILED, "stage": "write", "reason": lost, "outputs": {}}
                              for r in self.tars.abandon()])
        end = {"kind": "end", "status": status, "reason": reason, "done": self.done, "failed": self.failed,
               "stage_totals": {k: list(v) for k, v in self.stage_totals.items()}, "wall_s": self.elapsed,
               "data_wait_s": self.data_wait, "points_dropped": self.points_dropped, "startup_s": self.startup_s}
        self._commit([end])
        if self._unrecorded:
            self._save_fallback()

    def _save_fallback(self) -> None:
        path = fallback_path(self.run_id, self.rank)
        try:
            LedgerPart(path).append(self._unrecorded)
            where = (f"{len(self._unrecorded)} ledger record(s) were saved to {path}: copy that file into "
                     f"{self.layout.ledger_dir}/ once the folder can be written, then run semtrack-report "
                     f"{self.layout.root}")
        except OSError as exc:
            where = f"{len(self._unrecorded)} ledger record(s) could not be saved anywhere ({one_line(exc)})"
        self.errors.append(f"{self.stop.reason or 'the ledger could not be written'}; {where}")

    def _rebuild(self, trainer) -> dict:
        """Rank 0: the folder's report from the ledger, written to its files and printed."""
        report = rebuild(self.layout, self.run_id, self.errors)
        if report["last_run"] is not None:
            self.errors = report["last_run"]["errors"]
        print("\n" + format_report(report), file=sys.stderr, flush=True)  # after the bar line
        for line in self.errors:
            print(f"error: {line}", file=sys.stderr, flush=True)
        return report

    def on_predict_end(self, trainer, pl_module) -> None:
        self._finish("complete" if not self.stop.requested else "stopped", self.stop.reason)
        trainer.strategy.barrier("semtrack_report")
        report = self._rebuild(trainer) if trainer.is_global_zero else None
        self.report = trainer.strategy.broadcast(report, src=0)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A stopped or failed run: save what it did, without waiting for other ranks."""
        if not self.started or self._finished:
            return
        stopped = isinstance(exception, Stopped) or self.stop.requested
        reason = self.stop.stopped().args[0] if self.stop.requested else one_line(exception)
        self._finish("stopped" if stopped else "failed", reason)
        if trainer.is_global_zero:
            self.report = self._rebuild(trainer)

    def release(self) -> None:
        """Drop the folder lock and the signal handlers (after the run, whatever its outcome)."""
        self.stop.restore()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.release()


class ExtractionProgressBar(TQDMProgressBar):
    """TQDM bar over batches with the writer's done / failed counts, skipped rows and done videos per second."""

    def __init__(self, writer: TrackWriter):
        super().__init__()
        self.writer = writer

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        w = self.writer
        if self.predict_progress_bar is not None:
            plan = getattr(trainer.datamodule, "plan", None)
            rate = w.done / max(w.elapsed, 1e-9)  # done videos only
            self.predict_progress_bar.set_postfix(
                {"done": w.done, "failed": w.failed, "skipped": plan.skipped if plan else 0,
                 "done/s": f"{rate:.2f}"}, refresh=False
            )
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)
