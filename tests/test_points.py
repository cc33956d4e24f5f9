"""Query points against the research fixtures (shared/spec/fixtures, FIXTURES.md b and e)."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import ndimage

from _device_count import DeviceCounter
from _shared import shared_path
from semtrack.clustering import cluster_batch, kmeans_clusters
from semtrack.points import (
    FAST_SAMPLES,
    _geometry,
    _host_entities,
    closest_pixels,
    coverage,
    exact_pixel_points,
    grid_query_points,
    nearest_source_index,
    peak_frames,
    select_query_points,
    select_query_points_batch,
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
def test_components_on_kept_cells_equal_full_resolution(size):
    """Components found on the kept cells equal scipy's 4-connected labelling of the full mask."""
    gen = torch.Generator().manual_seed(7)
    labels = torch.randint(0, 4, (2, 16, 16), generator=gen)
    ent = _host_entities(labels[None], _geometry([size], 16, 16, FAST_SAMPLES), use_cc=True)
    ry, rx = nearest_source_index(size[0], 16).numpy(), nearest_source_index(size[1], 16).numpy()
    valid = ent.valid[0]
    pairs = list(dict.fromkeys(zip(ent.frame[0][valid].tolist(), ent.cluster[0][valid].tolist())))  # visiting order
    e = 0
    for f, c in pairs:
        comps, num = ndimage.label(labels[f].numpy()[ry][:, rx] == c)
        for k in range(num):
            assert ent.cluster[0, e] == c and ent.comp[0, e] == k
            np.testing.assert_array_equal(ent.cells[0, e].numpy()[ry][:, rx], comps == k + 1)
            e += 1
    assert e == int(valid.sum()) and not bool(ent.cells[0, e:].any())


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
    with pytest.raises(ValueError, match="tie_rule"):
        select_query_points(labels, frames, (24, 32), sampler="exact", tie_rule="last")
    batch, k = labels[None], frames[None]
    with pytest.raises(ValueError, match="num_labels"):
        select_query_points_batch(batch, k, [(24, 32)], 0)
    with pytest.raises(ValueError, match="clip_sizes"):
        select_query_points_batch(batch, k, [(24, 32), (8, 8)], 16)
    with pytest.raises(ValueError, match="cluster_frames"):
        select_query_points_batch(batch, k[:, :3], [(24, 32)], 16)
    with pytest.raises(ValueError, match="int64"):
        select_query_points_batch(batch.int(), k, [(24, 32)], 16)


FIELDS = ("queries", "obj_ids", "source_frames", "clusters", "components")


def _clips(fx):
    """Three videos: the fixture labels (8 frames), 5 of its frames shifted to other ids, 3 random
    frames; padded into (3, 8, 16, 16) labels (-1) and (3, 8) cluster frames (-1)."""
    lab = torch.from_numpy(fx["labels"])
    gen = torch.Generator().manual_seed(3)
    videos = [lab, (lab[3:] + 4) % 17, torch.randint(0, 6, (3, 16, 16), generator=gen)]
    frames = [torch.from_numpy(fx["frames_id_dict"]), torch.arange(5) * 2, torch.tensor([0, 4, 9])]
    labels = torch.full((3, 8, 16, 16), -1, dtype=torch.long)
    cluster_frames = torch.full((3, 8), -1, dtype=torch.long)
    for i, (x, f) in enumerate(zip(videos, frames)):
        labels[i, : len(x)], cluster_frames[i, : len(x)] = x, f
    return videos, frames, labels, cluster_frames


@pytest.mark.parametrize("options", [
    dict(sizes=[(240, 428), (24, 32), (9, 13)]),
    dict(sizes=[(240, 428), (24, 32), (9, 13)], use_connected_components=True, legacy_query_frames=True),
    dict(sizes=[(60, 80), (24, 32), (17, 20)], sampler="exact"),
    dict(sizes=[(60, 80), (24, 32), (17, 20)], sampler="exact", use_connected_components=True, tie_rule="research"),
    dict(sizes=[(48, 64), (24, 32), (17, 20)], min_point_distance=3, num_points_per_entity=4),
])
def test_batch_equals_each_clip_alone(fx, options):
    """Clips of different sizes and frame counts in one padded batch: each clip's points equal its
    solo points, packed to the front of its rows, -1 / zeros after them."""
    options = dict(options)
    sizes = options.pop("sizes")
    videos, frames, labels, cluster_frames = _clips(fx)
    batch = select_query_points_batch(labels, cluster_frames, sizes, 17, **options)
    n = batch.queries.shape[1]
    assert batch.queries.shape == (3, n, 3) and batch.valid.shape == batch.obj_ids.shape == (3, n)
    assert torch.equal(batch.valid, torch.arange(n)[None] < batch.counts[:, None])
    for i, (x, f, size) in enumerate(zip(videos, frames, sizes)):
        solo = select_query_points(x, f, size, **options)
        one = batch.clip(i)
        assert len(solo) == int(batch.counts[i]) > 0 and solo.num_dropped == one.num_dropped
        for name in FIELDS:
            assert torch.equal(getattr(one, name), getattr(solo, name)), name
            assert bool((getattr(batch, name)[i, len(solo):] == (0 if name == "queries" else -1)).all())
    if options.get("min_point_distance"):
        assert int(batch.num_dropped.sum()) > 0


def test_stages_never_wait_for_the_device():
    """Clustering and sampling of 1 and of 3 tiny clips, counted as CUDA would run them: the default
    path (bipartite, fast sampler) has no host sync at all and costs about the same device ops for
    3 clips as for 1; the exact sampler and connected components download the labels once."""
    gen = torch.Generator().manual_seed(1)
    tokens = torch.randn(3, 4, 16, 16, 24, generator=gen)
    cluster_frames = torch.tensor([[0, 3, 6, 9], [0, 2, 4, -1], [0, 5, -1, -1]])
    sizes, lengths = [(48, 64), (30, 40), (16, 20)], [4, 3, 2]
    ops = {}
    for v in (1, 3):
        counter = DeviceCounter()
        counter.seed(tokens, cluster_frames)
        with counter:
            with counter.stage("clustering"):
                clusters = cluster_batch(tokens[:v], lengths[:v], ["a", "b", "c"][:v], num_iters=5)
            with counter.stage("points"):
                points = select_query_points_batch(clusters.labels, cluster_frames[:v], sizes[:v],
                                                   clusters.num_labels, num_points_per_entity=4)
        assert counter.total_syncs() == 0, counter.sites
        assert bool((points.counts > 0).all())
        ops[v] = counter.ops
    assert all(ops[3][stage] < 1.2 * ops[1][stage] for stage in ("clustering", "points"))
    for options, syncs in ((dict(legacy_query_frames=True), {}), (dict(use_connected_components=True), {"d2h": 1}),
                           (dict(sampler="exact"), {"d2h": 1})):
        counter = DeviceCounter()
        counter.seed(clusters.labels, cluster_frames)
        with counter:
            select_query_points_batch(clusters.labels, cluster_frames, sizes, clusters.num_labels,
                                      num_points_per_entity=4, **options)
        assert dict(counter.syncs_by_kind()) == syncs, (options, counter.sites)


def test_research_tie_rule_by_hand():
    """Exact distance ties: "first" takes the first of all pixels in row-major order (distances
    rounded to 1e-9); "research" takes numpy's argmin of the float64 distances to the members of the
    centre's own k-means cluster, so membership and float noise decide."""
    pixels = np.array([[0, 0], [0, 1], [0, 2], [0, 3]])
    # centre 1 sits exactly between pixel 1 (k-means cluster 0) and pixel 2 (its own member)
    centres, members = np.array([[0.0, 0.5], [0.0, 1.5]]), np.array([0, 0, 1, 1])
    assert closest_pixels(pixels, centres, members, "first").tolist() == [[0, 0], [0, 1]]
    assert closest_pixels(pixels, centres, members, "research").tolist() == [[0, 0], [0, 2]]
    # float noise: 0.5 + 1 ulp is nearer pixel 1 (0.4999...) than pixel 0 (0.5000...1)
    noisy = np.array([[0.0, np.nextafter(0.5, 1)], [0.0, 2.5]])
    assert closest_pixels(pixels, noisy, np.array([0, 0, 1, 1]), "first").tolist() == [[0, 0], [0, 2]]
    assert closest_pixels(pixels, noisy, np.array([0, 0, 1, 1]), "research").tolist() == [[0, 1], [0, 2]]
    # a centre without members (possible in principle) falls back to all pixels
    assert closest_pixels(pixels, np.array([[0.0, 2.9]]), np.array([1, 1, 1, 1]), "research").tolist() == [[0, 3]]


def test_research_tie_rule_reproduces_the_fixture(fx):
    """With tie_rule="research" the exact sampler gives the research points (ties within the
    fixture's float noise of 1 px) and is exactly scikit-learn's fit followed by the research rule."""
    labels, frames = _inputs(fx)
    for case in ("nocc", "cc_small"):
        qp = select_query_points(labels, frames, tuple(fx[f"image_hw_{case}"]), sampler="exact",
                                 use_connected_components=case.startswith("cc"), tie_rule="research")
        err = np.abs(qp.queries[:, 1:].numpy() - fx[f"points_xy_{case}"])
        tie = fx[f"point_tie_{case}"]
        assert err[~tie].max() == 0 and err[tie].max(initial=0) <= 1
    from sklearn.cluster import KMeans

    pixels = np.argwhere(np.add.outer(np.arange(9), np.arange(13)) % 5 != 0)  # a striped entity
    km = KMeans(n_clusters=6, n_init=1, random_state=42).fit(pixels.astype(np.float64))
    expected = closest_pixels(pixels, km.cluster_centers_, km.labels_, "research")
    np.testing.assert_array_equal(exact_pixel_points(pixels, 6, tie_rule="research"), expected)
