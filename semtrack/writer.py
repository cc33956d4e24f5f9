"""Everything the extraction job writes: pickles, GIFs, debug PNGs, the config sidecar,
`failures.csv` and `run_report.json` (merged over DDP ranks), plus the progress bar.

Layout under `<base_feat_path>/<dump_name>/` (see `ExtractConfig.dump_name`):
`<dataset>/feat_dump/<video_id>.pkl`, `<dataset>/gif_dump/<video_id>.gif`,
`<dataset>/debug_vis/<video_id>/debug_cluster_pts_<frame>.png`, `semtrack_config.json`,
`failures.csv`, `run_report.json`. Every file is written under a temporary name and renamed.
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import torch
from lightning.pytorch.callbacks import BasePredictionWriter, TQDMProgressBar

import semtrack
from semtrack.config import ExtractConfig
from semtrack.gif import save_cluster_overlay, save_trail_gif
from semtrack.pipeline import STAGES, VideoResult, dinov2_weights_id, one_line, tracker_weights_id
from semtrack.trackfile import save_tracks

SIDECAR = "semtrack_config.json"
FAILURES = "failures.csv"
REPORT = "run_report.json"
FAILURE_COLUMNS = ("row", "video_id", "dataset", "video_path", "stage", "reason")


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder, fsync, rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- config sidecar
def run_options(config: ExtractConfig, precision: str) -> dict:
    """The options that decide the outputs (what the sidecar records and compares)."""
    options = config.output_options()
    options.update(
        precision=str(precision),
        tracker_weights=tracker_weights_id(config),
        dinov2_weights=None if config.use_grid else dinov2_weights_id(config),
    )
    return options


def check_sidecar(config: ExtractConfig, precision: str) -> Path:
    """Create `<output_dir>/semtrack_config.json`, or refuse (ValueError) if the folder's existing
    sidecar records different output options. Returns the sidecar path."""
    path = config.output_dir / SIDECAR
    options = run_options(config, precision)
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))["options"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}: unreadable config sidecar ({one_line(exc)}); remove it or use another --base_feat_path"
            ) from None
        differing = sorted(k for k in set(recorded) | set(options) if recorded.get(k) != options.get(k))
        if differing:
            detail = "; ".join(f"{k}: folder has {recorded.get(k)!r}, this run {options.get(k)!r}" for k in differing)
            raise ValueError(
                f"refusing to write into {config.output_dir}: its outputs were made with a different "
                f"configuration ({detail}). Use another --base_feat_path, or delete that folder to start over."
            )
        return path
    sidecar = {"semtrack_version": semtrack.__version__, "dump_name": config.dump_name(), "options": options}
    write_text_atomic(path, json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return path


# ---------------------------------------------------------------------------- report merging
def merge_parts(parts: list[dict], num_rows: int, num_skipped: int, config: ExtractConfig) -> dict:
    """One run report from the per-rank parts (counts summed, failures by CSV row, stage means)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for part in parts:
        for stage, (seconds, videos) in part["stage_totals"].items():
            totals[stage][0] += seconds
            totals[stage][1] += videos
    done = sum(p["done"] for p in parts)
    failed = sum(p["failed"] for p in parts)
    wall = max((p["wall_s"] for p in parts), default=0.0)
    failures = sorted((f for p in parts for f in p["failures"]), key=lambda f: f["row"])
    return {
        "semtrack_version": semtrack.__version__,
        "output_dir": str(config.output_dir),
        "csv_path": str(config.csv_path),
        "world_size": len(parts),
        "counts": {"rows": num_rows, "done": done, "failed": failed, "skipped": num_skipped},
        "failures": failures,
        "stage_mean_s": {s: totals[s][0] / totals[s][1] for s in (*STAGES, "write") if totals[s][1]},
        "data_wait_s": sum(p["data_wait_s"] for p in parts),
        "points_dropped": sum(p["points_dropped"] for p in parts),
        "wall_s": wall,
        "videos_per_s": (done + failed) / wall if wall > 0 else 0.0,
    }


def failures_csv(failures: list[dict]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FAILURE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: f[k] for k in FAILURE_COLUMNS} for f in failures)
    return out.getvalue()


def format_report(report: dict) -> str:
    c = report["counts"]
    lines = [
        f"semtrack: {c['rows']} rows: {c['done']} done, {c['failed']} failed, {c['skipped']} skipped "
        f"in {report['wall_s']:.1f} s ({report['videos_per_s']:.2f} videos/s, {report['world_size']} rank(s))"
    ]
    if report["stage_mean_s"]:
        lines.append("  mean s/video: " + ", ".join(f"{k} {v:.3f}" for k, v in report["stage_mean_s"].items()))
    lines += [f"  FAILED row {f['row']} {f['video_id']} [{f['stage']}]: {f['reason']}" for f in report["failures"]]
    lines.append(f"  outputs: {report['output_dir']}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the writer
class TrackWriter(BasePredictionWriter):
    """Writes each batch's results as soon as the step returns (`write_interval="batch"`).

    After the loop every rank writes `run_report.rank<k>.json`; after a barrier rank 0 merges
    them into `run_report.json` and `failures.csv`, and broadcasts the merged report (`.report`).
    """

    def __init__(self, config: ExtractConfig):
        super().__init__(write_interval="batch")
        self.config = config
        self.report: dict | None = None
        self._reset()

    def _reset(self) -> None:
        self.done = self.failed = self.points_dropped = 0
        self.failures: list[dict] = []
        self.stage_totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.data_wait = 0.0
        self._start = self._last = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    def on_predict_start(self, trainer, pl_module) -> None:
        self._reset()
        self.report = None
        self._options = run_options(self.config, trainer.precision)
        # Names this run's per-rank report parts, so jobs sharing an output folder never mix them.
        self._run_id = trainer.strategy.broadcast(uuid.uuid4().hex[:12] if trainer.is_global_zero else None, src=0)

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.data_wait += time.perf_counter() - self._last  # waiting for the DataLoader

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        items = {int(item["index"]): item for item in batch}
        for stage, (seconds, videos) in prediction["timings"].items():
            self.stage_totals[stage][0] += seconds
            self.stage_totals[stage][1] += videos
        for result in prediction["results"]:
            if result.ok:
                start = time.perf_counter()
                try:
                    self._write_video(result, items[result.index])
                except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
                    result.stage, result.reason = "write", one_line(exc)
                self.stage_totals["write"][0] += time.perf_counter() - start
                self.stage_totals["write"][1] += 1
            if result.ok:
                self.done += 1
                self.points_dropped += result.num_dropped
            else:
                self.failed += 1
                self.failures.append({
                    "row": result.index, "video_id": result.video_id, "dataset": result.dataset,
                    "video_path": result.video_path, "stage": result.stage, "reason": result.reason,
                })
        self._last = time.perf_counter()

    def _write_video(self, r: VideoResult, item: dict) -> None:
        cfg = self.config
        video = item["video"]  # (T, 3, H, W) uint8, CPU
        meta = {
            "frame_times": item["frame_times"].to(torch.float64),
            "source_fps": float(item["source_fps"]),
            "fps": None if item["fps"] is None else float(item["fps"]),
            "fps_rule": cfg.fps_rule,
            "clip_size": [int(video.shape[-2]), int(video.shape[-1])],
            "video_path": r.video_path,
            "dataset": r.dataset,
            "video_id": r.video_id,
            "decoder": item["decoder"],
            "mode": "grid" if cfg.use_grid else "semantic",
            "num_dropped_points": int(r.num_dropped),
            "version": semtrack.__version__,
            "tracker_weights": tracker_weights_id(cfg),
            "config": dict(self._options),
        }
        save_tracks(cfg.pickle_path(r.dataset, r.video_id), {
            "pred_tracks": r.tracks.to(torch.float16),  # (T, N, 2)
            "pred_visibility": r.visibility.to(torch.bool),  # (T, N)
            "obj_ids": r.obj_ids.to(torch.int64),  # (N,)
            "point_queries": r.query_frames.to(torch.int64),  # (N,) query frame of each point
            "semtrack": meta,
        })
        if not (cfg.make_vis or cfg.debug_mode):
            return
        frames = video.permute(0, 2, 3, 1).numpy()  # (T, H, W, 3) uint8
        folder = cfg.video_dir(r.dataset)
        save_trail_gif(
            folder / "gif_dump" / f"{r.video_id}.gif", frames, r.tracks.float().numpy(),
            r.visibility.numpy(), r.obj_ids.numpy(), item["frame_times"].numpy(),
        )
        if cfg.debug_mode and r.labels is not None:
            cluster_frames = item["cluster_frames"].tolist()
            for k in sorted(set(r.source_frames.tolist())):
                idx = (r.source_frames == k).nonzero()[:, 0]
                points = r.tracks[r.query_frames[idx], idx]  # (M, 2) the query pixels (x, y)
                save_cluster_overlay(
                    folder / "debug_vis" / r.video_id / f"debug_cluster_pts_{cluster_frames[k]}.png",
                    frames[cluster_frames[k]], r.labels[k].numpy(), points.numpy(), r.obj_ids[idx].numpy(),
                )

    # ------------------------------------------------------------------ end of run
    def on_predict_end(self, trainer, pl_module) -> None:
        cfg = self.config
        out = cfg.output_dir
        part = {
            "rank": trainer.global_rank, "done": self.done, "failed": self.failed, "failures": self.failures,
            "stage_totals": {k: list(v) for k, v in self.stage_totals.items()}, "wall_s": self.elapsed,
            "data_wait_s": self.data_wait, "points_dropped": self.points_dropped,
        }
        part_name = f"run_report.{self._run_id}.rank{{}}.json"
        write_text_atomic(out / part_name.format(trainer.global_rank), json.dumps(part))
        trainer.strategy.barrier("semtrack_report")
        report = None
        if trainer.is_global_zero:
            parts = [json.loads((out / part_name.format(r)).read_text()) for r in range(trainer.world_size)]
            dm = trainer.datamodule
            num_rows = getattr(dm, "num_rows", self.done + self.failed)
            report = merge_parts(parts, num_rows, getattr(dm, "num_skipped", 0), cfg)
            write_text_atomic(out / FAILURES, failures_csv(report["failures"]))
            write_text_atomic(out / REPORT, json.dumps(report, indent=2) + "\n")
            for r in range(trainer.world_size):
                (out / part_name.format(r)).unlink(missing_ok=True)
            print("\n" + format_report(report), file=sys.stderr, flush=True)  # after the bar line
        self.report = trainer.strategy.broadcast(report, src=0)


class ExtractionProgressBar(TQDMProgressBar):
    """TQDM bar over batches with done / failed / skipped videos and videos per second."""

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        writer = next((c for c in trainer.callbacks if isinstance(c, TrackWriter)), None)
        if writer is not None and self.predict_progress_bar is not None:
            skipped = getattr(trainer.datamodule, "num_skipped", 0)
            rate = (writer.done + writer.failed) / max(writer.elapsed, 1e-9)
            self.predict_progress_bar.set_postfix(
                {"done": writer.done, "failed": writer.failed, "skipped": skipped, "videos/s": f"{rate:.2f}"},
                refresh=False,
            )
        super().on_predict_batch_end(trainer, pl_module, outputs, batch, batch_idx, dataloader_idx)

