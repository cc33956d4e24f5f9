"""Visualisations: trail GIFs (REFERENCE.md 12.1) and debug cluster overlays (12.2), drawn with PIL.

Differences from the research renderer (REFERENCE.md 14.23): only the visible window of the
trail (the last 4 segments) is drawn, so the cost is O(T N) instead of O(T^2 N); the GIF plays at
the clip's real frame rate (frame durations from its timestamps); the colour map is computed
here (matplotlib's jet formula), so no matplotlib is needed and all-zero ids do not divide by zero.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

TRAIL_SEGMENTS = 4  # segments shown behind each point (research: alpha is 0 from 5 frames back)


def jet(x: np.ndarray) -> np.ndarray:
    """The jet colour map: values (N,) in [0, 1] -> (N, 3) uint8 RGB (dark blue -> red)."""
    x = np.clip(np.nan_to_num(np.asarray(x, dtype=np.float64)), 0.0, 1.0)[:, None]
    rgb = np.clip(1.5 - np.abs(4.0 * x - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)  # (N, 3)
    return np.round(rgb * 255).astype(np.uint8)


def entity_colours(obj_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """One colour per point from its entity id: jet(id / max id), all ids 0 -> jet(0)."""
    ids = np.asarray(obj_ids, dtype=np.float64)
    top = ids.max() if ids.size else 0.0
    scaled = ids / top if top > 0 else np.zeros_like(ids)
    return [tuple(int(c) for c in row) for row in jet(scaled)]


def frame_durations_ms(frame_times: np.ndarray, default_ms: float = 100.0) -> list[int]:
    """Per-frame display time (ms) from presentation times (T,) seconds; last frame repeats the median."""
    times = np.asarray(frame_times, dtype=np.float64)
    if times.size < 2:
        return [int(round(default_ms))] * int(times.size)
    gaps = np.diff(times) * 1000.0
    gaps = np.append(gaps, np.median(gaps))
    return [max(int(round(g)), 10) for g in gaps]


def render_trails(
    frames: np.ndarray, tracks: np.ndarray, visibility: np.ndarray, obj_ids: np.ndarray
) -> list[Image.Image]:
    """Draw fading trails, dots and entity ids.

    frames (T, H, W, 3) uint8; tracks (T, N, 2) float (x, y) pixels; visibility (T, N) bool;
    obj_ids (N,) int. A point is drawn at and after frame t while it is visible at some frame >= t.
    Returns T RGB images.
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


def _save_atomic(path: Path, save) -> None:
    """Write through `save(tmp_path)` to a temporary name in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        save(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_trail_gif(
    path: str | os.PathLike,
    frames: np.ndarray,
    tracks: np.ndarray,
    visibility: np.ndarray,
    obj_ids: np.ndarray,
    frame_times: np.ndarray,
) -> None:
    """Render `render_trails` and save an infinitely looping GIF at the clip's real frame rate (atomic)."""
    images = render_trails(frames, tracks, visibility, obj_ids)
    durations = frame_durations_ms(frame_times)
    _save_atomic(
        Path(path),
        lambda tmp: images[0].save(
            tmp, format="GIF", save_all=True, append_images=images[1:], duration=durations, loop=0
        ),
    )


def save_cluster_overlay(
    path: str | os.PathLike, frame: np.ndarray, labels: np.ndarray, points: np.ndarray, point_ids: np.ndarray
) -> None:
    """Debug PNG (atomic): the frame beside a 50 % blend with its coloured label map and the points.

    frame (H, W, 3) uint8; labels (P, Q) int cluster ids (upscaled nearest to H x W); points (M, 2)
    (x, y) pixels sampled in this frame, with their entity ids point_ids (M,).
    """
    h, w = frame.shape[:2]
    labels = np.asarray(labels)
    top = max(int(labels.max()), 1)
    colour_map = jet(labels.reshape(-1) / top).reshape(*labels.shape, 3)
    colour = Image.fromarray(colour_map).resize((w, h), Image.NEAREST)
    original = Image.fromarray(np.ascontiguousarray(frame)).convert("RGB")
    blended = Image.blend(original, colour, 0.5)
    draw = ImageDraw.Draw(blended)
    for (x, y), c in zip(np.asarray(points).reshape(-1, 2), entity_colours(point_ids)):
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c, outline=(255, 255, 255))
    canvas = Image.new("RGB", (2 * w, h))
    canvas.paste(original, (0, 0))
    canvas.paste(blended, (w, 0))
    _save_atomic(Path(path), lambda tmp: canvas.save(tmp, format="PNG"))
