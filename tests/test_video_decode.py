"""The decoders (`semtrack.video.decode_video`): the pixels they give, how much of a stream they decode,
and how often they open the file.

Two references, neither of them the decoders under test:
* `tests/data/decoded_frames.json`: a digest of every shared clip's frames and timestamps as decoded
  by the implementation at the commit it names (before frame skipping), per decoder and frame plan.
  Record again only for a change meant to alter decoded frames (`python tests/test_video_decode.py
  --record`), with the reason in the commit message.
* `full_decode`: every frame decoded in order with plain PyAV, then the plan applied; for clips made
  here with many keyframes and B-frames, where skipping and seeking have something to skip.
"""
from __future__ import annotations

import gc
import hashlib
import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import REPO_ROOT, shared_path  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
import semtrack.video.decode_pyav as pyav_mod  # noqa: E402
from semtrack.video import FramePlan, decode_video  # noqa: E402
from semtrack.video.stream import Packets, demux  # noqa: E402

RECORDED = Path(__file__).resolve().parent / "data" / "decoded_frames.json"
VIDEOS = shared_path("videos")
BROKEN = ("not_a_video.mp4", "corrupt_truncated.mp4")
CLIPS = sorted(p.name for p in VIDEOS.iterdir() if p.suffix in (".mp4", ".webm") and p.name not in BROKEN)
SMALL = ("bear_ssv2.webm", "tiny_25fps.mp4", "tiny_ssv2.webm", "paragliding_k400.mp4")
PLANS = {  # name -> (plan, clips)
    "10fps": (FramePlan(10.0, "timestamp", None), CLIPS),
    "native": (FramePlan(None, "timestamp", None), SMALL),
    "interval10": (FramePlan(10.0, "interval", None), SMALL),
    "max5": (FramePlan(None, "timestamp", 5), SMALL + ("bear.mp4", "pillow.mp4")),
    "2fps": (FramePlan(2.0, "timestamp", None), SMALL + ("teddy.mp4",)),
}
DECODERS = ("decord", "pyav")


def digest(path: Path, plan: FramePlan, decoder: str) -> dict:
    decoded, served, error = decode_video(str(path), plan, decoder)
    assert error is None and served == decoder, (path.name, error)
    frames = np.ascontiguousarray(decoded.frames)
    return {"shape": list(frames.shape), "frames_sha256": hashlib.sha256(frames.tobytes()).hexdigest(),
            "times": decoded.times.tolist(), "source_fps": decoded.source_fps, "fps": decoded.fps}


def record() -> None:
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
    out = {"commit": commit, "digests": {
        decoder: {name: {clip: digest(VIDEOS / clip, plan, decoder) for clip in clips}
                  for name, (plan, clips) in PLANS.items()}
        for decoder in DECODERS}}
    RECORDED.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {RECORDED} (commit {commit})")


@pytest.mark.parametrize("decoder", DECODERS)
@pytest.mark.parametrize("plan_name", list(PLANS))
def test_shared_clips_decode_to_the_recorded_pixels(decoder, plan_name):
    recorded = json.loads(RECORDED.read_text())["digests"][decoder][plan_name]
    plan, clips = PLANS[plan_name]
    assert sorted(recorded) == sorted(clips)
    for clip in clips:
        assert digest(VIDEOS / clip, plan, decoder) == recorded[clip], (clip, decoder, plan_name)


# ---------------------------------------------------------------------------------------------
# clips with something to skip
# ---------------------------------------------------------------------------------------------


def full_decode(path: Path, plan: FramePlan) -> tuple[np.ndarray, np.ndarray]:
    """-> (frames (T, H, W, 3), times (T,)): every frame decoded in order, the plan applied to the
    decoder's own frame timestamps (no display matrix: the clips here have none)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        images = {}
        for frame in container.decode(stream):
            images.setdefault(frame.pts, frame.to_ndarray(format="rgb24"))
        pts, tb, rate = sorted(images), Fraction(stream.time_base), float(stream.average_rate)
    times = np.array([float((p - pts[0]) * tb) for p in pts])
    idx, _ = plan(times, rate)
    return np.stack([images[pts[i]] for i in idx]), times[idx]


def moving_pattern(t: int, size=(96, 128)) -> np.ndarray:
    """A textured scene that pans and changes, so encoders use P- and B-frames."""
    h, w = size
    y, x = np.mgrid[0:h, 0:w]
    r = (np.sin((x + 3 * t) / 7.0) * 60 + 128 + (t % 7) * 9).astype(np.uint8)
    g = ((x * y + 5 * t) % 251).astype(np.uint8)
    b = (np.cos((y - 2 * t) / 5.0) * 70 + 120).astype(np.uint8)
    return np.stack([r, g, b], axis=-1)


def make_clip(path: Path, codec: str, options: dict, frames: int = 60, rate: int = 30) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=rate, options=options)
        stream.height, stream.width, stream.pix_fmt = 96, 128, "yuv420p"
        for t in range(frames):
            frame = av.VideoFrame.from_ndarray(moving_pattern(t), format="rgb24")
            frame.pts = t
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return path


KEYFRAMED = {  # many keyframes; B-frames where the codec has them
    "h264_closed_gop.mp4": ("libx264", {"g": "8", "bf": "3", "preset": "fast"}),
    "h264_open_gop.mkv": ("libx264", {"x264-params": "keyint=8:open-gop=1:bframes=3", "preset": "fast"}),
    "mpeg4_bframes.avi": ("mpeg4", {"g": "9", "bf": "2", "qscale": "4"}),
    "vp9_keyframes.webm": ("libvpx-vp9", {"g": "6", "deadline": "realtime", "cpu-used": "8"}),
    "h264_in_avi.avi": ("libx264", {"g": "8", "bf": "0", "preset": "fast"}),
}
DECORD_REFUSES = {  # decord's wrong frames, and what the probe sees
    "h264_open_gop.mkv": "open GOPs", "mpeg4_bframes.avi": "timestamp of frame",
    "h264_in_avi.avi": "timestamp of frame"}
SPARSE = {"2fps": FramePlan(2.0, "timestamp", None), "10fps": FramePlan(10.0, "timestamp", None),
          "max3": FramePlan(None, "timestamp", 3), "interval7": FramePlan(30 / 7, "interval", None)}


@pytest.fixture(scope="module")
def keyframed(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("keyframed")
    return {name: make_clip(folder / name, codec, options) for name, (codec, options) in KEYFRAMED.items()}


def keyframe_count(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(p.is_keyframe for p in container.demux(video=0) if p.size)


@pytest.mark.parametrize("name", list(KEYFRAMED))
def test_skipping_and_seeking_give_the_frames_of_a_full_decode(keyframed, name):
    """decord seeks and skips wrongly in open-GOP streams and misreads timestamps in some AVI files: a
    forced decord refuses them; `auto` (PyAV) and both decoders elsewhere give a full decode's frames."""
    path, refused = keyframed[name], name in DECORD_REFUSES
    assert keyframe_count(path) >= 6
    for plan_name, plan in SPARSE.items():
        expected, times = full_decode(path, plan)
        for decoder in ("auto", "decord", "pyav"):
            decoded, served, error = decode_video(str(path), plan, decoder)
            if decoder == "decord" and refused:
                assert decoded is None and "use decoder='pyav'" in error, (name, plan_name, error)
                assert DECORD_REFUSES[name] in error, (name, error)
                continue
            assert error is None, (name, plan_name, decoder, error)
            assert served == ("decord" if decoder == "decord" else "pyav")
            assert np.array_equal(decoded.frames, expected), (name, plan_name, decoder)
            np.testing.assert_allclose(decoded.times, times, rtol=0, atol=1e-9)


def pyav_actions(path: Path, plan: FramePlan) -> list[int]:
    """What the PyAV decoder's first pass does with each packet for `plan`."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        demuxed, tb = demux(container, stream, keep_bytes=0), Fraction(stream.time_base)
    times = np.array([float((p - demuxed.frame_pts[0]) * tb) for p in demuxed.frame_pts])
    idx, _ = plan(times, 30.0)
    return pyav_mod._plan_packets(demuxed, {demuxed.frame_pts[i] for i in idx})[0]


def test_sparse_selections_skip_whole_keyframe_runs_only_where_they_start_cleanly(keyframed):
    closed = pyav_actions(keyframed["h264_closed_gop.mp4"], SPARSE["2fps"])
    assert closed.count(pyav_mod._DROP) == 3 * 8  # 1 frame in 15: the runs of frames 16-23, 32-39, 48-55 go unsent
    open_gop = pyav_actions(keyframed["h264_open_gop.mkv"], SPARSE["2fps"])
    assert pyav_mod._DROP not in open_gop  # every keyframe has leading B-frames: nothing may be dropped
    dense = pyav_actions(keyframed["h264_closed_gop.mp4"], SPARSE["10fps"])
    assert pyav_mod._DROP not in dense and dense.count(pyav_mod._SKIP_NONREF) > 0


def test_plan_packets_on_hand_made_streams():
    """Decode order, pts and keyframes written out: I0 P3 B1 B2 | I6 P9 B7 B8 | I12 ... (closed), and
    the same with a last keyframe shown after two leading B-frames (open)."""
    closed = Packets(pts=[0, 3, 1, 2, 6, 9, 7, 8, 12, 15, 13, 14], keyframe=[True, False, False, False] * 3,
                     frame_pts=list(range(16)), present=12, head=[], kept=None)
    actions, restart = pyav_mod._plan_packets(closed, {0, 13})
    S, N, D = pyav_mod._SEND, pyav_mod._SKIP_NONREF, pyav_mod._DROP
    assert actions == [S, N, N, N, D, D, D, D, N, N, S]  # stops after the last selected packet (13)
    assert restart == [False] * 8 + [True, False, False]
    assert not closed.open_gop
    opened = Packets(pts=[0, 3, 1, 2, 6, 9, 7, 8, 14, 12, 13, 17, 15, 16],
                     keyframe=[True, False, False, False] * 2 + [True] + [False] * 5,
                     frame_pts=list(range(18)), present=14, head=[], kept=None)
    actions, restart = pyav_mod._plan_packets(opened, {0, 15})
    assert actions == [S] + [N] * 11 + [S] and not any(restart)  # I14 has leading B12, B13: I6's run stays
    assert opened.open_gop
    unknown = Packets(pts=[0, 1, None, 3, 4], keyframe=[True, False, True, False, True], frame_pts=[0, 1, 3, 4],
                      present=4, head=[], kept=None)
    assert pyav_mod._plan_packets(unknown, {4})[0] == [N, N, N, N, S]  # a packet without pts: no run dropped


def test_a_file_too_large_to_keep_its_packets_is_demuxed_again(keyframed, monkeypatch):
    path, plan = keyframed["h264_closed_gop.mp4"], SPARSE["2fps"]
    kept, _, _ = decode_video(str(path), plan, "pyav")
    monkeypatch.setattr(pyav_mod, "_KEEP_PACKET_BYTES", 1000)
    again, served, error = decode_video(str(path), plan, "pyav")
    assert error is None and served == "pyav"
    assert np.array_equal(again.frames, kept.frames) and np.array_equal(again.times, kept.times)


def test_each_decoder_opens_the_file_once_with_pyav(keyframed, monkeypatch):
    opened = []
    real_open = av.open

    def counting_open(*args, **kwargs):
        opened.append(args[0])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", counting_open)
    for decoder in ("auto", "decord", "pyav"):
        opened.clear()
        decoded, _, error = decode_video(str(VIDEOS / "bear.mp4"), FramePlan(10.0, "timestamp", None), decoder)
        assert error is None and len(decoded.frames) == 28
        assert opened == [str(VIDEOS / "bear.mp4")], decoder


class _CollectGarbage(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 1

    def __getitem__(self, i: int) -> int:
        return gc.collect()


@pytest.mark.timeout(120)
def test_frames_left_in_reference_cycles_are_freed_in_a_forked_worker():
    """A PyAV frame whose side data was read sits in a reference cycle until the garbage collector
    runs; if it held a scaler with threads, freeing it in a forked worker would hang for ever."""
    gc.collect()
    gc.disable()
    try:
        decoded, _, error = decode_video(str(VIDEOS / "tiny_25fps.mp4"), FramePlan(10.0, "timestamp", None), "pyav")
        assert error is None
        loader = torch.utils.data.DataLoader(_CollectGarbage(), batch_size=None, num_workers=1,
                                             multiprocessing_context="fork")
        assert list(loader)[0] > 0  # the worker found the cycle and freed it
    finally:
        gc.enable()


if __name__ == "__main__":
    if sys.argv[1:] != ["--record"]:
        sys.exit("usage: python tests/test_video_decode.py --record")
    record()
