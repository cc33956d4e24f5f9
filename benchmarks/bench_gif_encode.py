"""GIF encoders A/B on the SSV2-like set: process CPU time and bytes of PIL's encoder and of
`semtrack.gif_encode` (literal-only LZW), on the same drawn frames.

    python benchmarks/bench_gif_encode.py [--repeats 5] [--json OUT] [--cache DIR]

Inputs: `bench_host.py`'s `ssv2_like` set (made into `--cache` when not there) with its stand-in tracks
(`stand_in_result`: 250 random-walk points in 20 entities, 10 % invisible), drawn by
`semtrack.gif.render_indexed` at the default width. Per clip, taking turns in one process (the machine
may be shared): `encode` times the encoders alone on the same indices and palette (PIL: what
`gif_bytes` does after drawing; `literal`: `encode_gif`), `gif_bytes` the whole call with each
`encoder`; each the median of `--repeats` calls after one untimed call. Reported: the median and
mean over clips, the total bytes and the size ratio to PIL's.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_host  # noqa: E402

from semtrack.gif import (  # noqa: E402
    DEFAULT_MAX_WIDTH,
    encode_gif_pil,
    fitted_size,
    frame_durations_ms,
    gif_bytes,
    render_indexed,
    resize_frames,
    scale_points,
)
from semtrack.gif_encode import encode_gif  # noqa: E402
from semtrack.renders import gif_arrays  # noqa: E402


def taking_turns(calls: dict, repeats: int) -> dict:
    """{name: (median ms, bytes)} of calls {name: fn()}, each called once untimed, then in turns."""
    sizes = {name: len(fn()) for name, fn in calls.items()}
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            start = time.process_time()
            fn()
            times[name].append(time.process_time() - start)
    return {name: (1000 * statistics.median(times[name]), sizes[name]) for name in calls}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=bench_host.build_parser().get_default("cache"))
    args = parser.parse_args(argv)
    sets = bench_host.build_sets(bench_host.default_sources(), args.cache)
    clips = []
    for row, (path, plan) in enumerate(bench_host._plans(sets["ssv2_like"])):
        arrays = gif_arrays(bench_host.stand_in_result(row, path, plan))
        frames, tracks, visibility, ids, times = arrays
        source = (frames.shape[2], frames.shape[1])
        size = fitted_size(*source, DEFAULT_MAX_WIDTH)
        indices, palette = render_indexed(resize_frames(frames, size), scale_points(tracks, source, size),
                                          visibility, ids, times)
        durations = frame_durations_ms(times)
        measured = taking_turns({
            "encode pil": functools.partial(encode_gif_pil, indices, palette, durations),
            "encode literal": functools.partial(encode_gif, indices, palette, durations),
            "gif_bytes pil": functools.partial(gif_bytes, *arrays),
            "gif_bytes literal": functools.partial(gif_bytes, *arrays, encoder="literal"),
        }, args.repeats)
        clips.append({"video": Path(path).name, "frames": int(indices.shape[0]), "pixels": int(indices.size),
                      **{name: {"ms": round(ms, 3), "bytes": size} for name, (ms, size) in measured.items()}})
    summary = {}
    for name in ("encode pil", "encode literal", "gif_bytes pil", "gif_bytes literal"):
        ms = [c[name]["ms"] for c in clips]
        total = sum(c[name]["bytes"] for c in clips)
        pils = sum(c[name.replace("literal", "pil")]["bytes"] for c in clips)
        summary[name] = {"median_ms": round(statistics.median(ms), 2), "mean_ms": round(statistics.mean(ms), 2),
                         "ns_per_pixel": round(1e6 * sum(ms) / sum(c["pixels"] for c in clips), 2),
                         "total_bytes": total,
                         "bytes_vs_pil": round(total / pils, 3)}
        line = summary[name]
        print(f"{name:18} median {line['median_ms']:7.2f} ms  mean {line['mean_ms']:7.2f} ms  "
              f"{line['ns_per_pixel']:6.2f} ns/px  {total / 1e6:7.2f} MB ({line['bytes_vs_pil']}x PIL)")
    result = {"benchmark": "gif_encode", "env": bench_host.environment(), "repeats": args.repeats,
              "clips": clips, "summary": summary}
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
