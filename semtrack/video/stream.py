"""What one PyAV open of a video file tells both decoders (`StreamInfo`, `probe`), and what a decoder
returns (`Decoded`)."""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
from torch.utils.data import get_worker_info

from semtrack.video.frames import ItemError, check_memory
from semtrack.video.orientation import Orientation, frame_orientation

_PROBE_PACKETS = 64  # packets tried at most to find a decodable frame's display matrix


@dataclass
class Decoded:
    """A decoded clip: its selected frames and their source timestamps."""

    frames: np.ndarray  # (T, H, W, 3) uint8, as shown (display matrix applied)
    times: np.ndarray  # (T,) float64 seconds relative to the first decoded frame
    source_fps: float
    fps: float | None  # target rate actually used (None = native)


def decoder_threads() -> int:
    """1 inside DataLoader workers (the workers are the parallelism), else 0 = decoder's choice."""
    return 1 if get_worker_info() is not None else 0


@dataclass(frozen=True)
class StreamInfo:
    """Header facts about a container's first video stream (no decoding)."""

    time_base: Fraction | None
    end_s: float | None  # mp4/mov edit-list end: (start_time + duration) * time_base; else None
    frames: int | None  # mp4/mov: sample count in the header (decodable or not); else None
    average_rate: float | None
    height: int  # coded
    width: int  # coded

    @classmethod
    def read(cls, container) -> StreamInfo:
        """From an open PyAV input container. Raises `ItemError` if it has no video stream or one
        coded frame does not fit in memory."""
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise ItemError(f"no video stream (streams: {', '.join(kinds)})")
        stream = container.streams.video[0]
        tb = Fraction(stream.time_base) if stream.time_base else None
        is_mov = container.format.name.startswith("mov")  # the mov,mp4,m4a,3gp,3g2,mj2 demuxer
        end_s = None
        if is_mov and tb is not None and stream.duration:
            end_s = float(((stream.start_time or 0) + stream.duration) * tb)
        frames = stream.frames if is_mov and stream.frames > 0 else None
        rate = float(stream.average_rate) if stream.average_rate else None
        height, width = stream.codec_context.height, stream.codec_context.width
        check_memory(1, height, width)
        return cls(tb, end_s, frames, rate, height, width)

    def check_complete(self, present: int) -> None:
        """Raise `ItemError` if fewer samples are in the file than its mp4 header lists."""
        if self.frames and present < self.frames:
            raise ItemError(f"truncated file: the header lists {self.frames} frames, only {present} are present")


@dataclass
class Packets:
    """One demux of the stream, per packet in decode order (PyAV's end-of-stream markers left out)."""

    pts: list[int | None]
    keyframe: list[bool]
    frame_pts: list[int]  # sorted timestamps of the frames: packets with a pts, inside the edit list
    present: int  # packets with a pts, inside the edit list or not (the truncation check)
    head: list  # the first `_PROBE_PACKETS` packets
    kept: list | None  # every packet, or None when they took more than the `keep_bytes` asked for

    def clean(self, stop: int) -> list[bool]:
        """Per packet i < stop: no later packet before `stop` is shown before it (a keyframe that is
        clean starts a run that decodes without what came before). All False if a pts is unknown."""
        clean, lowest = [False] * stop, None
        if any(p is None for p in self.pts[:stop]):
            return clean
        for i in range(stop - 1, -1, -1):
            lowest = self.pts[i] if lowest is None else min(lowest, self.pts[i])
            clean[i] = self.pts[i] == lowest
        return clean

    @property
    def open_gop(self) -> bool:
        """Some keyframe after the first has leading frames (later in decode order, shown before it)."""
        clean = self.clean(len(self.pts))
        if not any(clean):  # a pts is unknown (the last packet of a known order is always clean)
            return False
        return any(key and not ok for key, ok in zip(self.keyframe[1:], clean[1:]))


def demux(container, stream, keep_bytes: int) -> Packets:
    """Read every packet of `stream` (no decoding), keeping them while they total <= `keep_bytes`."""
    pts, keyframe, frame_pts, present, head, kept, size = [], [], [], 0, [], [], 0
    for packet in container.demux(stream):
        if packet.pts is not None:
            present += 1
            if not packet.is_discard:  # outside the mp4 edit list: decoded, never output
                frame_pts.append(packet.pts)
        if not packet.size:  # PyAV's end-of-stream marker
            continue
        pts.append(packet.pts)
        keyframe.append(packet.is_keyframe)
        if len(head) < _PROBE_PACKETS:
            head.append(packet)
        size += packet.size
        if kept is not None and size <= keep_bytes:
            kept.append(packet)
        else:
            kept = None
    frame_pts.sort()
    return Packets(pts, keyframe, frame_pts, present, head, kept)


def _first_orientation(codec, head: list) -> Orientation:
    """The display matrix the decoder attaches to the first frame it can decode from `head`; identity
    if there is none or no frame decodes. A keyframe is drained on its own (its picture at once, not
    after the decoder's reordering delay), so a stream with B-frames costs one decoded frame. Raises
    `ItemError` for unsupported matrices."""
    import av

    codec.thread_count = 1  # the frame without frame-threading delay
    try:
        for packet in head:
            frames = codec.decode(packet)
            if not frames and packet.is_keyframe:
                frames = codec.decode(None)  # drain
                codec.flush_buffers()  # accept packets again
            if frames:
                return frame_orientation(frames[0])
    except av.FFmpegError:  # undecodable: the decoders report it
        pass
    return Orientation()


@dataclass
class Probe:
    """What the decord decoder learns from PyAV: the header, the packets (not kept), the orientation."""

    info: StreamInfo
    packets: Packets
    orientation: Orientation


def probe(path: str) -> Probe:
    """One PyAV open: the header, a demux of every packet, and the first decodable frame's display
    matrix (decoded once one coded frame is known to fit in memory). Raises `ItemError` (see
    `StreamInfo.read`, `Orientation.from_display_matrix`); other exceptions (PyAV cannot open or read
    it) propagate."""
    import av

    with av.open(path) as container:
        info = StreamInfo.read(container)
        stream = container.streams.video[0]
        packets = demux(container, stream, keep_bytes=0)
        return Probe(info, packets, _first_orientation(stream.codec_context, packets.head))
