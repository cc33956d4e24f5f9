"""The tracking-memory policy of a job, in one place: from (config, device, tracker precision, the
models' bytes) to the bytes one tracking call may use, the grouping of clips into calls that fit them,
and the chunk sizes each call runs with.

    memory = TrackingMemory.plan(config, device, "fp32", model_bytes)
    guard = memory.guard({row: N})             # TrackingBudget: clips -> calls that fit, refusals
    sizes = memory.chunk_sizes(frames, N)      # {"encoder_chunk", "chunk_bytes"} of one track_many call

Budget (`tracking_budget`): `max_tracking_memory_gb`, else on CUDA `CUDA_BUDGET_BYTES` minus what the
models hold, elsewhere half the memory still available (None: unknown, no guard). Calls are grouped at
the base chunk size; on a GPU each call then takes the largest of `CUDA_CHUNK_CHOICES` whose estimate
still fits, since fewer and larger chunks launch fewer kernels (chunking is exact either way). The
estimates are `semtrack.tracker.estimate_tracking_bytes`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from semtrack.config import ExtractConfig
from semtrack.records import Clip
from semtrack.resources import available_memory
from semtrack.tracker.compiled import bucket_shape
from semtrack.tracker.memory import CHUNK_BYTES, ENCODER_CHUNK, SUPPORT_POINTS, estimate_tracking_bytes

GB = 1e9
CUDA_BUDGET_BYTES = 10 * GB  # tracking memory per GPU rank, models included
# The smallest of the CUDA chunk choices, which the calls are grouped by, fits 8 SSV2 clips of 88 frames
# with 300 points at 8.8 GB in bf16, inside CUDA_BUDGET_BYTES with the models.
CUDA_ENCODER_CHUNK = 32  # frames per encoder call
CUDA_CHUNK_CHOICES = (None, 8 * GB, 4 * GB, 2 * GB, 1_500_000_000)  # one chunk's intermediates, largest first
DTYPE_BYTES = {"fp32": 4, "bf16": 2}  # the tracker's precision -> bytes of its transformer tokens


def tracking_budget(config: ExtractConfig, device: torch.device, model_bytes: int) -> float | None:
    """Bytes one tracking call may use (see the module docstring); `model_bytes`: what the models hold
    on a CUDA `device`."""
    if config.max_tracking_memory_gb is not None:
        return config.max_tracking_memory_gb * GB
    if device.type == "cuda":
        return max(0.0, CUDA_BUDGET_BYTES - model_bytes)
    available = available_memory()
    return None if available is None else available / 2


def chunk_bytes_for_call(estimate: Callable[[int | None], float], budget: float | None,
                         choices: Sequence[int | None], default: int | None) -> int | None:
    """The first of `choices` (largest first) whose `estimate(chunk_bytes)` fits `budget` bytes;
    `default` when there are no choices, no budget, or none fits (the call was grouped to fit it)."""
    if budget is None:
        return default
    return next((c for c in choices if estimate(c) <= budget), default)


@dataclass(frozen=True)
class TrackingMemory:
    """The policy of one job (module docstring).

    budget: bytes one call may use (None: no limit); resolution: (H, W) the tracker works at;
    dtype_bytes: 4 (fp32) or 2 (bf16); backward: queries mode (grid mode tracks forward only);
    encoder_chunk: frames per encoder call; base_chunk_bytes: the chunk size calls are grouped at;
    choices: chunk sizes a call may take instead, largest first (empty: always the base); buckets: the
    tracker pads each call to its compiled bucket (`--compile`), which the estimates then count.
    """

    budget: float | None
    resolution: tuple[int, int]
    dtype_bytes: int = 4
    backward: bool = True
    encoder_chunk: int = ENCODER_CHUNK
    base_chunk_bytes: int | None = CHUNK_BYTES
    choices: tuple[int | None, ...] = ()
    buckets: bool = False

    @classmethod
    def plan(cls, config: ExtractConfig, device: torch.device, precision: str, model_bytes: int) -> TrackingMemory:
        """The policy for `config` on `device` with the tracker in `precision` ("fp32" | "bf16") and the
        models holding `model_bytes` of the device: on CUDA `CUDA_ENCODER_CHUNK` and the chunk choices
        (grouped at the smallest), elsewhere the tracker's defaults (a CPU gains nothing from big chunks)."""
        cuda = device.type == "cuda"
        return cls(tracking_budget(config, device, model_bytes), tuple(config.tracker_resolution),
                   DTYPE_BYTES[precision], not config.use_grid,
                   CUDA_ENCODER_CHUNK if cuda else ENCODER_CHUNK,
                   CUDA_CHUNK_CHOICES[-1] if cuda else CHUNK_BYTES,
                   CUDA_CHUNK_CHOICES if cuda else (), config.compile)

    def estimate(self, num_frames: int, num_points: int, size: tuple[int, int], batch: int,
                 chunk_bytes: int | None) -> float:
        """Bytes of one call on `batch` clips padded to `num_frames` frames, `num_points` points and
        `size` (H, W) pixels, run with `chunk_bytes` chunks (at their bucket with `buckets`)."""
        if self.buckets:
            batch, num_frames, points = bucket_shape(batch, num_frames, num_points + SUPPORT_POINTS)
            num_points = points - SUPPORT_POINTS
        return estimate_tracking_bytes(
            num_frames, num_points, size, self.resolution, backward=self.backward, dtype_bytes=self.dtype_bytes,
            batch=batch, encoder_chunk=self.encoder_chunk, chunk_bytes=chunk_bytes)

    def chunk_sizes(self, frames: Sequence[torch.Tensor], num_points: int) -> dict:
        """`track_many`'s chunk arguments for one call on uint8 clips `frames` (T_i, 3, H_i, W_i) with at
        most `num_points` points each: the largest choice whose estimate fits the budget."""
        longest = max(len(f) for f in frames)
        size = (max(f.shape[-2] for f in frames), max(f.shape[-1] for f in frames))
        chunk_bytes = chunk_bytes_for_call(lambda c: self.estimate(longest, num_points, size, len(frames), c),
                                           self.budget, self.choices, self.base_chunk_bytes)
        return {"encoder_chunk": self.encoder_chunk, "chunk_bytes": chunk_bytes}

    def guard(self, num_points: dict[int, int]) -> TrackingBudget:
        """The grouping of clips with `num_points` {row: N} points each into calls (at the base chunk size)."""
        height, width = self.resolution

        def need(clips: Sequence[Clip], frames: int | None) -> float:
            size = (max(c.size[0] for c in clips), max(c.size[1] for c in clips))
            return self.estimate(frames or max(c.num_frames for c in clips), max(num_points[c.row] for c in clips),
                                 size, len(clips), self.base_chunk_bytes)

        def describe(clip: Clip) -> str:
            return f"{clip.num_frames} frames x {num_points[clip.row]} points at {height}x{width}"

        return TrackingBudget(self.budget, need, describe)


class TrackingBudget:
    """Cuts tracking calls to fit `limit` bytes (None: no limit).

    `need(clips, frames)` estimates the bytes of one call on `clips` (each cut to `frames` frames
    when given); it must grow with the clips and the frames. `describe(clip)` names the work
    ("T frames x N points at HxW") in the refusal reason.
    """

    def __init__(self, limit: float | None, need: Callable[[Sequence[Clip], int | None], float],
                 describe: Callable[[Clip], str]):
        self.limit, self.need, self.describe = limit, need, describe

    def calls(self, clips: list[Clip]) -> tuple[list[list[Clip]], dict[int, str]]:
        """-> (balanced consecutive calls that fit, {row: reason} for clips that do not fit alone)."""
        if self.limit is None:
            return [clips], {}
        refused = {c.row: self.refusal(c) for c in clips if self.need([c], None) > self.limit}
        fit = [c for c in clips if c.row not in refused]
        greedy, start = [], 0  # consecutive calls, each as long as fits
        while start < len(fit):
            size = 1
            while start + size < len(fit) and self.need(fit[start:start + size + 1], None) <= self.limit:
                size += 1
            greedy.append(fit[start:start + size])
            start += size
        balanced = _balanced(fit, len(greedy))  # as many calls, of near-equal length, if those fit too
        if all(self.need(call, None) <= self.limit for call in balanced):
            return balanced, refused
        return greedy, refused

    def calls_by_length(self, clips: list[Clip]) -> tuple[list[list[Clip]], dict[int, str]]:
        """`calls` on the clips in order of frame count: a call of several clips pads little."""
        return self.calls(sorted(clips, key=lambda c: c.num_frames))

    def refusal(self, clip: Clip) -> str:
        """Why `clip` is not tracked, naming the fix: the largest --max_frames that fits, or a budget that would."""
        need, frames = self.need([clip], None), clip.num_frames
        lo, hi = 1, frames  # lo: the largest frame count that fits (estimates grow with frames), or 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.need([clip], mid) <= self.limit else (lo, mid - 1)
        # max_frames changes outputs, so the config sidecar wants a new output folder for it.
        fix = f"use --max_frames {lo} (with a new --base_feat_path) or " if lo >= 2 else "use "
        return (f"needs ≈{need / GB:.3g} GB to track {self.describe(clip)}; budget {self.limit / GB:.3g} GB; "
                f"{fix}--max_tracking_memory_gb {math.ceil(need / GB * 100) / 100:g}")


def _balanced(clips: list[Clip], count: int) -> list[list[Clip]]:
    """`clips` cut into `count` consecutive calls of near-equal length (at most `count`)."""
    if not count:
        return []
    chunk = math.ceil(len(clips) / count)
    return [clips[i:i + chunk] for i in range(0, len(clips), chunk)]
