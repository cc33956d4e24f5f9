"""The track statistics' cost per video, and `semtrack-report` on a large synthetic folder.

1. `semtrack.trackstats.track_stats` on SSV2-like tensors (T = 88 frames, the longest SSV2 clips,
   N = 300 points in 12 entities, 240 x 427 px, 80 % visible), the call the writer thread makes per
   video: process CPU time per call (median of `--repeats` batches of 100 calls), one torch thread.
2. A folder whose ledger holds `--records` synthetic video records (2 % failed, the rest done with
   plausible statistics and a Lamport `seq` as runs write them, 8 rank files of 2 runs; no pickles
   or GIFs on disk, so the gallery shows
   "no preview"): `semtrack-report OUT --html`, `--json` and `--where` run as the installed command
   would (a child process): its CPU time (user + system), wall time, peak RSS and the page's size.

    python benchmarks/bench_report.py [--records 200000] [--json report.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
import semtrack  # noqa: E402
from semtrack.layout import OutputLayout  # noqa: E402
from semtrack.ledger import LedgerPart, done_record, failed_record  # noqa: E402
from semtrack.trackstats import STATS, track_stats  # noqa: E402

DATASET = "ssv2"
RANKS, RUNS = 8, 2


def ssv2_like_tracks(seed: int = 0, t: int = 88, n: int = 300, entities: int = 12):
    g = torch.Generator().manual_seed(seed)
    start = torch.rand(n, 2, generator=g) * torch.tensor([427.0, 240.0])
    steps = torch.randn(t, n, 2, generator=g).cumsum(0)
    tracks = start + steps  # (T, N, 2) random walks
    vis = torch.rand(t, n, generator=g) < 0.8
    queries = torch.randint(0, t, (n,), generator=g)
    vis[queries, torch.arange(n)] = True
    return tracks, vis, torch.arange(n) % entities, queries


def stats_cost(repeats: int) -> dict:
    torch.set_num_threads(1)
    args = ssv2_like_tracks()
    track_stats(*args, (240, 427))  # warm-up
    per_call = []
    for _ in range(repeats):
        t0 = time.process_time()
        for _ in range(100):
            track_stats(*args, (240, 427))
        per_call.append((time.process_time() - t0) / 100)
    return {"shape": "T=88, N=300, 12 entities", "median_ms": statistics.median(per_call) * 1e3,
            "max_ms": max(per_call) * 1e3, "repeats": repeats}


def synthetic_stats(rng: np.random.Generator) -> dict:
    t = int(rng.integers(28, 89))
    n = int(rng.integers(4, 400))
    entities = max(1, min(n, int(rng.integers(1, 20))))
    visible = float(rng.beta(8, 2))
    median_px = float(rng.gamma(2.0, 8.0))
    stats = {name: None for name in STATS}
    stats.update(frames=t, points=n, entities=entities, points_per_entity_min=max(1, n // entities - 3),
                 points_per_entity_median=float(n // entities), points_per_entity_max=n // entities + 3,
                 largest_entity_share=round(min(1.0, (n // entities + 3) / n), 4), visible=round(visible, 4),
                 visible_half=round(min(1.0, visible + 0.05), 4), displacement_median_px=round(median_px, 4),
                 displacement_p95_px=round(median_px * 3, 4), displacement_median_rel=round(median_px / 490, 4),
                 displacement_p95_rel=round(3 * median_px / 490, 4), static=round(float(rng.beta(1, 9)), 4),
                 step_s=round(float(rng.gamma(4, 0.05)), 4), wait_s=round(float(rng.gamma(1, 0.002)), 4))
    return stats


def build_folder(root: Path, records: int) -> OutputLayout:
    layout = OutputLayout(root)
    rng = np.random.default_rng(0)
    per_run = records // RUNS
    sha = "ab" * 32
    for run in range(RUNS):
        run_id = f"2026120{run + 1}T000000Z-00000{run}"
        parts = [[] for _ in range(RANKS)]
        for rank in range(RANKS):
            parts[rank].append({"kind": "start", "run": run_id, "rank": rank, "time": run * 1e5, "world_size": RANKS,
                                "shard": [0, 1], "rows": per_run, "csv_rows": records, "skipped": 0,
                                "csv_keys": "k", "semtrack_version": semtrack.__version__})
        for i in range(run * per_run, (run + 1) * per_run):
            rank = i % RANKS
            vid = f"{i:06d}"
            if rng.random() < 0.02:
                record = failed_record(i, DATASET, vid, "decode", "cannot decode: truncated file", f"/data/{vid}.webm")
            else:
                stats = synthetic_stats(rng)
                outputs = {"pickle": {"bytes": 40000 + stats["points"] * 500, "sha256": sha}, "gif": {"bytes": 250000}}
                record = done_record(i, DATASET, vid, stats["frames"], stats["points"], outputs, stats=stats)
            parts[rank].append({**record, "run": run_id, "rank": rank, "time": run * 1e5 + i * 0.01, "seq": i + 1})
        for rank in range(RANKS):
            parts[rank].append({"kind": "end", "run": run_id, "rank": rank, "time": run * 1e5 + 9e4,
                                "status": "complete", "wall_s": 3600.0, "done": 0, "failed": 0,
                                "stage_totals": {"features": [300.0, per_run // RANKS],
                                                 "tracking": [2000.0, per_run // RANKS]}})
            LedgerPart(layout.ledger_part(run_id, rank)).append(parts[rank])
    return layout


def timed_report(*args: str) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "semtrack.report", *args], capture_output=True, text=True,
                          cwd=REPO)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"args": list(args[1:]), "status": proc.returncode, "cpu_s": round(cpu, 2), "wall_s": round(wall, 2),
            "peak_rss_mb": round(after.ru_maxrss / 1024, 1), "stdout_bytes": len(proc.stdout),
            "stderr_tail": proc.stderr[-300:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    result = {"host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
              "stats": stats_cost(args.repeats)}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        layout = build_folder(Path(tmp) / "out", args.records)
        result["build_s"] = round(time.perf_counter() - t0, 1)
        result["ledger_mb"] = round(sum(p.stat().st_size for p in layout.ledger_dir.glob("*.jsonl")) / 2**20, 1)
        page = Path(tmp) / "report.html"
        result["html"] = timed_report(str(layout.root), "--html", str(page))
        result["html"]["page_mb"] = round(page.stat().st_size / 2**20, 2) if page.exists() else None
        result["json"] = timed_report(str(layout.root), "--json")
        result["where"] = timed_report(str(layout.root), "--where", "visible<0.5 and points>=8")
    result["records"] = args.records
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
