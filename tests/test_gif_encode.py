"""GIF files written with numpy (semtrack.gif_encode): every frame decodes exactly, in PIL and in
FFmpeg (PyAV), on edge-case frames and on a real rendered trail GIF, with PIL's timing and looping."""
from __future__ import annotations

import io
import sys
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from datamodules.video import VideoCSVDataset  # noqa: E402
from semtrack.gif import frame_durations_ms, gif_bytes  # noqa: E402
from semtrack.gif_encode import encode_gif, lzw_codes  # noqa: E402


def distinct_palette(colours: int) -> np.ndarray:
    """(colours, 3) uint8, no two entries alike, so equal RGB frames mean equal indices."""
    k = np.arange(colours)
    return np.stack([k, 255 - k, (k * 97) % 256], axis=-1).astype(np.uint8)


def pil_decode(data: bytes) -> tuple[np.ndarray, list[int], dict]:
    """(T, H, W, 3) uint8 RGB frames as PIL decodes them, their durations (ms) and the file's info."""
    frames, durations = [], []
    with Image.open(io.BytesIO(data)) as gif:
        info = dict(gif.info)
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
            frames.append(np.asarray(gif.convert("RGB")))
    return np.stack(frames), durations, info


def av_decode(data: bytes) -> np.ndarray:
    """(T, H, W, 3) uint8 RGB frames as FFmpeg's GIF decoder (through PyAV) gives them."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)])


def runs_across_rows(t_len: int, height: int, width: int, colours: int, seed: int) -> np.ndarray:
    """Frames of runs of one index (geometric lengths, mean 10) laid in scan order, so runs cross row ends."""
    rng = np.random.default_rng(seed)
    values = rng.integers(0, colours, t_len * height * width).astype(np.uint8)
    runs = np.repeat(values, rng.geometric(0.1, values.size))
    return runs[: t_len * height * width].reshape(t_len, height, width)


RNG = np.random.default_rng(7)
CASES = {  # name: (indices (T, H, W) uint8, colours)
    "1x1, one frame, one colour": (np.zeros((1, 1, 1), np.uint8), 1),
    "one frame of noise": (RNG.integers(0, 128, (1, 37, 51), dtype=np.uint8), 128),
    "one colour, 90,300 px a frame": (np.full((2, 300, 301), 5, np.uint8), 128),
    "noise, odd sizes": (RNG.integers(0, 128, (3, 37, 51), dtype=np.uint8), 128),
    "runs across row ends": (runs_across_rows(4, 61, 67, 128, seed=1), 128),
    "2 colours": (RNG.integers(0, 2, (3, 31, 29), dtype=np.uint8), 2),
    "3 colours (table of 4)": (RNG.integers(0, 3, (2, 9, 13), dtype=np.uint8), 3),
    "a frame of 126 px (one clear code's worth)": (RNG.integers(0, 128, (2, 2, 63), dtype=np.uint8), 128),
    "a frame of 125 px": (RNG.integers(0, 128, (2, 5, 25), dtype=np.uint8), 128),
    "one row": (RNG.integers(0, 128, (2, 1, 1000), dtype=np.uint8), 128),
    "256 colours, noise": (RNG.integers(0, 256, (2, 33, 35), dtype=np.uint8), 256),
    "256 colours, runs": (runs_across_rows(3, 50, 41, 256, seed=2), 256),
}


@pytest.mark.parametrize("name", list(CASES))
def test_frames_decode_exactly_in_pil_and_ffmpeg(name):
    indices, colours = CASES[name]
    palette = distinct_palette(colours)
    durations = [40 + 10 * t for t in range(len(indices))]
    data = encode_gif(indices, palette, durations)
    want = palette[indices]
    frames, got_durations, info = pil_decode(data)
    np.testing.assert_array_equal(frames, want)
    np.testing.assert_array_equal(av_decode(data), want)
    assert got_durations == durations and info["loop"] == 0
    assert data[:6] == b"GIF89a" and data[-1:] == b"\x3b"


def test_every_pixel_is_one_code_and_a_clear_code_comes_every_126():
    indices = RNG.integers(0, 128, (3, 20, 30), dtype=np.uint8)
    codes = lzw_codes(indices.reshape(3, -1), 7)  # (3, M): 600 px a frame
    assert codes.dtype == np.uint8 and codes.shape == (3, 600 + 5 + 1)  # 5 clear codes (ceil(600 / 126)), the end
    assert (codes[:, ::127] == 128).all() and (codes[:, -1] == 129).all()
    pixels = np.delete(codes[:, :-1], np.s_[::127], axis=1)
    np.testing.assert_array_equal(pixels, indices.reshape(3, -1))
    palette = distinct_palette(128)
    assert len(encode_gif(indices, palette, [100] * 3)) < len(encode_gif(indices, palette, [100] * 3, loop=None)) + 20


def test_no_loop_extension_plays_once():
    data = encode_gif(np.zeros((2, 4, 4), np.uint8), distinct_palette(2), [100, 100], loop=None)
    assert b"NETSCAPE2.0" not in data
    with Image.open(io.BytesIO(data)) as gif:
        assert "loop" not in gif.info and gif.n_frames == 2


@pytest.mark.parametrize("indices, colours, durations, message", [
    (np.zeros((2, 3), np.uint8), 4, [1, 1], "(T, H, W) uint8"),
    (np.zeros((1, 3, 3), np.int64), 4, [1], "(T, H, W) uint8"),
    (np.zeros((0, 3, 3), np.uint8), 4, [], "non-empty"),
    (np.full((1, 3, 3), 4, np.uint8), 4, [1], "palette has 4 colours"),
    (np.zeros((2, 3, 3), np.uint8), 4, [1], "1 durations for 2 frames"),
    (np.zeros((1, 3, 3), np.uint8), 257, [1], "1 to 256 colours"),
])
def test_bad_inputs_are_refused(indices, colours, durations, message):
    palette = np.zeros((colours, 3), np.uint8)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        encode_gif(indices, palette, durations)


def test_a_rendered_trail_gif_decodes_to_pils_frames(tmp_path, videos_dir):
    """The SSV2-like bear clip (428x240, 12 fps), 8 frames, 120 points: the literal encoder's GIF
    shows exactly the frames, durations and looping of the GIF PIL encodes from the same drawing."""
    table = tmp_path / "bear.csv"
    table.write_text(f"video_path,dataset\n{videos_dir / 'bear_ssv2.webm'},ssv2\n")
    item = VideoCSVDataset(table)[0]
    frames, times = item.frames[:8].permute(0, 2, 3, 1).numpy(), item.frame_times[:8].numpy()
    t_len, height, width = frames.shape[:3]
    rng = np.random.default_rng(0)
    tracks = rng.uniform([0, 0], [width, height], (120, 2))[None] + np.cumsum(rng.normal(0, 2, (t_len, 120, 2)), 0)
    args = (frames, tracks, rng.random((t_len, 120)) > 0.1, np.repeat(np.arange(12), 10), times)
    ours, pils = gif_bytes(*args, encoder="literal"), gif_bytes(*args)
    want, want_durations, want_info = pil_decode(pils)
    got, got_durations, got_info = pil_decode(ours)
    assert got.shape == (t_len, height, width, 3)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(av_decode(ours), want)
    assert got_durations == want_durations == frame_durations_ms(times) and got_info["loop"] == want_info["loop"] == 0
    assert len(pils) < len(ours) < 2.5 * len(pils)  # literal codes: one byte a pixel
    with pytest.raises(ValueError, match="encoder"):
        gif_bytes(*args, encoder="lzw")
