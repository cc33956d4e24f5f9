"""The PyAV decoder: one open of the file for the header, the frame timestamps and the decoding, and
only the frames the selection needs decoded.

1. The demuxer lists every packet (no decoding): the frame timestamps (packets outside an mp4 edit
   list are not frames), the sample count for the truncation check, the keyframes. The packets are
   kept for step 3 (up to `_KEEP_PACKET_BYTES`; a larger file is demuxed again).
2. The plan selects frames from those timestamps.
3. The decoder gets the packets in decode order up to the last one whose frame is selected. A
   packet whose frame is not selected is sent with `skip_frame = NONREF`: the decoder drops it if no
   other frame refers to it (an H.264/HEVC/MPEG-4 non-reference B-frame) and decodes it otherwise.
   A keyframe-to-keyframe run of packets none of whose frames is selected is not sent at all when
   the next keyframe starts cleanly (no later packet shows before it); the decoder is drained and
   reset there, as after a seek. Only selected frames are converted to RGB (then to the displayed
   orientation, from the first frame's display matrix).

Skipping never changes a selected frame's pixels: a non-reference frame is referred to by no other
frame, and decoding can start at a keyframe that no later packet shows before (what the container's
keyframe flag promises: an IDR or recovery-point picture, a VP9 keyframe). If a selected frame does
not come out (the decoder dropped it), the whole stream is decoded instead, and if the decoder's
frames differ from the demuxer's list the selection is redone on the frames it did output (then
once more at most).
"""
from __future__ import annotations

import contextlib
from fractions import Fraction
from typing import Iterable, Iterator

import numpy as np

from semtrack.video.frames import FramePlan, ItemError, select_frames
from semtrack.video.orientation import Orientation, frame_orientation
from semtrack.video.stream import Decoded, Packets, StreamInfo, decoder_threads, demux

_KEEP_PACKET_BYTES = 64 * 2**20  # compressed packets kept between demuxing and decoding, per video

_SEND, _SKIP_NONREF, _DROP = 0, 1, 2  # what the decoding pass does with a packet


def _scaler_threads() -> dict:
    """The RGB conversion's threads as the decoder's (`decoder_threads`), where PyAV lets one say
    (17.0 on; before, the scaler was single-threaded)."""
    import av

    major = int(av.__version__.split(".")[0])
    return {"threads": decoder_threads()} if major >= 17 else {}


def _packets_again(path: str, demuxed: Packets) -> Iterator:
    """The packets of `demux` once more, in the same order: the kept ones, or a second demux."""
    if demuxed.kept is not None:
        yield from demuxed.kept
        return
    import av

    with av.open(path) as container:
        again = (p for p in container.demux(container.streams.video[0]) if p.size)
        for i, packet in enumerate(again):
            if i >= len(demuxed.pts) or packet.pts != demuxed.pts[i]:
                raise RuntimeError("PyAV demuxed different packets on a second read")
            yield packet


def _plan_packets(demuxed: Packets, wanted: set[int]) -> tuple[list[int], list[bool]]:
    """-> (per packet up to the last selected one: `_SEND`, `_SKIP_NONREF` or `_DROP`; per packet:
    drain and reset the decoder before it). See the module docstring."""
    selected = [p in wanted for p in demuxed.pts]
    stop = max(i for i, s in enumerate(selected) if s) + 1
    actions = [_SEND if s else _SKIP_NONREF for s in selected[:stop]]
    restart = [False] * stop
    clean = demuxed.clean(stop)  # all False when some pts is unknown: no run is dropped
    starts = [i for i in range(stop) if demuxed.keyframe[i]]
    bounds = ([0] if not starts or starts[0] > 0 else []) + starts + [stop]
    for begin, end in zip(bounds[:-1], bounds[1:]):
        if end < stop and clean[end] and not any(selected[begin:end]):
            actions[begin:end] = [_DROP] * (end - begin)
            restart[end] = True
    return actions, restart


class _Frames:
    """The selected frames as they come out of the decoder, in the displayed orientation.

    One `VideoReformatter` converts them all (one scaler set up per clip, not per frame, and none
    left on a frame: a frame that ends up in a reference cycle is then safe to free in a forked
    DataLoader worker, where freeing a scaler's threads would hang)."""

    def __init__(self, positions: dict[int, list[int]], count: int):
        from av.video.reformatter import VideoReformatter

        self.positions, self.count = positions, count  # pts -> indices into the output
        self.out: np.ndarray | None = None  # (T, H, W, 3) uint8
        self.filled: set[int] = set()
        self.orientation: Orientation | None = None
        self.decoded: list[int] = []
        self.rgb = VideoReformatter()
        self.rgb_options = {"format": "rgb24", **_scaler_threads()}

    def take(self, frames) -> None:
        for frame in frames:
            if frame.pts is None:
                raise ItemError("PyAV decoded a frame without a timestamp")
            self.decoded.append(frame.pts)
            if self.orientation is None:
                self.orientation = frame_orientation(frame)
            if frame.pts not in self.positions or frame.pts in self.filled:
                continue
            rgb = self.rgb.reformat(frame, **self.rgb_options).to_ndarray()  # (H, W, 3) uint8
            image = self.orientation.apply(rgb[None])[0]  # a view
            if self.out is None:
                self.out = np.empty((self.count, *image.shape), dtype=np.uint8)
            self.out[self.positions[frame.pts]] = image
            self.filled.add(frame.pts)

    @property
    def complete(self) -> bool:
        return len(self.filled) == len(self.positions)


def _decode(codec, packets: Iterable, actions: list[int] | None, restart: list[bool] | None, sink: _Frames) -> None:
    """Send `packets` to `codec` as `actions` say (all of them when None), then drain and reset it."""
    sent = False  # since the last reset
    with contextlib.closing(iter(packets)) as stream:
        for i, packet in enumerate(stream):
            if actions is not None:
                if i >= len(actions):
                    break
                if restart[i] and sent:
                    sink.take(codec.decode(None))
                    codec.flush_buffers()
                    sent = False
                if actions[i] == _DROP:
                    continue
                codec.skip_frame = "NONREF" if actions[i] == _SKIP_NONREF else "DEFAULT"
            sink.take(codec.decode(packet))
            sent = True
    sink.take(codec.decode(None))
    codec.flush_buffers()
    codec.skip_frame = "DEFAULT"


def _rate_from_times(times: np.ndarray) -> float:
    return (len(times) - 1) / float(times[-1]) if len(times) > 1 and times[-1] > 0 else float("nan")


def _selection(plan: FramePlan, pts: list[int], time_base, rate: float | None, size: tuple[int, int]):
    """-> (indices (T,) into `pts`, target rate, frame times (N,) s, source rate)."""
    if not pts:
        raise ItemError("no decodable video frames")
    times = np.array([float((p - pts[0]) * time_base) for p in pts], dtype=np.float64)
    source_fps = rate if rate else _rate_from_times(times)
    idx, fps = select_frames(plan, times, source_fps, size)
    return idx, fps, times, source_fps


def _sink(pts: list[int], idx: np.ndarray) -> _Frames:
    positions: dict[int, list[int]] = {}
    for k, i in enumerate(idx.tolist()):
        positions.setdefault(pts[i], []).append(k)
    return _Frames(positions, len(idx))


def decode_pyav(container, path: str, plan: FramePlan) -> Decoded:
    """Decode the frames `plan` selects (module docstring) from `container`, the file `path` opened
    with PyAV. Raises `ItemError` for the clip's own problems; PyAV's exceptions propagate."""
    info = StreamInfo.read(container)
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    if decoder_threads():
        stream.codec_context.thread_count = 1
    codec, time_base, size = stream.codec_context, Fraction(stream.time_base), (info.height, info.width)
    demuxed = demux(container, stream, _KEEP_PACKET_BYTES)
    info.check_complete(demuxed.present)
    pts = demuxed.frame_pts
    idx, fps, times, source_fps = _selection(plan, pts, time_base, info.average_rate, size)
    sink = _sink(pts, idx)
    _decode(codec, _packets_again(path, demuxed), *_plan_packets(demuxed, set(sink.positions)), sink)
    if sink.complete:
        return Decoded(sink.out, times[idx], source_fps, fps)
    for _ in range(2):  # a selected frame did not come out: every frame, as the decoder outputs them
        idx, fps, times, source_fps = _selection(plan, pts, time_base, info.average_rate, size)
        sink = _sink(pts, idx)
        _decode(codec, _packets_again(path, demuxed), None, None, sink)
        decoded = sorted(sink.decoded)
        if decoded == pts:
            return Decoded(sink.out, times[idx], source_fps, fps)
        pts = decoded
    raise ItemError("PyAV frame timestamps changed between two decodes")
