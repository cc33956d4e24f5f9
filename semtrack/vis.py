"""`semtrack-vis`: the trail GIF of an existing track pickle.

    semtrack-vis PICKLE [--video PATH] [--out GIF] [--max_width W|none]   (also: python -m semtrack.vis ...)

Reads PICKLE (`semtrack.trackfile.load_tracks`), decodes exactly the frames its tracks cover from the
video it was extracted from (`meta["video_path"]`, or `--video`): the frames at the source timestamps
recorded in `meta["frame_times"]`, or, for a research pickle (no metadata, so `--video` is needed),
the research training rule `linspace(0, n - 1, T)` over the n decoded frames. Tracks are in the
pixels of the clip as extracted (`meta["clip_size"]`); a video of another size gets them scaled.
Writes the GIF (`semtrack.gif.save_trail_gif`, the look of `--make_vis`) to `--out`, by default
`<pickle name>.gif` in the current folder, and prints one line saying what it wrote.

Exit status: 0 written; 1 the GIF could not be written; 2 a missing or invalid pickle or video, or
a bad option (one line on stderr).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from semtrack.gif import DEFAULT_MAX_WIDTH, fitted_size, save_trail_gif, scale_points
from semtrack.trackfile import TrackFileError, load_tracks
from semtrack.util import one_line
from semtrack.video import TrackedFramePlan, decode_video


class VisError(Exception):
    """Why the GIF cannot be drawn (one line)."""


def _max_width(text: str) -> int | None:
    if text.lower() in ("none", "null"):
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive number of pixels or 'none', got {text!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="semtrack-vis", description=__doc__.split("\n\n")[0])
    parser.add_argument("pickle", type=Path, help="a track pickle (<dataset>/feat_dump/<video_id>.pkl)")
    parser.add_argument("--video", type=Path, help="the video the tracks were made from (default: the path the "
                                                   "pickle records; needed for research pickles)")
    parser.add_argument("--out", type=Path, help="the GIF to write (default: <pickle name>.gif here)")
    parser.add_argument("--max_width", type=_max_width, default=DEFAULT_MAX_WIDTH, metavar="W|none",
                        help=f"scale frames down to at most W pixels wide ('none': full size) "
                             f"(default: {DEFAULT_MAX_WIDTH})")
    return parser.parse_args(argv)


def tracked_frames(video: str, meta: dict, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Decode the `num_frames` frames a pickle's tracks cover -> (frames (T, H, W, 3) uint8, their
    source times (T,) s). By `meta["frame_times"]` when recorded, else by the research rule."""
    times = meta.get("frame_times")
    if times is None:
        print("note: the pickle records no frame times: frames chosen with the research rule "
              "linspace(0, n - 1, T), which can be off by a few frames", file=sys.stderr)
    decoded, decoder, error = decode_video(video, TrackedFramePlan.of(times, num_frames))
    if decoded is None:
        raise VisError(f"cannot decode {video} ({decoder}): {error}")
    return decoded.frames, np.asarray(decoded.times, dtype=np.float64)


def draw(pickle: Path, video: Path | None, out: Path, max_width: int | None) -> str:
    """Write the GIF of `pickle` to `out`; -> the line to print. `VisError` for a bad pickle or video."""
    try:
        tf = load_tracks(pickle)
    except TrackFileError as exc:
        raise VisError(str(exc)) from None
    source = str(video) if video is not None else tf.meta.get("video_path")
    if not source:
        raise VisError(f"{pickle}: no video path recorded (a research pickle?): pass --video")
    frames, times = tracked_frames(source, tf.meta, tf.num_frames)
    tracks = tf.tracks.numpy()  # (T, N, 2) float32 pixels of the clip as extracted
    height, width = frames.shape[1:3]
    clip = tf.meta.get("clip_size")  # [H, W]
    if clip is not None and (clip[0], clip[1]) != (height, width):
        tracks = scale_points(tracks, (clip[1], clip[0]), (width, height))
    save_trail_gif(out, frames, tracks, tf.visibility.numpy(), tf.obj_ids.numpy(), times, max_width)
    size = fitted_size(width, height, max_width)
    return f"{out}: {tf.num_frames} frames, {size[0]}x{size[1]}, {out.stat().st_size} bytes (video {source})"


def main(argv: list[str] | None = None) -> int:
    """`semtrack-vis PICKLE [--video PATH] [--out GIF] [--max_width W|none]`."""
    args = parse_args(argv)
    out = args.out if args.out is not None else Path(args.pickle.name).with_suffix(".gif")
    try:
        print(draw(args.pickle, args.video, out, args.max_width))
    except VisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: cannot write {out}: {one_line(exc)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
