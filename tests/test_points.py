"""Query points against the research fixtures (shared/spec/fixtures, FIXTURES.md b and e)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from _shared import shared_path
from semtrack.clustering import kmeans_clusters
from semtrack.points import (
    _entities,
    coverage,
    exact_pixel_points,
    grid_query_points,
    nearest_source_index,
    peak_frames,
    select_query_points,
)

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]
CASES = ["nocc", "cc", "nocc_small", "cc_small"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def fx():
    return dict(np.load(shared_path("spec", "fixtures", "sampling.npz")))


def _inputs(fx, device="cpu"):
    """labels on `device`; cluster_frames stay on the CPU (as the dataset yields them)."""
    return torch.from_numpy(fx["labels"]).to(device), torch.from_numpy(fx["frames_id_dict"])


def _weighted(cov):
    return float((cov[:, 0] * cov[:, 1]).sum() / cov[:, 1].sum())


def test_nearest_rule_matches_torch_interpolate():
    checks = json.loads(shared_path("spec", "fixtures", "device_checks.json").read_text())
    assert checks["nearest_rule_float32_floor_mismatching_sizes"] == []
    src = torch.arange(16, dtype=torch.float32)[None, None, :, None]  # (1, 1, 16, 1)
    for size in range(1, 2200):
        ref = F.interpolate(src, size=(size, 1), mode="nearest")[0, 0, :, 0].long()
        assert torch.equal(nearest_source_index(size, 16), ref), size
    assert nearest_source_index(428, 16)[107] == 3  # exact integer floor(16 * 107 / 428) would be 4


def test_peak_frames(fx):
    present, peak = peak_frames(torch.from_numpy(fx["labels"]))
    assert bool(present.all()) and peak.tolist() == fx["peak_frame_of_cluster"].tolist()
    tie = torch.zeros(3, 4, 4, dtype=torch.long)
    tie[1, 0, 0] = tie[2, 0, 0] = 1  # cluster 1 has one patch in frames 1 and 2: earliest wins
    assert peak_frames(tie)[1].tolist() == [0, 1]


@pytest.mark.parametrize("case", CASES)
def test_exact_sampler_reproduces_reference(fx, case):
    labels, frames = _inputs(fx)
    cc = case.startswith("cc")
    hw = tuple(fx[f"image_hw_{case}"])
    qp = select_query_points(labels, frames, hw, sampler="exact", use_connected_components=cc)
    n = len(fx[f"obj_ids_{case}"])
    assert len(qp) == n and qp.queries.dtype == torch.float32 and qp.obj_ids.dtype == torch.int64
    np.testing.assert_array_equal(qp.clusters.numpy(), fx[f"point_cluster_{case}"])
    np.testing.assert_array_equal(qp.obj_ids.numpy(), fx[f"obj_ids_{case}"])
    np.testing.assert_array_equal(qp.source_frames.numpy(), fx[f"point_source_frame_{case}"])
    if cc:
        np.testing.assert_array_equal(qp.components.numpy(), fx[f"point_component_{case}"])
    np.testing.assert_array_equal(qp.queries[:, 0].numpy(), fx[f"intended_query_frame_{case}"])  # fixed rule
    err = np.abs(qp.queries[:, 1:].numpy() - fx[f"points_xy_{case}"])  # (N, 2) (x, y)
    tie = fx[f"point_tie_{case}"]
    assert err[~tie].max() == 0
    assert err[tie].max(initial=0) <= 1
    assert qp.num_dropped == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES)
def test_legacy_query_frames_and_fast_structure(fx, case, device):
    """Query frames (legacy rank rule and fixed rule), ids and order do not depend on the sampler."""
    labels, frames = _inputs(fx, device)
    cc = case.startswith("cc")
    hw = tuple(fx[f"image_hw_{case}"])
    legacy = select_query_points(labels, frames, hw, use_connected_components=cc, legacy_query_frames=True)
    assert legacy.queries.device.type == device
    np.testing.assert_array_equal(legacy.queries[:, 0].cpu().numpy(), fx[f"queries_txy_{case}"][:, 0])
    np.testing.assert_array_equal(legacy.queries[:, 0].cpu().numpy(), fx[f"point_queries_{case}"])
    fixed = select_query_points(labels, frames, hw, use_connected_components=cc)
    np.testing.assert_array_equal(fixed.queries[:, 0].cpu().numpy(), fx[f"intended_query_frame_{case}"])
    for qp in (legacy, fixed):
        np.testing.assert_array_equal(qp.obj_ids.cpu().numpy(), fx[f"obj_ids_{case}"])
        np.testing.assert_array_equal(qp.clusters.cpu().numpy(), fx[f"point_cluster_{case}"])
        np.testing.assert_array_equal(qp.source_frames.cpu().numpy(), fx[f"point_source_frame_{case}"])


def test_exact_sampler_old_sklearn_default(fx):
    """n_init=10 (scikit-learn <= 1.3 default) reproduces the `_ninit10` arrays; checked on the
    clusters/components small enough to keep this quick."""
    labels = fx["labels"]
    h, w = fx["image_hw_nocc_ninit10"]
    ry, rx = nearest_source_index(h, 16).numpy(), nearest_source_index(w, 16).numpy()
    for case, cc in (("nocc_ninit10", False), ("cc_ninit10", True)):
        done = 0
        for c in range(16):
            mask = labels[fx["peak_frame_of_cluster"][c]][ry][:, rx] == c
            if mask.sum() > 1500:
                continue
            comps, num = ndimage.label(mask) if cc else (mask.astype(int), 1)
            for k in range(num):
                sel = fx[f"point_cluster_{case}"] == c
                if cc:
                    sel &= fx[f"point_component_{case}"] == k
                got = exact_pixel_points(np.argwhere(comps == k + 1), 16, n_init=10)[:, ::-1]  # (x, y)
                err = np.abs(got - fx[f"points_xy_{case}"][sel])
                tie = fx[f"point_tie_{case}"][sel]
                assert err[~tie].max() == 0 and err[tie].max(initial=0) <= 1
                done += 1
        assert done >= 8


@pytest.mark.parametrize("size", [(24, 32), (17, 20), (9, 13), (240, 428)])
def test_components_on_reduced_grid_equal_full_resolution(size):
    """Components found on the kept cells equal scipy's 4-connected labelling of the full mask."""
    gen = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 4, (2, 16, 16), generator=gen)
    ent = _entities(labels, size, use_cc=True)
    ry, rx = nearest_source_index(size[0], 16).numpy(), nearest_source_index(size[1], 16).numpy()
    pairs = list(dict.fromkeys(zip(ent.frame.tolist(), ent.cluster.tolist())))  # clusters in visiting order
    e = 0
    for f, c in pairs:
        comps, num = ndimage.label(labels[f].numpy()[ry][:, rx] == c)
        for k in range(num):
            assert ent.cluster[e] == c and ent.comp[e] == k
            np.testing.assert_array_equal(ent.full_mask(e), comps == k + 1)
            e += 1
    assert e == len(ent.frame)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("size,cc", [((240, 320), False), ((240, 320), True), ((480, 854), False), ((720, 1296), True)])
def test_fast_sampler_coverage_close_to_exact(fx, size, cc, device):
    """Mean distance from mask pixels to the nearest point: fast within 5 % of exact (fixture
    labels, and the same labels on real clip sizes)."""
    labels, frames = _inputs(fx, device)
    fast = select_query_points(labels, frames, size, use_connected_components=cc)
    assert torch.equal(fast.queries, select_query_points(labels, frames, size, use_connected_components=cc).queries)
    exact = select_query_points(labels.cpu(), frames.cpu(), size, sampler="exact", use_connected_components=cc)
    assert torch.equal(fast.obj_ids.cpu(), exact.obj_ids) and torch.equal(fast.queries[:, 0].cpu(), exact.queries[:, 0])
    cov_fast, cov_exact = coverage(labels, size, fast), coverage(labels, size, exact)
    assert _weighted(cov_fast) <= 1.05 * _weighted(cov_exact)
    assert (cov_fast[:, 0] <= 1.10 * cov_exact[:, 0] + 0.5).all()  # no entity much worse
    # every fast point is a pixel of its own cluster in its source frame
    ry, rx = nearest_source_index(size[0], 16, device), nearest_source_index(size[1], 16, device)
    x, y = fast.queries[:, 1].long(), fast.queries[:, 2].long()
    assert torch.equal(labels[fast.source_frames, ry[y], rx[x]], fast.clusters)


@pytest.mark.parametrize("cc", [False, True])
def test_fast_sampler_coverage_on_real_frames(cc):
    """Real-clip masks: 4 frames of bear.mp4 (480x854, shared/dinov2) split into 10 colour clusters
    of their 16x16 patch means: irregular, fragmented entities (over 100 components with CC)."""
    frames = np.load(shared_path("dinov2", "features_vitb14.npz"))["frames"]  # (4, 480, 854, 3) uint8
    patches = F.adaptive_avg_pool2d(torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 255, 16)
    labels = kmeans_clusters(patches.permute(0, 2, 3, 1).contiguous(), 10, seed=0, init="kmeans++")  # (4, 16, 16)
    frames_id = torch.tensor([0, 10, 20, 30])
    fast = select_query_points(labels, frames_id, (480, 854), use_connected_components=cc)
    exact = select_query_points(labels, frames_id, (480, 854), sampler="exact", use_connected_components=cc)
    assert torch.equal(fast.obj_ids, exact.obj_ids)
    cov_fast, cov_exact = coverage(labels, (480, 854), fast), coverage(labels, (480, 854), exact)
    assert _weighted(cov_fast) <= 1.05 * _weighted(cov_exact)
    assert (cov_fast[:, 0] <= 1.10 * cov_exact[:, 0] + 0.5).all()


def test_fast_sampler_small_entities_take_all_pixels(fx):
    labels, frames = _inputs(fx)
    for cc in (False, True):
        case = "cc_small" if cc else "nocc_small"
        fast = select_query_points(labels, frames, (24, 32), use_connected_components=cc)
        exact = select_query_points(labels, frames, (24, 32), sampler="exact", use_connected_components=cc)
        assert len(fast) == len(fx[f"obj_ids_{case}"])
        small = np.bincount(fast.obj_ids.numpy()) < 16
        pick = np.isin(fast.obj_ids.numpy(), np.nonzero(small)[0])
        assert pick.sum() > 0
        torch.testing.assert_close(fast.queries[pick], exact.queries[pick])  # all pixels, row-major


def test_tiny_clips(fx):
    labels, frames = _inputs(fx)
    for size in [(1, 1), (8, 8), (5, 40)]:
        for cc in (False, True):
            fast = select_query_points(labels, frames, size, use_connected_components=cc)
            exact = select_query_points(labels, frames, size, sampler="exact", use_connected_components=cc)
            assert len(fast) == len(exact) > 0 and torch.equal(fast.obj_ids, exact.obj_ids)
            assert fast.queries[:, 1].max() < size[1] and fast.queries[:, 2].max() < size[0]
    assert len(select_query_points(labels, frames, (1, 1))) == 1  # every other cluster vanishes


def _greedy(xy, t, d):
    keep = []
    for i in range(len(xy)):
        if all(t[j] != t[i] or np.hypot(*(xy[i] - xy[j])) >= d for j in keep):
            keep.append(i)
    return keep


@pytest.mark.parametrize("sampler", ["fast", "exact"])
def test_min_point_distance(fx, sampler):
    labels, frames = _inputs(fx)
    full = select_query_points(labels, frames, (24, 32), sampler=sampler)
    assert full.num_dropped == 0
    for d in (1.5, 4, 40):
        kept = select_query_points(labels, frames, (24, 32), sampler=sampler, min_point_distance=d)
        ref = _greedy(full.queries[:, 1:].numpy(), full.queries[:, 0].numpy(), d)
        assert kept.num_dropped == len(full) - len(ref) > 0
        torch.testing.assert_close(kept.queries, full.queries[ref])
        assert torch.equal(kept.obj_ids, full.obj_ids[ref])


def test_grid_query_points():
    g = grid_query_points(5, grid_query_frame=3)
    assert g.obj_ids.shape == g.query_frames.shape == (25,)
    assert g.obj_ids.dtype == g.query_frames.dtype == torch.int64
    assert bool((g.obj_ids == 0).all()) and bool((g.query_frames == 3).all())
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="grid_size"):
            grid_query_points(bad)


def test_errors(fx):
    labels, frames = _inputs(fx)
    with pytest.raises(ValueError, match="sampler"):
        select_query_points(labels, frames, (24, 32), sampler="kmeans")
    with pytest.raises(ValueError, match="num_points_per_entity"):
        select_query_points(labels, frames, (24, 32), num_points_per_entity=0)
    with pytest.raises(ValueError, match="cluster_frames"):
        select_query_points(labels, frames[:3], (24, 32))
    with pytest.raises(ValueError, match="labels"):
        select_query_points(labels[0], frames, (24, 32))
    with pytest.raises(ValueError, match="labels"):
        select_query_points(labels.float(), frames, (24, 32))
    with pytest.raises(ValueError, match="clip_size"):
        select_query_points(labels, frames, (0, 32))
    with pytest.raises(ValueError, match="min_point_distance"):
        select_query_points(labels, frames, (24, 32), min_point_distance=-1)
    with pytest.raises(ValueError, match="fast_samples"):
        select_query_points(labels, frames, (24, 32), fast_samples=8)
