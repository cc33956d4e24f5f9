"""CoTracker3 offline re-implementation vs the official golden fixtures (../shared/cotracker3).

Tolerances (fp32): coordinates 1e-3 px (raw 512-px model coords 2e-3), probabilities
2e-5, intermediates 1e-4, visibility flags identical.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from _shared import shared_path
from semtrack.tracker import CoTrackerThreeOffline, OfflineTracker, random_state_dict
from semtrack.tracker.model import resize_frames

COORD_TOL, RAW_COORD_TOL, PROB_TOL, INTER_TOL = 1e-3, 2e-3, 2e-5, 1e-4
MANIFEST = shared_path("cotracker3", "state_dict_manifest.tsv")


def _reference_weights_module():
    path = shared_path("cotracker3", "weights.py")
    spec = importlib.util.spec_from_file_location("cotracker3_reference_weights", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fixture(name: str) -> dict[str, np.ndarray]:
    with np.load(shared_path("cotracker3", name)) as data:
        return {k: data[k] for k in data.files}


def _maxdiff(actual, expected) -> float:
    actual = actual.detach().cpu().numpy() if torch.is_tensor(actual) else np.asarray(actual)
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max())


@pytest.fixture(scope="module")
def reference_state():
    """The fixtures' weights, built by the shared numpy recipe (not by semtrack)."""
    sd = _reference_weights_module().make_state_dict(str(MANIFEST), seed=0)
    return {k: torch.from_numpy(v) for k, v in sd.items()}


@pytest.fixture(scope="module")
def model(reference_state):
    m = CoTrackerThreeOffline().eval()
    result = m.load_state_dict(reference_state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return m


@pytest.fixture(scope="module")
def tracker(model):
    return OfflineTracker(model).eval()


# ----------------------------------------------------------------------------- state dict / weights
def test_state_dict_layout_matches_manifest(model):
    rows = [line.split("\t") for line in MANIFEST.read_text().splitlines() if line and not line.startswith("#")]
    sd = model.state_dict()
    assert [k for k, _, _ in rows] == list(sd)
    for key, shape, dtype in rows:
        assert tuple(sd[key].shape) == tuple(int(s) for s in shape.split(",")), key
        assert str(sd[key].dtype) == f"torch.{dtype}", key
    assert sum(p.numel() for p in model.parameters()) == 25_385_700


def test_random_weights_are_the_shared_recipe_bytes(reference_state):
    ours = random_state_dict(0)
    assert list(ours) == list(reference_state)
    for key, ref in reference_state.items():
        assert ours[key].dtype == ref.dtype and ours[key].numpy().tobytes() == ref.numpy().tobytes(), key


def test_time_emb_buffer_equals_checkpoint_table(model, reference_state):
    fresh = CoTrackerThreeOffline()
    assert torch.equal(fresh.time_emb, reference_state["time_emb"])


# ----------------------------------------------------------------------------- bare model
@pytest.fixture(scope="module")
def small_run(model):
    """One 6-iteration forward on model_small.npz, with intermediates recorded by forward hooks."""
    ref = _fixture("model_small.npz")
    calls: dict[str, list] = {}

    def record(name):
        def hook(_module, args, output):
            calls.setdefault(name, []).append((args, output))

        return hook

    uf = model.updateformer
    modules = {
        "fnet": model.fnet,
        "corr_mlp": model.corr_mlp,
        "input_transform": uf.input_transform,
        "updateformer": uf,
        "time_block0": uf.time_blocks[0],
        "virtual2point0": uf.space_virtual2point_blocks[0],
        "virtual_block0": uf.space_virtual_blocks[0],
        "point2virtual0": uf.space_point2virtual_blocks[0],
    }
    handles = [m.register_forward_hook(record(name)) for name, m in modules.items()]
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(ref["video"]), torch.from_numpy(ref["queries"]), iters=6)
    finally:
        for h in handles:
            h.remove()
    return ref, out, calls


def test_model_small_outputs(small_run):
    ref, (coords, vis, conf), _ = small_run
    assert _maxdiff(coords, ref["coords"]) < COORD_TOL
    assert _maxdiff(vis, ref["vis"]) < PROB_TOL
    assert _maxdiff(conf, ref["conf"]) < PROB_TOL


def test_model_small_per_iteration(small_run):
    ref, _, calls = small_run
    deltas = [out for _, out in calls["updateformer"]]  # (B, T, N, 4) per iteration
    assert len(deltas) == 6
    assert _maxdiff(torch.stack(deltas).transpose(2, 3), ref["updateformer_out"]) < INTER_TOL
    coords = torch.from_numpy(ref["queries"][:, None, :, 1:] / 4.0).expand(1, 12, 10, 2)
    logits = torch.zeros(1, 12, 10, 2)
    for it, delta in enumerate(deltas):
        coords = coords + delta[..., :2]
        logits = logits + delta[..., 2:]
        assert _maxdiff(coords * 4, ref["coords_iters"][it]) < COORD_TOL, it
        assert _maxdiff(torch.sigmoid(logits[..., 0]), ref["vis_iters"][it]) < PROB_TOL, it
        assert _maxdiff(torch.sigmoid(logits[..., 1]), ref["conf_iters"][it]) < PROB_TOL, it


def test_model_small_intermediates(small_run, model):
    ref, _, calls = small_run
    assert _maxdiff(calls["fnet"][0][1], ref["fnet_out"]) < INTER_TOL
    corr_in = calls["corr_mlp"][0][0][0]  # iteration 0, level 0: (B, N, T, 2401) (one chunk of frames)
    assert _maxdiff(corr_in.view(1, 10, 12, 7, 7, 7, 7).transpose(1, 2), ref["corr_volume_it0_l0"]) < INTER_TOL
    embs = torch.cat([out for _, out in calls["corr_mlp"][:4]], dim=-1).transpose(1, 2)
    assert _maxdiff(embs, ref["corr_embs_it0"]) < INTER_TOL
    assert _maxdiff(calls["input_transform"][0][0][0], ref["updateformer_in_it0"]) < INTER_TOL  # (B, N, T, 1110)
    for name in ("time_block0", "virtual2point0", "virtual_block0", "point2virtual0"):
        assert _maxdiff(calls[name][0][1], ref[f"{name}_out_it0"]) < INTER_TOL, name
    assert _maxdiff(model.time_embedding(12), ref["time_emb_interp"]) < 1e-6


def test_model_small_encoder_pyramid_and_query_features(model):
    ref = _fixture("model_small.npz")
    video = torch.from_numpy(ref["video"])
    with torch.no_grad():
        stages = model.fnet.stages(2 * (video[0, :1] / 255.0) - 1.0)
        for i, stage in enumerate(stages, start=1):
            assert _maxdiff(stage, ref[f"enc_layer{i}_f0"]) < INTER_TOL, i
        pyramid = model.encode_clips(list(video))  # levels (T, B, C, h, w)
        assert _maxdiff(pyramid.levels[0][0], ref["fmaps_l0_f0"]) < INTER_TOL
        for level in (1, 2, 3):
            assert _maxdiff(pyramid.levels[level].transpose(0, 1), ref[f"fmaps_l{level}"]) < INTER_TOL, level
        queries = torch.from_numpy(ref["queries"])
        feats = model.query_features(pyramid, queries[..., 0].long(), queries[..., 1:] / 4)  # (B, N, P, C)
        for level, feat in enumerate(feats):
            assert _maxdiff(feat.transpose(1, 2), ref[f"track_feat_support_l{level}"]) < INTER_TOL, level


def test_encoder_chunking_does_not_change_features(model):
    video = torch.from_numpy(_fixture("model_small.npz")["video"])
    with torch.no_grad():
        whole = model.encode_clips(list(video)).levels
        chunked = model.encode_clips(list(video), encoder_chunk=5).levels
    for level_whole, level_chunked in zip(whole, chunked):
        assert torch.allclose(level_whole, level_chunked, atol=1e-6)


def test_model_batch_of_two_equals_single_runs(model):
    ref = _fixture("model_small.npz")
    video, queries = torch.from_numpy(ref["video"]), torch.from_numpy(ref["queries"])
    video2 = video.flip(1)  # a different clip of the same length
    queries2 = queries.flip(1)  # different query order and frames
    with torch.no_grad():
        batched = model(torch.cat([video, video2]), torch.cat([queries, queries2]), iters=3)
        singles = [model(video, queries, iters=3), model(video2, queries2, iters=3)]
    for i, single in enumerate(singles):
        assert _maxdiff(batched[0][i], single[0][0].numpy()) < COORD_TOL
        assert _maxdiff(batched[1][i], single[1][0].numpy()) < PROB_TOL


# ----------------------------------------------------------------------------- predictor
def _record_model_passes(tracker, monkeypatch):
    passes = []
    track = tracker.model.track

    def recording_track(pyramid, queries, iters, point_valid=None, reverse=False, **chunks):
        out = track(pyramid, queries, iters, point_valid, reverse, **chunks)
        passes.append((queries.clone(), out))
        return out

    monkeypatch.setattr(tracker.model, "track", recording_track)
    return passes


def _check_raw_pass(recorded, ref, prefix):
    queries, (coords, vis, conf) = recorded
    assert _maxdiff(queries, ref[f"{prefix}_model_queries"]) == 0
    assert _maxdiff(coords, ref[f"{prefix}_model_coords"]) < RAW_COORD_TOL
    assert _maxdiff(vis, ref[f"{prefix}_model_vis"]) < PROB_TOL
    assert _maxdiff(conf, ref[f"{prefix}_model_conf"]) < PROB_TOL


def test_predictor_queries_backward_tracking(tracker, monkeypatch):
    ref = _fixture("predictor_queries.npz")
    video = torch.from_numpy(ref["video_uint8"]).float()
    assert _maxdiff(resize_frames(video[0, :1], tracker.interp_shape), ref["model_video_f0"]) < INTER_TOL
    passes = _record_model_passes(tracker, monkeypatch)
    tracks, visible = tracker(video, queries=torch.from_numpy(ref["queries"]), backward_tracking=True)
    assert len(passes) == 2  # one encoder pass is shared by the forward and backward model passes
    _check_raw_pass(passes[0], ref, "fwd")
    _check_raw_pass(passes[1], ref, "bwd")
    assert tracks.dtype == torch.float32 and visible.dtype == torch.bool
    assert _maxdiff(tracks, ref["tracks"]) < COORD_TOL
    assert torch.equal(visible, torch.from_numpy(ref["visibility"]))


def test_predictor_grid(tracker, monkeypatch):
    ref = _fixture("predictor_grid.npz")
    assert torch.equal(
        torch.cat([torch.zeros(64, 1), tracker.grid_points(8)], dim=1), torch.from_numpy(ref["fwd_model_queries"][0])
    )
    passes = _record_model_passes(tracker, monkeypatch)
    tracks, visible = tracker(torch.from_numpy(ref["video_uint8"]).float(), grid_size=8, grid_query_frame=0)
    assert len(passes) == 1
    _check_raw_pass(passes[0], ref, "fwd")
    assert _maxdiff(tracks, ref["tracks"]) < COORD_TOL
    assert torch.equal(visible, torch.from_numpy(ref["visibility"]))


def test_predictor_batch_of_two_equals_single_runs(tracker):
    frames = torch.from_numpy(_fixture("predictor_queries.npz")["video_uint8"]).float()
    videos = torch.cat([frames[:, :3], frames[:, 10:13]])  # (2, 3, 3, 240, 184)
    queries = torch.tensor(
        [[[0, 20.0, 30.0], [1, 100.5, 200.25], [2, 170.0, 10.0]], [[2, 50.0, 60.0], [1, 90.0, 120.0], [0, 5.0, 5.0]]]
    )
    tracks, visible = tracker(videos, queries=queries, backward_tracking=True)
    assert tracks.shape == (2, 3, 3, 2) and visible.shape == (2, 3, 3)
    for i in range(2):
        single_tracks, single_visible = tracker(videos[i : i + 1], queries=queries[i : i + 1], backward_tracking=True)
        assert _maxdiff(tracks[i], single_tracks[0].numpy()) < COORD_TOL
        assert torch.equal(visible[i], single_visible[0])
        # each query frame holds the query itself, visible
        frame = queries[i, :, 0].long()
        assert torch.allclose(tracks[i, frame, torch.arange(3)], queries[i, :, 1:], atol=1e-4)
        assert visible[i, frame, torch.arange(3)].all()


def test_dense_mode_equals_queries_without_support_grid(tracker):
    """Dense mode on an 80-px-wide clip (step 1) tracks every pixel, like queries mode with no support grid."""
    video = torch.from_numpy(_fixture("predictor_queries.npz")["video_uint8"][:, :2, :, 100:102, 50:130]).float()
    tracks, visible = tracker(video, grid_query_frame=1)
    ys, xs = torch.meshgrid(torch.arange(2.0), torch.arange(80.0), indexing="ij")
    queries = torch.stack([torch.ones(160), xs.flatten(), ys.flatten()], dim=1)[None]
    # queries together with grid_size > 0: the queries are used and no support grid is added
    ref_tracks, ref_visible = tracker(video, queries=queries, grid_size=1)
    assert tracks.shape == (1, 2, 160, 2)
    assert _maxdiff(tracks, ref_tracks.numpy()) < COORD_TOL
    assert torch.equal(visible, ref_visible)


def test_segm_mask_keeps_grid_points_inside_mask_of_first_video(tracker):
    mask = torch.zeros(2, 1, 240, 184)
    mask[0, :, :, :92] = 1  # left half of video 0; video 1's mask is ignored (official behaviour)
    points = tracker._mask_points(tracker.grid_points(8), mask)
    grid = tracker.grid_points(8)
    assert torch.equal(points, grid[grid[:, 0] < 256])


def test_predictor_rejects_bad_inputs(tracker):
    video = torch.zeros(1, 3, 3, 8, 8)
    with pytest.raises(ValueError, match="query frames"):
        tracker(video, queries=torch.tensor([[[3.0, 1.0, 1.0]]]))
    with pytest.raises(ValueError, match=r"\(B, T, 3, H, W\)"):
        tracker(video[0])
    with pytest.raises(ValueError, match="precision"):
        OfflineTracker(precision="fp16")


# ----------------------------------------------------------------------------- precision / device
def test_bf16_autocast_stays_close_to_fp32(model):
    """Correlation and transformer under CPU bf16 autocast (the encoder runs in fp32 here only
    because CPU bf16 convolutions are very slow without AMX)."""
    ref = _fixture("model_small.npz")
    video, queries = torch.from_numpy(ref["video"]), torch.from_numpy(ref["queries"])
    with torch.no_grad():
        pyramid = model.encode_clips(list(video))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            coords, vis, conf = model.track(pyramid, queries, iters=2)
    assert coords.dtype == torch.float32 and vis.dtype == torch.float32
    assert torch.isfinite(coords).all()
    assert _maxdiff(coords, ref["coords_iters"][1]) < 0.5  # measured 0.1 px
    assert _maxdiff(vis, ref["vis_iters"][1]) < 0.02  # measured 0.004


@pytest.fixture
def no_tf32(monkeypatch):
    """fp32 parity on CUDA needs true fp32 convolutions and matmuls (cuDNN defaults to TF32)."""
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.mark.cuda
def test_cuda_fp32_matches_model_fixture(model, no_tf32):
    ref = _fixture("model_small.npz")
    gpu = CoTrackerThreeOffline().cuda().eval()
    gpu.load_state_dict(model.state_dict())
    with torch.no_grad():
        coords, vis, conf = gpu(torch.from_numpy(ref["video"]).cuda(), torch.from_numpy(ref["queries"]).cuda(), iters=6)
    assert _maxdiff(coords, ref["coords"]) < COORD_TOL
    assert _maxdiff(vis, ref["vis"]) < PROB_TOL
    assert _maxdiff(conf, ref["conf"]) < PROB_TOL


@pytest.mark.cuda
def test_cuda_predictor_fp32_matches_fixture_and_bf16_stays_close(model, no_tf32):
    ref = _fixture("predictor_queries.npz")
    video = torch.from_numpy(ref["video_uint8"]).float().cuda()
    queries = torch.from_numpy(ref["queries"]).cuda()
    fp32 = OfflineTracker(CoTrackerThreeOffline()).cuda().eval()
    fp32.model.load_state_dict(model.state_dict())
    tracks, visible = fp32(video, queries=queries, backward_tracking=True)
    assert _maxdiff(tracks, ref["tracks"]) < COORD_TOL
    assert torch.equal(visible.cpu(), torch.from_numpy(ref["visibility"]))
    bf16 = OfflineTracker(fp32.model, precision="bf16").eval()
    tracks16, visible16 = bf16(video, queries=queries, backward_tracking=True)
    assert tracks16.dtype == torch.float32 and torch.isfinite(tracks16).all()
    assert (tracks16 - tracks).abs().median() < 1.0
