"""Hostile inputs for the video Dataset: bad paths, malformed CSVs, bogus timestamps, rotated videos,
cgroup memory limits. Each must give a clear ValueError (CSV) or an error item (one video) in bounded
time and memory, while the other rows of the same Dataset still decode.

Every input is built here: CSVs, synthetic clips written with PyAV, files and links in tmp_path, fake
/proc and cgroup trees. The expected display orientation follows PyAV's `set_display_rotation`
documentation (counter-clockwise degrees, then the mirrors), not the implementation.
"""
from __future__ import annotations

import math
import os
import tracemalloc
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

import semtrack.video.frames as frames_mod
from _shared import shared_path
from datamodules import VideoCSVDataset, collate_videos
from semtrack.resources import available_memory
from semtrack.video import FramePlan, decode_video

GOOD = shared_path("videos", "tiny_25fps.mp4")  # 40 frames, 320x240, 1.56 s: 17 frames at 10 fps


def write_csv(path: Path, header: str, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_bytes((header + "\n" + "".join(line + "\n" for line in lines)).encode(encoding))
    return path


def items_of(dataset) -> list[dict]:
    return [it for batch in DataLoader(dataset, batch_size=2, collate_fn=collate_videos) for it in batch]


def assert_error_item(item: dict, *fragments: str) -> None:
    assert item.frames is None, item.video_path
    error = item.error
    assert isinstance(error, str) and error and "\n" not in error and len(error) <= 300
    for fragment in fragments:
        assert fragment in error, (fragment, error)


def assert_good_item(item: dict) -> None:
    assert item.error is None, item.error
    assert item.frames.shape == (17, 3, 240, 320)


# ---------------------------------------------------------------------------------------------
# paths
# ---------------------------------------------------------------------------------------------


def test_hostile_paths_are_error_items_and_the_other_rows_decode(tmp_path):
    long_name = tmp_path / ("v" * 300 + ".mp4")  # one component over NAME_MAX (255)
    loop_a, loop_b = tmp_path / "loop_a.mp4", tmp_path / "loop_b.mp4"
    loop_a.symlink_to(loop_b)
    loop_b.symlink_to(loop_a)
    dangling = tmp_path / "dangling.mp4"
    dangling.symlink_to(tmp_path / "gone.mp4")
    fifo = tmp_path / "pipe.mp4"
    os.mkfifo(fifo)  # opening it for reading would block forever
    under_a_file = tmp_path / "plain.txt" / "clip.mp4"
    (tmp_path / "plain.txt").write_text("not a folder")
    cases = [
        (long_name, "file name too long"),
        (loop_a, "symlink loop"),
        (dangling, "broken symbolic link"),
        (fifo, "not a regular file"),
        (under_a_file, "not a directory"),
        (Path("/dev/null"), "not a regular file"),
    ]
    lines = [f"{GOOD},test,good0"] + [f"{p},test,bad{i}" for i, (p, _) in enumerate(cases)] + [f"{GOOD},test,good1"]
    items = items_of(VideoCSVDataset(write_csv(tmp_path / "paths.csv", "video_path,dataset,video_id", lines)))
    assert len(items) == len(cases) + 2
    assert_good_item(items[0])
    assert_good_item(items[-1])
    for item, (_, reason) in zip(items[1:-1], cases):
        assert_error_item(item, reason)
        assert item.decoder == "pyav" and math.isnan(item.source_fps)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unreadable_folder_and_file_are_permission_denied(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "clip.mp4").symlink_to(GOOD)
    unreadable = tmp_path / "unreadable.mp4"
    unreadable.write_bytes(GOOD.read_bytes())
    unreadable.chmod(0)
    locked.chmod(0)
    try:
        lines = [f"{locked / 'clip.mp4'},test,a", f"{unreadable},test,b", f"{GOOD},test,c"]
        items = items_of(VideoCSVDataset(write_csv(tmp_path / "perm.csv", "video_path,dataset,video_id", lines)))
    finally:
        locked.chmod(0o755)
    assert_error_item(items[0], "permission denied")
    assert_error_item(items[1], "permission denied")
    assert_good_item(items[2])


@pytest.mark.parametrize("decoder", ["auto", "decord", "pyav"])
def test_decode_video_never_raises_for_any_path(tmp_path, decoder):
    plan = FramePlan(10.0, "timestamp", None)
    hostile = ["", "\0clip.mp4", "/" + "d/" * 3000 + "clip.mp4", "x" * 5000, str(tmp_path), "/proc/self/mem"]
    for path in hostile:
        decoded, name, error = decode_video(path, plan, decoder)
        assert decoded is None and isinstance(error, str) and "\n" not in error, (path[:40], error)
        assert name == ("decord" if decoder == "decord" else "pyav")
    decoded, name, error = decode_video(str(GOOD), plan, decoder)
    assert error is None and decoded.frames.shape == (17, 240, 320, 3)
    assert name == ("decord" if decoder == "decord" else "pyav")


# ---------------------------------------------------------------------------------------------
# memory
# ---------------------------------------------------------------------------------------------


def make_bogus_timestamp_clip(path: Path, frames: int = 25, last_s: float = 2e7, options=None) -> Path:
    """`frames` mpeg4 frames at 10 fps, except that the last packet is stamped `last_s` seconds."""
    with av.open(str(path), "w", options=options or {}) as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.height, stream.width, stream.pix_fmt = 48, 64, "yuv420p"
        packets = []
        for i in range(frames):
            packets += stream.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 9 * i, np.uint8), format="rgb24"))
        packets += stream.encode(None)
        packets[-1].pts = packets[-1].dts = int(round(last_s / packets[-1].time_base))
        for packet in packets:
            container.mux(packet)
    return path


@pytest.mark.parametrize("decoder", ["auto", "decord", "pyav"])
def test_a_bogus_last_timestamp_is_refused_without_allocating(tmp_path, decoder):
    """K = floor(2e7 * 10 + 0.5) + 1 = 2e8 frames: refused from the timestamps alone (the frame plan
    itself would take ~10 GB)."""
    mkv = make_bogus_timestamp_clip(tmp_path / "bogus.mkv")
    paths = [mkv, GOOD]
    if decoder == "pyav":  # decord's float32 stamps cannot tell this mp4's last frame from its end
        paths.insert(1, make_bogus_timestamp_clip(tmp_path / "bogus_mp4.mp4", options={"video_track_timescale": "10"}))
    ds = VideoCSVDataset(write_csv(tmp_path / "bogus.csv", "video_path,dataset", [f"{p},test" for p in paths]),
                         decoder=decoder)
    tracemalloc.start()
    try:
        bogus = [ds[i] for i in range(len(paths) - 1)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for item in bogus:
        assert_error_item(item, "frames of 48x64 need", "GiB", "set max_frames")
        assert int(item.error.split()[0]) > 2 * 10**8
    assert peak < 20 * 2**20, peak
    assert_good_item(ds[len(paths) - 1])
    capped = VideoCSVDataset(ds.csv_path, decoder=decoder, max_frames=50)[0]
    assert capped.error is None and capped.frames.shape == (50, 3, 48, 64)
    assert capped.frame_times[-1] == pytest.approx(2e7)


def test_the_memory_allowance_is_shared_between_workers(tmp_path, monkeypatch):
    """17 frames of 240x320 fit in half of 3 clips' worth for one process, not in a quarter of it
    (each of two workers)."""
    need = 17 * (240 * 320 * 3 + frames_mod.INDEX_BYTES_PER_FRAME)
    monkeypatch.setattr(frames_mod, "available_memory", lambda: 3 * need)  # inherited by forked workers
    ds = VideoCSVDataset(write_csv(tmp_path / "w.csv", "video_path,dataset,video_id",
                                   [f"{GOOD},test,a", f"{GOOD},test,b"]))
    assert_good_item(ds[0])
    loader = DataLoader(ds, batch_size=1, num_workers=2, collate_fn=collate_videos, multiprocessing_context="fork")
    for batch in loader:
        assert_error_item(batch[0], "17 frames of 240x320", "1/4 of the available memory", "shared by 2")


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


GIB = 2**30
MEMINFO = f"MemTotal: {64 * GIB // 1024} kB\nMemAvailable: {48 * GIB // 1024} kB\n"


def test_available_memory_reads_cgroup_v2_without_a_namespace(tmp_path):
    """SLURM-like: /proc/self/cgroup names the full path; the job level (two up) has the tightest
    limit, the step has none, a higher slice a looser one; page cache on the inactive list is free."""
    job = "sys/fs/cgroup/system.slice/slurmstepd.scope/job_7"
    tree = write_tree(tmp_path, {
        "proc/meminfo": MEMINFO,
        "proc/self/cgroup": "0::/system.slice/slurmstepd.scope/job_7/step_0/user/task_0\n",
        f"{job}/step_0/user/task_0/memory.max": "max\n",
        f"{job}/step_0/user/task_0/memory.current": str(3 * GIB),
        f"{job}/memory.max": str(8 * GIB),
        f"{job}/memory.current": str(5 * GIB),
        f"{job}/memory.stat": f"anon {4 * GIB}\ninactive_file {GIB}\nactive_file {GIB}\n",
        "sys/fs/cgroup/system.slice/memory.max": str(32 * GIB),
        "sys/fs/cgroup/system.slice/memory.current": str(20 * GIB),
    })
    assert available_memory(tree / "proc", tree / "sys/fs/cgroup") == 8 * GIB - 5 * GIB + GIB


def test_available_memory_reads_cgroup_v2_in_a_namespace_and_a_foreign_path(tmp_path):
    files = {"proc/meminfo": MEMINFO, "sys/fs/cgroup/memory.max": str(6 * GIB),
             "sys/fs/cgroup/memory.current": str(2 * GIB)}
    for own in ("/", "/docker/0123abcd"):  # the latter is not under this mount: the mount's root counts
        tree = write_tree(tmp_path / own.strip("/").replace("/", "_"), {**files, "proc/self/cgroup": f"0::{own}\n"})
        assert available_memory(tree / "proc", tree / "sys/fs/cgroup") == 4 * GIB


def test_available_memory_reads_cgroup_v1(tmp_path):
    own = "sys/fs/cgroup/memory/slurm/uid_0/job_9"
    tree = write_tree(tmp_path, {
        "proc/meminfo": MEMINFO,
        "proc/self/cgroup": "12:pids:/slurm/uid_0/job_9\n4:memory:/slurm/uid_0/job_9\n1:name=systemd:/x\n0::/\n",
        f"{own}/memory.limit_in_bytes": str(10 * GIB),
        f"{own}/memory.usage_in_bytes": str(7 * GIB),
        f"{own}/memory.stat": f"inactive_file 1\ntotal_inactive_file {2 * GIB}\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": "9223372036854771712",  # v1's "no limit"
        "sys/fs/cgroup/memory/memory.usage_in_bytes": str(30 * GIB),
        "sys/fs/cgroup/unified/cgroup.controllers": "",  # hybrid: the unified tree has no memory files
    })
    assert available_memory(tree / "proc", tree / "sys/fs/cgroup") == 10 * GIB - 7 * GIB + 2 * GIB


def test_available_memory_without_limits_is_memavailable_and_none_when_unknown(tmp_path):
    tree = write_tree(tmp_path, {"proc/meminfo": MEMINFO, "proc/self/cgroup": "0::/a\n",
                                 "sys/fs/cgroup/a/memory.max": "max\n", "sys/fs/cgroup/a/memory.current": "5"})
    assert available_memory(tree / "proc", tree / "sys/fs/cgroup") == 48 * GIB
    assert available_memory(tmp_path / "nowhere", tmp_path / "nothing") is None
    real = available_memory()
    assert isinstance(real, int) and 0 < real


# ---------------------------------------------------------------------------------------------
# display matrix
# ---------------------------------------------------------------------------------------------


def pattern(height: int, width: int) -> np.ndarray:
    """(H, W, 3) uint8 with no symmetry: red block top-left, green bottom-right, blue ramp to the right."""
    img = np.zeros((height, width, 3), np.uint8)
    img[: height // 2, : width // 3, 0] = 250
    img[height // 2:, width // 2:, 1] = 250
    img[:, :, 2] = np.linspace(0, 250, width).astype(np.uint8)[None, :]
    return img


def make_oriented_clip(path: Path, size=(64, 128), degrees=0, hflip=False, vflip=False, frames=4) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10, options={"qscale": "2"})
        stream.height, stream.width, stream.pix_fmt = *size, "yuv420p"
        if degrees or hflip or vflip:
            stream.set_display_rotation(degrees, hflip=hflip, vflip=vflip)
        for _ in range(frames):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(pattern(*size), format="rgb24")))
        container.mux(stream.encode(None))
    return path


def displayed(img: np.ndarray, degrees: int, hflip: bool, vflip: bool) -> np.ndarray:
    """PyAV's documented meaning: turn counter-clockwise by `degrees`, then mirror."""
    out = np.rot90(img, k=degrees // 90)
    out = out[:, ::-1] if hflip else out
    return out[::-1] if vflip else out


def mean_abs(a: torch.Tensor, b: np.ndarray) -> float:
    return float(np.abs(a.permute(1, 2, 0).numpy().astype(np.int16) - b.astype(np.int16)).mean())


ORIENTATIONS = [(0, False, False), (90, False, False), (-90, False, False), (180, False, False),
                (0, True, False), (0, False, True), (90, True, False), (-90, False, True)]


@pytest.mark.parametrize("degrees,hflip,vflip", ORIENTATIONS)
def test_both_decoders_apply_the_display_matrix(tmp_path, degrees, hflip, vflip):
    """64x128 coded: display widths 64 and 128 are whole multiples of any row alignment, so decord
    serves every orientation; both decoders must then give the displayed frames."""
    clip = make_oriented_clip(tmp_path / "o.mp4", degrees=degrees, hflip=hflip, vflip=vflip)
    expected = displayed(pattern(64, 128), degrees, hflip, vflip)
    unrotated = pattern(64, 128)
    csv = write_csv(tmp_path / "o.csv", "video_path,dataset,video_id", [f"{clip},test,o", f"{GOOD},test,g"])
    by_decoder = {}
    for decoder in ("decord", "pyav", "auto"):
        ds = VideoCSVDataset(csv, fps=None, decoder=decoder)
        item = ds[0]
        assert item.error is None, (decoder, item.error)
        assert item.decoder == ("decord" if decoder == "decord" else "pyav")
        assert item.frames.shape == (4, 3, *expected.shape[:2])
        assert mean_abs(item.frames[0], expected) < 4
        assert_good_item(VideoCSVDataset(csv, decoder=decoder)[1])
        by_decoder[decoder] = item.frames
    if expected.shape == unrotated.shape and (degrees, hflip, vflip) != (0, False, False):
        assert mean_abs(by_decoder["pyav"][0], unrotated) > 20  # the orientations are told apart
    diff = (by_decoder["decord"].float() - by_decoder["pyav"].float()).abs().mean()
    assert diff < 2.0


@pytest.mark.parametrize("degrees", [90, -90])
def test_rotated_clip_decord_cannot_serve_falls_back_to_the_displayed_frames(tmp_path, degrees):
    """48x80 coded, turned: decord2 mis-sizes such rotated frames on some row alignments (and fails);
    `auto` must still give the displayed frames, and a forced decord never gives wrong ones."""
    clip = make_oriented_clip(tmp_path / "r.mp4", size=(48, 80), degrees=degrees)
    expected = displayed(pattern(48, 80), degrees, False, False)
    csv = write_csv(tmp_path / "r.csv", "video_path,dataset", [f"{clip},test"])
    auto = VideoCSVDataset(csv, fps=None)[0]
    assert auto.error is None and auto.frames.shape == (4, 3, 80, 48)
    assert mean_abs(auto.frames[0], expected) < 4
    forced = VideoCSVDataset(csv, fps=None, decoder="decord")[0]
    assert forced.decoder == "decord"
    if forced.frames is None:
        assert_error_item(forced, "cannot decode: decord:", "try decoder='pyav'")
    else:
        assert mean_abs(forced.frames[0], expected) < 4


def test_a_rotation_off_the_quarter_turns_is_an_error_item(tmp_path):
    clip = make_oriented_clip(tmp_path / "tilted.mp4", degrees=45)
    csv = write_csv(tmp_path / "t.csv", "video_path,dataset,video_id", [f"{clip},test,t", f"{GOOD},test,g"])
    for decoder in ("auto", "decord", "pyav"):
        ds = VideoCSVDataset(csv, decoder=decoder)
        assert_error_item(ds[0], "rotates by 45.0 degrees, not a multiple of 90")
        assert_good_item(ds[1])


def test_decoder_option_is_validated(tmp_path):
    csv = write_csv(tmp_path / "d.csv", "video_path,dataset", [f"{GOOD},test"])
    with pytest.raises(ValueError, match="decoder must be one of"):
        VideoCSVDataset(csv, decoder="ffmpeg")
