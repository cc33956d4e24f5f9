"""Process CPU time of one trail GIF (`semtrack.gif.gif_bytes`) on SSV2-like and 480p inputs.

Inputs: the first `--frames` frames of the shared `bear_ssv2.webm` (VP9, 428x240, 12 fps: SSV2-like)
and of `bear.mp4` (854x480, 30 fps), decoded once with PyAV; `--points` points in 20 entities,
random walks from uniform starts (seed 0), 10 % of the positions invisible. Each case is timed as
the median process CPU time (`time.process_time`, this process only) of `--repeats` calls after one
warm-up (a baseline's calls, if any, taking turns with them), at the default width
(`DEFAULT_MAX_WIDTH`: SSV2 frames stay 428 wide, 480p ones become 640x360) and at full size.

`--baseline FILE` also times another renderer module's `save_trail_gif(path, frames, tracks,
visibility, obj_ids, frame_times, max_width)` on the same inputs, e.g. the previous one:

    git show ad30ca2:semtrack/gif.py > /tmp/gif_ad30ca2.py
    python benchmarks/bench_gif.py [--frames 30] [--points 250] [--repeats 7] \
        [--baseline /tmp/gif_ad30ca2.py] [--json OUT]
"""
from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import av
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO))
from _shared import shared_path  # noqa: E402
from semtrack.gif import DEFAULT_MAX_WIDTH, gif_bytes  # noqa: E402

CLIPS = {"ssv2_like": "bear_ssv2.webm", "480p": "bear.mp4"}
ENTITIES = 20


def decode(path: Path, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `num_frames` frames (T, H, W, 3) uint8 and their times (T,) s from the first frame."""
    frames, times = [], []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            times.append(frame.time)
            if len(frames) == num_frames:
                break
    return np.stack(frames), np.asarray(times) - times[0]


def walks(t_len: int, width: int, height: int, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n random-walk tracks (T, n, 2) px from uniform starts, visibility (T, n), ids (n,) in ENTITIES."""
    rng = np.random.default_rng(0)
    start = rng.uniform([0, 0], [width, height], size=(n, 2))
    tracks = start[None] + np.cumsum(rng.normal(0, 2.0, size=(t_len, n, 2)), axis=0)
    return tracks, rng.random((t_len, n)) > 0.1, np.sort(rng.integers(0, ENTITIES, n))


def cpu_ms(fns: list, repeats: int) -> list[float]:
    """Median process CPU time (ms) of each fn() over `repeats` rounds after one warm-up; the functions
    take turns within a round, so a busy machine slows them alike."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.process_time()
            fn()
            spent.append(time.process_time() - start)
    return [1000.0 * statistics.median(spent) for spent in times]


def load_module(path: Path):
    spec = importlib.util.spec_from_file_location("baseline_gif", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=30)
    ap.add_argument("--points", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--baseline", type=Path, help="another renderer module (a gif.py) to time beside this one")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    baseline = load_module(args.baseline) if args.baseline else None
    results = {"commit": commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
               "frames": args.frames, "points": args.points, "repeats": args.repeats, "cases": []}
    with tempfile.TemporaryDirectory() as scratch:
        gif_path = Path(scratch) / "baseline.gif"
        for name, clip in CLIPS.items():
            frames, times = decode(shared_path("videos", clip), args.frames)
            inputs = (frames, *walks(len(frames), frames.shape[2], frames.shape[1], args.points), times)
            for label, width in (("default", DEFAULT_MAX_WIDTH), ("full", None)):
                fns = [functools.partial(gif_bytes, *inputs, width)]
                if baseline is not None:
                    fns.append(functools.partial(baseline.save_trail_gif, gif_path, *inputs, width))
                spent = cpu_ms(fns, args.repeats)
                case = {"clip": name, "size": f"{frames.shape[2]}x{frames.shape[1]}", "max_width": width,
                        "ms": spent[0], "bytes": len(gif_bytes(*inputs, width))}
                if baseline is not None:
                    case["baseline_ms"], case["baseline_bytes"] = spent[1], gif_path.stat().st_size
                results["cases"].append(case)
                extra = "" if baseline is None else (
                    f"   baseline {case['baseline_ms']:7.1f} ms {case['baseline_bytes']:>9} B"
                    f"   x{case['baseline_ms'] / case['ms']:.1f}")
                print(f"{name:9s} {case['size']:>8s} max_width={label:7s} {case['ms']:7.1f} ms {case['bytes']:>9} B"
                      + extra, flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
