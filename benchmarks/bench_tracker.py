"""CoTracker3 offline tracker: time, kernel launches per video, peak memory per frame.

Modes (stand-in weights "random" by default: the weights do not change the work done):

* `time` (default): one SSV2-like clip, bear_ssv2.webm (VP9, 428x240, 33 frames) played forward
  then backward to T = 52 frames, 224 query points (fixed seed, query frames spread over the clip),
  backward tracking on, through `track_many` on the uint8 clip as the extraction pipeline calls
  it. CPU: one fp32 call, peak RSS. CUDA (when present): fp32 and bf16 autocast, one warm-up then
  `--repeats` timed calls each, torch.cuda.max_memory_allocated, and the bf16-vs-fp32 deviation.
* `launches`: aten ops dispatched per video (about one kernel launch each on CUDA) and host syncs,
  counted on the meta device (no compute) with a `TorchDispatchMode`, for two draws of 8 SSV2-like
  clips (240x428 uint8, fixed seeds): `ragged` (T in 28..88, N in 192..336, as unbucketed rows) and
  `bucket` (T in 28..32, as one length bucket of the DataModule), tracked one per call vs all in one
  call, for several chunk settings, among them the GPU job's (the largest chunks whose estimate fits
  the 10 GB budget, per call). Prediction tested: batch 8 <= 1/5 of batch 1 per video.
* `memory`: peak live tensor bytes of one `track_many` call on the meta device (a storage counts
  from the op that creates it until its last tensor dies; attention counted as one fused kernel,
  as flash attention runs), N = 300 user points + 36 support, 384x512, fp32, at several T; the
  per-frame slope and `estimate_tracking_bytes` beside it. Prediction tested: <= 15 MB per frame.
* `rss`: the same call really run on the CPU (1 refinement iteration: memory does not depend on the
  count) in a subprocess per T; peak RSS growth during the call vs `estimate_tracking_bytes`.

    python benchmarks/bench_tracker.py [--mode time|launches|memory|rss] [--device auto|cpu|cuda]
        [--repeats 5] [--json OUT]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import weakref
from pathlib import Path

import av
import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _shared import shared_path  # noqa: E402
from semtrack.features import model_spec  # noqa: E402
from semtrack.tracker import OfflineTracker, estimate_tracking_bytes, load_tracker  # noqa: E402
from semtrack.tracking_memory import (  # noqa: E402
    CUDA_BUDGET_BYTES,
    CUDA_CHUNK_CHOICES,
    CUDA_ENCODER_CHUNK,
    chunk_bytes_for_call,
)

NUM_FRAMES, NUM_QUERIES = 52, 224
SSV2_SIZE = (240, 428)  # (H, W) of an SSV2 clip
RAGGED_FRAMES, RAGGED_POINTS = (28, 88), (192, 336)  # SSV2 ranges of T and N
NOT_LAUNCHES = {"_unsafe_view", "_reshape_alias", "alias", "detach", "lift_fresh", "empty_like", "empty"}
MB = 1e6


# ----------------------------------------------------------------------------- inputs
def ssv2_like_clip() -> torch.Tensor:
    """(52, 3, 240, 428) uint8: bear_ssv2.webm played forward then backward."""
    with av.open(str(shared_path("videos", "bear_ssv2.webm"))) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    order = list(range(len(frames))) + list(range(len(frames) - 2, 0, -1))
    clip = np.stack([frames[i % len(frames)] for i in (order * 2)[:NUM_FRAMES]])  # (T, H, W, 3)
    return torch.from_numpy(clip).permute(0, 3, 1, 2).contiguous()


def random_queries(t: int, n: int, size: tuple[int, int], seed: int = 0) -> torch.Tensor:
    """(n, 3) (t, x, y) clip pixels; query frames from 4 'cluster frames' as the pipeline does."""
    h, w = size
    rng = np.random.RandomState(seed)
    frames = rng.choice(np.linspace(0, t - 1, 4).round(), size=n)
    xy = rng.uniform([0, 0], [w - 1, h - 1], size=(n, 2))
    return torch.from_numpy(np.concatenate([frames[:, None], xy], axis=1)).float()


def ragged_shapes(count: int = 8, seed: int = 0) -> list[tuple[int, int]]:
    """`count` (T, N) pairs drawn uniformly from the SSV2 ranges."""
    rng = np.random.RandomState(seed)
    return [(int(rng.randint(RAGGED_FRAMES[0], RAGGED_FRAMES[1] + 1)), int(rng.randint(RAGGED_POINTS[0],
             RAGGED_POINTS[1] + 1))) for _ in range(count)]


# ----------------------------------------------------------------------------- meta-device counters
def _fused_attention(q, k, v, attn_mask=None, **kwargs):
    """Stand-in for SDPA on the meta device: one op whose output is the attention result (the
    math fallback meta would otherwise run materialises the L x S scores)."""
    return torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)


@contextlib.contextmanager
def fused_attention():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


class OpCounter(TorchDispatchMode):
    """Counts dispatched aten ops that launch work (views excluded) and host syncs."""

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("_local_scalar_dense", "nonzero", "item"):
            self.syncs += 1
        if not func.is_view and name not in NOT_LAUNCHES:
            self.ops += 1
        return func(*args, **(kwargs or {}))


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the storages created inside the mode that are alive at the same time."""

    def __init__(self):
        super().__init__()
        self.refs: dict[int, int] = {}
        self.sizes: dict[int, int] = {}
        self.current = self.peak = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            del self.refs[key]
            self.current -= self.sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        out = func(*args, **kwargs)
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            key = t.untyped_storage()._cdata
            if key not in self.refs:
                if key in inputs:  # a view of / in-place op on a tensor from outside the mode
                    continue
                self.refs[key], self.sizes[key] = 0, t.untyped_storage().nbytes()
                self.current += self.sizes[key]
                self.peak = max(self.peak, self.current)
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def meta_tracker(interp_shape=(384, 512), iters: int = 6):
    """An `OfflineTracker` on the meta device (no weights, no compute)."""
    with torch.device("meta"):
        tracker = OfflineTracker(iters=iters, interp_shape=interp_shape).eval()
    tracker.to("meta")  # buffers made from numpy arrays start on the CPU
    return tracker


def meta_inputs(shapes, size=SSV2_SIZE):
    clips = [torch.empty(t, 3, *size, dtype=torch.uint8, device="meta") for t, _ in shapes]
    queries = [random_queries(t, n, size, seed=i).to("meta") for i, (t, n) in enumerate(shapes)]
    return clips, queries


def count_ops(tracker, clips, queries, **chunks) -> tuple[int, int]:
    """(ops, syncs) of one `track_many` call; `chunks`: its encoder_chunk / chunk_bytes (default: the defaults)."""
    with fused_attention(), OpCounter() as counter:
        tracker.track_many(clips, queries, backward_tracking=True, **chunks)
    return counter.ops, counter.syncs


def peak_live_bytes(tracker, clips, queries) -> int:
    with fused_attention(), LiveBytes() as live:
        out = tracker.track_many(clips, queries, backward_tracking=True)
        del out
    return live.peak


# ----------------------------------------------------------------------------- modes
PER_CALL = "per call"
LAUNCH_SETTINGS = {  # label: (encoder_chunk, chunk_bytes)
    "defaults (encoder 16 frames, chunks 512 MiB)": (16, "default"),
    f"GPU job: encoder {CUDA_ENCODER_CHUNK}, the largest chunks that fit the budget per call": (
        CUDA_ENCODER_CHUNK, PER_CALL),
    f"encoder {CUDA_ENCODER_CHUNK}, chunks {CUDA_CHUNK_CHOICES[-1] / 1e9:g} GB (the GPU job's smallest)": (
        CUDA_ENCODER_CHUNK, CUDA_CHUNK_CHOICES[-1]),
    "encoder 64, no chunking": (64, None),
}


def bucket_shapes(count: int = 8, seed: int = 1) -> list[tuple[int, int]]:
    """`count` (T, N) pairs of one length bucket as the DataModule forms them: T in 28..32 (SSV2's
    commonest lengths), N drawn from the SSV2 range."""
    rng = np.random.RandomState(seed)
    return [(int(rng.randint(28, 33)), int(rng.randint(RAGGED_POINTS[0], RAGGED_POINTS[1] + 1))) for _ in range(count)]


def gpu_budget() -> float:
    """The GPU job's tracking budget per call: `CUDA_BUDGET_BYTES` minus the fp32 weights of the
    tracker and DINOv2 ViT-B/14 (what `tracking_budget` subtracts on a GPU)."""
    with torch.device("meta"):
        models = [OfflineTracker(), timm.create_model(model_spec("vitb14").timm_name, pretrained=False, num_classes=0)]
    return CUDA_BUDGET_BYTES - sum(4 * p.numel() for m in models for p in m.parameters())


def count_setting(tracker, clips, queries, shapes, chunk_bytes, encoder_chunk, budget) -> tuple[int, int, float]:
    """-> (ops, syncs, estimated bytes) of one call, with `chunk_bytes` PER_CALL chosen as the job does."""
    frames, points = max(t for t, _ in shapes), max(n for _, n in shapes)

    def estimate(chunk):
        chunk = {} if chunk == "default" else {"chunk_bytes": chunk}
        return estimate_tracking_bytes(frames, points, SSV2_SIZE, batch=len(shapes), encoder_chunk=encoder_chunk,
                                       **chunk)

    if chunk_bytes == PER_CALL:
        chunk_bytes = chunk_bytes_for_call(estimate, budget, CUDA_CHUNK_CHOICES, CUDA_CHUNK_CHOICES[-1])
    chunks = {"encoder_chunk": encoder_chunk} | ({} if chunk_bytes == "default" else {"chunk_bytes": chunk_bytes})
    ops, syncs = count_ops(tracker, clips, queries, **chunks)
    return ops, syncs, estimate(chunk_bytes)


def run_launches(args) -> dict:
    budget = gpu_budget()
    result = {"clip_size_hw": list(SSV2_SIZE), "gpu_budget_gb": round(budget / 1e9, 2), "draws": {}}
    for draw, shapes in (("ragged", ragged_shapes()), ("bucket", bucket_shapes())):
        clips, queries = meta_inputs(shapes)
        out = result["draws"][draw] = {"shapes_T_N": shapes, "settings": {}}
        for label, (encoder_chunk, chunk_bytes) in LAUNCH_SETTINGS.items():
            tracker = meta_tracker()
            solo = [count_setting(tracker, [c], [q], [shape], chunk_bytes, encoder_chunk, budget)
                    for c, q, shape in zip(clips, queries, shapes)]
            ops, syncs, estimate = count_setting(tracker, clips, queries, shapes, chunk_bytes, encoder_chunk, budget)
            per_video_solo = sum(o for o, _, _ in solo) / len(solo)
            out["settings"][label] = {
                "estimated_peak_gb_batch8_fp32": round(estimate / 1e9, 2),
                "ops_per_video_batch1": round(per_video_solo),
                "ops_per_video_batch8": round(ops / len(clips)),
                "ratio": round(ops / len(clips) / per_video_solo, 3),
                "syncs_batch1": sum(s for _, s, _ in solo),
                "syncs_batch8": syncs,
            }
            print(draw, label, out["settings"][label], flush=True)
    return result


def run_memory(args) -> dict:
    tracker = meta_tracker()
    size = (480, 640)
    rows = []
    for t in args.frames:
        clips, queries = meta_inputs([(t, 300)], size)
        peak = peak_live_bytes(tracker, clips, queries)
        clip_bytes = t * 3 * size[0] * size[1]
        estimate = estimate_tracking_bytes(t, 300, size)
        rows.append({"T": t, "peak_mb": round(peak / MB, 1), "peak_per_frame_mb": round(peak / t / MB, 2),
                     "estimate_mb_without_clip": round((estimate - clip_bytes) / MB, 1)})
        print(rows[-1], flush=True)
    slope = (rows[-1]["peak_mb"] - rows[0]["peak_mb"]) / (rows[-1]["T"] - rows[0]["T"])
    est_slope = (estimate_tracking_bytes(rows[-1]["T"], 300, size) - estimate_tracking_bytes(rows[0]["T"], 300, size))
    est_slope = est_slope / (rows[-1]["T"] - rows[0]["T"]) / MB - 3 * size[0] * size[1] / MB
    print(f"slope {slope:.2f} MB/frame (estimate {est_slope:.2f})")
    return {"points": 300, "support": 36, "resolution": [384, 512], "clip_size_hw": list(size), "rows": rows,
            "slope_mb_per_frame": round(slope, 3), "estimate_slope_mb_per_frame": round(est_slope, 3),
            "note": "live tensors created by the call; the input clips (created before) are not counted"}


def _rss_child(t: int, n: int, size, interp) -> dict:
    """Run one call in this process; report the peak RSS growth during it (bytes)."""
    tracker = load_tracker("random", interp_shape=tuple(interp))
    tracker.iters = 1
    clip = (torch.rand(t, 3, *size) * 255).to(torch.uint8)
    queries = random_queries(t, n, size)
    tracker.track_many([clip[:2]], [queries[:2, :] * torch.tensor([0.0, 1, 1])])  # warm-up: allocator, kernels
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak RSS (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    tracker.track_many([clip], [queries])
    return {"T": t, "N": n, "peak_growth_bytes": (_status_kb("VmHWM") - before) * 1024}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure_rss(t: int, n: int, size, interp) -> dict:
    """Peak RSS growth of one `track_many` call, measured in a fresh subprocess."""
    code = (f"import json, sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import bench_tracker as b; "
            f"print(json.dumps(b._rss_child({t}, {n}, {tuple(size)}, {tuple(interp)})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_rss(args) -> dict:
    size, interp, n = (240, 428), tuple(args.interp), args.points
    rows = []
    for t in args.frames:
        m = measure_rss(t, n, size, interp)
        est = estimate_tracking_bytes(t, n, size, interp) - t * 3 * size[0] * size[1]  # clip allocated before
        rows.append({"T": t, "peak_growth_mb": round(m["peak_growth_bytes"] / MB, 1),
                     "estimate_mb_without_clip": round(est / MB, 1)})
        print(rows[-1], flush=True)
    return {"points": n, "resolution": list(interp), "clip_size_hw": list(size), "iters": 1, "rows": rows}


def run_time_cpu(video, queries, weights, encoder_chunk: int) -> dict:
    tracker = load_tracker(weights, device="cpu")
    start, cpu_start = time.perf_counter(), time.process_time()
    tracker.track_many([video], [queries], backward_tracking=True, encoder_chunk=encoder_chunk)
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"time_s": round(elapsed, 2), "cpu_s": round(cpu, 1), "peak_rss_mb": round(peak_rss_mb),
            "threads": torch.get_num_threads()}


def run_time_cuda(video, queries, weights, precision: str, repeats: int, encoder_chunk: int):
    tracker = load_tracker(weights, device="cuda", precision=precision)
    video, queries = video.cuda(), queries.cuda()
    tracker.track_many([video], [queries], backward_tracking=True, encoder_chunk=encoder_chunk)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ((tracks, visible),) = tracker.track_many([video], [queries], backward_tracking=True,
                                                  encoder_chunk=encoder_chunk)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    stats = {
        "time_s": round(statistics.median(times), 4),
        "time_min_s": round(min(times), 4),
        "peak_gpu_mem_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
    }
    return stats, tracks.cpu(), visible.cpu()


def run_time(args) -> dict:
    video = ssv2_like_clip()
    queries = random_queries(NUM_FRAMES, NUM_QUERIES, tuple(video.shape[-2:]))
    result = {"clip": {"frames": NUM_FRAMES, "queries": NUM_QUERIES, "size_hw": list(video.shape[-2:]),
                       "backward_tracking": True, "weights": args.weights, "encoder_chunk": args.encoder_chunk}}
    if args.device in ("auto", "cpu"):
        result["cpu_fp32"] = run_time_cpu(video, queries, args.weights, args.encoder_chunk)
        print(f"CPU fp32: {result['cpu_fp32']}")
    if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()):
        result["gpu"] = torch.cuda.get_device_name()
        runs = {
            p: run_time_cuda(video, queries, args.weights, p, args.repeats, args.encoder_chunk)
            for p in ("fp32", "bf16")
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
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("time", "launches", "memory", "rss"), default="time")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="time mode: auto = CPU, plus CUDA when present")
    parser.add_argument("--repeats", type=int, default=5, help="timed CUDA calls per precision")
    parser.add_argument("--weights", default="random", help="load_tracker weights (default: stand-in)")
    parser.add_argument("--encoder_chunk", type=int, default=16, help="frames per encoder call")
    parser.add_argument("--frames", type=int, nargs="+", default=None,
                        help="clip lengths (memory: 50 300 1000 3000; rss: 8 24)")
    parser.add_argument("--points", type=int, default=300, help="rss mode: user points")
    parser.add_argument("--interp", type=int, nargs=2, default=(384, 512), help="rss mode: tracker resolution")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if args.frames is None:
        args.frames = [50, 300, 1000, 3000] if args.mode == "memory" else [8, 24]
    if args.mode in ("memory", "rss") and len(set(args.frames)) < 2:
        parser.error(f"--mode {args.mode} measures a per-frame slope: give --frames at least two different lengths")
    result = {
        "mode": args.mode,
        "torch": torch.__version__,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg_1min_at_start": round(os.getloadavg()[0], 2), "python": platform.python_version()},
    }
    result.update({"time": run_time, "launches": run_launches, "memory": run_memory, "rss": run_rss}[args.mode](args))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
