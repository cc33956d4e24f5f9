"""Smoke tests of the throughput benchmark tools: the SSV2-like re-encoder and
bench_extract's JSON on a tiny CSV (tiny settings: a few seconds of CPU per video)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_extract  # noqa: E402
import make_ssv2_like  # noqa: E402

from datamodules.video import VideoCSVDataset  # noqa: E402
from semtrack.trackfile import load_tracks, save_tracks  # noqa: E402
from semtrack.video import select_by_timestamp  # noqa: E402


def _probe(path: Path) -> tuple[str, float, int, int, list[float]]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        times = [f.time for f in container.decode(stream)]
        return stream.codec_context.name, float(stream.average_rate), stream.width, stream.height, times


def test_make_ssv2_like_reencodes_like_ssv2(tmp_path, videos_dir):
    src = videos_dir / "backpack_25fps.mp4"  # 368x480 portrait, 25 fps, 109 frames
    bad = videos_dir / "not_a_video.mp4"
    status = make_ssv2_like.main([str(src), str(bad), "--out", str(tmp_path / "clips")])
    assert status == 1  # the text file is reported and skipped

    out = tmp_path / "clips" / "backpack_25fps.webm"
    codec, rate, width, height, times = _probe(out)
    assert (codec, rate, width, height) == ("vp9", 12.0, 184, 240)  # 368 * 240 / 480 = 184, even
    with av.open(str(src)) as container:
        source_times = np.array([f.time for f in container.decode(video=0)])
    expected = len(select_by_timestamp(source_times - source_times[0], 12.0))
    assert len(times) == expected
    np.testing.assert_allclose(times, np.arange(expected) / 12.0, atol=1e-3)

    with open(tmp_path / "clips" / "ssv2_like.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"video_path": "backpack_25fps.webm", "dataset": "ssv2", "video_id": "backpack_25fps"}]
    assert VideoCSVDataset(tmp_path / "clips" / "ssv2_like.csv")[0].video_path == str(out)  # relative to the CSV


def test_make_ssv2_like_variants_have_the_lengths_asked_for(tmp_path, videos_dir):
    assert make_ssv2_like.variant_lengths(60, 3, 28) == [28, 44, 60]
    assert make_ssv2_like.variant_lengths(12, 3, 28) == [12]  # a short source gives one clip
    status = make_ssv2_like.main([str(videos_dir / "bear_ssv2.webm"), "--out", str(tmp_path), "--variants", "3",
                                  "--crf", "45"])
    assert status == 0
    frames = {p.stem: len(_probe(p)[4]) for p in sorted(tmp_path.glob("*.webm"))}
    assert frames == {"bear_ssv2_v1": 28, "bear_ssv2_v2": 30, "bear_ssv2_v0": 33}


def test_output_size_keeps_aspect_and_even_width():
    assert make_ssv2_like.output_size(854, 480, 240) == (428, 240)  # 427 -> nearest even
    assert make_ssv2_like.output_size(1296, 720, 240) == (432, 240)
    with pytest.raises(ValueError, match="positive"):
        make_ssv2_like.output_size(0, 480, 240)


def test_bench_extract_json_on_tiny_csv(tmp_path, videos_dir):
    table = tmp_path / "two.csv"
    clip = videos_dir / "tiny_ssv2.webm"  # VP9, 12 fps, 256x192, 12 frames
    table.write_text(f"video_path,dataset,video_id\n{clip},ssv2,a\n{clip},ssv2,b\n")
    out_json, outputs = tmp_path / "bench.json", tmp_path / "outputs"
    status = bench_extract.main([
        "--csv_path", str(table), "--json", str(out_json), "--keep_outputs", str(outputs),
        "--accelerator", "cpu", "--num_workers", "0", "--dinov2_model", "vits14",
        "--num_frames_clustering", "2", "--num_points_per_entity", "1", "--tracker_resolution", "64", "96",
        "--max_frames", "6",
    ])
    assert status == 0
    result = json.loads(out_json.read_text())
    for key in ("date_utc", "git_commit", "torch", "command", "settings"):
        assert result[key]
    assert result["hardware"]["cpu_model"] and result["hardware"]["gpu"] is None
    settings = result["settings"]
    assert settings["tracker_resolution"] == [64, 96] and settings["max_frames"] == 6
    assert settings["weights"] == "random"

    run = result["runs"]["32-true"]
    loop = run["loop"]
    assert run["run_report"]["counts"] == {"rows": 2, "done": 2, "failed": 0, "pending": 0}
    assert loop["batches"] == 2 and loop["videos"] == 2
    assert run["all_ranks"]["ranks"] == 1 and run["all_ranks"]["videos_per_s"] == pytest.approx(loop["videos_per_s"])
    assert 0 < loop["videos_per_s"] <= loop["steady_videos_per_s"] * 1.5
    stages = loop["stage_s_per_video"]
    assert set(stages) == {"decode_wait", "features", "clustering", "sampling", "tracking", "step_other", "writing",
                           "writer_thread"}
    assert all(v >= 0 for v in stages.values())
    assert stages["tracking"] > 0 and stages["features"] > 0 and stages["writing"] > 0 and stages["writer_thread"] > 0
    # the stage clocks add up to no more than the steps they ran in
    assert sum(stages[s] for s in ("features", "clustering", "sampling", "tracking")) <= loop["step_s_per_video"] + 1e-6
    assert 0 < loop["busy_fraction"] <= 1.0
    assert run["decode_s_per_video"] > 0
    (memory,) = run["per_rank_memory"]
    assert memory["rank"] == 0 and memory["cuda_max_allocated_gb"] is None and memory["cpu_max_rss_gb"] > 0.1
    assert [v["frames"] for v in run["videos"]] == [6, 6]  # 12 frames resampled to max_frames
    assert all(v["clip_hw"] == [192, 256] and v["points"] > 0 for v in run["videos"])
    pickles = sorted(outputs.glob("32-true/*/ssv2/feat_dump/*.pkl"))
    assert [p.stem for p in pickles] == ["a", "b"]
    assert torch.equal(load_tracks(pickles[0]).tracks, load_tracks(pickles[1]).tracks)  # same clip, same result


def _write(path: Path, tracks: torch.Tensor, visibility: torch.Tensor, obj_ids: list[int], frames: list[int]) -> None:
    save_tracks(path, {
        "pred_tracks": tracks.to(torch.float16), "pred_visibility": visibility,
        "obj_ids": torch.tensor(obj_ids), "point_queries": torch.tensor(frames),
    })


def test_compare_outputs_matches_points_by_query(tmp_path):
    cfg32 = bench_extract.ExtractConfig(base_feat_path=str(tmp_path / "a"))
    cfg16 = bench_extract.ExtractConfig(base_feat_path=str(tmp_path / "b"))
    t, frames = 5, [0, 2, 4]
    tracks = torch.arange(t * 3 * 2, dtype=torch.float32).view(t, 3, 2)
    visible = torch.ones(t, 3, dtype=torch.bool)
    _write(cfg32.layout.pickle("ssv2", "v"), tracks, visible, [0, 1, 2], frames)
    moved = tracks.clone()
    moved[1, 0] += torch.tensor([3.0, 4.0])  # point 0 off by 5 px on frame 1 (not its query frame)
    moved[:, 2] += 100.0  # point 2 has another query pixel: not matched
    hidden = visible.clone()
    hidden[3, 0] = False
    _write(cfg16.layout.pickle("ssv2", "v"), moved, hidden, [0, 1, 2], frames)

    out = bench_extract.compare_outputs(cfg32, cfg16)
    (video,) = out["per_video"]
    assert video["matched_points"] == 2 and video["same_queries"] is False
    assert out["videos_same_queries"] == 0 and out["matched_point_fraction"] == pytest.approx(2 / 3, abs=1e-4)
    assert out["max_px"] == pytest.approx(5.0)
    assert out["mean_px"] == pytest.approx(5.0 / (t * 2), abs=1e-5)
    assert out["visibility_agreement"] == pytest.approx(1 - 1 / (t * 2), abs=1e-5)
