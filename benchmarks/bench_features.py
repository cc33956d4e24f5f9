"""Per-video DINOv2 feature time: 32 frames of an SSV2-like clip (428x240) and of a 720p clip.

For each device (CPU; CUDA in fp32 and bf16 autocast when present) and each preprocessing path
("tensor", "pil") it times one `DinoV2Extractor(frames)` call on the clip's first 32 decoded frames
(uint8 already on the device, as the Lightning loop hands them over) and, separately, the
preprocessing alone. Weights do not change the timing, so the default is checkpoint="random".

    python benchmarks/bench_features.py [--model vitb14] [--repeats 1] [--json OUT]
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

import av
import numpy as np
import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _shared import shared_path  # noqa: E402
from semtrack.features import DinoV2Extractor  # noqa: E402

CLIPS = {"ssv2_428x240": "bear_ssv2.webm", "720p_1296x720": "apple.mp4"}


def decode(path: Path, num_frames: int) -> torch.Tensor:
    """First `num_frames` frames as uint8 (T, 3, H, W) (PyAV, rgb24)."""
    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == num_frames:
                break
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def timed(fn, device: torch.device, repeats: int, warmup=None) -> tuple[list[float], list[float]]:
    """(wall, process CPU) seconds of `repeats` calls of fn() after one warm-up call (of `warmup` if
    given). CPU seconds tell a busy shared machine apart from a slow program."""
    (warmup or fn)()
    wall, cpu = [], []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        wall.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vitb14")
    parser.add_argument("--checkpoint", default="random", help="'random' (default), a path, or 'hub'")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per setting (after a warm-up)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when present")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    checkpoint = None if args.checkpoint == "hub" else args.checkpoint
    clips = {name: decode(shared_path("videos", file), args.frames) for name, file in CLIPS.items()}
    ext = DinoV2Extractor(args.model, checkpoint=checkpoint)
    rows = []
    for dev_name in devices:
        device = torch.device(dev_name)
        ext.to(device)
        precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
        for clip_name, frames_cpu in clips.items():
            frames = frames_cpu.to(device)  # (T, 3, H, W) uint8
            for precision in precisions:
                for preprocess in ("tensor", "pil"):
                    ext.preprocess = preprocess
                    def run(x=frames, bf16=precision == "bf16", device_type=device.type):
                        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                            ext(x)

                    total, total_cpu = timed(run, device, args.repeats, warmup=functools.partial(run, frames[:2]))
                    prep, _ = timed(functools.partial(ext.preprocess_frames, frames), device, max(args.repeats, 5))
                    row = {
                        "device": dev_name, "precision": precision, "model": args.model, "clip": clip_name,
                        "frames": int(frames.shape[0]), "height": int(frames.shape[2]), "width": int(frames.shape[3]),
                        "preprocess": preprocess,
                        "seconds_per_video": min(total), "seconds_per_video_median": statistics.median(total),
                        "process_cpu_seconds": min(total_cpu), "preprocess_seconds": min(prep),
                        "ms_per_frame": 1000 * min(total) / frames.shape[0],
                    }
                    rows.append(row)
                    print(f"{dev_name:5s} {precision:4s} {clip_name:14s} {preprocess:6s} "
                          f"{row['seconds_per_video']:8.3f} s/video  ({row['ms_per_frame']:7.1f} ms/frame; "
                          f"preprocess {1000 * row['preprocess_seconds']:7.1f} ms; "
                          f"process CPU {min(total_cpu):7.2f} s)",
                          flush=True)
    report = {
        "benchmark": "features", "rows": rows,
        "env": {
            "torch": torch.__version__, "timm": timm.__version__, "python": platform.python_version(),
            "cpu_threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "weights": ext.weights_id,
        },
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
