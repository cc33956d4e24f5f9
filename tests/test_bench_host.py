"""bench_host.py on two tiny sources: the input sets it makes, its JSON and its sections (one timed
run per video, a few seconds)."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import av
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import bench_host  # noqa: E402


def _stream(path: Path) -> tuple[str, float, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return stream.codec_context.name, float(stream.average_rate), stream.codec_context.height


def _videos(csv_path: str) -> list[Path]:
    with open(csv_path, newline="") as f:
        return [Path(csv_path).parent / row["video_path"] for row in csv.DictReader(f)]


def test_bench_host_makes_its_sets_and_reports_decode_and_transfer(tmp_path, videos_dir):
    sources = [videos_dir / "tiny_25fps.mp4", videos_dir / "tiny_ssv2.webm"]  # 25 fps 320x240; 12 fps
    out = tmp_path / "host.json"
    result = bench_host.main(["--sources", *map(str, sources), "--cache", str(tmp_path / "cache"),
                              "--repeats", "1", "--json", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    env = result["env"]
    assert env["git_commit"] and env["date_utc"] and env["torch"] and env["hardware"]["cpu_model"]
    sets = result["settings"]["sets"]
    assert sorted(sets) == ["480p_x264", "ssv2_like"]  # no source is already 480 px high
    assert [_stream(v) for v in _videos(sets["ssv2_like"])] == [("vp9", 12.0, 240)] * 2
    assert [_stream(v) for v in _videos(sets["480p_x264"])] == [("h264", 25.0, 480)]  # tiny_ssv2 is 12 fps

    decode = result["sections"]["decode"]
    frames = {"ssv2_like": 16, "480p_x264": 17}  # native 20 and 12 frames; 1.56 s at 10 fps
    for name, by_decoder in decode.items():
        for decoder in ("auto", "decord", "pyav"):
            summary = by_decoder["summary"][decoder]
            assert summary["videos"] == len(_videos(sets[name])) and summary["median_ms"] > 0
            assert summary["median_frames"] == frames[name]
            served = {v["decoder"] for v in by_decoder["videos"][decoder]}
            assert served == {"decord" if decoder == "decord" else "pyav"}
        floor = by_decoder["summary"]["floor"]  # the codec alone: reference frames, every one decoded
        assert floor["videos"] == len(_videos(sets[name])) and floor["median_ms"] > 0 and floor["median_frames"] > 0
    transfer = result["sections"]["transfer"]["480p_x264"]
    (video,) = transfer["videos"]
    assert video["bytes"] == 17 * 480 * 640 * 3 and video["ms"] > 0

    again = bench_host.build_sets(sources, tmp_path / "cache")  # made once, then reused
    assert again == {name: Path(path) for name, path in sets.items()}
    only = bench_host.main(["--set", f"mine={sets['480p_x264']}", "--sections", "transfer", "--repeats", "1"])
    assert list(only["sections"]) == ["transfer"] and list(only["sections"]["transfer"]) == ["mine"]
    with pytest.raises(SystemExit, match="unknown section"):
        bench_host.main(["--set", f"mine={sets['480p_x264']}", "--sections", "gif"])


def test_bench_host_times_the_writer_and_the_overlap_with_and_without_gifs(tmp_path, videos_dir):
    sources = [videos_dir / "tiny_ssv2.webm"]  # 12 fps, 12 frames at 320x240
    result = bench_host.main(["--sources", *map(str, sources), "--cache", str(tmp_path / "cache"),
                              "--sections", "writer", "overlap", "--repeats", "1",
                              "--batch", "2", "--batches", "2", "--step_ms", "5"])
    writer = result["sections"]["writer"]
    assert sorted(writer["summary"]) == ["gif", "gif_literal", "ledger", "pickle"]
    for what, summary in writer["summary"].items():
        assert summary["videos"] == 1 and summary["median_frames"] == 12, what  # the set: one length of this clip
    overlap = result["sections"]["overlap"]
    assert (overlap["batch"], overlap["batches"], overlap["limit"]) == (2, 2, 1.1)
    without, with_gifs, with_literal_gifs = overlap["runs"]
    assert [(r["make_vis"], r["gif_encoder"]) for r in overlap["runs"]] == [(False, None), (True, "pil"),
                                                                          (True, "literal")]
    for run in overlap["runs"]:  # every video written (the section raises otherwise); the stand-in step slept
        assert run["step_ms"] == 10 and run["alone_ms"] >= 10 and run["run_ms"] >= run["loop_ms"] >= 10
    assert with_gifs["gif_workers_cpu_ms_per_video"] > 0 and with_literal_gifs["gif_workers_cpu_ms_per_video"] > 0
    assert without["writer_cpu_ms_per_video"] > 0
