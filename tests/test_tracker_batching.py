"""`OfflineTracker.track_many` on real clips of different lengths, sizes and point counts: each
clip's result equals its solo run (fp32 CPU: tracks <= 1e-4 px, identical visibility), in queries
mode with backward tracking and in grid mode; chunked computation equals unchunked; no host
synchronisation on the traced path. Stand-in weights, tracker at 64x96, 2 refinement iterations
(the equality does not depend on the count), a handful of frames per clip.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from _shared import decode_first
from semtrack.tracker import OfflineTracker, load_tracker

TRACK_TOL, PROB_TOL = 1e-4, 1e-5
CLIPS = {"tiny_ssv2.webm": 4, "tiny_25fps.mp4": 7, "bear_ssv2.webm": 5}  # file: frames decoded


@pytest.fixture(scope="module")
def clips(videos_dir) -> list[torch.Tensor]:
    return [decode_first(videos_dir / name, frames) for name, frames in CLIPS.items()]


@pytest.fixture(scope="module")
def tracker() -> OfflineTracker:
    tracker = load_tracker("random", interp_shape=(64, 96))
    tracker.iters = 2
    return tracker


@pytest.fixture(scope="module")
def queries(clips) -> list[torch.Tensor]:
    """Different point counts and query frames per clip, including the shortest clip's last frame."""
    rng = np.random.RandomState(0)
    shortest = min(len(c) for c in clips)
    out = []
    for clip, frames in zip(clips, ([0, shortest - 1, 2, shortest - 1], [6, 3, 0, 5, 1, 4], [4, 2])):
        h, w = clip.shape[-2:]
        xy = rng.uniform([0, 0], [w - 1, h - 1], size=(len(frames), 2))
        out.append(torch.from_numpy(np.concatenate([np.array(frames)[:, None], xy], axis=1)).float())
    return out


def _assert_same(batched, solo):
    tracks, visible, probs = batched
    solo_tracks, solo_visible, solo_probs = solo
    assert tracks.shape == solo_tracks.shape and visible.shape == solo_visible.shape == probs.shape
    assert tracks.dtype == torch.float32 and visible.dtype == torch.bool and probs.dtype == torch.float32
    assert (tracks - solo_tracks).abs().max() <= TRACK_TOL
    assert torch.equal(visible, solo_visible)
    assert (probs - solo_probs).abs().max() <= PROB_TOL


def test_queries_mode_with_backward_tracking_equals_solo_runs(tracker, clips, queries):
    batched = tracker.track_many(clips, queries, backward_tracking=True, return_probs=True)
    assert len(batched) == len(clips)
    for clip, q, result in zip(clips, queries, batched):
        (solo,) = tracker.track_many([clip], [q], backward_tracking=True, return_probs=True)
        _assert_same(result, solo)
        tracks, visible, probs = result
        assert tracks.shape == (len(clip), len(q), 2)
        frame, point = q[:, 0].long(), torch.arange(len(q))
        assert torch.allclose(tracks[frame, point], q[:, 1:], atol=1e-3)  # each query frame holds its query
        assert visible[frame, point].all()
        assert ((probs > 0) & (probs < 1)).all()


def test_grid_mode_equals_solo_runs(tracker, clips):
    batched = tracker.track_many(clips, grid_size=3, grid_query_frame=2, backward_tracking=True, return_probs=True)
    for clip, result in zip(clips, batched):
        (solo,) = tracker.track_many([clip], grid_size=3, grid_query_frame=2, backward_tracking=True,
                                     return_probs=True)
        _assert_same(result, solo)
        assert result[0].shape == (len(clip), 9, 2)


def test_forward_call_equals_track_many(tracker, clips, queries):
    """The (B, T, 3, H, W) API on float frames gives track_many's result on the uint8 clip."""
    clip, q = clips[0], queries[0]
    tracks, visible = tracker(clip[None].float(), queries=q[None])
    ((many_tracks, many_visible),) = tracker.track_many([clip], [q], backward_tracking=False)
    assert torch.equal(tracks[0], many_tracks) and torch.equal(visible[0], many_visible)


def test_chunked_computation_equals_unchunked(clips, queries):
    """3-4 chunks of frames / tracks / frame rows per op (12 MB budget) and 3-frame encoder chunks
    vs no chunking: the chunked ops are row-wise."""
    tracker = load_tracker("random", interp_shape=(64, 96))
    tracker.iters = 1
    chunked = tracker.track_many(clips[:2], queries[:2], return_probs=True, encoder_chunk=3, chunk_bytes=12_000_000)
    whole = tracker.track_many(clips[:2], queries[:2], return_probs=True, encoder_chunk=64, chunk_bytes=None)
    for a, b in zip(chunked, whole):
        _assert_same(a, b)


class _SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("_local_scalar_dense", "nonzero", "item"):
            self.syncs.append(str(func))
        return func(*args, **(kwargs or {}))


def test_no_host_sync_with_device_queries():
    """On the meta device (any device-to-host read would fail there) with meta queries: no sync."""
    with torch.device("meta"):
        tracker = OfflineTracker(iters=1, interp_shape=(64, 96)).eval()
    tracker.to("meta")
    clips = [torch.empty(t, 3, 40, 60, dtype=torch.uint8, device="meta") for t in (3, 5)]
    queries = [torch.zeros(n, 3, device="meta") for n in (2, 4)]
    with _SyncCounter() as counter:
        out = tracker.track_many(clips, queries, backward_tracking=True)
        tracker.track_many(clips, grid_size=2)
    assert counter.syncs == []
    assert [tuple(tracks.shape) for tracks, _ in out] == [(3, 2, 2), (5, 4, 2)]


def test_bad_inputs_are_clear_errors(tracker, clips, queries):
    shortest = min(len(c) for c in clips)
    late = queries[0].clone()
    late[0, 0] = len(clips[0])  # one past the last frame of video 0
    with pytest.raises(ValueError, match="video 0: query frames must lie in"):
        tracker.track_many(clips, [late, *queries[1:]])
    with pytest.raises(ValueError, match="list of 3"):
        tracker.track_many(clips, queries[:2])
    with pytest.raises(ValueError, match=r"queries 1 must be \(N, 3\)"):
        tracker.track_many(clips, [queries[0], queries[1][:, :2], queries[2]])
    with pytest.raises(ValueError, match="grid_query_frame"):
        tracker.track_many(clips, grid_size=2, grid_query_frame=shortest)
    with pytest.raises(ValueError, match="non-empty list"):
        tracker.track_many([])
    with pytest.raises(ValueError, match=r"video 1 must be \(T, 3, H, W\)"):
        tracker.track_many([clips[0], clips[1][0]], grid_size=2)
    with pytest.raises(ValueError, match="queries or grid_size"):
        tracker.track_many(clips)
