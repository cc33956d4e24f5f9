"""Per-video feature time and what preprocessing costs of it: the first frames of an SSV2-like clip
(428x240), a 720p clip (1296x720) and a portrait clip (368x480).

Two tables per device (CPU; CUDA in fp32 and bf16 autocast when present):
* resize: ms per frame of each resize to the model's input size: PIL per frame (`resize_pil`, CPU
  only), Pillow's exact fixed-point filter batched (`fixed_point_resize`) and PyTorch's kernel
  (`resize_tensor`), on the frames' device;
* features: one `DinoV2Extractor(frames)` call per preprocessing option ("pil", "tensor") on the
  uint8 frames already on the device (as the Lightning loop hands them over), its preprocessing
  alone, and the share of the call that preprocessing takes.
Weights do not change the timing, so the default is checkpoint="random". Process CPU seconds tell a
busy shared machine apart from a slow program.

    python benchmarks/bench_features.py [--model vitb14] [--frames 32] [--repeats 1] [--json OUT]
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

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _shared import decode_first, shared_path  # noqa: E402
from semtrack.features import DinoV2Extractor  # noqa: E402
from semtrack.resize import fixed_point_resize, resize_pil, resize_tensor  # noqa: E402

CLIPS = {"ssv2_428x240": "bear_ssv2.webm", "720p_1296x720": "apple.mp4", "portrait_368x480": "cat.mp4"}
RESIZES = {"pil_per_frame": resize_pil, "fixed_point": fixed_point_resize, "torch_kernel": resize_tensor}


def timed(fn, device: torch.device, repeats: int, warmup=None) -> tuple[list[float], list[float]]:
    """(wall, process CPU) seconds of `repeats` calls of fn() after one warm-up call (of `warmup` if given)."""
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


def resize_rows(clips: dict, device: torch.device, size: int, repeats: int) -> list[dict]:
    rows = []
    for clip_name, frames_cpu in clips.items():
        frames = frames_cpu.to(device)
        for method, resize in RESIZES.items():
            if method == "pil_per_frame" and device.type != "cpu":
                continue
            wall, cpu = timed(functools.partial(resize, frames, (size, size)), device, repeats)
            n = frames.shape[0]
            row = {"table": "resize", "device": device.type, "clip": clip_name, "method": method,
                   "ms_per_frame": 1000 * min(wall) / n, "process_cpu_ms_per_frame": 1000 * min(cpu) / n}
            rows.append(row)
            print(f"resize   {device.type:5s} {clip_name:17s} {method:14s} {row['ms_per_frame']:8.2f} ms/frame "
                  f"(process CPU {row['process_cpu_ms_per_frame']:8.2f})", flush=True)
    return rows


def feature_rows(ext: DinoV2Extractor, clips: dict, device: torch.device, repeats: int) -> list[dict]:
    rows = []
    precisions = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    for clip_name, frames_cpu in clips.items():
        frames = frames_cpu.to(device)  # (T, 3, H, W) uint8
        for precision in precisions:
            for preprocess in ("pil", "tensor"):
                ext.preprocess = preprocess

                def run(x=frames, bf16=precision == "bf16", device_type=device.type):
                    with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                        ext(x)

                total, total_cpu = timed(run, device, repeats, warmup=functools.partial(run, frames[:2]))
                prep, _ = timed(functools.partial(ext.preprocess_frames, frames), device, max(repeats, 3))
                n = frames.shape[0]
                row = {
                    "table": "features", "device": device.type, "precision": precision, "model": ext.model_name,
                    "clip": clip_name, "frames": n, "height": int(frames.shape[2]), "width": int(frames.shape[3]),
                    "preprocess": preprocess, "seconds_per_video": min(total),
                    "seconds_per_video_median": statistics.median(total), "process_cpu_seconds": min(total_cpu),
                    "preprocess_seconds": min(prep), "ms_per_frame": 1000 * min(total) / n,
                    "preprocess_share": min(prep) / min(total),
                }
                rows.append(row)
                print(f"features {device.type:5s} {precision:4s} {clip_name:17s} {preprocess:6s} "
                      f"{row['seconds_per_video']:8.3f} s/video ({row['ms_per_frame']:7.1f} ms/frame; preprocess "
                      f"{1000 * row['preprocess_seconds']:7.1f} ms = {100 * row['preprocess_share']:4.1f} %; "
                      f"process CPU {min(total_cpu):7.2f} s)", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vitb14")
    parser.add_argument("--checkpoint", default="random", help="'random' (default), a path, or 'official'")
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="timed calls per setting (after a warm-up)")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, plus cuda when present")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args()

    devices = args.devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    clips = {name: decode_first(shared_path("videos", file), args.frames) for name, file in CLIPS.items()}
    ext = DinoV2Extractor(args.model, checkpoint=args.checkpoint)
    rows = []
    for dev_name in devices:
        device = torch.device(dev_name)
        ext.to(device)
        rows += resize_rows(clips, device, ext.input_size, max(args.repeats, 3))
        rows += feature_rows(ext, clips, device, args.repeats)
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
