"""Re-encode any clips the way Something-Something-V2 stores them, for the extraction benchmark.

SSV2 clips are VP9 in WebM, 12 fps, 240 pixels high. For each source clip this writes
`<out>/<stem>.webm`: the frames resampled to 12 fps by timestamp (output frame k is the source
frame nearest to k / 12 s, the rule of `semtrack.video.select_by_timestamp`), resized to 240 px
high with the aspect ratio kept (width rounded to the nearest even number, as yuv420p needs), and
encoded with libvpx-vp9 through PyAV. With `--variants K` each source gives K clips of different
lengths (`<stem>_v<j>.webm`: its first n_j frames, n_j spread evenly from `--min_frames` to all of
them), so a few sources make a set of varied lengths like SSV2's (28-88 frames). Then a CSV
(`video_path`, `dataset`=ssv2, `video_id`) lists them, ready for `benchmarks/bench_extract.py --csv_path`.

    python benchmarks/make_ssv2_like.py ../shared/videos/bear.mp4 ../shared/videos/cat.mp4 \
        --out /tmp/ssv2_like [--csv /tmp/ssv2_like/ssv2_like.csv] [--fps 12] [--height 240] [--variants 3]

A source that cannot be decoded is reported and skipped; the exit status is 1 if any was.
"""
from __future__ import annotations

import argparse
import csv
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from semtrack.video import select_by_timestamp  # noqa: E402

CODEC = "libvpx-vp9"
# Constant-quality VP9 (crf with b:v 0) at the fastest "good" preset: sizes near SSV2's ~100 kB/s.
ENCODER_OPTIONS = {"crf": "32", "b:v": "0", "deadline": "good", "cpu-used": "8", "row-mt": "1"}


def output_size(width: int, height: int, target_height: int) -> tuple[int, int]:
    """(W, H) of the re-encoded clip: `target_height` high, aspect kept, width even (>= 2)."""
    if width < 1 or height < 1:
        raise ValueError(f"frame size must be positive, got {width}x{height}")
    even_width = max(2, int(width * target_height / height / 2 + 0.5) * 2)
    return even_width, target_height


def decode_with_times(path: Path) -> tuple[list[av.VideoFrame], np.ndarray]:
    """All frames of the first video stream and their times (N,) float64 seconds from the first frame."""
    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError(f"{path}: no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate) if stream.average_rate else None
        frames, times = [], []
        for i, frame in enumerate(container.decode(stream)):
            if frame.time is not None:
                times.append(frame.time)
            elif rate:
                times.append(i / rate)
            else:
                raise ValueError(f"{path}: frame {i} has no timestamp and the stream no frame rate")
            frames.append(frame)
    if not frames:
        raise ValueError(f"{path}: no decodable frames")
    order = np.argsort(np.asarray(times), kind="stable")  # presentation order
    t = np.asarray(times, dtype=np.float64)[order]
    return [frames[i] for i in order], t - t[0]


def variant_lengths(frames: int, variants: int, min_frames: int) -> list[int]:
    """Frame counts of a source's variants: `variants` values from min(min_frames, frames) to
    `frames`, evenly spread, distinct, longest last."""
    low = min(min_frames, frames)
    return sorted({int(round(n)) for n in np.linspace(low, frames, variants)})


def reencode(src: Path, dst: Path, fps: float = 12.0, height: int = 240, frames_kept: int | None = None,
             crf: int = 32) -> dict:
    """Write `dst` (VP9 WebM, `fps` by timestamp, `height` px high, the first `frames_kept` of those
    frames or all, quality `crf`); -> a summary dict."""
    frames, times = decode_with_times(src)
    keep = select_by_timestamp(times, fps)[:frames_kept]  # (K,) indices into frames
    width, height = output_size(frames[0].width, frames[0].height, height)
    rate = Fraction(fps).limit_denominator(1001)
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".part")
    with av.open(str(tmp), mode="w", format="webm") as out:
        stream = out.add_stream(CODEC, rate=rate, options={**ENCODER_OPTIONS, "crf": str(crf)})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.time_base = 1 / rate
        for k, i in enumerate(keep):
            frame = frames[i].reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
            frame.pts, frame.time_base = k, 1 / rate
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    tmp.replace(dst)
    return {"src": str(src), "video_path": str(dst), "frames": len(keep), "width": width, "height": height,
            "source_frames": len(frames), "duration_s": round(float(times[-1]), 3)}


def write_csv(path: Path, clips: list[dict], dataset: str = "ssv2") -> None:
    """CSV with columns video_path, dataset, video_id (the benchmark's input). Paths are relative to
    the CSV's folder where the clips lie under it, so the set can be moved (the Dataset resolves them)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video_path", "dataset", "video_id"])
        for clip in clips:
            video = Path(clip["video_path"]).resolve()
            where = video.relative_to(path.parent.resolve()) if video.is_relative_to(path.parent.resolve()) else video
            writer.writerow([where, dataset, video.stem])


def _variants(src: Path, args: argparse.Namespace) -> list[dict]:
    """The clips of one source: the whole clip, or `args.variants` lengths of it."""
    if args.variants == 1:
        return [reencode(src, args.out / f"{src.stem}.webm", args.fps, args.height, crf=args.crf)]
    whole = reencode(src, args.out / f"{src.stem}_v0.webm", args.fps, args.height, crf=args.crf)
    lengths = variant_lengths(whole["frames"], args.variants, args.min_frames)[:-1]  # the last is `whole`
    return [reencode(src, args.out / f"{src.stem}_v{j + 1}.webm", args.fps, args.height, n, args.crf)
            for j, n in enumerate(lengths)] + [whole]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sources", nargs="+", type=Path, metavar="SRC", help="clips to re-encode")
    parser.add_argument("--out", type=Path, required=True, help="folder for the .webm files")
    parser.add_argument("--csv", type=Path, default=None, help="CSV to write (default <out>/ssv2_like.csv)")
    parser.add_argument("--fps", type=float, default=12.0, help="output frame rate (SSV2: 12)")
    parser.add_argument("--height", type=int, default=240, help="output height in pixels (SSV2: 240)")
    parser.add_argument("--dataset", default="ssv2", help="the CSV's dataset column (ssv2 keeps native fps)")
    parser.add_argument("--variants", type=int, default=1, help="clips of different lengths per source")
    parser.add_argument("--min_frames", type=int, default=28, help="the shortest variant (SSV2: about 28)")
    parser.add_argument("--crf", type=int, default=int(ENCODER_OPTIONS["crf"]), help="VP9 quality (higher: smaller)")
    args = parser.parse_args(argv)
    if args.height < 2 or args.height % 2:
        parser.error(f"--height must be an even number >= 2, got {args.height}")
    if not args.fps > 0:
        parser.error(f"--fps must be positive, got {args.fps}")
    if args.variants < 1 or args.min_frames < 2:
        parser.error("--variants must be >= 1 and --min_frames >= 2")
    stems = [src.stem for src in args.sources]
    clashes = sorted({s for s in stems if stems.count(s) > 1})
    if clashes:
        parser.error(f"sources share output names {clashes}; rename or re-encode them in separate runs")

    clips, failed = [], 0
    for src in args.sources:
        try:
            made = _variants(src, args)
        except (av.FFmpegError, OSError, ValueError) as exc:
            failed += 1
            print(f"skipped {src}: {type(exc).__name__}: {exc}", file=sys.stderr)
            continue
        clips += made
        for clip in made:
            print(f"{clip['video_path']}: {clip['frames']} frames {clip['width']}x{clip['height']} "
                  f"(from {clip['source_frames']} frames, {clip['duration_s']} s)")
    if not clips:
        print("no clip could be re-encoded", file=sys.stderr)
        return 1
    csv_path = args.csv or args.out / "ssv2_like.csv"
    write_csv(csv_path, clips, args.dataset)
    print(f"wrote {csv_path} ({len(clips)} videos)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
