"""CoTracker3 offline tracker time and peak memory on one SSV2-like clip.

Clip: bear_ssv2.webm (VP9, 428x240, 33 frames) played forward then backward to T = 52 frames,
224 query points (fixed seed, query frames spread over the clip), backward tracking on, as the
extraction pipeline calls the tracker. Stand-in weights ("random") by default: the weights do not
change the work done.

* CPU: one fp32 call (slow: about a minute on 2 cores); peak memory = the process's peak RSS.
* CUDA (when present): fp32 and bf16 autocast, one warm-up then `--repeats` timed calls each;
  peak memory = torch.cuda.max_memory_allocated during the timed calls; plus the bf16-vs-fp32
  track deviation (max / mean px, visibility agreement).

    python benchmarks/bench_tracker.py [--device auto|cpu|cuda] [--repeats 5] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import av
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _shared import shared_path  # noqa: E402
from semtrack.tracker import load_tracker  # noqa: E402

NUM_FRAMES, NUM_QUERIES = 52, 224


def ssv2_like_clip() -> torch.Tensor:
    """(1, 52, 3, 240, 428) float32 in [0, 255]: the clip played forward then backward."""
    with av.open(str(shared_path("videos", "bear_ssv2.webm"))) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    order = list(range(len(frames))) + list(range(len(frames) - 2, 0, -1))
    clip = np.stack([frames[i % len(frames)] for i in (order * 2)[:NUM_FRAMES]])  # (T, H, W, 3)
    return torch.from_numpy(clip).permute(0, 3, 1, 2)[None].float()


def queries_for(video: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """(1, 224, 3) (t, x, y) in input pixels; query frames from 4 'cluster frames' as the pipeline does."""
    _, t, _, h, w = video.shape
    rng = np.random.RandomState(seed)
    frames = rng.choice(np.linspace(0, t - 1, 4).round(), size=NUM_QUERIES)
    xy = rng.uniform([0, 0], [w - 1, h - 1], size=(NUM_QUERIES, 2))
    return torch.from_numpy(np.concatenate([frames[:, None], xy], axis=1)).float()[None]


def run_cpu(video, queries, weights, encoder_chunk: int) -> tuple[dict, torch.Tensor]:
    tracker = load_tracker(weights, device="cpu", encoder_chunk=encoder_chunk)
    start = time.perf_counter()
    tracks, visible = tracker(video, queries=queries, backward_tracking=True)
    elapsed = time.perf_counter() - start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"time_s": round(elapsed, 2), "peak_rss_mb": round(peak_rss_mb), "threads": torch.get_num_threads()}, tracks


def run_cuda(video, queries, weights, precision: str, repeats: int, encoder_chunk: int):
    tracker = load_tracker(weights, device="cuda", precision=precision, encoder_chunk=encoder_chunk)
    video, queries = video.cuda(), queries.cuda()
    tracker(video, queries=queries, backward_tracking=True)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tracks, visible = tracker(video, queries=queries, backward_tracking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    stats = {
        "time_s": round(statistics.median(times), 4),
        "time_min_s": round(min(times), 4),
        "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
    }
    return stats, tracks.cpu(), visible.cpu()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto: CPU, plus CUDA when present")
    parser.add_argument("--repeats", type=int, default=5, help="timed CUDA calls per precision")
    parser.add_argument("--weights", default="random", help="load_tracker weights (default: stand-in)")
    parser.add_argument("--encoder_chunk", type=int, default=16, help="frames per encoder call")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()

    video = ssv2_like_clip()
    queries = queries_for(video)
    result = {
        "clip": {"frames": NUM_FRAMES, "queries": NUM_QUERIES, "size_hw": list(video.shape[-2:]),
                 "backward_tracking": True, "weights": args.weights, "encoder_chunk": args.encoder_chunk},
        "torch": torch.__version__,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_1min_at_start": round(os.getloadavg()[0], 2), "python": platform.python_version()},
    }
    if args.device in ("auto", "cpu"):
        result["cpu_fp32"], _ = run_cpu(video, queries, args.weights, args.encoder_chunk)
        print(f"CPU fp32: {result['cpu_fp32']}")
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        result["gpu"] = torch.cuda.get_device_name()
        runs = {
            p: run_cuda(video, queries, args.weights, p, args.repeats, args.encoder_chunk) for p in ("fp32", "bf16")
        }
        (result["cuda_fp32"], tracks32, vis32), (result["cuda_bf16"], tracks16, vis16) = runs["fp32"], runs["bf16"]
        dev = (tracks16 - tracks32).abs()
        result["bf16_vs_fp32"] = {
            "max_px": round(dev.max().item(), 4),
            "mean_px": round(dev.mean().item(), 5),
            "visibility_agreement": round((vis16 == vis32).float().mean().item(), 5),
        }
        for key in ("cuda_fp32", "cuda_bf16", "bf16_vs_fp32"):
            print(f"{key}: {result[key]}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
