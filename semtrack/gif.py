"""Visualisations: trail GIFs (REFERENCE.md 12.1) and debug cluster overlays (12.2), drawn with PIL.

Differences from the research renderer (REFERENCE.md 14.23): only the visible window of the
trail (the last 4 segments) is drawn, so the cost is O(T N) instead of O(T^2 N); the GIF plays at
the clip's real frame rate (frame durations from its timestamps); entities are coloured from a fixed
categorical palette indexed by id (`ENTITY_PALETTE`), so an id keeps its colour whatever the other
ids of the video are; every frame of a GIF shares one palette (no dithering), which keeps the files
small and the entity colours exact; `max_width` optionally scales frames and tracks down together.
"""
from __future__ import annotations

import numbers
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from semtrack.util import atomic_write

TRAIL_SEGMENTS = 4  # segments shown behind each point (research: alpha is 0 from 5 frames back)

# 32 categorical colours (RGB). Made by greedy farthest-point selection (Glasbey's method) in CIELAB
# over the RGB grid of step 15, restricted to lightness L* in [30, 90] and chroma >= 25, starting
# from the most saturated colour: any two differ by CIE76 Delta E >= 32, consecutive ones by >= 35.
ENTITY_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 255), (0, 255, 0), (255, 0, 15), (45, 195, 240),
    (255, 105, 210), (105, 105, 0), (30, 120, 255), (90, 240, 165),
    (135, 30, 45), (255, 225, 0), (255, 195, 180), (75, 75, 120),
    (240, 135, 0), (0, 105, 90), (240, 0, 255), (105, 180, 0),
    (255, 0, 105), (210, 180, 255), (120, 15, 165), (225, 225, 135),
    (255, 120, 105), (135, 30, 105), (0, 135, 60), (165, 240, 225),
    (150, 105, 75), (195, 120, 150), (0, 255, 120), (165, 60, 0),
    (135, 165, 120), (90, 75, 255), (195, 120, 255), (0, 150, 240),
)
GIF_COLOURS = 128  # shared GIF palette: ENTITY_PALETTE first, the rest quantised from the frames
PALETTE_SAMPLE_FRAMES = 3  # frames (first, middle, last) the content colours are quantised from


def entity_colours(obj_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """One RGB colour per point: `ENTITY_PALETTE[id % 32]`. obj_ids (N,) int -> N (r, g, b) tuples."""
    ids = np.mod(np.asarray(obj_ids, dtype=np.int64).reshape(-1), len(ENTITY_PALETTE))
    return [ENTITY_PALETTE[i] for i in ids]


def label_colours(labels: np.ndarray) -> np.ndarray:
    """Colour a label map with `ENTITY_PALETTE` (id % 32): labels (...) int -> (..., 3) uint8 RGB."""
    table = np.asarray(ENTITY_PALETTE, dtype=np.uint8)  # (32, 3)
    return table[np.mod(np.asarray(labels, dtype=np.int64), len(table))]


def frame_durations_ms(frame_times: np.ndarray, default_ms: float = 100.0) -> list[int]:
    """Per-frame display time (ms) from presentation times (T,) seconds; last frame repeats the median."""
    times = np.asarray(frame_times, dtype=np.float64)
    if times.size < 2:
        return [int(round(default_ms))] * int(times.size)
    gaps = np.diff(times) * 1000.0
    gaps = np.append(gaps, np.median(gaps))
    return [max(int(round(g)), 10) for g in gaps]


# ----------------------------------------------------------------------------- scaling


def fitted_size(width: int, height: int, max_width: int | None) -> tuple[int, int]:
    """(width, height) scaled down to at most `max_width` pixels wide, aspect kept (height rounded,
    at least 1). `max_width=None` or a frame already narrow enough: unchanged (never upscaled)."""
    if max_width is None:
        return width, height
    if isinstance(max_width, bool) or not isinstance(max_width, numbers.Integral) or max_width < 1:
        raise ValueError(f"max_width must be None or a positive int (pixels), got {max_width!r}")
    if width <= max_width:
        return width, height
    return int(max_width), max(1, int(round(height * max_width / width)))


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size[1], size[0], 3) uint8 (PIL antialiased bilinear); same size: as is."""
    if (frames.shape[2], frames.shape[1]) == tuple(size):
        return frames
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize(size, Image.BILINEAR)) for f in frames])


def scale_points(xy: np.ndarray, source_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(x, y) pixel coordinates (..., 2) from an image of `source_size` (W, H) to one of `size`
    (W', H'), pixel centres aligned: x' = (x + 0.5) W' / W - 0.5 (likewise y)."""
    scale = np.array([size[0] / source_size[0], size[1] / source_size[1]])
    return (np.asarray(xy, dtype=np.float64) + 0.5) * scale - 0.5


# ----------------------------------------------------------------------------- drawing


def render_trails(
    frames: np.ndarray, tracks: np.ndarray, visibility: np.ndarray, obj_ids: np.ndarray
) -> list[Image.Image]:
    """Draw fading trails, dots and entity ids.

    frames (T, H, W, 3) uint8; tracks (T, N, 2) float (x, y) pixels; visibility (T, N) bool;
    obj_ids (N,) int. A point is drawn at and after frame t while it is visible at some frame >= t.
    Dots are filled radius-2 discs in exactly the entity colour. Returns T RGB images.
    """
    t_len, n = visibility.shape
    if frames.shape[0] != t_len or tracks.shape[:2] != (t_len, n):
        raise ValueError(
            f"frames {frames.shape}, tracks {tracks.shape} and visibility {visibility.shape} disagree on T or N"
        )
    colours = entity_colours(obj_ids)
    alive = np.flip(np.logical_or.accumulate(np.flip(np.asarray(visibility, bool), 0), axis=0), 0)  # (T, N)
    finite = np.isfinite(tracks).all(axis=-1)  # (T, N)
    font = ImageFont.load_default()
    out = []
    for i in range(t_len):
        image = Image.fromarray(np.ascontiguousarray(frames[i])).convert("RGB")
        for t in range(max(0, i - TRAIL_SEGMENTS), i):
            alpha = max(1.0 - 0.9 * (i - t) / ((i + 1) * 0.99), 0.1)
            overlay = image.copy()
            draw = ImageDraw.Draw(overlay)
            for j in np.flatnonzero(alive[t] & finite[t] & finite[t + 1]):
                start = tuple(int(round(v)) for v in tracks[t, j])
                end = tuple(int(round(v)) for v in tracks[t + 1, j])
                draw.line([start, end], fill=colours[j], width=1)
            image = Image.blend(image, overlay, alpha)
        draw = ImageDraw.Draw(image)
        for j in np.flatnonzero(alive[i] & finite[i]):
            x, y = (int(round(v)) for v in tracks[i, j])
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colours[j])
            draw.text((x, y - 3), str(int(obj_ids[j])), fill=colours[j], font=font, anchor="ls")
        out.append(image)
    return out


# ----------------------------------------------------------------------------- shared palette


def shared_palette(images: list[Image.Image]) -> list[tuple[int, int, int]]:
    """The GIF palette for all frames: `ENTITY_PALETTE` followed by up to GIF_COLOURS - 32 colours
    quantised (fast octree) from PALETTE_SAMPLE_FRAMES evenly spaced images, half resolution."""
    picks = np.unique(np.linspace(0, len(images) - 1, PALETTE_SAMPLE_FRAMES).round().astype(int))
    samples = [images[i].reduce(2) for i in picks]
    montage = Image.new("RGB", (max(s.width for s in samples), sum(s.height for s in samples)))
    top = 0
    for s in samples:
        montage.paste(s, (0, top))
        top += s.height
    content = montage.quantize(GIF_COLOURS - len(ENTITY_PALETTE), method=Image.Quantize.FASTOCTREE)
    rgb = np.asarray(content.getpalette(), dtype=np.uint8).reshape(-1, 3)
    used = sorted(index for _, index in content.getcolors())
    return list(ENTITY_PALETTE) + [tuple(int(c) for c in rgb[i]) for i in used]


def _pack(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) uint8 -> (...) int64 0xRRGGBB."""
    rgb = rgb.astype(np.int64)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def to_palette(image: Image.Image, palette: list[tuple[int, int, int]]) -> Image.Image:
    """RGB image -> P image over `palette` (at most 256 colours): nearest colour, no dithering, and
    every pixel that equals one of the first 32 entries (`ENTITY_PALETTE`) gets exactly that entry
    (PIL's nearest-colour cache can confuse colours a few levels apart)."""
    flat = [c for rgb in palette for c in rgb]
    template = Image.new("P", (1, 1))
    template.putpalette(flat)
    indexed = image.quantize(palette=template, dither=Image.Dither.NONE)
    indices = np.array(indexed, dtype=np.uint8)  # (H, W)
    entity = _pack(np.asarray(ENTITY_PALETTE, dtype=np.uint8))  # (32,)
    order = np.argsort(entity)
    packed = _pack(np.asarray(image))
    exact = np.isin(packed, entity)
    indices[exact] = order[np.searchsorted(entity[order], packed[exact])]
    indexed.frombytes(indices.tobytes())
    return indexed


# ----------------------------------------------------------------------------- files


def save_trail_gif(
    path: str | os.PathLike,
    frames: np.ndarray,
    tracks: np.ndarray,
    visibility: np.ndarray,
    obj_ids: np.ndarray,
    frame_times: np.ndarray,
    max_width: int | None = None,
) -> None:
    """Save `render_trails` as an infinitely looping GIF at the clip's real frame rate (atomic).

    frames (T, H, W, 3) uint8; tracks (T, N, 2) (x, y) pixels of those frames; visibility (T, N);
    obj_ids (N,); frame_times (T,) seconds. `max_width` (pixels, None = full size) scales frames and
    tracks down together before drawing, so dots and text keep their pixel size. All frames share
    one GIF_COLOURS palette (no dithering); dots keep their exact entity colour.
    """
    frames = np.asarray(frames)
    source = (frames.shape[2], frames.shape[1])
    size = fitted_size(*source, max_width)
    tracks = scale_points(tracks, source, size) if size != source else np.asarray(tracks)
    images = render_trails(resize_frames(frames, size), tracks, visibility, obj_ids)
    palette = shared_palette(images)
    indexed = [to_palette(im, palette) for im in images]
    durations = frame_durations_ms(frame_times)
    with atomic_write(path) as tmp:  # optimize=False: PIL's transparent "unchanged" pixels speckle video
        indexed[0].save(tmp, format="GIF", save_all=True, append_images=indexed[1:], duration=durations, loop=0,
                        optimize=False)


def save_cluster_overlay(
    path: str | os.PathLike,
    frame: np.ndarray,
    labels: np.ndarray,
    points: np.ndarray,
    point_ids: np.ndarray,
    max_width: int | None = None,
) -> None:
    """Debug PNG (atomic): the frame beside a 50 % blend with its coloured label map and the points.

    frame (H, W, 3) uint8; labels (P, Q) int cluster ids (coloured by `label_colours`, upscaled
    nearest to the frame); points (M, 2) (x, y) pixels sampled in this frame, with their entity ids
    point_ids (M,). `max_width` (pixels, None = full size) scales each half down, points with it.
    """
    frame = np.asarray(frame)
    source = (frame.shape[1], frame.shape[0])
    w, h = fitted_size(*source, max_width)
    points = scale_points(np.asarray(points).reshape(-1, 2), source, (w, h))
    colour = Image.fromarray(label_colours(labels)).resize((w, h), Image.NEAREST)
    original = Image.fromarray(resize_frames(frame[None], (w, h))[0]).convert("RGB")
    blended = Image.blend(original, colour, 0.5)
    draw = ImageDraw.Draw(blended)
    for (x, y), c in zip(points, entity_colours(point_ids)):
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c, outline=(255, 255, 255))
    canvas = Image.new("RGB", (2 * w, h))
    canvas.paste(original, (0, 0))
    canvas.paste(blended, (w, 0))
    with atomic_write(path) as tmp:
        canvas.save(tmp, format="PNG")
