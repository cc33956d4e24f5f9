"""Per-video track statistics: a few numbers that say whether a video's tracks are any good, computed
from the CPU tensors the writer already holds (or from a track file) and kept in the video's ledger
record (`stats`, a dict name -> number or None).

    stats = track_stats(tracks, visibility, obj_ids, query_frames, clip_size)

`STATS` names every statistic with its meaning (the README's table repeats it); `step_s` and `wait_s`
are the run's clocks, filled in by the writer (None when computed from a file afterwards).

A point's displacement is the largest distance (px) between its position at its query frame and its
position at any frame where it is visible; a point that is never visible away from its query frame
has displacement 0. Quantiles interpolate linearly between order statistics (numpy's default).
Computed with numpy on the CPU (faster than torch's per-op overhead at these sizes).
"""
from __future__ import annotations

import math

import numpy as np

STATIC_PX = 1.0  # a point whose displacement is under this many pixels is static
DIGITS = 4  # decimals kept of a fraction or a quantity in pixels or seconds (keeps ledger lines short)

# name -> what it means (units in brackets)
STATS: dict[str, str] = {
    "frames": "T, the tracked frames",
    "points": "N, the tracked points",
    "entities": "distinct entity ids among the points",
    "points_per_entity_min": "fewest points of one entity",
    "points_per_entity_median": "median points per entity",
    "points_per_entity_max": "most points of one entity",
    "largest_entity_share": "points of the largest entity / N",
    "visible": "fraction of the T x N (frame, point) pairs that are visible",
    "visible_half": "fraction of points visible in at least half of the T frames",
    "displacement_median_px": "median over points of the displacement [px]",
    "displacement_p95_px": "95th percentile over points of the displacement [px]",
    "displacement_median_rel": "displacement_median_px / the clip's diagonal",
    "displacement_p95_rel": "displacement_p95_px / the clip's diagonal",
    "static": f"fraction of points whose displacement is under {STATIC_PX:g} px",
    "step_s": "compute seconds of the video's batch (features to tracking) / its videos [s]",
    "wait_s": "seconds the step waited for the batch's decoded videos / its videos [s]",
}


def _round(value: float) -> float:
    return round(float(value), DIGITS)


def track_stats(tracks, visibility, obj_ids, query_frames, clip_size: tuple[int, int] | None) -> dict:
    """The statistics of `STATS` (timings None) of one video.

    tracks (T, N, 2) float (x, y) px; visibility (T, N) bool; obj_ids (N,) int; query_frames (N,) int
    (indices into T): CPU tensors or arrays. clip_size (H, W) px of the frames the tracks are in, or
    None (research files): the `_rel` statistics are then None. T, N >= 1.
    """
    xy = np.asarray(tracks, dtype=np.float32)
    vis = np.asarray(visibility, dtype=bool)
    t, n = xy.shape[:2]
    per_entity = np.unique(np.asarray(obj_ids), return_counts=True)[1]  # (E,) points of each entity
    visible_frames = vis.sum(0)  # (N,)
    offset = xy - xy[np.asarray(query_frames, dtype=np.int64), np.arange(n)]  # (T, N, 2) from the query position
    squared = np.where(vis, offset[..., 0] ** 2 + offset[..., 1] ** 2, 0.0)  # (T, N) px^2, 0 where hidden
    disp = np.sqrt(squared.max(0).astype(np.float64))  # (N,) px
    median_px, p95_px = np.quantile(disp, (0.5, 0.95))
    diagonal = math.hypot(*clip_size) if clip_size else None
    return {
        "frames": int(t),
        "points": int(n),
        "entities": len(per_entity),
        "points_per_entity_min": int(per_entity.min()),
        "points_per_entity_median": _round(np.median(per_entity)),
        "points_per_entity_max": int(per_entity.max()),
        "largest_entity_share": _round(per_entity.max() / n),
        "visible": _round(visible_frames.sum() / (t * n)),
        "visible_half": _round((2 * visible_frames >= t).sum() / n),
        "displacement_median_px": _round(median_px),
        "displacement_p95_px": _round(p95_px),
        "displacement_median_rel": None if diagonal is None else _round(median_px / diagonal),
        "displacement_p95_rel": None if diagonal is None else _round(p95_px / diagonal),
        "static": _round((disp < STATIC_PX).sum() / n),
        "step_s": None,
        "wait_s": None,
    }


def file_stats(track_file) -> dict:
    """`track_stats` of a loaded `semtrack.trackfile.TrackFile` (clip size from its metadata, if recorded)."""
    size = track_file.meta.get("clip_size")
    return track_stats(track_file.tracks, track_file.visibility, track_file.obj_ids, track_file.query_frames,
                       tuple(size) if size else None)
