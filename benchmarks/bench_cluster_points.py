"""Device ops, would-be host syncs and host CPU time per video of the clustering and query-point stages.

On an SSV2-like set (`benchmarks/make_ssv2_like.py` makes one): every clip is decoded as the job
does (`VideoCSVDataset`, SSV2 at its native rate), its clustering frames go through DINOv2 with
stand-in weights (`--model`, checkpoint "random"; cached in `--tokens`, since only the stages after
it are measured), then the clips are clustered and sampled in batches of 1 and `--batch`:

* `--api batch` (default): `clustering.cluster_batch` and `points.select_query_points_batch`, one
  call each per batch, as the pipeline's step calls them;
* `--api per_clip`: `clustering.cluster` per batch and `points.select_query_points` per clip (what
  the pipeline called before the batch API; also runs on older commits).

Counted under `tests/_device_count.DeviceCounter` with the tokens and cluster frames seeded as
device tensors: device ops (≈ kernel launches on CUDA) and would-be host syncs by kind, per video
and per stage, with their sites. CPU time: the main thread's (`time.process_time`) per stage and
video in an uncounted run; on the CPU it is the stage's whole cost (`--threads`, default 1).

    python benchmarks/bench_cluster_points.py --csv_path /tmp/ssv2_like/ssv2_like.csv \
        [--tokens /tmp/ssv2_like_tokens.pt] [--batch 8] [--api batch|per_clip] [--sync_free 1|0]
        [--method bipartite|kmeans] [--sampler fast|exact] [--cc] [--clips N] [--frames K] [--json OUT]
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Iterator

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from _device_count import DeviceCounter  # noqa: E402
from datamodules.video import VideoCSVDataset  # noqa: E402
from semtrack import clustering, points  # noqa: E402
from semtrack.config import NUM_FRAMES_CLUSTERING  # noqa: E402
from semtrack.features import DinoV2Extractor  # noqa: E402

STAGES = ("clustering", "points")


def readable_clips(dataset: VideoCSVDataset) -> Iterator:
    """The dataset's clips in order, decoded as the job decodes them; each one that failed to decode is
    skipped with a line saying why."""
    for i in range(len(dataset)):
        clip = dataset[i]
        if clip.frames is None:
            print(f"skipped {clip.video_path}: {clip.error}")
            continue
        yield clip


def load_clips(csv_path: Path, tokens_path: Path | None, model: str, frames: int) -> list[dict]:
    """Per readable clip: video_id, size (H, W), cluster_frames (K,) int64 and tokens (K, 16, 16, D)
    float32 (K = min(frames, T)), from the cache when it was made for the same CSV, model and frames."""
    key = {"csv": str(csv_path), "model": model, "frames": frames}
    if tokens_path is not None and tokens_path.exists():
        cached = torch.load(tokens_path)
        if all(cached.get(k) == v for k, v in key.items()):
            return cached["clips"]
    dataset = VideoCSVDataset(csv_path, num_frames_clustering=frames)
    extractor = DinoV2Extractor(model, checkpoint="random").eval()
    clips = []
    for clip in readable_clips(dataset):
        with torch.no_grad():
            tokens = extractor(clip.frames[clip.cluster_frames])
        clips.append({"video_id": clip.video_id, "size": tuple(clip.frames.shape[-2:]),
                      "cluster_frames": clip.cluster_frames, "tokens": tokens.float()})
    if tokens_path is not None:
        torch.save({**key, "clips": clips}, tokens_path)
    return clips


def run_batch(group: list[dict], args, stage) -> None:
    """Clustering and points for one batch of clips (their tensors already where the device would
    hold them); `stage(name)` is a context manager around each stage."""
    if args.api == "batch":
        lengths = [c["tokens"].shape[0] for c in group]
        with stage("clustering"):
            result = clustering.cluster_batch(group[0]["batch_tokens"], lengths, [c["video_id"] for c in group],
                                              args.method, n_clusters=args.n_clusters, sync_free=args.sync_free)
        with stage("points"):
            points.select_query_points_batch(result.labels, group[0]["batch_frames"], [c["size"] for c in group],
                                             result.num_labels, sampler=args.sampler,
                                             use_connected_components=args.cc, sync_free=args.sync_free)
        return
    with stage("clustering"):
        labels = clustering.cluster([c["tokens"] for c in group], [c["video_id"] for c in group], args.method,
                                    n_clusters=args.n_clusters)
    with stage("points"):
        for c, lab in zip(group, labels):
            points.select_query_points(lab, c["cluster_frames"], c["size"], sampler=args.sampler,
                                       use_connected_components=args.cc)


def batches(clips: list[dict], size: int, api: str) -> list[list[dict]]:
    """Consecutive batches; with the batch API the first clip of each carries the padded tensors
    (tokens (V, K_max, 16, 16, D) zero-padded, cluster frames (V, K_max) -1-padded)."""
    out = []
    for i in range(0, len(clips), size):
        group = [dict(c) for c in clips[i:i + size]]
        if api == "batch":
            k = max(c["tokens"].shape[0] for c in group)
            tokens = group[0]["tokens"].new_zeros(len(group), k, *group[0]["tokens"].shape[1:])
            frames = torch.full((len(group), k), -1, dtype=torch.long)
            for j, c in enumerate(group):
                tokens[j, : c["tokens"].shape[0]] = c["tokens"]
                frames[j, : c["tokens"].shape[0]] = c["cluster_frames"]
            group[0]["batch_tokens"], group[0]["batch_frames"] = tokens, frames
        out.append(group)
    return out


def measure(clips: list[dict], size: int, args) -> dict:
    """Counted run (ops, syncs, sites) and an uncounted one (main-thread CPU seconds per stage)."""
    groups = batches(clips, size, args.api)
    counter = DeviceCounter()
    for group in groups:  # what the device holds when the stages start
        counter.seed(*(t for c in group for t in c.values() if isinstance(t, torch.Tensor)))
    with counter:
        for group in groups:
            run_batch(group, args, counter.stage)
    cpu = dict.fromkeys(STAGES, 0.0)

    @contextlib.contextmanager
    def clock(name):
        start = time.process_time()
        yield
        cpu[name] += time.process_time() - start

    for group in groups:
        run_batch(group, args, clock)
    n = len(clips)
    return {
        "ops_per_video": {s: counter.ops[s] / n for s in STAGES},
        "syncs_per_video": {s: counter.total_syncs(s) / n for s in STAGES},
        "syncs_per_batch": counter.total_syncs() / len(groups),
        "syncs_by_kind": dict(counter.syncs_by_kind()),
        "sync_sites": counter.sites.most_common(),
        "cpu_ms_per_video": {s: 1e3 * cpu[s] / n for s in STAGES},
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--csv_path", type=Path, required=True)
    ap.add_argument("--tokens", type=Path, help="token cache (made on the first run)")
    ap.add_argument("--model", default="vitb14", help="DINOv2 model of the stand-in features")
    ap.add_argument("--frames", type=int, default=NUM_FRAMES_CLUSTERING, help="clustering frames per clip (at most)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--clips", type=int, help="only the first N clips")
    ap.add_argument("--api", choices=("batch", "per_clip"), default="batch")
    ap.add_argument("--method", choices=clustering.CLUSTERING_METHODS, default="bipartite")
    ap.add_argument("--n_clusters", type=int, default=clustering.N_CLUSTERS)
    ap.add_argument("--sampler", choices=points.SAMPLERS, default="fast")
    ap.add_argument("--cc", action="store_true", help="use connected components")
    ap.add_argument("--sync_free", type=int, choices=(0, 1), default=1,
                    help="batch API: 1 = the GPU form (no host reads), 0 = the CPU form (reads to trim work)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: comparable CPU times on a busy machine)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    clips = load_clips(args.csv_path, args.tokens, args.model, args.frames)[: args.clips]
    result = {"clips": len(clips), "api": args.api, "sync_free": bool(args.sync_free), "method": args.method,
              "sampler": args.sampler, "cc": args.cc, "frames": [c["tokens"].shape[0] for c in clips], "batch": {}}
    for size in sorted({1, args.batch}):
        r = result["batch"][str(size)] = measure(clips, size, args)
        print(f"batch {size}: ops/video {r['ops_per_video']}, syncs/video {r['syncs_per_video']}, "
              f"syncs/batch {r['syncs_per_batch']:.1f}, CPU ms/video {r['cpu_ms_per_video']}")
        for site, count in r["sync_sites"][:8]:
            print(f"    {count:6d}  {site}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
