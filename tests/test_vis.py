"""`semtrack-vis` (semtrack.vis): the GIF of an existing pickle shows exactly the frames it records.

The pickles are built with `save_tracks` from the shared SSV2-like clip `bear_ssv2.webm` (428x240,
12 fps, 33 frames), decoded once here with the project's decoder: a semtrack pickle that tracks an
irregular choice of its frames (recorded by timestamp), and a research pickle (no metadata).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from _shared import REPO_ROOT
from datamodules.video import VideoCSVDataset
from semtrack.gif import ENTITY_PALETTE, frame_durations_ms
from semtrack.trackfile import save_tracks
from semtrack.vis import main

CLIP = "bear_ssv2.webm"
CHOSEN = [0, 2, 3, 7, 8, 20, 32]  # the source frames the semtrack pickle tracks (irregular on purpose)
COUNTER_ROWS = 20  # the counter stays in the rows above this one


@pytest.fixture(scope="module")
def source(tmp_path_factory, videos_dir):
    """Every frame of the clip as the extraction decodes it: (path, frames (33, 240, 428, 3) uint8, times (33,) s)."""
    table = tmp_path_factory.mktemp("clip") / "clip.csv"
    table.write_text(f"video_path,dataset\n{videos_dir / CLIP},ssv2\n")
    clip = VideoCSVDataset(table, fps=None)[0]
    return clip.video_path, clip.frames.permute(0, 2, 3, 1).numpy(), clip.frame_times.numpy()


def write_pickle(path: Path, t_len: int, meta: dict | None, tracks: np.ndarray | None = None) -> Path:
    """A track pickle of T frames; by default one visible point far outside the frame (nothing drawn)."""
    if tracks is None:
        tracks = np.full((t_len, 1, 2), -1000.0)
    n = tracks.shape[1]
    data = {"pred_tracks": torch.tensor(tracks, dtype=torch.float16),
            "pred_visibility": torch.ones(t_len, n, dtype=bool), "obj_ids": torch.arange(n, dtype=torch.int64),
            "point_queries": torch.zeros(n, dtype=torch.int64)}
    if meta is not None:
        data["semtrack"] = meta
    save_tracks(path, data)
    return path


def gif_frames(path: Path) -> tuple[np.ndarray, list[int]]:
    frames, durations = [], []
    with Image.open(path) as gif:
        for i in range(gif.n_frames):
            gif.seek(i)
            durations.append(gif.info["duration"])
            frames.append(np.asarray(gif.convert("RGB")))
    return np.stack(frames), durations


def nearest_source_frames(images: np.ndarray, frames: np.ndarray) -> list[int]:
    """For each GIF frame, the source frame it is closest to (mean absolute difference below the counter)."""
    below = slice(COUNTER_ROWS, None)
    return [int(np.argmin([np.abs(im[below].astype(int) - f[below]).mean() for f in frames])) for im in images]


def test_gif_of_a_semtrack_pickle_shows_its_recorded_frames(tmp_path, source, capsys):
    video, frames, times = source
    meta = {"frame_times": torch.tensor(times[CHOSEN], dtype=torch.float64), "video_path": video,
            "clip_size": [240, 428]}
    pkl = write_pickle(tmp_path / "feat_dump" / "clip.pkl", len(CHOSEN), meta)
    out = tmp_path / "clip.gif"
    assert main([str(pkl), "--out", str(out)]) == 0
    images, durations = gif_frames(out)
    assert images.shape == (len(CHOSEN), 240, 428, 3)  # narrower than 640: kept at full size
    assert durations == frame_durations_ms(times[CHOSEN])
    assert nearest_source_frames(images, frames) == CHOSEN
    assert np.abs(images[:, COUNTER_ROWS:].astype(int) - frames[CHOSEN, COUNTER_ROWS:]).mean() < 4  # only quantised
    assert capsys.readouterr().out.strip() == f"{out}: {len(CHOSEN)} frames, 428x240, {out.stat().st_size} bytes " \
                                              f"(video {video})"

    assert main([str(pkl), "--out", str(tmp_path / "small.gif"), "--max_width", "200"]) == 0
    small, _ = gif_frames(tmp_path / "small.gif")
    assert small.shape == (len(CHOSEN), 112, 200, 3)
    assert main([str(pkl), "--out", str(tmp_path / "full.gif"), "--max_width", "none"]) == 0
    assert gif_frames(tmp_path / "full.gif")[0].shape == images.shape


def test_default_output_is_named_after_the_pickle_in_the_current_folder(tmp_path, source, monkeypatch):
    video, _, times = source
    pkl = write_pickle(tmp_path / "in" / "abc.pkl", 2, {"frame_times": torch.tensor(times[:2]), "video_path": video})
    monkeypatch.chdir(tmp_path)
    assert main([str(pkl)]) == 0
    assert gif_frames(tmp_path / "abc.gif")[0].shape[0] == 2


def test_research_pickle_needs_the_video_and_uses_the_research_rule(tmp_path, source, capsys):
    video, frames, _ = source
    pkl = write_pickle(tmp_path / "research.pkl", 6, None)
    assert main([str(pkl), "--out", str(tmp_path / "r.gif")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pass --video" in err and not (tmp_path / "r.gif").exists()

    assert main([str(pkl), "--video", video, "--out", str(tmp_path / "r.gif")]) == 0
    assert "research rule" in capsys.readouterr().err
    images, _ = gif_frames(tmp_path / "r.gif")
    expected = np.linspace(0, len(frames) - 1, 6).astype(int).tolist()  # [0, 6, 12, 19, 25, 32]
    assert nearest_source_frames(images, frames) == expected


def test_tracks_are_scaled_to_a_video_of_another_size(tmp_path, source):
    """Tracks made on a 2x larger clip land on the same spot of this video."""
    video, _, times = source
    tracks = np.array([[[201.0, 101.0]], [[201.0, 101.0]]])  # (2, 1, 2) in an 856x480 clip: (100, 50) here
    meta = {"frame_times": torch.tensor(times[:2]), "video_path": video, "clip_size": [480, 856]}
    pkl = write_pickle(tmp_path / "big.pkl", 2, meta, tracks)
    assert main([str(pkl), "--out", str(tmp_path / "big.gif")]) == 0
    images, _ = gif_frames(tmp_path / "big.gif")
    assert (images[:, 49:52, 99:102] == ENTITY_PALETTE[0]).all()  # the dot's core, exactly the entity colour


def test_bad_pickles_and_videos_are_one_line_errors(tmp_path, source, videos_dir, capsys):
    video, _, times = source
    garbage = tmp_path / "garbage.pkl"
    garbage.write_bytes(b"not a pickle at all")
    lost = write_pickle(tmp_path / "lost.pkl", 2, {"frame_times": torch.tensor(times[:2]),
                                                   "video_path": str(tmp_path / "moved.webm")})
    other = write_pickle(tmp_path / "other.pkl", 2, {"frame_times": torch.tensor([0.0, 0.05]), "video_path": video})
    cases = [
        ([str(tmp_path / "missing.pkl")], "missing.pkl"),
        ([str(garbage)], "garbage.pkl"),
        ([str(lost)], "moved.webm"),  # the recorded video is gone
        ([str(lost), "--video", str(videos_dir / "not_a_video.mp4")], "not_a_video.mp4"),
        ([str(other)], "0.0500"),  # no frame of this video at a recorded time
    ]
    for args, named in cases:
        assert main([*args, "--out", str(tmp_path / "x.gif")]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and named in err, err
    assert not (tmp_path / "x.gif").exists()
    with pytest.raises(SystemExit) as stop:
        main([str(lost), "--max_width", "0"])
    assert stop.value.code == 2


def test_console_script_and_module_form(tmp_path):
    scripts = (REPO_ROOT / "pyproject.toml").read_text().split("[project.scripts]")[1].split("\n[")[0]
    assert 'semtrack-vis = "semtrack.vis:main"' in scripts.splitlines()
    done = subprocess.run([sys.executable, "-m", "semtrack.vis", str(tmp_path / "none.pkl")], capture_output=True,
                          text=True, cwd=REPO_ROOT, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("error: ") and done.stderr.count("\n") == 1
