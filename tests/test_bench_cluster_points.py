"""Smoke test of benchmarks/bench_cluster_points.py on two tiny clips (3 clustering frames, ViT-S stand-ins)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_cluster_points as bench  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_counts_and_json_on_two_tiny_clips(tmp_path, videos_dir):
    csv = tmp_path / "clips.csv"
    csv.write_text("video_path,dataset\n" + "".join(f"{videos_dir / name},ssv2\n"
                                                     for name in ("tiny_ssv2.webm", "tiny_25fps.mp4")))
    cache, out = tmp_path / "tokens.pt", tmp_path / "counts.json"
    args = ["--csv_path", str(csv), "--tokens", str(cache), "--model", "vits14", "--frames", "3", "--batch", "2"]
    result = bench.main([*args, "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["clips"] == 2 and result["frames"] == [3, 3] and cache.exists()
    one, two = result["batch"]["1"], result["batch"]["2"]
    for r in (one, two):  # the batch API as the step calls it: no host sync in either stage
        assert r["syncs_per_batch"] == 0 and r["sync_sites"] == []
        assert all(r["cpu_ms_per_video"][stage] > 0 for stage in bench.STAGES)
    assert all(two["ops_per_video"][s] < 0.6 * one["ops_per_video"][s] for s in bench.STAGES)  # batched work
    per_clip = bench.main([*args, "--api", "per_clip"])  # from the cache; the per-video functions sync
    assert per_clip["batch"]["1"]["syncs_per_batch"] > 0
