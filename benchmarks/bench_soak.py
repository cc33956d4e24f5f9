"""Soak: memory over a long run of tiny videos (Lightning's predict loop has an open report of
memory growth, the run keeps per-video state, and its background writer holds batches not yet
written).

Runs the real job in this process (`semtrack.api.run`, grid mode, stand-in weights, 4 frames at
64x96, GIFs off unless `--make_vis`) on `--rows` rows (the same tiny shared clip under distinct ids)
and samples the resident memory of this process (and of its child processes: DataLoader workers, GIF
workers) after every batch, against the videos the writer has recorded. The claim it tests: after
the first `--warmup` videos, resident memory grows by at most 10 %.

    python benchmarks/bench_soak.py --rows 500 --json soak.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from _shared import shared_path  # noqa: E402
from semtrack.api import build_trainer, predict  # noqa: E402
from semtrack.config import ExtractConfig  # noqa: E402

GROWTH_LIMIT = 0.10  # the claim: at most 10 % growth after the warm-up


def rss_bytes(pid: int) -> int:
    """Resident memory of process `pid` (bytes), 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return 0


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children", encoding="ascii") as f:
            return [int(p) for p in f.read().split()]
    except OSError:
        return []


class MemoryProbe(Callback):
    """After each batch: (videos finished, seconds, own RSS, RSS of the DataLoader workers)."""

    def __init__(self, writer_counts):
        self.counts, self.samples, self.start = writer_counts, [], time.perf_counter()

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        me = os.getpid()
        self.samples.append((self.counts(), time.perf_counter() - self.start, rss_bytes(me),
                             sum(rss_bytes(c) for c in children(me))))


def summary(samples: list[tuple], warmup: int) -> dict:
    """Growth of own RSS after `warmup` videos: (max after - value at warm-up) / value at warm-up."""
    after = [s for s in samples if s[0] >= warmup]
    base = after[0][2]
    peak = max(s[2] for s in after)
    last = after[-1][2]
    # least-squares slope of RSS against videos after the warm-up, in MB per 100 videos
    n = len(after)
    mx = sum(s[0] for s in after) / n
    my = sum(s[2] for s in after) / n
    var = sum((s[0] - mx) ** 2 for s in after) or 1.0
    slope = sum((s[0] - mx) * (s[2] - my) for s in after) / var
    return {"rss_at_warmup_mb": round(base / 1e6, 1), "rss_peak_after_mb": round(peak / 1e6, 1),
            "rss_last_mb": round(last / 1e6, 1), "growth_after_warmup": round((peak - base) / base, 4),
            "slope_mb_per_100_videos": round(slope * 100 / 1e6, 3),
            "workers_rss_last_mb": round(after[-1][3] / 1e6, 1)}


def git_commit() -> str | None:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--warmup", type=int, default=50, help="videos before the growth is measured")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--make_vis", action="store_true", help="also write GIFs (drawn by the GIF workers)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    parser.add_argument("--json", help="write the result (with every sample) here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    clip = shared_path("videos", "tiny_ssv2.webm")
    with tempfile.TemporaryDirectory() as tmp:
        csv_path = Path(tmp) / "soak.csv"
        csv_path.write_text("video_path,dataset,video_id\n" + "".join(f"{clip},soak,v{i:05d}\n"
                                                                      for i in range(args.rows)))
        config = ExtractConfig(csv_path=str(csv_path), base_feat_path=str(Path(tmp) / "out"), weights="random",
                               use_grid=True, cotracker_grid_size=2, tracker_resolution=(64, 96), max_frames=4,
                               num_workers=args.num_workers, batch_size=args.batch_size, make_vis=args.make_vis)
        holder = {}
        probe = MemoryProbe(lambda: holder["writer"].run.done + holder["writer"].run.failed)
        trainer, holder["writer"] = build_trainer(config, [probe], accelerator="cpu", enable_progress_bar=False)
        start = time.perf_counter()
        predict(trainer, config)
        wall = time.perf_counter() - start
        report = holder["writer"].report
    result = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "rows": args.rows, "warmup": args.warmup, "threads": args.threads, "make_vis": args.make_vis,
              "wall_s": round(wall, 1),
              "done": report["last_run"]["counts"]["done"], **summary(probe.samples, args.warmup),
              "samples": probe.samples}
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result) + "\n")
    return 0 if result["growth_after_warmup"] <= GROWTH_LIMIT and result["done"] == args.rows else 1


if __name__ == "__main__":
    sys.exit(main())
