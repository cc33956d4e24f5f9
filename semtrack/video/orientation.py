"""How a player shows coded frames: the stream's display matrix (a rotation by a multiple of 90
degrees, mirroring), read from a decoded PyAV frame and applied to decoded frames."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from semtrack.video.frames import ItemError


@dataclass(frozen=True)
class Orientation:
    """How a player shows coded frames (an axis-aligned display matrix): swap rows and columns, then
    mirror top <-> bottom, then mirror left <-> right. `quarter_turns`: the matrix's rotation part in
    counter-clockwise quarter turns (0..3), mirroring ignored: what decord applies by itself."""

    transpose: bool = False
    flip_rows: bool = False
    flip_cols: bool = False
    quarter_turns: int = 0

    @classmethod
    def from_display_matrix(cls, matrix: np.ndarray) -> Orientation:
        """`matrix`: FFmpeg's display matrix, (3, 3) int32 row-major [[a, b, u], [c, d, v], [x, y, w]],
        a..d in 16.16 fixed point; a coded pixel at column p, row q is shown at column a p + c q, row
        b p + d q (plus an offset). Scale is ignored; a degenerate matrix is ignored (as players do).
        Raises `ItemError` for a rotation that is not a multiple of 90 degrees."""
        a, b, c, d = (float(v) / 65536 for v in (matrix[0, 0], matrix[0, 1], matrix[1, 0], matrix[1, 1]))
        scale_p, scale_q = math.hypot(a, c), math.hypot(b, d)
        if not (scale_p > 0 and scale_q > 0):
            return cls()
        a, c, b, d = a / scale_p, c / scale_p, b / scale_q, d / scale_q
        degrees = -math.degrees(math.atan2(b, a))  # counter-clockwise, as FFmpeg's av_display_rotation_get
        turns = round(degrees / 90) % 4
        if max(abs(b), abs(c)) < 1e-3:
            return cls(False, d < 0, a < 0, turns)
        if max(abs(a), abs(d)) < 1e-3:
            return cls(True, b < 0, c < 0, turns)
        raise ItemError(f"the display matrix rotates by {degrees:.1f} degrees, not a multiple of 90: not supported")

    @property
    def is_identity(self) -> bool:
        return not (self.transpose or self.flip_rows or self.flip_cols)

    def display_size(self, height: int, width: int) -> tuple[int, int]:
        """Coded (H, W) -> shown (H, W)."""
        return (width, height) if self.transpose else (height, width)

    def apply(self, frames: np.ndarray) -> np.ndarray:
        """(T, H, W, C) coded -> (T, H', W', C) shown; a strided view, no copy."""
        if self.transpose:
            frames = frames.swapaxes(1, 2)
        if self.flip_rows:
            frames = frames[:, ::-1]
        if self.flip_cols:
            frames = frames[:, :, ::-1]
        return frames

    def from_decord(self, frames: np.ndarray) -> np.ndarray:
        """decord's (T, H, W, 3) frames, which it has turned by `quarter_turns` itself -> shown frames,
        C-contiguous (no copy when decord's turn already is the whole transform)."""
        coded = np.rot90(frames, -self.quarter_turns, axes=(1, 2))
        return np.ascontiguousarray(self.apply(coded))



def frame_orientation(frame) -> Orientation:
    """The display matrix a decoder attached to a PyAV `VideoFrame` (identity if none). Raises
    `ItemError` for unsupported ones."""
    side_data = frame.side_data.get("DISPLAYMATRIX")
    matrix = np.frombuffer(bytes(side_data), dtype=np.int32) if side_data is not None else None
    if matrix is None or matrix.size != 9:
        return Orientation()
    return Orientation.from_display_matrix(matrix.reshape(3, 3))
