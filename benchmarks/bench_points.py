"""Per-video time of clustering and query-point sampling.

Inputs: the planted DINOv2-like tokens of shared/spec/fixtures/bipartite.npz, extended to
`--frames` clustering frames (frame t = fixture frame t mod 8 plus small noise), clustered into
label maps ("planted"); and 4 real bear.mp4 frames (shared/dinov2) split into 10 colour clusters of
their 16x16 patch means ("bear_colour": irregular, fragmented, > 100 components with CC). Sampled
at SSV2-like (240x428) and 720p (720x1296) clip sizes, without and with connected components.

Reports per device: bipartite clustering of the planted tokens (one video, and per video in a
batch of `--batch`), k-means (k=32), and sampling with `exact` (scikit-learn, CPU) and `fast`
(batched, on the device), with the fast/exact speedup and the coverage ratio (mean
pixel-to-nearest-point distance, fast / exact; < 1 means fast covers better).

    python benchmarks/bench_points.py [--frames 32] [--repeats 5] [--threads N] [--devices cpu cuda] [--json OUT]
"""
from __future__ import annotations

import argparse
import functools
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from _shared import shared_path  # noqa: E402
from semtrack.clustering import bipartite_clusters, kmeans_clusters  # noqa: E402
from semtrack.points import coverage, select_query_points  # noqa: E402

CLIPS = {"ssv2_240x428": (240, 428), "720p_720x1296": (720, 1296)}


def timed(fn, repeats: int, device: str) -> tuple[float, object]:
    """Median wall time (s) of fn() over `repeats` runs after one warm-up, and its last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def weighted_coverage(cov: np.ndarray) -> float:
    return float((cov[:, 0] * cov[:, 1]).sum() / cov[:, 1].sum())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=32, help="clustering frames per video")
    ap.add_argument("--batch", type=int, default=8, help="videos per batched bipartite call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--exact-repeats", type=int, default=1, help="runs of the slow exact sampler")
    ap.add_argument("--devices", nargs="+", default=["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
    ap.add_argument("--threads", type=int, default=0, help="torch and BLAS/OpenMP threads (0 = library default)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    if args.threads > 0:
        from threadpoolctl import threadpool_limits

        torch.set_num_threads(args.threads)
        threadpool_limits(args.threads)

    base = torch.from_numpy(np.load(shared_path("spec", "fixtures", "bipartite.npz"))["tokens"])  # (8, 16, 16, 768)
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(args.frames) % base.shape[0]
    tokens = base[idx] + 0.05 * torch.randn(args.frames, *base.shape[1:], generator=gen)  # (T, 16, 16, 768)
    cluster_frames = torch.from_numpy(np.floor(np.linspace(0, 3 * args.frames - 1, args.frames)).astype(np.int64))

    labels_cpu = bipartite_clusters(tokens)
    frames_bear = np.load(shared_path("dinov2", "features_vitb14.npz"))["frames"]  # (4, 480, 854, 3) real frames
    patches = F.adaptive_avg_pool2d(torch.from_numpy(frames_bear).permute(0, 3, 1, 2).float() / 255, 16)
    bear = kmeans_clusters(patches.permute(0, 2, 3, 1).contiguous(), 10, seed=0, init="kmeans++")  # (4, 16, 16)
    label_maps = {"planted": (labels_cpu, cluster_frames), "bear_colour": (bear, torch.tensor([0, 10, 20, 30]))}

    results = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_threads": torch.get_num_threads(),
        "frames": args.frames,
        "devices": {},
    }
    for device in args.devices:
        tok = tokens.to(device)
        res: dict = {}
        t_bip, labels = timed(functools.partial(bipartite_clusters, tok), args.repeats, device)
        videos = [tok] * args.batch
        t_batch, _ = timed(functools.partial(bipartite_clusters, videos), max(1, args.repeats // 2), device)
        t_km, _ = timed(functools.partial(kmeans_clusters, tok, 32, seed=1234), args.repeats, device)
        res["bipartite_s"] = t_bip
        res[f"bipartite_batch{args.batch}_per_video_s"] = t_batch / args.batch
        res["kmeans_k32_s"] = t_km
        res["num_clusters"] = int(labels.unique().numel())
        print(f"[{device}] bipartite {t_bip * 1e3:.1f} ms/video ({args.frames} frames), batched "
              f"{t_batch / args.batch * 1e3:.1f} ms/video, k-means k=32 {t_km * 1e3:.1f} ms, "
              f"{res['num_clusters']} clusters")
        res["sampling"] = {}
        for source, (lab_cpu, frames_cpu) in label_maps.items():
            lab, frames = lab_cpu.to(device), frames_cpu.to(device)
            for name, size in CLIPS.items():
                for cc in (False, True):
                    key = f"{source}/{name}/{'cc' if cc else 'nocc'}"
                    opts = dict(clip_size=size, use_connected_components=cc)
                    fast_fn = functools.partial(select_query_points, lab, frames, **opts)
                    t_fast, fast = timed(fast_fn, args.repeats, device)
                    exact_fn = functools.partial(select_query_points, lab_cpu, frames_cpu, sampler="exact", **opts)
                    t_exact, exact = timed(exact_fn, args.exact_repeats, "cpu")
                    cov_fast, cov_exact = coverage(lab, size, fast), coverage(lab_cpu, size, exact)
                    ratio = weighted_coverage(cov_fast) / weighted_coverage(cov_exact)
                    r = res["sampling"][key] = {
                        "points": len(fast),
                        "fast_s": t_fast,
                        "exact_s": t_exact,
                        "speedup": t_exact / t_fast,
                        "coverage_ratio_fast_over_exact": ratio,
                    }
                    print(f"[{device}] {key:30s} {r['points']:5d} points  fast {t_fast * 1e3:7.1f} ms  exact "
                          f"{t_exact * 1e3:6.0f} ms  speedup x{r['speedup']:4.0f}  coverage fast/exact {ratio:.4f}")
        results["devices"][device] = res
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
