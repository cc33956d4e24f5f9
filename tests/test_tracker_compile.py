"""`--compile`: the tracker's refinement compiled once per length bucket (`semtrack.tracker.compiled`).

With inductor on the CPU (one compilation, the slow part): three calls on real clips of different
lengths and point counts that share a bucket compile once, and every clip's result equals its
eager solo run (tracks <= 1e-4 px, identical visibility), backward pass included. With dynamo's
graphs counted but not compiled (what decides the count): a call in another bucket (more frames,
more clips, more points, grid mode) compiles once more, a repeated bucket never, and the padding
of every bucket (padding clips, points and frames) leaves each clip's result equal to its eager run.
Stand-in weights, tracker at 32x64, one refinement iteration.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from _shared import decode_first
from semtrack.cli import parse_flat
from semtrack.config import ExtractConfig
from semtrack.defaults import CLIP_BUCKETS, FRAME_BUCKETS, POINT_BUCKETS
from semtrack.tracker import load_tracker
from semtrack.tracker.compiled import bucket, bucket_shape
from semtrack.tracker.memory import CHUNK_BYTES as CHUNK

TRACK_TOL, PROB_TOL = 1e-4, 1e-5
CLIPS = {"tiny_ssv2.webm": 4, "tiny_25fps.mp4": 7, "bear_ssv2.webm": 5}  # file: frames, all in the 8-frame bucket
POINTS = (3, 5, 2)


def graphs_only(gm, example_inputs):
    """Dynamo's graph run as captured: counted, not compiled."""
    return gm.forward


@pytest.fixture(scope="module")
def clips(videos_dir) -> list[torch.Tensor]:
    return [decode_first(videos_dir / name, frames) for name, frames in CLIPS.items()]


@pytest.fixture(scope="module")
def long_clip(videos_dir) -> torch.Tensor:
    return decode_first(videos_dir / "tiny_25fps.mp4", 11)  # the 16-frame bucket


def _queries(clip: torch.Tensor, count: int, seed: int) -> torch.Tensor:
    rng = np.random.RandomState(seed)
    h, w = clip.shape[-2:]
    frames = rng.randint(0, len(clip), size=(count, 1))
    xy = rng.uniform([0, 0], [w - 1, h - 1], size=(count, 2))
    return torch.from_numpy(np.concatenate([frames, xy], axis=1)).float()


@pytest.fixture(scope="module")
def queries(clips) -> list[torch.Tensor]:
    return [_queries(c, k, i) for i, (c, k) in enumerate(zip(clips, POINTS))]


def _tracker():
    tracker = load_tracker("random", interp_shape=(32, 64))
    tracker.iters = 1
    return tracker


@pytest.fixture(scope="module")
def eager():
    return _tracker()


def _assert_same(result, reference):
    tracks, visible, probs = result
    ref_tracks, ref_visible, ref_probs = reference
    assert tracks.shape == ref_tracks.shape and visible.shape == ref_visible.shape
    assert (tracks - ref_tracks).abs().max() <= TRACK_TOL
    assert torch.equal(visible, ref_visible)
    assert (probs - ref_probs).abs().max() <= PROB_TOL


def test_bucket_ladders():
    assert [bucket(v, FRAME_BUCKETS) for v in (1, 8, 9, 33, 88, 384, 385, 600)] == [8, 8, 16, 48, 96, 384, 512, 640]
    assert [bucket(v, POINT_BUCKETS) for v in (36, 65, 244, 2049, 2561)] == [64, 96, 256, 2560, 3072]
    assert [bucket(v, CLIP_BUCKETS) for v in (1, 3, 5, 9, 17, 25)] == [1, 4, 8, 16, 24, 32]
    assert bucket_shape(3, 7, 41) == (4, 8, 64)


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("g++") is None and shutil.which("c++") is None,
                    reason="inductor on the CPU needs a C++ compiler (g++ or c++ on PATH)")
def test_inductor_compiles_once_per_bucket_and_equals_eager(clips, queries, eager):
    import torch._inductor.config as inductor_config

    tracker = _tracker().compile_buckets()
    # Scalar C++ kernels: half the compile time of vectorised ones, and the vectorisation is the CPU
    # backend's own (CUDA runs Triton); the graph, its lowering and fusions are the same.
    with inductor_config.patch({"cpp.vec_isa_ok": False}):
        for clip, q in zip(clips, queries):  # 4, 7, 5 frames; 3, 5, 2 points (+ 36): bucket (1, 8, 64)
            (result,) = tracker.track_many([clip], [q], return_probs=True)
            (reference,) = eager.track_many([clip], [q], return_probs=True)
            _assert_same(result, reference)
    assert dict(tracker.compiled.counts) == {(1, 8, 64, CHUNK): 1}


def test_a_new_bucket_compiles_once_more_and_padding_is_exact(clips, queries, long_clip, eager):
    tracker = _tracker().compile_buckets(graphs_only)
    counts = tracker.compiled.counts
    for clip, q in zip(clips, queries):
        (result,) = tracker.track_many([clip], [q], return_probs=True)
        _assert_same(result, eager.track_many([clip], [q], return_probs=True)[0])
    assert tracker.compiled.compilations == 1

    long_q = _queries(long_clip, 4, 7)
    (result,) = tracker.track_many([long_clip], [long_q], return_probs=True)  # 11 frames: bucket (1, 16, 64)
    _assert_same(result, eager.track_many([long_clip], [long_q], return_probs=True)[0])
    assert tracker.compiled.compilations == 2 and counts[(1, 16, 64, CHUNK)] == 1

    # three clips of one call: a padding clip makes four; and more points than the 64 bucket
    many = [_queries(c, 40, 10 + i) for i, c in enumerate(clips)]
    for qs in (queries, many):
        batched = tracker.track_many(clips, qs, return_probs=True)
        for clip, q, result in zip(clips, qs, batched):
            _assert_same(result, eager.track_many([clip], [q], return_probs=True)[0])
    assert set(counts) == {(1, 8, 64, CHUNK), (1, 16, 64, CHUNK),
                           (4, 8, 64, CHUNK), (4, 8, 96, CHUNK)}
    assert tracker.compiled.compilations == 4

    grid = tracker.track_many(clips[:2], grid_size=3, grid_query_frame=1, return_probs=True)  # bucket (2, 8, 64)
    for clip, result in zip(clips, grid):
        _assert_same(result, eager.track_many([clip], grid_size=3, grid_query_frame=1, return_probs=True)[0])
    tracker.track_many(clips[1:], queries[1:])  # (2, 8, 64) again: the same graph
    assert tracker.compiled.compilations == 5 and counts[(2, 8, 64, CHUNK)] == 1


def test_compile_option_is_off_by_default_and_recorded_only_when_on():
    assert ExtractConfig().compile is False
    assert "compile" not in ExtractConfig().output_options()
    config, _ = parse_flat(["--csv_path", "x.csv", "--compile"])
    assert config.compile is True and config.output_options()["compile"] is True
