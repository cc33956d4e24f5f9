"""Trail GIFs and cluster overlays (semtrack.gif): palette, sizes, timing, exact colours, atomic files."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from datamodules.video import VideoCSVDataset
from semtrack.gif import (
    ENTITY_PALETTE,
    GIF_COLOURS,
    entity_colours,
    fitted_size,
    frame_durations_ms,
    label_colours,
    render_trails,
    save_cluster_overlay,
    save_trail_gif,
    scale_points,
    to_palette,
)

MIN_PAIR_DELTA_E = 32.0  # CIE76 distance between any two palette colours (stated in semtrack.gif)
MIN_ADJACENT_DELTA_E = 35.0  # between the colours of ids k and k + 1
BEAR_GIF_MAX_BYTES = 2_000_000  # 8 frames, 854x480, 256 points (one per-frame adaptive palette each: 2.8 MB)
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


def gif_frames(path) -> tuple[list[np.ndarray], list[int], dict]:
    """Every frame of a GIF as (H, W, 3) uint8, each frame's duration (ms), and the file's info."""
    frames, durations = [], []
    with Image.open(path) as gif:
        info = dict(gif.info)
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
            frames.append(np.asarray(gif.convert("RGB")))
    return frames, durations, info


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


def test_trails_show_only_the_last_four_segments(tmp_path):
    t_len, n = 8, 1
    frames = np.zeros((t_len, 40, 120, 3), dtype=np.uint8)
    xs = 5.0 + 14.0 * np.arange(t_len)  # one point moving right along row 20
    tracks = np.stack([xs, np.full(t_len, 20.0)], axis=-1)[:, None, :]  # (T, 1, 2)
    visibility = np.ones((t_len, n), dtype=bool)
    images = render_trails(frames, tracks, visibility, np.zeros(n, dtype=np.int64))
    last = np.asarray(images[-1]).astype(int).sum(axis=-1)[20]  # row 20 of frame 7
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
    full, small = tmp_path / "full.gif", tmp_path / "small.gif"
    save_trail_gif(full, frames, tracks, visibility, ids, times)
    save_trail_gif(small, frames, tracks, visibility, ids, times, max_width=320)
    assert full.stat().st_size < BEAR_GIF_MAX_BYTES
    assert small.stat().st_size < min(BEAR_GIF_320_MAX_BYTES, full.stat().st_size)
    for path, size in ((full, (480, 854)), (small, (180, 320))):
        images, durations, info = gif_frames(path)
        assert len(images) == len(frames) and info["loop"] == 0
        assert all(im.shape[:2] == size for im in images)
        assert durations == frame_durations_ms(times)
        with Image.open(path) as gif:
            assert len(gif.getpalette()) // 3 <= GIF_COLOURS


@pytest.mark.parametrize("max_width", [None, 320])
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


def test_entity_colours_map_exactly_even_beside_near_duplicates():
    entity = np.array(ENTITY_PALETTE, dtype=np.int64)
    near = np.clip(entity + np.array([1, -2, 1]), 0, 255)  # frame colours a level or two away
    palette = [tuple(c) for c in entity.tolist()] + [tuple(c) for c in near.tolist()]
    image = np.concatenate([entity, near]).astype(np.uint8)[None]  # (1, 64, 3)
    indices = np.asarray(to_palette(Image.fromarray(image), palette))[0]
    assert indices[: len(entity)].tolist() == list(range(len(entity)))


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

    def failing_save(self, fp, *args, **kwargs):
        with open(fp, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_trail_gif(gif, frames, tracks, np.ones((3, 1), bool), np.zeros(1, np.int64), np.arange(3) / 10)
    with pytest.raises(OSError, match="disk full"):
        save_cluster_overlay(png, frames[0], np.zeros((2, 2), np.int64), np.zeros((0, 2)), np.zeros(0, np.int64))
    assert gif.read_bytes() == b"previous" and not png.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif"]
