"""Device ops, would-be host syncs and main-thread CPU time per video of the job's GPU step.

The step is what `predict_step` calls: `semtrack.pipeline.Pipeline.__call__` on a batch of decoded
clips (features -> clustering -> points -> tracking, then the results' copy back). The clips of the
CSV (an SSV2-like set: `benchmarks/make_ssv2_like.py`) are decoded as the job decodes them, then the
step runs on them in consecutive batches of 1 and of `--batch` (default 8), with the job's settings
(`ExtractConfig` defaults, stand-in weights `random`) unless an option below shrinks them.

Counted run: under `tests/_device_count.DeviceCounter` with `cuda_code_paths`, i.e. the pipeline on
`torch.device("cuda")` and CUDA's branches taken, on the CPU: per stage and per video, device ops
(≈ kernel launches) and would-be host syncs by kind, with the file:line of the first project frame.
What runs outside the four stages (uploads, reading the point counts, the copy back) is "other",
included in "total". CPU time: the main thread's (`time.process_time`, `--threads` torch threads)
per video of an uncounted run of the same batches on the CPU device (`--host_time 0` skips it);
on the CPU that is the step's whole cost, not what a GPU host would spend.

    python benchmarks/bench_step.py --csv_path /tmp/ssv2_like/ssv2_like.csv --json OUT \\
        [--batch 8] [--clips N] [--max_frames T] [--num_frames_clustering K] [--dinov2_model vits14] \\
        [--tracker_resolution H W] [--num_points_per_entity n] [--host_time 0|1]

JSON: {"commit", "date", "clips", "settings", "batch": {"1": S, "8": S}}, S = {"ops_per_video": {stage:
n, "total": n}, "syncs_per_video": {same keys}, "syncs_per_batch": n, "syncs_by_kind": {kind: n},
"sync_sites": [["file:line", count], ...], "host_ms_per_video": ms}, stages features, clustering,
points, tracking, other.

`--compile inductor|graphs` (default off) instead runs the step on the CPU with the tracker's compiled
buckets (`--compile`, `semtrack/tracker/compiled.py`) at batch 1 and `--batch`, and reports the
compilations per bucket and in total, and the buckets the calls fell in (the bound): `inductor`
compiles each graph (minutes per bucket on a CPU), `graphs` counts dynamo's graphs without compiling
them (the same count, seconds). JSON then: {"commit", "date", "clips", "settings", "compile": mode,
"batch": {"1": C, "8": C}}, C = {"compilations": n, "buckets": n, "calls": n, "per_bucket": {"BxTxN":
compilations}, "padded_frame_fraction": f, "seconds": s}.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from bench_cluster_points import readable_clips  # noqa: E402

from _device_count import DeviceCounter, cuda_code_paths  # noqa: E402
from datamodules.video import VideoCSVDataset  # noqa: E402
from semtrack.config import ExtractConfig  # noqa: E402
from semtrack.features import DinoV2Extractor  # noqa: E402
from semtrack.pipeline import Pipeline  # noqa: E402
from semtrack.tracker import load_tracker  # noqa: E402
from semtrack.tracking_memory import TrackingMemory  # noqa: E402

STAGES = ("features", "clustering", "points", "tracking", "other")
CUDA = torch.device("cuda")


def load_clips(config: ExtractConfig, limit: int | None) -> list:
    """The CSV's clips decoded as the job decodes them (failed ones skipped, with a line each)."""
    dataset = VideoCSVDataset(config.csv_path, fps=config.fps, num_frames_clustering=config.num_frames_clustering,
                              max_frames=config.max_frames)
    return list(itertools.islice(readable_clips(dataset), limit))


def make_pipeline(config: ExtractConfig, models: tuple, device: torch.device) -> Pipeline:
    """The job's Pipeline on `device`, set up as `Pipeline.build` does (fp32 tracker; the models'
    parameter bytes stand for CUDA's allocated memory)."""
    features, tracker = models
    model_bytes = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    memory = TrackingMemory.plan(config, device, "fp32", model_bytes if device.type == "cuda" else 0)
    return Pipeline(config, features, tracker, device, memory)


def measure(config: ExtractConfig, models: tuple, clips: list, size: int, host_time: bool) -> dict:
    """One counted run of the step on consecutive batches of `size` clips (as on CUDA) and, with
    `host_time`, one uncounted run on the CPU."""
    batches = [clips[i:i + size] for i in range(0, len(clips), size)]
    pipeline = make_pipeline(config, models, CUDA)
    counter = DeviceCounter()
    counter.seed(*models)
    failed = 0
    with counter, cuda_code_paths(counter):
        for batch in batches:
            failed += sum(r.failure is not None for r in pipeline(batch).results)
    n, out = len(clips), {}
    ops = {s: counter.ops[s] / n for s in STAGES}
    syncs = {s: counter.total_syncs(s) / n for s in STAGES}
    out["ops_per_video"] = {**ops, "total": sum(counter.ops.values()) / n}
    out["syncs_per_video"] = {**syncs, "total": counter.total_syncs() / n}
    out["syncs_per_batch"] = counter.total_syncs() / len(batches)
    out["syncs_by_kind"] = dict(counter.syncs_by_kind())
    out["sync_sites"] = [list(s) for s in counter.sites.most_common()]
    out["failed"] = failed
    out["host_ms_per_video"] = None
    if host_time:
        pipeline = make_pipeline(config, models, torch.device("cpu"))
        start = time.process_time()
        for batch in batches:
            pipeline(batch)
        out["host_ms_per_video"] = 1e3 * (time.process_time() - start) / n
    return out


def graphs_only(gm, example_inputs):
    """Dynamo's graph run as captured: counted, not compiled."""
    return gm.forward


def measure_compile(config: ExtractConfig, features, clips: list, size: int, mode: str) -> dict:
    """The step on the CPU in batches of `size` with a fresh tracker's compiled buckets: compilations
    per bucket, the buckets of the tracker calls, and how much the buckets padded the frames."""
    config = dataclasses.replace(config, compile=True)
    tracker = load_tracker("random", precision="fp32", interp_shape=config.tracker_resolution)
    tracker.compile_buckets(graphs_only if mode == "graphs" else None)
    pipeline = make_pipeline(config, (features, tracker), torch.device("cpu"))
    calls, start = [], time.perf_counter()
    for i in range(0, len(clips), size):
        calls += pipeline(clips[i:i + size]).tracking_calls
        print(f"  batch {size}, clips {i}..{i + size - 1}: {tracker.compiled.compilations} compilations, "
              f"{time.perf_counter() - start:.0f} s", flush=True)
    counts = tracker.compiled.counts
    return {"compilations": tracker.compiled.compilations, "buckets": len(counts), "calls": len(calls),
            "per_bucket": {"x".join(map(str, key[:3])): n for key, n in sorted(counts.items())},
            "padded_frame_fraction": sum(p - f for _, f, p in calls) / max(sum(p for _, _, p in calls), 1),
            "seconds": time.perf_counter() - start}


def table(result: dict) -> str:
    rows = ["| batch | " + " | ".join(f"ops {s}" for s in (*STAGES, "total")) + " | syncs/video | syncs/batch "
            "| CPU ms/video |", "|---" * (len(STAGES) + 5) + "|"]
    for size, r in result["batch"].items():
        ops = " | ".join(f"{r['ops_per_video'][s]:,.0f}" for s in (*STAGES, "total"))
        ms = "—" if r["host_ms_per_video"] is None else f"{r['host_ms_per_video']:,.0f}"
        rows.append(f"| {size} | {ops} | {r['syncs_per_video']['total']:.2f} | {r['syncs_per_batch']:.2f} | {ms} |")
    return "\n".join(rows)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv_path", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clips", type=int, help="only the first N readable clips")
    ap.add_argument("--max_frames", type=int, help="tracked frames per clip at most (default: all)")
    ap.add_argument("--num_frames_clustering", type=int, help="clustering frames per clip")
    ap.add_argument("--dinov2_model", help="DINOv2 model of the stand-in features")
    ap.add_argument("--tracker_resolution", type=int, nargs=2, metavar=("H", "W"))
    ap.add_argument("--num_points_per_entity", type=int)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable CPU times on a busy machine)")
    ap.add_argument("--host_time", type=int, choices=(0, 1), default=1, help="0: skip the uncounted CPU run")
    ap.add_argument("--compile", choices=("inductor", "graphs"),
                    help="count the compiled tracker's compilations per bucket instead (see above)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    given = {k: getattr(args, k) for k in ("max_frames", "num_frames_clustering", "dinov2_model",
                                            "tracker_resolution", "num_points_per_entity") if getattr(args, k)}
    config = ExtractConfig(csv_path=str(args.csv_path), weights="random", **given)
    clips = load_clips(config, args.clips)
    features = DinoV2Extractor(config.dinov2_model, checkpoint="random", preprocess=config.dinov2_preprocess).eval()
    tracker = load_tracker("random", precision="fp32", interp_shape=config.tracker_resolution)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    result = {"commit": commit.stdout.strip(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
              "clips": len(clips), "frames": [c.num_frames for c in clips],
              "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in given.items()}, "batch": {}}
    if args.compile:
        result["compile"] = args.compile
        for size in sorted({1, args.batch}):
            r = result["batch"][str(size)] = measure_compile(config, features, clips, size, args.compile)
            print(f"batch {size}: {r['compilations']} compilations over {r['calls']} tracker calls in "
                  f"{r['buckets']} buckets {r['per_bucket']}, padded frames {r['padded_frame_fraction']:.0%}, "
                  f"{r['seconds']:.0f} s")
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return result
    for size in sorted({1, args.batch}):
        r = result["batch"][str(size)] = measure(config, (features, tracker), clips, size, bool(args.host_time))
        print(f"batch {size}: syncs/video {r['syncs_per_video']}, by kind {r['syncs_by_kind']}")
        for site, count in r["sync_sites"][:12]:
            print(f"    {count:6d}  {site}")
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
