"""Memory model of the tracker: how the chunked ops are sized, and `estimate_tracking_bytes`.

The tracker keeps only a few tensors whose size grows with the clip (the feature pyramid, the
update transformer's token buffer, the small per-point state). Every larger intermediate is
computed over chunks of rows (frames for the correlation and the space attention, tracks for the
time attention) sized so that one chunk's intermediates stay near `CHUNK_BYTES`. Chunking is
exact: every chunked op is row-wise.

The per-row constants below are peak live bytes per row element of the fp32 ops, counted on the
meta device (a `TorchDispatchMode` adding each new storage and subtracting it when its last tensor
dies, attention as one fused kernel: `benchmarks/bench_tracker.py --mode memory`), rounded up.
"""
from __future__ import annotations

from semtrack.defaults import MODEL_RESOLUTION

SUPPORT_POINTS = 36  # 6 x 6 support grid added in queries mode
VIRTUAL_TRACKS = 64
LATENT_DIM = 128  # feature channels of the pyramid
HIDDEN_DIM = 384  # update transformer width
CHUNK_BYTES = 512 * 2**20  # default budget of one chunk's intermediates
ENCODER_CHUNK = 16  # default frames per encoder call

# Peak intermediates of the correlation + token step, per (point, frame) of a chunk: the level-0
# patches from grid_sample (128 x 49 floats), their copy in bmm layout, the 49 x 49 correlation
# (measured 61.8 kB).
CORR_POINT_FRAME_BYTES = 64_000
# Peak intermediates of one transformer block, per token of a chunk: the MLP's two 1536-wide
# activations, its input copy, norms and attention projections (measured 18.4 kB).
TOKEN_BYTES = 20_000
# Encoder phase, per frame of a chunk: activations per model-input pixel (meta count 62.9 MB at
# 384 x 512 = 320 B/px, plus 48 B/px for the resized, normalised and concatenated chunk; real CPU
# runs peak at up to 400 B/px: oneDNN's convolution buffers are not aten tensors) ...
ENCODER_PIXEL_BYTES = 420
# ... and the float32 copy of the uint8 chunk at the clip's own size (3 channels x 4 B), plus a
# fixed allowance for oneDNN's reordered convolution weights and scratch (2.6 M weights, fp32).
CLIP_PIXEL_BYTES = 12
ENCODER_FIXED_BYTES = 16_000_000
# Per-point state over the clip, per (point, frame): coords, logits, motion deltas, the forward
# pass's outputs kept for the backward merge, the outputs (fp32).
STATE_POINT_FRAME_BYTES = 120
# Query patch features per point while they are built: 4 levels x 128 x 49 floats, twice (the
# gathered patches and their bmm-layout copy; the copy stays for the pass; measured 203 kB).
QUERY_POINT_BYTES = 210_000


def rows_per_chunk(row_bytes: float, budget: int | None, total: int) -> int:
    """How many of `total` rows of `row_bytes` intermediates each fit in `budget` bytes (at least
    one; all of them when `budget` is None)."""
    if budget is None:
        return max(total, 1)
    return max(1, min(total, int(budget // max(row_bytes, 1))))


def chunk_bounds(total: int, rows: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering range(total) in pieces of at most `rows`."""
    return [(start, min(start + rows, total)) for start in range(0, total, rows)]


def pyramid_frame_bytes(resolution: tuple[int, int], stride: int = 4, levels: int = 4) -> int:
    """Bytes of one frame's float32 feature pyramid at model-input size `resolution` (H, W)."""
    h, w = resolution[0] // stride, resolution[1] // stride
    total = 0
    for _ in range(levels):
        total += LATENT_DIM * h * w * 4
        h, w = h // 2, w // 2
    return total


def estimate_tracking_bytes(
    num_frames: int,
    num_points: int,
    clip_size: tuple[int, int],
    resolution: tuple[int, int] = MODEL_RESOLUTION,
    backward: bool = True,
    dtype_bytes: int = 4,
    batch: int = 1,
    *,
    encoder_chunk: int = ENCODER_CHUNK,
    chunk_bytes: int | None = CHUNK_BYTES,
) -> float:
    """Upper bound of the peak bytes of one `OfflineTracker.track_many` call.

    `batch` clips padded to `num_frames` frames and `num_points` user queries each (the 36 support
    points are added here, also an upper bound for grid mode), given as uint8 clips of at most
    `clip_size` (H, W) pixels, tracked at model-input size `resolution` (H, W); `dtype_bytes` 2 for
    bf16 autocast, 4 for fp32; `encoder_chunk` and `chunk_bytes` as set on the tracker.

    Counted: the input clips, plus the larger of two phases. Encoding: the float32 feature
    pyramid and the encoder's activations on one chunk of frames. Tracking: the pyramid, the
    transformer's token buffer (`dtype_bytes` per value), the per-point state, the query features
    and the largest correlation / transformer chunk (at fp32 sizes, which also bound bf16).
    Not counted: the tracker's weights (about 100 MB fp32) and allocator overhead. `backward`
    changes nothing measurable (the backward pass reuses the pyramid); it is accepted so callers
    can pass their mode.

    The constants are meta-device live-tensor counts (module docstring); the bound was checked
    against peak RSS of real CPU runs (tests/test_tracker_memory.py, benchmarks/NOTES.md).
    """
    del backward
    frames = batch * num_frames
    points = num_points + SUPPORT_POINTS
    tokens = points + VIRTUAL_TRACKS
    model_pixels, clip_pixels = resolution[0] * resolution[1], clip_size[0] * clip_size[1]
    pyramid = frames * pyramid_frame_bytes(resolution)
    encoding = ENCODER_FIXED_BYTES + min(frames, encoder_chunk) * (
        ENCODER_PIXEL_BYTES * model_pixels + CLIP_PIXEL_BYTES * clip_pixels
    )
    corr_row = batch * points * CORR_POINT_FRAME_BYTES  # one frame of every clip
    time_row = frames * TOKEN_BYTES  # one track of every clip
    space_row = tokens * TOKEN_BYTES  # one frame
    chunk = max(
        rows_per_chunk(corr_row, chunk_bytes, num_frames) * corr_row,
        rows_per_chunk(time_row, chunk_bytes, tokens) * time_row,
        rows_per_chunk(space_row, chunk_bytes, frames) * space_row,
    )
    tracking = (
        frames * (tokens * HIDDEN_DIM * dtype_bytes + points * STATE_POINT_FRAME_BYTES)
        + batch * points * QUERY_POINT_BYTES
        + chunk
    )
    return float(frames * 3 * clip_pixels + pyramid + max(encoding, tracking))
