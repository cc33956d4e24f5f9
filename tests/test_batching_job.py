"""The job batches ragged videos: --batch_size 4 writes what --batch_size 1 writes."""
from __future__ import annotations

import numpy as np
import pytest

from semtrack.cli import main
from semtrack.trackfile import load_tracks

pytestmark = pytest.mark.slow

CLIPS = ("tiny_ssv2.webm", "tiny_25fps.mp4", "bear_ssv2.webm", "paragliding.mp4")
FPS = {"tiny_ssv2.webm": 3, "tiny_25fps.mp4": 4, "bear_ssv2.webm": 2, "paragliding.mp4": 3}  # 3, 7, 6, 8 frames
FLAGS = ["--weights", "random", "--dinov2_model", "vits14", "--num_frames_clustering", "4",
         "--num_points_per_entity", "2", "--tracker_resolution", "64", "96",
         "--num_workers", "0", "--save_confidence", "--trainer.enable_progress_bar=false"]


def run(tmp_path, videos_dir, batch_size: int) -> dict:
    out = tmp_path / f"b{batch_size}"
    table = tmp_path / "clips.csv"
    table.write_text("video_path,dataset,fps\n" + "".join(f"{videos_dir / c},clips,{FPS[c]}\n" for c in CLIPS))
    assert main(["--csv_path", str(table), "--base_feat_path", str(out), "--batch_size", str(batch_size),
                 *FLAGS]) == 0
    return {p.stem: load_tracks(p) for p in sorted(out.rglob("*.pkl"))}


def test_batched_pickles_equal_one_by_one(tmp_path, videos_dir):
    one, four = run(tmp_path, videos_dir, 1), run(tmp_path, videos_dir, 4)
    assert sorted(one) == sorted(four) == sorted(c.split(".")[0] for c in CLIPS)
    assert len({tf.num_frames for tf in one.values()}) > 1  # ragged: the clips differ in length
    assert len({tf.num_points for tf in one.values()}) > 1  # and in point count
    for vid, a in one.items():
        b = four[vid]
        np.testing.assert_array_equal(a.obj_ids.numpy(), b.obj_ids.numpy())
        np.testing.assert_array_equal(a.query_frames.numpy(), b.query_frames.numpy())
        np.testing.assert_array_equal(a.visibility.numpy(), b.visibility.numpy())
        step = np.spacing(np.abs(a.tracks.numpy()).astype(np.float16)).astype(np.float32)  # float16 resolution
        assert np.all(np.abs(a.tracks.numpy() - b.tracks.numpy()) <= step), vid  # <= 1e-4 px before rounding
        assert np.abs(a.meta["confidence"].float().numpy() - b.meta["confidence"].float().numpy()).max() <= 1e-3
