"""VideoCSVDataset / collate_videos on the real clips in shared/videos.

Expected frame lists are derived independently of the implementation: from the container's packet
timestamps read with PyAV's demuxer (no decoding; packets the demuxer flags as discarded are not
frames), with exact fractions, applying the rule as the issue states it.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import semtrack.video.decode as decode_mod
import semtrack.video.frames as frames_mod
from _shared import shared_path
from datamodules import VideoCSVDataset, collate_videos
from semtrack.records import Clip

VIDEOS = shared_path("videos")
BROKEN = ("not_a_video.mp4", "corrupt_truncated.mp4")
CLIPS = sorted(p.name for p in VIDEOS.iterdir() if p.suffix in (".mp4", ".webm") and p.name not in BROKEN)
DECODE_JSON = json.loads(shared_path("spec", "fixtures", "decode.json").read_text())


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def write_csv(path: Path, header: str, lines: list[str]) -> Path:
    path.write_text(header + "\n" + "".join(line + "\n" for line in lines))
    return path


def container_frames(name: str):
    """-> (times as exact Fractions relative to the first frame, average_rate, (H, W))."""
    with av.open(str(VIDEOS / name)) as container:
        stream = container.streams.video[0]
        tb = Fraction(stream.time_base)
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None and not p.is_discard)
        rate = Fraction(stream.average_rate)
        hw = (stream.codec_context.height, stream.codec_context.width)
    return [(p - pts[0]) * tb for p in pts], rate, hw


def rule_indices(times: list[Fraction], fps) -> list[int]:
    """The issue's rule, exactly: K = floor(last*f + 1/2) + 1; nearest to k/f, ties -> earlier."""
    if fps is None:
        return list(range(len(times)))
    f = Fraction(fps)
    count = math.floor(times[-1] * f + Fraction(1, 2)) + 1
    return [min(range(len(times)), key=lambda i: (abs(times[i] - k / f), i)) for k in range(count)]


def summary(item: Clip) -> dict:
    """A clip's fields without its pixels, and their shape (kept small for module-level caches)."""
    out = {f.name: getattr(item, f.name) for f in dataclasses.fields(item) if f.name != "frames"}
    out["shape"] = None if item.frames is None else tuple(item.frames.shape)
    return out


@pytest.fixture(scope="module")
def csv_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("csv")


@pytest.fixture(scope="module")
def all_clips(csv_dir):
    """Runs the dataset once per configuration over every good clip; results cached per config."""
    csv = write_csv(csv_dir / "clips.csv", "video_path,dataset", [f"{VIDEOS / n},test" for n in CLIPS])
    cache: dict = {}

    def run(**kwargs) -> dict[str, dict]:
        key = tuple(sorted(kwargs.items()))
        if key not in cache:
            ds = VideoCSVDataset(csv, native_fps_datasets=(), **kwargs)
            cache[key] = {Path(it.video_path).name: summary(it) for it in (ds[i] for i in range(len(ds)))}
        return cache[key]

    return run


# ---------------------------------------------------------------------------------------------
# frame selection on the real clips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [10.0, None], ids=["10fps", "native"])
def test_frames_follow_the_timestamp_rule_on_every_clip(all_clips, fps):
    results = all_clips(fps=fps)
    assert set(results) == set(CLIPS)
    for name in CLIPS:
        item = results[name]
        times, rate, (h, w) = container_frames(name)
        expected = rule_indices(times, fps)
        assert item["error"] is None, (name, item["error"])
        assert item["decoder"] == "pyav"
        assert item["shape"] == (len(expected), 3, h, w), name
        assert item["frame_times"].dtype == torch.float64
        np.testing.assert_allclose(item["frame_times"].numpy(), [float(times[i]) for i in expected], rtol=0, atol=1e-9)
        k = min(32, len(expected))
        assert item["cluster_frames"].dtype == torch.int64
        assert item["cluster_frames"].tolist() == np.linspace(0, len(expected) - 1, k).astype(np.int64).tolist()
        assert item["source_fps"] == pytest.approx(float(rate))
        assert item["fps"] == fps
        assert item["dataset"] == "test" and item["video_id"] == Path(name).stem


def test_known_counts_at_10fps(all_clips):
    """Spot values of the rule (25 fps -> 10 fps, not the research code's 12.5 fps)."""
    t = {name: r["shape"][0] for name, r in all_clips(fps=10.0).items()}
    assert t["backpack_25fps.mp4"] == 44  # research interval rule: 55
    assert t["tiny_25fps.mp4"] == 17  # 1.56 s -> k = 0..16
    assert t["bear.mp4"] == 28 and t["paragliding_k400.mp4"] == 24
    assert t["apple.mp4"] == 50 and t["backpack.mp4"] == 44
    assert t["pillow.mp4"] == 74  # 147 decodable frames, last at 7.30 s
    assert t["bear_ssv2.webm"] == 28  # 12 fps source, 2.667 s


def test_trailing_packets_outside_the_edit_list_are_not_frames(all_clips):
    """pillow.mp4 / teddy.mp4: decord indexes 149 / 142 frames, but the last packets lie past the mp4
    edit list and never decode (decord would hand back a stale image for them)."""
    native = all_clips(fps=None)
    rows = {(r["video"], r["fps_arg"]): r for r in DECODE_JSON["rows"] if r["result"] == "ok"}
    for name, decoded in (("pillow.mp4", 147), ("teddy.mp4", 141)):
        assert rows[(name, None)]["native_decoded_frames"] == decoded
        assert rows[(name, None)]["decord_len"] > decoded
        assert len(container_frames(name)[0]) == decoded
        assert native[name]["shape"][0] == decoded


def test_vfr_teddy_frames_are_nearest_to_the_target_times(all_clips):
    item = all_clips(fps=10.0)["teddy.mp4"]
    times, rate, _ = container_frames("teddy.mp4")
    assert float(rate) != pytest.approx(20.0, abs=1e-3)  # average rate 19.98: not a clean 20 fps
    ft = item["frame_times"].numpy()
    k = np.arange(len(ft))
    assert len(ft) == math.floor(float(times[-1]) * 10 + 0.5) + 1
    all_t = np.array([float(t) for t in times])
    nearest = np.abs(all_t[None, :] - k[:, None] / 10.0).min(axis=1)
    np.testing.assert_allclose(np.abs(ft - k / 10.0), nearest, atol=1e-9)


def test_timestamp_ties_go_to_the_earlier_frame_despite_float32_noise():
    exact = np.arange(40) * 0.04  # 25 fps
    noisy = exact.astype(np.float32).astype(np.float64)  # what decord reports without snapping
    for times in (exact, noisy):
        idx = frames_mod.select_by_timestamp(times, 10.0)
        # 0.1 s is equidistant from frames 2 (0.08) and 3 (0.12): the earlier one wins
        assert idx[:6].tolist() == [0, 2, 5, 7, 10, 12]
        assert len(idx) == 17


@pytest.mark.parametrize("fps_arg", [10, None], ids=["fps10", "native"])
def test_legacy_interval_rule_matches_decode_json(all_clips, csv_dir, fps_arg):
    """decode.json holds the research loader's frame lists (PyAV). With fps=None every rule keeps
    every decoded frame; the native run is reused for the big clips and the interval code path is
    run on the small ones."""
    rows = [r for r in DECODE_JSON["rows"] if r["fps_arg"] == fps_arg and r["result"] == "ok"]
    assert {r["video"] for r in rows} >= set(CLIPS) - {"tiny_25fps.mp4", "tiny_ssv2.webm"}
    if fps_arg is None:
        small = ["bear_ssv2.webm", "pillow.mp4", "tiny_25fps.mp4", "tiny_ssv2.webm"]
        csv = write_csv(csv_dir / "legacy_native.csv", "video_path,dataset", [f"{VIDEOS / n},test" for n in small])
        ds = VideoCSVDataset(csv, fps=None, fps_rule="interval")
        legacy = {Path(it.video_path).name: summary(it) for it in (ds[i] for i in range(len(ds)))}
        for name in small:  # interval path == timestamp path when every frame is kept
            native = all_clips(fps=None)[name]
            assert legacy[name]["frame_times"].tolist() == native["frame_times"].tolist()
        results = {**all_clips(fps=None), **legacy}
    else:
        results = all_clips(fps=10.0, fps_rule="interval")
    for row in rows:
        item = results[row["video"]]
        times, _, _ = container_frames(row["video"])
        assert item["error"] is None
        assert len(times) == row["native_decoded_frames"]
        assert item["shape"] == (row["tracked_T"], 3, *row["frame_hw"]), row["video"]
        assert item["cluster_frames"].tolist() == row["frames_id_dict_values"], row["video"]
        kept = [float(times[k * row["interval"]]) for k in range(row["tracked_T"])]
        np.testing.assert_allclose(item["frame_times"].numpy(), kept, rtol=0, atol=1e-9)
        assert item["source_fps"] == pytest.approx(row["pyav_average_rate"])


def test_legacy_interval_zero_is_an_error_item(csv_dir):
    csv = write_csv(csv_dir / "zero.csv", "video_path,dataset", [f"{VIDEOS / 'tiny_ssv2.webm'},test"])
    item = VideoCSVDataset(csv, fps=30.0, fps_rule="interval")[0]  # round(12 / 30) = 0
    assert item.frames is None and "interval" in item.error and "\n" not in item.error
    ok = VideoCSVDataset(csv, fps=30.0)[0]  # the timestamp rule repeats frames instead
    assert ok.error is None and ok.frames.shape[0] == math.floor(0.917 * 30 + 0.5) + 1


# ---------------------------------------------------------------------------------------------
# datasets, per-row fps, sizes
# ---------------------------------------------------------------------------------------------


def test_ssv2_native_and_other_dataset_at_10fps(csv_dir):
    webm = VIDEOS / "bear_ssv2.webm"
    csv = write_csv(
        csv_dir / "ssv2.csv",
        "video_path,dataset,video_id,fps",
        [f"{webm},ssv2,a,", f"{webm},SomethingV2,b,", f"{webm},kinetics,c,", f"{webm},kinetics,d,native",
         f"{webm},ssv2,e,6"],
    )
    ds = VideoCSVDataset(csv)
    items = [ds[i] for i in range(len(ds))]
    assert [it.frames.shape[0] for it in items] == [33, 33, 28, 33, 17]
    assert [it.fps for it in items] == [None, None, 10.0, None, 6.0]
    assert items[0].frames.shape == (33, 3, 240, 428)
    assert items[0].cluster_frames.tolist() == list(range(31)) + [32]
    assert [it.row for it in items] == [0, 1, 2, 3, 4]
    assert all(it.source_fps == 12.0 for it in items)


def test_portrait_and_720p_clips(all_clips):
    results = all_clips(fps=10.0)
    assert results["apple.mp4"]["shape"] == (50, 3, 720, 1296)
    assert results["backpack.mp4"]["shape"] == (44, 3, 480, 368)
    assert results["cat.mp4"]["shape"][2:] == (480, 368)


def test_item_video_is_uint8_t3hw_and_a_pyav_failure_falls_back_to_decord(csv_dir, monkeypatch):
    """`auto` decodes with PyAV; where PyAV fails on a file, decord serves it with the same frames at
    the same timestamps (pillow.mp4's index holds two undecodable trailing packets)."""
    csv = write_csv(csv_dir / "pix.csv", "video_path,dataset", [f"{VIDEOS / 'pillow.mp4'},test",
                                                                 f"{VIDEOS / 'tiny_25fps.mp4'},test"])
    ds = VideoCSVDataset(csv, fps=10.0)
    first = [ds[0], ds[1]]

    def broken_pyav(*args, **kwargs):
        raise RuntimeError("simulated PyAV failure")

    monkeypatch.setattr(decode_mod, "decode_pyav", broken_pyav)
    second = [ds[0], ds[1]]
    for a, b in zip(first, second):
        assert a.decoder == "pyav" and b.decoder == "decord" and b.error is None
        assert a.frames.dtype == torch.uint8 and a.frames.shape == b.frames.shape
        assert a.frame_times.tolist() == b.frame_times.tolist()
        assert a.cluster_frames.tolist() == b.cluster_frames.tolist()
        diff = (a.frames.float() - b.frames.float()).abs().mean(dim=(1, 2, 3))  # (T,)
        assert diff.max() < 2.0, diff.max()


# ---------------------------------------------------------------------------------------------
# broken inputs
# ---------------------------------------------------------------------------------------------


def make_clip(path: Path, frames: int = 6, size=(48, 64), options=None) -> Path:
    """A tiny mpeg4 clip at 10 fps (frame i has grey level 12 * i)."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height, stream.width = size
        stream.pix_fmt = "yuv420p"
        for i in range(frames):
            img = np.full((*size, 3), 12 * i, np.uint8)
            container.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def make_audio_only(path: Path) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        stream.layout = "mono"
        for i in range(5):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


def make_undecodable(path: Path) -> Path:
    """A video stream whose packets are random bytes: opens, but zero decodable frames."""
    rng = np.random.default_rng(0)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("h264", rate=10)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        container.start_encoding()
        for i in range(5):
            packet = av.Packet(rng.integers(0, 256, 500, dtype=np.uint8).tobytes())
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, i, i, stream.time_base
            container.mux(packet)
    return path


def make_truncated(path: Path) -> Path:
    """An mp4 with its header first ("faststart") cut in half: opens, but half the frames are gone."""
    full = make_clip(path.with_name("full_" + path.name), frames=20, options={"movflags": "faststart"})
    data = full.read_bytes()
    assert data.find(b"moov") < data.find(b"mdat")
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.fixture(scope="module")
def broken_csv(csv_dir):
    (csv_dir / "empty.mp4").write_bytes(b"")
    (csv_dir / "a_folder.mp4").mkdir()
    make_audio_only(csv_dir / "audio_only.mp4")
    make_undecodable(csv_dir / "undecodable.mkv")
    make_truncated(csv_dir / "truncated.mp4")
    paths = [VIDEOS / n for n in BROKEN] + [csv_dir / "missing.mp4", csv_dir / "empty.mp4",
                                             csv_dir / "a_folder.mp4", csv_dir / "audio_only.mp4",
                                             csv_dir / "undecodable.mkv", csv_dir / "truncated.mp4"]
    return write_csv(csv_dir / "broken.csv", "video_path,dataset", [f"{p},test" for p in paths])


def test_every_broken_input_is_an_error_item(broken_csv):
    loader = DataLoader(VideoCSVDataset(broken_csv), batch_size=4, collate_fn=collate_videos)
    items = [it for batch in loader for it in batch]
    assert len(items) == 8
    reasons = {Path(it.video_path).name: it.error for it in items}
    for it in items:
        assert it.frames is None
        assert isinstance(it.error, str) and it.error and "\n" not in it.error
        assert it.frame_times.shape == (0,) and it.cluster_frames.shape == (0,)
        assert it.decoder in ("decord", "pyav") and math.isnan(it.source_fps)
    assert "not found" in reasons["missing.mp4"]
    assert "0 bytes" in reasons["empty.mp4"]
    assert "directory" in reasons["a_folder.mp4"]
    assert "no video stream" in reasons["audio_only.mp4"]
    assert "no decodable video frames" in reasons["undecodable.mkv"]
    assert "truncated file: the header lists 20 frames, only" in reasons["truncated.mp4"]
    for name in BROKEN:
        assert "cannot open" in reasons[name] and "decord" in reasons[name] and "pyav" in reasons[name]


def test_truncated_file_is_also_an_error_for_the_fallback_decoder(broken_csv, csv_dir, monkeypatch):
    def broken_pyav(*args, **kwargs):
        raise RuntimeError("simulated PyAV failure")

    monkeypatch.setattr(decode_mod, "decode_pyav", broken_pyav)
    csv = write_csv(csv_dir / "trunc.csv", "video_path,dataset",
                    [f"{csv_dir / 'truncated.mp4'},test", f"{csv_dir / 'full_truncated.mp4'},test"])
    cut, full = VideoCSVDataset(csv, fps=None)[0], VideoCSVDataset(csv, fps=None)[1]
    assert cut.frames is None and cut.decoder == "decord" and "truncated" in cut.error
    assert full.error is None and full.frames.shape == (20, 3, 48, 64)
    levels = full.frames[:, :, 24, 32].float().mean(dim=1)  # (T,) grey level 12 * i
    assert torch.allclose(levels, 12 * torch.arange(20.0), atol=5)  # lossy mpeg4, steps of 12


def test_a_clip_too_large_for_memory_is_an_error_item(csv_dir, monkeypatch):
    csv = write_csv(csv_dir / "mem.csv", "video_path,dataset", [f"{VIDEOS / 'tiny_25fps.mp4'},test"])
    monkeypatch.setattr(frames_mod, "available_memory", lambda: 11 * 240 * 320 * 3)
    item = VideoCSVDataset(csv, fps=10.0)[0]  # 17 frames of 240x320 > half of 11 frames' worth
    assert item.frames is None and "max_frames" in item.error and "17 frames of 240x320" in item.error
    assert VideoCSVDataset(csv, fps=10.0, max_frames=5)[0].frames.shape[0] == 5


def test_collate_passes_items_through():
    items = [{"video": None, "error": "x"}, {"video": torch.zeros(2, 3, 4, 4, dtype=torch.uint8), "error": None}]
    out = collate_videos(items)
    assert out == items and isinstance(out, list)


# ---------------------------------------------------------------------------------------------
# workers, leaks, DataModule, distributed sampling
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_csv(csv_dir, broken_csv):
    lines = [f"{VIDEOS / 'tiny_25fps.mp4'},test", f"{VIDEOS / 'tiny_ssv2.webm'},ssv2",
             f"{VIDEOS / 'not_a_video.mp4'},test", f"{csv_dir / 'missing.mp4'},test",
             f"{VIDEOS / 'bear_ssv2.webm'},test"]
    return write_csv(csv_dir / "mixed.csv", "video_path,dataset", lines)


def assert_same_items(a: list[Clip], b: list[Clip]):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in (f.name for f in dataclasses.fields(Clip)):
            u, v = getattr(x, key), getattr(y, key)
            if isinstance(u, torch.Tensor):
                assert torch.equal(u, v), key
            elif isinstance(u, float) and math.isnan(u):
                assert math.isnan(v)
            else:
                assert u == v, key


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_two_workers_return_what_zero_workers_return(mixed_csv, context):
    ds = VideoCSVDataset(mixed_csv)
    serial = [it for batch in DataLoader(ds, batch_size=2, collate_fn=collate_videos) for it in batch]
    parallel = [it for batch in DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_videos,
                                           multiprocessing_context=context) for it in batch]
    assert [it.error is None for it in serial] == [True, True, False, False, True]
    assert_same_items(serial, parallel)


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def test_no_file_handle_or_memory_leak_over_1000_items(csv_dir, broken_csv):
    """1,000 items: tiny clips through decord, plus failures through both decoders' error paths."""
    clip = make_clip(csv_dir / "leak.mp4")
    undecodable = csv_dir / "undecodable.mkv"  # decord fails, PyAV decodes nothing
    lines = []
    for i in range(1000):
        path = VIDEOS / "not_a_video.mp4" if i % 10 == 3 else undecodable if i % 10 == 7 else clip
        lines.append(f"{path},test,v{i}")
    ds = VideoCSVDataset(write_csv(csv_dir / "leak.csv", "video_path,dataset,video_id", lines), fps=None)
    for i in range(100):  # warm-up: libraries load, caches fill
        ds[i]
    fds, rss = _open_fds(), _rss_mb()
    for i in range(100, 1000):
        item = ds[i]
        assert (item.frames is None) == (i % 10 in (3, 7))
    assert _open_fds() == fds
    assert _rss_mb() - rss < 40, (rss, _rss_mb())
    assert item.frames.shape == (6, 3, 48, 64)


# ---------------------------------------------------------------------------------------------
# ids, paths, max_frames
# ---------------------------------------------------------------------------------------------


def test_video_ids_and_relative_paths(tmp_path, monkeypatch):
    sub = tmp_path / "data"
    sub.mkdir()
    (sub / "clip.v2.mp4").symlink_to(VIDEOS / "tiny_25fps.mp4")
    (sub / "12345.webm").symlink_to(VIDEOS / "tiny_ssv2.webm")
    csv = write_csv(sub / "list.csv", "video_path,dataset,video_id",
                    ["clip.v2.mp4,test,", "12345.webm,ssv2,", "12345.webm,test,007"])
    monkeypatch.chdir(tmp_path)  # not the CSV's folder: paths resolve relative to the CSV
    ds = VideoCSVDataset(csv)
    assert [r.video_id for r in ds.rows] == ["clip.v2", "12345", "007"]
    items = [ds[i] for i in range(len(ds))]
    assert all(it.error is None for it in items)
    assert items[0].video_path == str(sub / "clip.v2.mp4")
    assert [it.frames.shape[0] for it in items] == [17, 12, 10]


def test_max_frames_resamples_evenly_in_time(csv_dir):
    csv = write_csv(csv_dir / "max.csv", "video_path,dataset", [f"{VIDEOS / 'tiny_25fps.mp4'},test"])
    item = VideoCSVDataset(csv, fps=None, max_frames=16)[0]  # 40 native frames over 1.56 s
    assert item.error is None and item.frames.shape[0] == 16
    assert item.fps == pytest.approx(15 / 1.56)
    ft = item.frame_times.numpy()
    assert ft[0] == 0 and ft[-1] == pytest.approx(1.56)
    assert np.all(np.abs(ft - np.arange(16) * 1.56 / 15) <= 0.02 + 1e-9)  # within half a source frame
    assert VideoCSVDataset(csv, fps=10.0, max_frames=17)[0].frames.shape[0] == 17  # not over the cap
    legacy = VideoCSVDataset(csv, fps=None, fps_rule="interval", max_frames=16)[0]
    assert legacy.frames is None and "max_frames" in legacy.error
    with pytest.raises(ValueError, match="max_frames"):
        VideoCSVDataset(csv, max_frames=1)
