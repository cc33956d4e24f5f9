"""Trail GIFs and cluster overlays (semtrack.gif): the look kept from the previous renderer, the
deliberate changes (outlined ids, counter, default width), palette, sizes, timing, exact colours,
atomic files.

`tests/data/gif_reference_ad30ca2.npz` holds what the previous renderer (semtrack/gif.py at commit
ad30ca2) drew on `reference_input()`: `delta`, its RGB frames before the GIF palette (trails, dots
and ids) minus the input frames, and `gif_error`, the mean absolute difference of its GIF's frames
from those RGB frames outside the ids and dots. Recorded with

    git show ad30ca2:semtrack/gif.py > /tmp/gif_ad30ca2.py
    python tests/test_gif.py --record /tmp/gif_ad30ca2.py
"""
from __future__ import annotations

import importlib.util
import io
import os
import pickle
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules.video import VideoCSVDataset  # noqa: E402
from semtrack.gif import (  # noqa: E402
    BLACK,
    DEFAULT_MAX_WIDTH,
    ENTITY_PALETTE,
    FIXED_COLOURS,
    GIF_COLOURS,
    WHITE,
    _rasterise,
    entity_colours,
    fitted_size,
    frame_durations_ms,
    gif_bytes,
    label_colours,
    outline_index,
    render_indexed,
    save_cluster_overlay,
    save_trail_gif,
    scale_points,
    trail_video,
)

REFERENCE = Path(__file__).resolve().parent / "data" / "gif_reference_ad30ca2.npz"
MIN_PAIR_DELTA_E = 32.0  # CIE76 distance between any two palette colours (stated in semtrack.gif)
MIN_ADJACENT_DELTA_E = 35.0  # between the colours of ids k and k + 1
BEAR_GIF_MAX_BYTES = 2_000_000  # 8 frames, 854x480, 256 points (one per-frame adaptive palette each: 2.8 MB)
BEAR_GIF_640_MAX_BYTES = 1_100_000
BEAR_GIF_320_MAX_BYTES = 500_000


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """(..., 3) sRGB 0..255 -> (..., 3) CIELAB (D65)."""
    c = np.asarray(rgb, np.float64) / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    to_xyz = np.array([[0.4124564, 0.3575761, 0.1804375], [0.2126729, 0.7151522, 0.0721750],
                       [0.0193339, 0.1191920, 0.9503041]])
    xyz = linear @ to_xyz.T / np.array([0.95047, 1.0, 1.08883])
    f = np.where(xyz > (6 / 29) ** 3, np.cbrt(xyz), xyz / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def gif_frames(path_or_bytes) -> tuple[list[np.ndarray], list[int], dict]:
    """Every frame of a GIF (a path or its bytes) as (H, W, 3) uint8, each frame's duration (ms), and its info."""
    source = io.BytesIO(path_or_bytes) if isinstance(path_or_bytes, bytes) else path_or_bytes
    frames, durations = [], []
    with Image.open(source) as gif:
        info = dict(gif.info)
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
            frames.append(np.asarray(gif.convert("RGB")))
    return frames, durations, info


def reference_input():
    """A fixed clip, made by formulas (no decoder, no random numbers): frames (8, 120, 200, 3) uint8,
    tracks (8, 12, 2) moving up and to the right (trails below the dots, ids above them), visibility
    (8, 12), ids (12,) and times (8,) s. Point 3 is invisible from frame 4 on (not drawn there), point 5
    hidden at frame 2 only (still drawn), point 7 has no position at frame 3."""
    t_len, width, height = 8, 200, 120
    t = np.arange(t_len)[:, None, None]
    y, x = np.mgrid[0:height, 0:width]
    frames = np.stack([  # smooth colours drifting to the right: a few hundred distinct colours per frame
        np.broadcast_to(60 + x * 120 // (width - 1), (t_len, height, width)),
        np.broadcast_to(80 + y * 100 // (height - 1), (t_len, height, width)),
        (110 + 50 * np.sin((x[None] + 6 * t) / 17.0) * np.cos(y[None] / 13.0)).astype(np.int64),
    ], axis=-1).astype(np.uint8)
    gx, gy = np.meshgrid(np.linspace(20, 170, 4), np.linspace(60, 100, 3))
    start = np.stack([gx.ravel(), gy.ravel()], axis=-1)  # (12, 2)
    steps = np.arange(t_len)[:, None]
    tracks = np.stack([start[:, 0] + 2.6 * steps + 3.0 * np.sin(steps / 2.0 + start[:, 1] / 30.0),
                       start[:, 1] - 4.3 * steps], axis=-1)  # (8, 12, 2)
    visibility = np.ones((t_len, 12), dtype=bool)
    visibility[4:, 3] = False
    visibility[2, 5] = False
    tracks[3, 7] = np.nan
    ids = np.arange(12) * 3 % 32
    return frames, tracks, visibility, ids, np.arange(t_len) / 10.0


def drawn_points(tracks: np.ndarray, visibility: np.ndarray, i: int) -> list[tuple[int, int, int]]:
    """(j, x, y) of the points drawn in frame i (visible at i or later, position known), centres rounded."""
    alive = np.flip(np.logical_or.accumulate(np.flip(visibility, 0), axis=0), 0)
    return [(j, int(round(x)), int(round(y))) for j, (x, y) in enumerate(tracks[i])
            if alive[i, j] and np.isfinite(x) and np.isfinite(y)]


def dot_pixels(x: int, y: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the radius-2 dot both renderers draw: PIL's filled ellipse over [x-2, y-2, x+2, y+2]."""
    canvas = Image.new("L", (5, 5), 0)
    ImageDraw.Draw(canvas).ellipse([0, 0, 4, 4], fill=1)
    dy, dx = np.nonzero(np.asarray(canvas))
    return dy + y - 2, dx + x - 2


def text_mask(shape, tracks, visibility, ids, i: int, top: int, bottom: int, char_px: int) -> np.ndarray:
    """(H, W) bool: a box around each drawn point's id: rows y - top .. y - bottom, columns x - 2 ..
    x + char_px * len(id) + 2."""
    mask = np.zeros(shape[:2], dtype=bool)
    for j, x, y in drawn_points(tracks, visibility, i):
        mask[max(0, y - top): max(0, y - bottom + 1), max(0, x - 2): max(0, x + char_px * len(str(ids[j])) + 3)] = True
    return mask


OLD_TEXT = dict(top=3 + 12, bottom=3 - 2, char_px=7)  # previous ids: size-10 text, baseline 3 px above the dot
NEW_TEXT = dict(top=4 + 13, bottom=4 - 1, char_px=9)  # ids now: 12 px outlined, baseline 4 px above the dot
COUNTER_BOX = (slice(0, 20), slice(0, 110))  # rows, columns the counter may use in a frame 200 px wide


@pytest.fixture(scope="module")
def reference():
    """The previous renderer's RGB frames of `reference_input()` (stored as the change it made) and its GIF's error."""
    with np.load(REFERENCE) as data:
        return (reference_input()[0] + data["delta"]).astype(np.uint8), float(data["gif_error"])


@pytest.fixture(scope="module")
def bear(tmp_path_factory, videos_dir):
    """The first 8 frames of bear.mp4 (854x480) at 10 fps: (frames (8, 480, 854, 3) uint8, times (8,) s)."""
    table = tmp_path_factory.mktemp("bear") / "bear.csv"
    table.write_text(f"video_path,dataset\n{videos_dir / 'bear.mp4'},davis\n")
    item = VideoCSVDataset(table, fps=10)[0]
    return item.frames[:8].permute(0, 2, 3, 1).numpy(), item.frame_times[:8].numpy()


def random_tracks(t_len: int, width: int, height: int, n: int = 256, seed: int = 0):
    """n points drifting across a width x height frame: tracks (T, n, 2), visibility (T, n), 16 ids."""
    rng = np.random.default_rng(seed)
    start = rng.uniform([0, 0], [width, height], size=(n, 2))
    tracks = start[None] + rng.normal(0, 4, size=(n, 2))[None] * np.arange(t_len)[:, None, None]
    return tracks, rng.random((t_len, n)) > 0.1, np.repeat(np.arange(16), n // 16)


# ------------------------------------------------------------------------------ the same look as before
def test_trails_are_the_previous_renderers_pixels(reference):
    """Trails (and the frame under them) equal the previous renderer's RGB frames exactly, everywhere
    but under its dots and ids (which it drew on top)."""
    rendered, _ = reference
    frames, tracks, visibility, ids, _ = reference_input()
    video = trail_video(frames, tracks, visibility, ids)
    assert video.shape == rendered.shape
    for i in range(len(frames)):
        covered = text_mask(rendered.shape[1:], tracks, visibility, ids, i, **OLD_TEXT)
        for _, x, y in drawn_points(tracks, visibility, i):
            covered[dot_pixels(x, y)] = True
        np.testing.assert_array_equal(video[i][~covered], rendered[i][~covered], err_msg=f"frame {i}")
    assert (video != frames).any(axis=-1).sum() > 200  # there are trails to compare


def test_dots_are_the_previous_renderers_dots(reference):
    rendered, _ = reference
    frames, tracks, visibility, ids, times = reference_input()
    images, _, _ = gif_frames(gif_bytes(frames, tracks, visibility, ids, times))
    compared = 0
    for i, image in enumerate(images):
        for j, x, y in drawn_points(tracks, visibility, i):
            rows, cols = dot_pixels(x, y)
            np.testing.assert_array_equal(image[rows, cols], rendered[i][rows, cols])
            assert (image[rows, cols] == ENTITY_PALETTE[ids[j] % 32]).all()
            compared += 1
    assert compared == 8 * 12 - 4 - 1  # point 3 gone from frame 4 on, point 7 unplaced at frame 3


def test_palette_is_the_previous_renderers(reference):
    """Same palette rule (entity colours first, exact; the rest quantised from the frames, no dithering)
    and as faithful: the GIF's frames differ from the frames they encode (outside ids, dots and counter)
    by no more than the previous GIF did (+10 %)."""
    rendered, gif_error = reference
    frames, tracks, visibility, ids, times = reference_input()
    data = gif_bytes(frames, tracks, visibility, ids, times)
    images, _, _ = gif_frames(data)
    with Image.open(io.BytesIO(data)) as gif:
        palette = np.asarray(gif.getpalette(), dtype=np.uint8).reshape(-1, 3)
    assert len(palette) <= GIF_COLOURS
    assert [tuple(c) for c in palette[: len(FIXED_COLOURS)]] == list(FIXED_COLOURS)
    assert FIXED_COLOURS[:32] == ENTITY_PALETTE
    video = trail_video(frames, tracks, visibility, ids)
    errors = []
    for i, image in enumerate(images):
        outside = ~(text_mask(video.shape[1:], tracks, visibility, ids, i, **NEW_TEXT)
                    | text_mask(video.shape[1:], tracks, visibility, ids, i, **OLD_TEXT))
        outside[COUNTER_BOX] = False
        for _, x, y in drawn_points(tracks, visibility, i):
            outside[dot_pixels(x, y)] = False
        errors.append(np.abs(image[outside].astype(int) - video[i][outside]).mean())
    assert np.mean(errors) <= 1.1 * gif_error


# ------------------------------------------------------------------------------ what changed on purpose
def test_ids_are_outlined_in_the_contrasting_colour():
    """Changed: ids are 12 px crisp text outlined in black or white (the previous ones were ~8 px,
    antialiased, without outline, hard to read on video): every glyph pixel is the exact entity
    colour, surrounded only by glyph or outline pixels."""
    frames, tracks, visibility, ids, times = reference_input()
    images, _, _ = gif_frames(gif_bytes(frames, tracks, visibility, ids, times))
    assert {outline_index(c) for c in ENTITY_PALETTE} == {FIXED_COLOURS.index(BLACK), FIXED_COLOURS.index(WHITE)}
    checked = 0
    for i, image in enumerate(images):
        for j, x, y in drawn_points(tracks, visibility, i):
            colour = np.array(ENTITY_PALETTE[ids[j] % 32])
            outline = np.array(FIXED_COLOURS[outline_index(ENTITY_PALETTE[ids[j] % 32])])
            top, left = y - 4 - 12, x - 2
            box = image[top: y - 3, left: x + 9 * len(str(ids[j])) + 2].astype(int)  # above the dot
            glyph = (box == colour).all(-1)
            rows = np.flatnonzero(glyph.any(axis=1))
            assert glyph.sum() >= 12 and rows[-1] - rows[0] + 1 >= 8, (i, j)  # legible: >= 8 px tall
            for r, c in zip(*np.nonzero(glyph)):  # neighbours inside the frame: glyph or outline
                around = image[max(top + r - 1, 0): top + r + 2, max(left + c - 1, 0): left + c + 2].reshape(-1, 3)
                assert ((around == colour).all(-1) | (around == outline).all(-1)).all(), (i, j, r, c)
            checked += 1
    assert checked == 8 * 12 - 4 - 1


def test_every_frame_has_its_counter():
    """New: a counter (track frame index / last index, source time) in the top-left corner, white
    outlined in black; it also keeps frames distinct, so a still clip keeps all its frames."""
    t_len = 5
    frames = np.full((t_len, 60, 160, 3), 90, dtype=np.uint8)  # a still clip: only the counter changes
    tracks = np.full((t_len, 1, 2), 120.0)
    times = np.array([0.5, 0.6, 0.7, 0.8, 0.9])
    images, durations, _ = gif_frames(gif_bytes(frames, tracks, np.ones((t_len, 1), bool), np.zeros(1, np.int64),
                                                 times))
    assert len(images) == t_len and durations == frame_durations_ms(times)
    corner = [im[:20, :110].astype(int) for im in images]
    for c in corner:
        white, black = (c == WHITE).all(-1), (c == BLACK).all(-1)
        assert white.sum() >= 40 and black.sum() > white.sum()
        padded = np.pad(white | black, 1)
        for r, col in zip(*np.nonzero(white)):
            assert padded[r: r + 3, col: col + 3].all()  # every white pixel is outlined
    assert all((a != b).any() for a, b in zip(corner, corner[1:]))
    assert all((im[25:] == 90).all() for im in images)  # nothing else drawn (the point is off to the side)


def test_gifs_are_640_wide_by_default(tmp_path, bear):
    frames, times = bear
    tracks, visibility, ids = random_tracks(len(frames), 854, 480, n=32)
    assert DEFAULT_MAX_WIDTH == 640
    save_trail_gif(tmp_path / "g.gif", frames, tracks, visibility, ids, times)
    images, _, _ = gif_frames(tmp_path / "g.gif")
    assert images[0].shape == (360, 640, 3)
    frame = np.full((480, 854, 3), 200, dtype=np.uint8)
    save_cluster_overlay(tmp_path / "o.png", frame, np.zeros((2, 2), np.int64), np.zeros((0, 2)), np.zeros(0, np.int64))
    assert Image.open(tmp_path / "o.png").size == (2 * 640, 360)


# ------------------------------------------------------------------------------ palette
def test_palette_ids_get_distinct_well_separated_colours():
    k = len(ENTITY_PALETTE)
    lab = srgb_to_lab(np.array(entity_colours(np.arange(k))))
    dist = np.linalg.norm(lab[:, None] - lab[None], axis=-1)
    np.fill_diagonal(dist, np.inf)
    assert dist.min() >= MIN_PAIR_DELTA_E
    assert np.diagonal(dist, offset=1).min() >= MIN_ADJACENT_DELTA_E
    assert len(set(entity_colours(np.arange(k)))) == k


def test_an_ids_colour_does_not_depend_on_the_other_ids():
    assert entity_colours(np.array([5])) == entity_colours(np.array([0, 5, 99]))[1:2]
    assert entity_colours(np.zeros(3, dtype=np.int64)) == [ENTITY_PALETTE[0]] * 3
    k = len(ENTITY_PALETTE)
    assert entity_colours(np.array([3, 3 + k, 3 + 2 * k])) == [ENTITY_PALETTE[3]] * 3  # wraps around
    labels = np.array([[0, 1], [k + 1, 7]])
    assert label_colours(labels).tolist() == [[list(ENTITY_PALETTE[i]) for i in row] for row in [[0, 1], [1, 7]]]


# ------------------------------------------------------------------------------ timing and trails
def test_gif_durations_follow_timestamps():
    assert frame_durations_ms(np.array([0.0, 0.04, 0.08, 0.12])) == [40, 40, 40, 40]
    assert frame_durations_ms(np.array([0.0, 0.1, 0.3])) == [100, 200, 150]
    twelve = frame_durations_ms(np.arange(13) / 12)  # 83.3 ms frames in whole 10 ms ticks, no drift
    assert set(twelve) == {80, 90} and sum(twelve[:12]) == 1000
    assert np.abs(np.cumsum(twelve) - 1000 * np.arange(1, 14) / 12).max() <= 5
    assert frame_durations_ms(np.arange(5) / 120) == [20] * 5  # never below what browsers honour
    assert frame_durations_ms(np.array([1.5])) == [100]


def test_trails_show_only_the_last_four_segments():
    t_len, n = 8, 1
    frames = np.zeros((t_len, 40, 120, 3), dtype=np.uint8)
    xs = 5.0 + 14.0 * np.arange(t_len)  # one point moving right along row 20
    tracks = np.stack([xs, np.full(t_len, 20.0)], axis=-1)[:, None, :]  # (T, 1, 2)
    visibility = np.ones((t_len, n), dtype=bool)
    video = trail_video(frames, tracks, visibility, np.zeros(n, dtype=np.int64))
    last = video[-1].astype(int).sum(axis=-1)[20]  # row 20 of frame 7
    assert last[int(xs[0] + xs[1]) // 2] == 0  # segment 0->1 is 7 frames old: not drawn
    assert last[int(xs[2] + xs[3]) // 2] == 0  # 5 frames old: not drawn
    assert last[int(xs[6] + xs[5]) // 2] > 0  # the newest segment is drawn
    assert last[int(xs[3] + xs[4]) // 2] > 0  # 4 frames old: still drawn, faded
    assert last[int(xs[3] + xs[4]) // 2] < last[int(xs[6] + xs[5]) // 2]


def test_gif_frames_loop_and_per_frame_durations(tmp_path):
    t_len = 6
    frames = np.zeros((t_len, 40, 120, 3), dtype=np.uint8)
    tracks = np.stack([5.0 + 14.0 * np.arange(t_len), np.full(t_len, 20.0)], axis=-1)[:, None, :]
    times = np.array([0.0, 0.04, 0.08, 0.2, 0.24, 0.28])  # a gap: frame 2 shows for 120 ms
    save_trail_gif(tmp_path / "g.gif", frames, tracks, np.ones((t_len, 1), bool), np.zeros(1, np.int64), times)
    images, durations, info = gif_frames(tmp_path / "g.gif")
    assert len(images) == t_len and info["loop"] == 0
    assert durations == frame_durations_ms(times) == [40, 40, 120, 40, 40, 40]


# ------------------------------------------------------------------------------ real clip: size and colours
def test_bear_gif_is_small_and_keeps_frames_and_timing(tmp_path, bear):
    frames, times = bear
    tracks, visibility, ids = random_tracks(len(frames), 854, 480)
    full, default, small = tmp_path / "full.gif", tmp_path / "default.gif", tmp_path / "small.gif"
    save_trail_gif(full, frames, tracks, visibility, ids, times, max_width=None)
    save_trail_gif(default, frames, tracks, visibility, ids, times)
    save_trail_gif(small, frames, tracks, visibility, ids, times, max_width=320)
    assert full.stat().st_size < BEAR_GIF_MAX_BYTES
    assert default.stat().st_size < min(BEAR_GIF_640_MAX_BYTES, full.stat().st_size)
    assert small.stat().st_size < min(BEAR_GIF_320_MAX_BYTES, default.stat().st_size)
    for path, size in ((full, (480, 854)), (default, (360, 640)), (small, (180, 320))):
        images, durations, info = gif_frames(path)
        assert len(images) == len(frames) and info["loop"] == 0
        assert all(im.shape[:2] == size for im in images)
        assert durations == frame_durations_ms(times)
        with Image.open(path) as gif:
            assert len(gif.getpalette()) // 3 <= GIF_COLOURS


@pytest.mark.parametrize("max_width", [None, DEFAULT_MAX_WIDTH, 320])
def test_dots_keep_their_exact_entity_colour(tmp_path, bear, max_width):
    frames, times = bear
    t_len = len(frames)
    gx, gy = np.meshgrid(np.linspace(60, 780, 8), np.linspace(60, 400, 4))  # 32 points, >= 100 px apart
    start = np.stack([gx.ravel(), gy.ravel()], axis=-1)  # (32, 2)
    tracks = start[None] + np.array([3.0, 1.0]) * np.arange(t_len)[:, None, None]  # (T, 32, 2)
    ids = np.arange(32)
    path = tmp_path / "dots.gif"
    save_trail_gif(path, frames, tracks, np.ones((t_len, 32), bool), ids, times, max_width=max_width)
    images, _, _ = gif_frames(path)
    size = fitted_size(854, 480, max_width)
    centres = np.rint(scale_points(tracks, (854, 480), size)).astype(int)  # (T, 32, 2) as drawn
    expected = np.array(entity_colours(ids))  # (32, 3)
    for image, xy in zip(images, centres):
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):  # the 3x3 core of each radius-2 dot
                np.testing.assert_array_equal(image[xy[:, 1] + dy, xy[:, 0] + dx], expected)


def test_lines_are_pils_lines_even_off_the_frame():
    """The vectorised rasteriser draws PIL's width-1 line pixels, for segments inside, across and outside
    the frame, and keeps only the frame's pixels of a segment between far-away points."""
    rng = np.random.default_rng(0)
    width, height = 40, 30
    ends = rng.integers(-60, 100, size=(500, 4)).astype(float) + rng.choice([0.0, 0.5, 0.3], size=(500, 4))
    seg, pixels = _rasterise(ends[:, :2], ends[:, 2:], width, height)
    for s, (x0, y0, x1, y1) in enumerate(ends):
        canvas = Image.new("L", (width, height), 0)
        ImageDraw.Draw(canvas).line([(round(x0), round(y0)), (round(x1), round(y1))], fill=1, width=1)
        assert set(pixels[seg == s].tolist()) == set(np.flatnonzero(np.asarray(canvas)).tolist()), (x0, y0, x1, y1)
    seg, pixels = _rasterise(np.array([[-1e12, 7.0], [5e30, 9.0]]), np.array([[1e12, 7.0], [6e30, 9.0]]), width, height)
    assert seg.tolist() == [0] * width and pixels.tolist() == list(range(7 * width, 8 * width))


def test_points_far_away_or_without_position_draw_nothing_wrong():
    t_len = 4
    frames = np.zeros((t_len, 50, 80, 3), dtype=np.uint8)
    tracks = np.array([[1e9, 1e9], [np.nan, 3.0], [np.inf, -np.inf], [-5e4, 25.0]], dtype=float)[None].repeat(t_len, 0)
    tracks[:, 3, 0] += 1e5 * np.arange(t_len)  # crosses the frame between frames 0 and 1
    data = gif_bytes(frames, tracks, np.ones((t_len, 4), bool), np.arange(4), np.arange(t_len) / 10)
    images, _, _ = gif_frames(data)
    assert len(images) == t_len
    video = trail_video(frames, tracks, np.ones((t_len, 4), bool), np.arange(4))
    crossing = np.array(ENTITY_PALETTE[3])
    row = video[1, 25].astype(float)  # frame 1 shows segment 0 -> 1 of point 3 along row 25, nothing else
    np.testing.assert_allclose(row, np.broadcast_to(np.floor(_alpha(1, 0) * crossing), row.shape), atol=1)
    assert (np.delete(video[1], 25, axis=0) == 0).all() and (video[0] == 0).all()


def _alpha(i: int, t: int) -> float:
    return max(1.0 - 0.9 * (i - t) / ((i + 1) * 0.99), 0.1)


def test_no_points_and_single_frames_render():
    frames = np.full((1, 20, 30, 3), 50, dtype=np.uint8)
    images, durations, _ = gif_frames(gif_bytes(frames, np.zeros((1, 0, 2)), np.zeros((1, 0), bool),
                                                 np.zeros(0, np.int64), np.zeros(1)))
    assert len(images) == 1 and durations == [100] and images[0].shape == (20, 30, 3)
    with pytest.raises(ValueError, match="do not fit"):
        gif_bytes(frames, np.zeros((2, 1, 2)), np.ones((2, 1), bool), np.zeros(1, np.int64), np.zeros(2))


def test_gif_bytes_is_deterministic_and_can_run_in_a_worker_process():
    frames, tracks, visibility, ids, times = reference_input()
    assert pickle.loads(pickle.dumps(gif_bytes)) is gif_bytes  # a top-level function: a process pool can call it
    args = pickle.loads(pickle.dumps((frames, tracks, visibility, ids, times)))
    assert gif_bytes(*args) == gif_bytes(frames, tracks, visibility, ids, times)
    indices, palette = render_indexed(frames, tracks, visibility, ids, times)
    images, _, _ = gif_frames(gif_bytes(frames, tracks, visibility, ids, times))
    np.testing.assert_array_equal(np.stack(images), palette[indices])  # the GIF holds exactly what was rendered


# ------------------------------------------------------------------------------ scaling
def test_fitted_size_scales_down_only_and_checks_its_bound():
    assert fitted_size(854, 480, None) == (854, 480)
    assert fitted_size(854, 480, 320) == (320, 180)
    assert fitted_size(300, 200, 320) == (300, 200)  # never upscaled
    assert fitted_size(4000, 1, 10) == (10, 1)  # at least one row
    for bad in (0, -5, 1.5, True, "320"):
        with pytest.raises(ValueError, match="max_width"):
            fitted_size(854, 480, bad)


def test_scale_points_aligns_pixel_centres():
    xy = np.array([[-0.5, -0.5], [853.5, 479.5], [426.5, 239.5]])
    np.testing.assert_allclose(scale_points(xy, (854, 480), (320, 180)), [[-0.5, -0.5], [319.5, 179.5], [159.5, 89.5]])


# ------------------------------------------------------------------------------ overlay
def test_cluster_overlay_png(tmp_path):
    frame = np.full((32, 48, 3), 200, dtype=np.uint8)
    k = len(ENTITY_PALETTE)
    labels = np.array([[0, 1], [k, k + 1]])  # the bottom row's ids wrap around to 0 and 1
    save_cluster_overlay(tmp_path / "o.png", frame, labels, np.array([[40.0, 28.0]]), np.array([3]))
    image = np.asarray(Image.open(tmp_path / "o.png")).astype(int)
    assert image.shape == (32, 96, 3)
    assert (image[:, :48] == 200).all()  # the frame as is, beside the blended label map
    for (row, col), label in (((2, 2), 0), ((2, 30), 1), ((20, 2), 0), ((20, 30), 1)):
        np.testing.assert_allclose(image[row, 48 + col], (200 + np.array(ENTITY_PALETTE[label])) / 2, atol=1)
    assert tuple(image[28, 48 + 40]) == ENTITY_PALETTE[3]  # the point, in its entity colour

    save_cluster_overlay(tmp_path / "s.png", frame, labels, np.array([[40.0, 28.0]]), np.array([3]), max_width=24)
    small = np.asarray(Image.open(tmp_path / "s.png")).astype(int)
    assert small.shape == (16, 48, 3)
    assert tuple(small[14, 24 + 20]) == ENTITY_PALETTE[3]  # (40.5 / 2 - 0.5, 28.5 / 2 - 0.5) rounded


# ------------------------------------------------------------------------------ atomic files
def test_failed_writes_leave_no_partial_file(tmp_path, monkeypatch):
    frames = np.zeros((3, 20, 30, 3), dtype=np.uint8)
    tracks = np.full((3, 1, 2), 10.0)
    gif, png = tmp_path / "a.gif", tmp_path / "a.png"
    gif.write_bytes(b"previous")

    def failing_fsync(fd):  # the data is written, the disk fails before it is durable
        raise OSError("disk full")

    def failing_save(self, fp, *args, **kwargs):
        fp.write(b"half a file")
        raise OSError("disk full")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="disk full"):
            save_trail_gif(gif, frames, tracks, np.ones((3, 1), bool), np.zeros(1, np.int64), np.arange(3) / 10)
    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_cluster_overlay(png, frames[0], np.zeros((2, 2), np.int64), np.zeros((0, 2)), np.zeros(0, np.int64))
    assert gif.read_bytes() == b"previous" and not png.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif"]


def record(baseline_module: Path) -> None:
    """Write REFERENCE from a previous renderer module (its `render_trails` and `save_trail_gif`)."""
    spec = importlib.util.spec_from_file_location("previous_gif", baseline_module)
    previous = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(previous)
    frames, tracks, visibility, ids, times = reference_input()
    rendered = np.stack([np.asarray(im) for im in previous.render_trails(frames, tracks, visibility, ids)])
    with tempfile.TemporaryDirectory() as scratch:
        previous.save_trail_gif(Path(scratch) / "previous.gif", frames, tracks, visibility, ids, times)
        images, _, _ = gif_frames(Path(scratch) / "previous.gif")
    errors = []
    for i, image in enumerate(images):
        outside = ~text_mask(rendered.shape[1:], tracks, visibility, ids, i, **OLD_TEXT)
        for _, x, y in drawn_points(tracks, visibility, i):
            outside[dot_pixels(x, y)] = False
        errors.append(np.abs(image[outside].astype(int) - rendered[i][outside]).mean())
    np.savez_compressed(REFERENCE, delta=rendered.astype(np.int16) - frames, gif_error=np.mean(errors))
    print(f"{REFERENCE}: {REFERENCE.stat().st_size} bytes, gif_error {np.mean(errors):.3f}")


if __name__ == "__main__":
    if sys.argv[1:2] != ["--record"] or len(sys.argv) != 3:
        sys.exit("usage: python tests/test_gif.py --record PREVIOUS_GIF_PY")
    record(Path(sys.argv[2]))
