"""The tracking-memory policy: the budget of one call, the grouping of clips into calls that fit it,
and the chunk sizes each call runs with."""
from __future__ import annotations

import dataclasses
import re

import pytest
import torch

from semtrack.config import ExtractConfig
from semtrack.pipeline import Pipeline
from semtrack.records import Clip
from semtrack.resources import available_memory
from semtrack.tracker import estimate_tracking_bytes, load_tracker
from semtrack.tracker.memory import CHUNK_BYTES, ENCODER_CHUNK
from semtrack.tracking_memory import (
    CUDA_CHUNK_CHOICES,
    CUDA_ENCODER_CHUNK,
    TrackingBudget,
    TrackingMemory,
    tracking_budget,
)


def clip(row: int, frames: int = 4, size=(8, 8)) -> Clip:
    """A clip whose frames live on the meta device (no memory)."""
    return Clip(row, f"v{row}", "d", f"/v{row}.mp4", frames=torch.empty(frames, 3, *size, dtype=torch.uint8,
                                                                          device="meta"))


def test_budget_splits_calls_and_refuses_what_does_not_fit_alone():
    """need = frames x clips: a budget of 9 frames fits two 4-frame clips per call; a 30-frame clip
    is refused untried, and the reason names the largest --max_frames that fits."""
    budget = TrackingBudget(9.0, lambda clips, frames: float(len(clips) * (frames or max(c.num_frames for c in clips))),
                            lambda c: f"{c.num_frames} frames")
    clips = [clip(i) for i in range(5)] + [clip(5, frames=30)]
    calls, refused = budget.calls(clips)
    assert [[c.row for c in call] for call in calls] == [[0, 1], [2, 3], [4]]
    assert list(refused) == [5]
    assert refused[5].startswith("needs ≈3e-08 GB to track 30 frames; budget 9e-09 GB; ")
    match = re.search(r"use --max_frames (\d+) \(with a new --base_feat_path\) or --max_tracking_memory_gb", refused[5])
    assert int(match.group(1)) == 9
    assert TrackingBudget(None, budget.need, budget.describe).calls(clips) == ([clips], {})


def test_budget_calls_are_balanced_only_when_the_balanced_calls_fit():
    need = lambda clips, frames: float(len(clips) * max(c.num_frames for c in clips))  # noqa: E731 - padded calls
    clips = [clip(0, 2), clip(1, 2), clip(2, 2), clip(3, 5)]
    calls, _ = TrackingBudget(6.0, need, str).calls(clips)
    assert [[c.row for c in call] for call in calls] == [[0, 1, 2], [3]]  # [[0, 1], [2, 3]] would need 10


def test_budget_calls_by_length_group_similar_clips():
    need = lambda clips, frames: float(len(clips) * max(c.num_frames for c in clips))  # noqa: E731
    clips = [clip(0, 9), clip(1, 2), clip(2, 8), clip(3, 3)]
    calls, _ = TrackingBudget(18.0, need, str).calls_by_length(clips)
    assert [[c.row for c in call] for call in calls] == [[1, 3], [2, 0]]  # CSV order would pad 2 -> 9


def test_tracking_budget_default_is_half_the_available_memory_on_cpu():
    budget, available = tracking_budget(ExtractConfig(), torch.device("cpu"), 0), available_memory()
    assert available is not None and 0 < budget <= available / 2 * 1.1  # memory use moves between the reads
    assert tracking_budget(ExtractConfig(max_tracking_memory_gb=1.5), torch.device("cpu"), 0) == 1.5e9
    assert tracking_budget(ExtractConfig(), torch.device("cuda"), int(2e9)) == pytest.approx(8e9)
    with pytest.raises(ValueError, match="max_tracking_memory_gb"):
        ExtractConfig(max_tracking_memory_gb=0)


def test_tracking_estimate_grows_with_the_work():
    """The guard needs an estimate that never shrinks with more frames, points or clips (the tracker's tests
    check it against measured memory); a batch shares its encoder chunk, so five clips cost < 5x."""
    one = estimate_tracking_bytes(50, 300, (240, 428))
    assert one < estimate_tracking_bytes(50, 300, (240, 428), batch=5) <= 5 * one
    assert one < estimate_tracking_bytes(100, 300, (240, 428)) <= 2 * one
    assert one <= estimate_tracking_bytes(50, 400, (240, 428)) < estimate_tracking_bytes(500, 400, (240, 428))
    assert estimate_tracking_bytes(50, 300, (240, 428), resolution=(192, 256)) < one


def test_the_policy_per_device_precision_and_mode():
    """CPU: the tracker's default chunks and no choices; CUDA: bigger encoder chunks, calls grouped at
    the smallest choice, the budget less what the models hold; bf16 halves the token bytes."""
    cpu = TrackingMemory.plan(ExtractConfig(max_tracking_memory_gb=2), torch.device("cpu"), "fp32", 0)
    assert (cpu.budget, cpu.encoder_chunk, cpu.base_chunk_bytes, cpu.choices) == (2e9, ENCODER_CHUNK, CHUNK_BYTES, ())
    cuda = TrackingMemory.plan(ExtractConfig(use_grid=True), torch.device("cuda"), "bf16", int(3e9))
    assert cuda.budget == pytest.approx(7e9) and (cuda.dtype_bytes, cuda.backward) == (2, False)
    assert (cuda.encoder_chunk, cuda.base_chunk_bytes, cuda.choices) == (
        CUDA_ENCODER_CHUNK, CUDA_CHUNK_CHOICES[-1], CUDA_CHUNK_CHOICES)
    assert cuda.estimate(88, 300, (240, 428), 8, None) < dataclasses.replace(cuda, dtype_bytes=4).estimate(
        88, 300, (240, 428), 8, None)


def test_each_tracking_call_takes_the_largest_chunks_that_fit_and_tracks_the_same():
    """Grid mode, stand-in tracker at 64x96, two ragged clips in one call: with a budget that fits
    the call unchunked the tracker runs unchunked, with one that fits only the small chunks it runs
    chunked, without choices at the policy's base size; the sizes are each call's arguments (the
    tracker holds none) and the tracks agree."""
    small = 2**20
    tracker = load_tracker("random", interp_shape=(64, 96))
    seen = []
    track_many = tracker.track_many

    def spy(*args, **kwargs):
        seen.append((kwargs["encoder_chunk"], kwargs["chunk_bytes"]))
        return track_many(*args, **kwargs)

    tracker.track_many = spy
    gen = torch.Generator().manual_seed(0)
    clips = [Clip(i, f"v{i}", "d", f"/v{i}.mp4", frames=torch.randint(0, 256, (t, 3, 48, 64), generator=gen,
                                                                      dtype=torch.uint8)) for i, t in enumerate((6, 8))]
    config = ExtractConfig(use_grid=True, cotracker_grid_size=3, tracker_resolution=(64, 96), weights="random")

    def run(budget, choices):
        memory = TrackingMemory(None, (64, 96), backward=False, encoder_chunk=5, base_chunk_bytes=small // 2,
                                choices=choices)
        fits_small = memory.estimate(8, 9, (48, 64), 2, small)
        assert memory.estimate(8, 9, (48, 64), 2, None) > fits_small  # chunking really is in play
        memory = dataclasses.replace(memory, budget=fits_small if budget == "small" else budget)
        results = Pipeline(config, None, tracker, torch.device("cpu"), memory)(clips).results
        return [r.tracks for r in results]

    unchunked, chunked, base = run(1e12, (None, small)), run("small", (None, small)), run(1e12, ())
    assert seen == [(5, None), (5, small), (5, small // 2)]
    for a, b, c in zip(unchunked, chunked, base):
        assert torch.allclose(a.tracks, b.tracks, atol=1e-4) and torch.allclose(a.tracks, c.tracks, atol=1e-4)
        assert torch.equal(a.visibility, b.visibility) and torch.equal(a.visibility, c.visibility)
