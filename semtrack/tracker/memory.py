"""Peak memory of one tracking call, estimated before it runs (the pipeline's memory guard)."""
from __future__ import annotations

MODEL_RESOLUTION = (384, 512)
SUPPORT_POINTS = 36  # the 6x6 support grid added to the queries in queries mode
# Peak live memory counted on the meta device (benchmarks/NOTES.md "Long clips", fp32, 384x512):
# per frame 25 MB that scale with the tracker resolution (feature pyramids, their reversed copy for
# the backward pass, the resized video) plus 70 kB per tracked point (correlation patches, their
# einsum copy, the two bmm products). Rounded up from 24.3 MB and 69.4 kB.
FRAME_BYTES = 25e6
POINT_FRAME_BYTES = 70e3


def estimate_tracking_bytes(num_frames: int, num_points: int, clip_size: tuple[int, int],
                            resolution: tuple[int, int] = MODEL_RESOLUTION, backward: bool = True,
                            dtype_bytes: int = 4, batch: int = 1) -> float:
    """Upper bound of the peak bytes of one call on `batch` clips of `num_frames` uint8 frames of
    `clip_size` (H, W) with `num_points` queries each, tracked at `resolution` (H, W). Counts fp32 and
    the backward pass whatever `backward` and `dtype_bytes` say, and the float32 copy of the input."""
    h, w = resolution
    per_frame = FRAME_BYTES * (h * w) / (MODEL_RESOLUTION[0] * MODEL_RESOLUTION[1])
    per_frame += POINT_FRAME_BYTES * (num_points + SUPPORT_POINTS)
    per_frame += 3 * clip_size[0] * clip_size[1] * (1 + 4)  # the uint8 clip and its float32 copy
    return batch * num_frames * per_frame
