"""Default values and bounds of the stages' options, stated once, in a module that imports nothing of the
stages: `config` (and through it every DataLoader worker) reads them here, and the stages take them from
here as their own defaults.

`merge_schedule` is the bound of the bipartite options (`merge_ratio`, `num_iters`): the token counts
it yields are what the clustering runs, and `ExtractConfig` calls it to name a bad pair before a run.
"""
from __future__ import annotations

import math
import numbers

# clustering (REFERENCE.md 6, 7)
CLUSTERING_METHODS = ("bipartite", "kmeans")
MERGE_RATIO = 25  # percent of a frame's tokens merged per bipartite iteration (research default)
MAX_MERGE_RATIO = 50  # a bipartite step can merge at most the A half of the tokens
NUM_ITERS = 11  # bipartite merge iterations (research default)
N_CLUSTERS = 32  # k of k-means (research default)
TOKENS_PER_FRAME = 16 * 16  # DINOv2 patch tokens per clustering frame (a 16 x 16 grid)

# points (REFERENCE.md 8-10)
NUM_POINTS_PER_ENTITY = 16  # points per cluster, or per component (research default)
FAST_SAMPLES = 256  # weighted samples per entity (fast sampler): coverage within ~2 % of exact; 1024: ~1 %, 4x slower
GRID_SIZE = 16  # grid mode: a GRID_SIZE x GRID_SIZE grid of tracks (research default)

# tracker
MODEL_RESOLUTION = (384, 512)  # (H, W) CoTracker3 was trained at; its motion features assume it
# --compile: every tracker call is padded up to these rungs (beyond the last, multiples of the last step)
# so that one compiled graph serves a bucket; padding costs at most 1.5x (1.8x at the first rungs: 9 -> 16).
CLIP_BUCKETS = (1, 2, 4, 8, 16)  # clips per call; then multiples of 8
FRAME_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384)  # frames; then multiples of 128
POINT_BUCKETS = (64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)  # points incl. the support grid; then x512
MAX_BUCKETS = 64  # distinct compiled shapes per process, at most; a further shape runs eager (with a warning)


def merge_schedule(num_tokens: int, merge_ratio: float = MERGE_RATIO, num_iters: int = NUM_ITERS) -> list[int]:
    """Tokens per frame before each merge iteration and after the last: length `num_iters + 1`.

    Iteration with `n` tokens merges away `r = floor(n * merge_ratio / 100)` of them. Raises
    ValueError for `merge_ratio` outside (0, MAX_MERGE_RATIO], a negative `num_iters`, or a schedule
    that would start an iteration with fewer than 2 tokens (nothing left to merge into).
    """
    bounds = f"(0, {MAX_MERGE_RATIO}]"
    if isinstance(merge_ratio, bool) or not isinstance(merge_ratio, numbers.Real):
        raise ValueError(f"merge_ratio must be a number in {bounds}, got {merge_ratio!r}")
    if not 0 < merge_ratio <= MAX_MERGE_RATIO:
        raise ValueError(f"merge_ratio must be in {bounds} (percent of tokens merged per iteration), got {merge_ratio}")
    if isinstance(num_iters, bool) or not isinstance(num_iters, numbers.Integral) or num_iters < 0:
        raise ValueError(f"num_iters must be a non-negative int, got {num_iters!r}")
    schedule = [int(num_tokens)]
    for it in range(int(num_iters)):
        n = schedule[-1]
        if n < 2:
            raise ValueError(
                f"num_iters={num_iters} with merge_ratio={merge_ratio} merges {num_tokens} tokens down to "
                f"{n} after {it} iterations; iteration {it + 1} would merge past one token"
            )
        if isinstance(merge_ratio, numbers.Integral):
            r = n * int(merge_ratio) // 100
        else:
            r = math.floor(n * merge_ratio / 100)
        schedule.append(n - int(r))
    return schedule

DEFAULT_MAX_WIDTH = 640  # px: GIFs and overlays are scaled down to at most this wide unless asked otherwise
# GIF encoders (`--gif_encoder`, `semtrack.gif.gif_bytes`): "pil" (PIL's greedy LZW: small files) or "literal"
# (`semtrack.gif_encode`: one LZW code per pixel, the same frames for ~1/13 of the encoding CPU time, files ~2x).
GIF_ENCODERS = ("pil", "literal")
