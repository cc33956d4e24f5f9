"""Resume start-up on a large folder: from the command to the first video processed.

Builds a CSV of `--rows` rows (all the same tiny shared clip under distinct video ids, one dataset:
SSV2 keeps 220k pickles in one folder too) and an output folder in which `--done` of them are done:
a tiny pickle each and its ledger record, as an earlier run leaves them. The done rows are spread
evenly (every row but each `rows / (rows - done)`-th). Then it starts the real command
(`scripts/extract.py`, grid mode, stand-in weights, 4 frames at 64x96), times each start-up line
it prints and the first new ledger record, and stops it with SIGTERM (exit status 143 expected).

Also timed in this process, for the breakdown: reading the CSV, reading the ledger, and the done
check (ledger + one stat per row) of all rows.

    python benchmarks/bench_resume.py --rows 200000 --done 190000 --json resume.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
from _shared import shared_path  # noqa: E402
from semtrack.config import ExtractConfig  # noqa: E402
from semtrack.ledger import (  # noqa: E402
    DoneRule,
    LedgerPart,
    done_record,
    iter_records,
    latest_videos,
    new_run_id,
    output_entry,
)
from semtrack.sidecar import write_sidecar  # noqa: E402
from semtrack.trackfile import dumps_tracks  # noqa: E402
from semtrack.video import read_video_csv  # noqa: E402

FLAGS = ["--weights", "random", "--use_grid", "--cotracker_grid_size", "2", "--tracker_resolution", "64", "96",
         "--max_frames", "4", "--num_workers", "0", "--accelerator", "cpu", "--trainer.enable_progress_bar=false"]
DATASET = "bench"


def tiny_pickle() -> bytes:
    return dumps_tracks({"pred_tracks": torch.zeros(2, 1, 2, dtype=torch.float16),
                         "pred_visibility": torch.ones(2, 1, dtype=torch.bool),
                         "obj_ids": torch.zeros(1, dtype=torch.int64),
                         "point_queries": torch.zeros(1, dtype=torch.int64)})


def build(work: Path, rows: int, done: int) -> tuple[Path, ExtractConfig]:
    """The CSV, the sidecar, `done` pickles and their ledger file."""
    clip = shared_path("videos", "tiny_ssv2.webm")
    csv_path = work / "big.csv"
    with open(csv_path, "w", encoding="utf-8") as f:
        f.write("video_path,dataset,video_id\n")
        f.writelines(f"{clip},{DATASET},v{i:06d}\n" for i in range(rows))
    config = ExtractConfig(csv_path=str(csv_path), base_feat_path=str(work / "out"), weights="random", use_grid=True,
                           cotracker_grid_size=2, tracker_resolution=(64, 96), max_frames=4, num_workers=0)
    write_sidecar(config, "32-true")
    layout = config.layout
    data = tiny_pickle()
    outputs = {"pickle": output_entry(data)}
    stride = rows // max(1, rows - done)
    todo = set(range(0, rows, stride)[: rows - done])
    folder = layout.pickle(DATASET, "x").parent
    folder.mkdir(parents=True, exist_ok=True)
    run, records = new_run_id(), []
    for i in [i for i in range(rows) if i not in todo][:done]:
        (folder / f"v{i:06d}.pkl").write_bytes(data)
        records.append({**done_record(i, DATASET, f"v{i:06d}", 2, 1, outputs), "run": run, "rank": 0,
                        "time": time.time()})
    LedgerPart(layout.ledger_part(run, 0)).append(records)
    return csv_path, config


def breakdown(config: ExtractConfig) -> dict:
    """Seconds of the start-up's parts, in this process (a warm page cache)."""
    t0 = time.perf_counter()
    rows = read_video_csv(config.csv_path)
    t1 = time.perf_counter()
    latest = latest_videos(iter_records(config.layout))
    t2 = time.perf_counter()
    plan = DoneRule(config.layout, latest, want_gif=False, verify=False).plan(rows)
    t3 = time.perf_counter()
    return {"read_csv_s": t1 - t0, "read_ledger_s": t2 - t1, "done_check_s": t3 - t2,
            "pending": len(plan.pending), "skipped": plan.skipped}


def first_video(csv_path: Path, config: ExtractConfig, timeout: float) -> dict:
    """Run the command until its first new ledger record, then SIGTERM it; -> seconds per start-up line."""
    ledger = config.layout.ledger_dir
    before = set(ledger.glob("*.jsonl"))
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "scripts" / "extract.py"), "--csv_path", str(csv_path),
                             "--base_feat_path", config.base_feat_path, *FLAGS],
                            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    lines: list[tuple[float, str]] = []
    reader = threading.Thread(target=lambda: lines.extend((time.perf_counter() - start, ln.rstrip())
                                                          for ln in proc.stderr), daemon=True)
    reader.start()
    first = None
    while first is None and proc.poll() is None and time.perf_counter() - start < timeout:
        for path in set(ledger.glob("*.jsonl")) - before:
            if '"kind":"video"' in path.read_text():
                first = time.perf_counter() - start
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=600)
    reader.join(timeout=10)
    said = {text.removeprefix("semtrack: "): round(t, 2) for t, text in lines if text.startswith("semtrack: ")
            and ("loading models" in text or "decoding the first videos" in text)}
    return {"first_video_s": first, "exit_status": status, "startup_lines_s": said}


def git_commit() -> str | None:
    proc = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return proc.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--done", type=int, default=190_000)
    parser.add_argument("--work", help="folder to build in (default: a temporary one, removed after)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the first video")
    parser.add_argument("--json", help="write the result here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        csv_path, config = build(work, args.rows, args.done)
        built = time.perf_counter() - t0
        result = {"date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "git_commit": git_commit(),
                  "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
                  "rows": args.rows, "done": args.done, "build_s": round(built, 1), "in_process": breakdown(config)}
        result.update(first_video(csv_path, config, args.timeout))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["first_video_s"] is not None and result["exit_status"] == 143 else 1


if __name__ == "__main__":
    sys.exit(main())
