"""Clustering against the research fixtures (shared/spec/fixtures, FIXTURES.md a and c)."""
import json

import numpy as np
import pytest
import torch

from _device_count import DeviceCounter
from _shared import shared_path
from semtrack.clustering import (
    assign_labels,
    bipartite_clusters,
    cluster,
    cluster_batch,
    kmeans_clusters,
    merge_frames,
    merge_schedule,
    merge_step,
    temporal_merge,
)
from semtrack.util import stable_seed

SETTINGS = [("m25_i11", 25, 11), ("m40_i5", 40, 5)]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bip():
    return dict(np.load(shared_path("spec", "fixtures", "bipartite.npz")))


@pytest.fixture(scope="module")
def km():
    return dict(np.load(shared_path("spec", "fixtures", "kmeans.npz")))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tag,m,it", SETTINGS)
def test_bipartite_labels_match_reference(bip, tag, m, it, device):
    labels = bipartite_clusters(torch.from_numpy(bip["tokens"]).to(device), m, it)
    assert labels.dtype == torch.int64 and labels.shape == (8, 16, 16) and labels.device.type == device
    np.testing.assert_array_equal(labels.cpu().numpy(), bip[f"labels_{tag}"])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tag,m,it", SETTINGS)
def test_bipartite_intermediates(bip, tag, m, it, device):
    tokens = torch.from_numpy(bip["tokens"]).to(device)
    assert merge_schedule(256, m, it) == bip[f"merge_schedule_{tag}"].tolist()
    frames = merge_frames(tokens.reshape(8, 256, 768), m, it)  # (8, K_f, 768)
    if device == "cpu":  # the reference itself gave a different frame-1 result on CUDA
        np.testing.assert_allclose(frames.numpy(), bip[f"frame_centroids_{tag}"], atol=1e-4, rtol=0)
    centroids, prov, count = temporal_merge(frames[None])
    k = int(count[0])
    np.testing.assert_array_equal(prov[0, :k].cpu().numpy(), bip[f"merged_provenance_{tag}"])
    assert bool((prov[0, k:] == -1).all())
    np.testing.assert_allclose(centroids[0, :k].cpu().numpy(), bip[f"merged_centroids_{tag}"], atol=1e-5, rtol=0)
    # the assignment cosines and labels from the reference's own merged set
    ref_u = torch.from_numpy(bip[f"merged_centroids_{tag}"]).to(device)
    xn = tokens / tokens.norm(dim=-1, keepdim=True)
    cos = xn @ (ref_u / ref_u.norm(dim=-1, keepdim=True)).T
    np.testing.assert_allclose(cos.cpu().numpy(), bip[f"assign_cos_{tag}"], atol=1e-5, rtol=0)
    labels = assign_labels(tokens.reshape(1, 8, 256, 768), ref_u[None], torch.tensor([k], device=device))
    np.testing.assert_array_equal(labels.reshape(8, 16, 16).cpu().numpy(), bip[f"labels_{tag}"])


def test_onehot_merge_path_gives_same_labels(bip, monkeypatch):
    """The GPU merge path (one-hot matmul, deterministic) reproduces the fixture on CPU too."""
    import semtrack.clustering as clustering

    monkeypatch.setattr(clustering, "_onehot_sums", lambda device: True)
    tokens = torch.from_numpy(bip["tokens"])
    for tag, m, it in SETTINGS:
        np.testing.assert_array_equal(bipartite_clusters(tokens, m, it).numpy(), bip[f"labels_{tag}"])
    frames = merge_frames(tokens.reshape(8, 256, 768))
    np.testing.assert_allclose(frames.numpy(), bip["frame_centroids_m25_i11"], atol=1e-4, rtol=0)


def test_toy_merge_is_unweighted_average(bip):
    toy = torch.from_numpy(bip["toy_in"])[None]  # (1, 8, 4)
    one = merge_step(toy, 4)
    np.testing.assert_allclose(one[0].numpy(), bip["toy_after_iter1_r4"], atol=1e-7)
    np.testing.assert_allclose(merge_step(one, 2)[0].numpy(), bip["toy_after_iter2_r2"], atol=1e-7)
    via = merge_frames(toy, 50, 2)[0].numpy()
    np.testing.assert_allclose(via, bip["toy_via_get_bipartite_soft_matching_m50_i2"], atol=1e-7)
    np.testing.assert_allclose(via[0], [0.45, 0.55, 0, 0], atol=1e-6)  # 50/50, not the size-weighted 0.675


@pytest.mark.parametrize("device", DEVICES)
def test_several_videos_equal_single_video(bip, device):
    tokens = torch.from_numpy(bip["tokens"]).to(device)
    videos = [tokens, tokens[2:5].flip(0).contiguous(), tokens[5:6] * 1.5]
    batched = bipartite_clusters(videos)
    assert isinstance(batched, list) and len(batched) == len(videos)
    for v, lab in zip(videos, batched):
        assert torch.equal(lab, bipartite_clusters(v))
    np.testing.assert_array_equal(batched[0].cpu().numpy(), bip["labels_m25_i11"])
    # the padded form: padded frames are labelled -1 and do not influence the others
    pad = torch.zeros(2, 8, 16, 16, 768, device=device)
    pad[0], pad[1, :3] = tokens, videos[1]
    pad[1, 3:] = 100.0  # garbage in the padding
    out = bipartite_clusters(pad, num_frames=[8, 3])
    assert torch.equal(out[0], batched[0]) and torch.equal(out[1, :3], batched[1])
    assert bool((out[1, 3:] == -1).all())


def test_dtypes_and_zero_tokens(bip):
    tokens = torch.from_numpy(bip["tokens"])
    ref = bip["labels_m25_i11"]
    np.testing.assert_array_equal(bipartite_clusters(tokens.double()).numpy(), ref)  # computed in float32
    assert bipartite_clusters(tokens.half()).dtype == torch.int64  # the research code raised on fp16
    zeros = tokens[:2].clone()
    zeros[1, 4, 5] = 0  # NaN in the research code (no epsilon)
    assert bool(merge_frames(zeros.reshape(2, 256, 768)).isfinite().all())
    lab = bipartite_clusters(zeros)
    assert lab.min() >= 0 and lab.max() < 24
    const = torch.ones(2, 16, 16, 8)
    assert bool((bipartite_clusters(const) == 0).all())  # identical tokens: one cluster (first on ties)


def test_schedule_and_errors():
    assert merge_schedule(256, 25, 40)[-1] == 3  # n = 3 -> r = 0: never below 3
    assert merge_schedule(256, 50, 8)[-1] == 1
    assert merge_schedule(256, 40, 0) == [256]
    tokens = torch.randn(2, 16, 16, 8)
    for bad in (0, -5, 50.5, 51, 100, "25", None):
        with pytest.raises(ValueError, match="merge_ratio"):
            bipartite_clusters(tokens, merge_ratio=bad)
    with pytest.raises(ValueError, match="past one token"):
        bipartite_clusters(tokens, merge_ratio=50, num_iters=9)
    with pytest.raises(ValueError, match="num_iters"):
        bipartite_clusters(tokens, num_iters=-1)
    with pytest.raises(ValueError, match=r"\(T, P, Q, D\)"):
        bipartite_clusters(torch.randn(16, 16, 8))
    with pytest.raises(ValueError, match="floating"):
        bipartite_clusters(torch.ones(2, 16, 16, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="same"):
        bipartite_clusters([tokens, torch.randn(2, 8, 8, 8)])
    with pytest.raises(ValueError, match="num_frames"):
        bipartite_clusters(tokens[None].expand(2, -1, -1, -1, -1), num_frames=[2, 3])


def test_kmeans_random_init_reproduces_reference_on_cpu(bip, km):
    tokens = torch.from_numpy(bip["tokens"])
    stream = json.loads(shared_path("spec", "fixtures", "device_checks.json").read_text())
    gen = torch.Generator().manual_seed(1234)
    assert torch.randperm(2048, generator=gen)[:16].tolist() == stream["randperm_2048_seed1234_first16"]
    for k in (8, 32):
        labels, cent = kmeans_clusters(tokens, k, seed=1234, return_centroids=True)
        np.testing.assert_array_equal(labels.numpy(), km[f"labels_k{k}"])
        np.testing.assert_allclose(cent.numpy(), km[f"centroids_k{k}"], atol=1e-4, rtol=0)
    sizes = torch.bincount(kmeans_clusters(tokens, 8, seed=1234).flatten(), minlength=8)
    assert sizes[2] == 0  # the research behaviour: a dead cluster (zero centroid)


@pytest.mark.parametrize("device", DEVICES)
def test_kmeans_lloyd_from_recorded_init(bip, km, device):
    tokens = torch.from_numpy(bip["tokens"]).to(device)
    for k in (8, 32):
        init = torch.from_numpy(km[f"init_indices_k{k}"])
        labels, cent = kmeans_clusters(tokens, k, seed=0, init_indices=init, return_centroids=True)
        np.testing.assert_array_equal(labels.cpu().numpy(), km[f"labels_k{k}"])
        np.testing.assert_allclose(cent.cpu().numpy(), km[f"centroids_k{k}"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
def test_kmeans_seeding_and_options(bip, device):
    tokens = torch.from_numpy(bip["tokens"]).to(device)
    seed = stable_seed("somethingv2/12345")
    a = kmeans_clusters(tokens, 8, seed)
    assert torch.equal(a, kmeans_clusters(tokens, 8, seed))  # reproducible on a device
    assert a.shape == (8, 16, 16) and a.dtype == torch.int64 and 0 <= a.min() and a.max() < 8
    pp = kmeans_clusters(tokens, 8, seed, init="kmeans++")  # reseeds empty clusters by default
    assert torch.equal(pp, kmeans_clusters(tokens, 8, seed, init="kmeans++", reseed_empty=True))
    assert bool((torch.bincount(pp.flatten(), minlength=8) > 0).all())
    reseeded = kmeans_clusters(tokens, 8, 1234, reseed_empty=True)
    assert bool((torch.bincount(reseeded.flatten(), minlength=8) > 0).all())  # no dead cluster


def test_cluster_stage_equals_the_methods_per_video(bip):
    tokens = torch.from_numpy(bip["tokens"])
    videos, ids = [tokens, tokens[:5]], ["a", "b"]
    bipartite = cluster(videos, ids, "bipartite")
    assert all(torch.equal(lab, bipartite_clusters(x)) for lab, x in zip(bipartite, videos))
    kmeans = cluster(videos, ids, "kmeans", n_clusters=8)
    assert all(torch.equal(lab, kmeans_clusters(x, 8, stable_seed(i))) for lab, x, i in zip(kmeans, videos, ids))
    with pytest.raises(ValueError, match="method must be one of"):
        cluster(videos, ids, "spectral")


def test_kmeans_errors():
    tokens = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="exceeds the number of tokens"):
        kmeans_clusters(tokens, 17, 0)
    with pytest.raises(ValueError, match="n_clusters"):
        kmeans_clusters(tokens, 0, 0)
    with pytest.raises(ValueError, match="init"):
        kmeans_clusters(tokens, 4, 0, init="bogus")
    with pytest.raises(ValueError, match="init_indices"):
        kmeans_clusters(tokens, 4, 0, init_indices=torch.arange(3))
    assert kmeans_clusters(tokens, 16, 0).unique().numel() == 16  # k = number of tokens is fine


def _padded(videos: list[torch.Tensor]) -> torch.Tensor:
    """Videos (K_i, P, Q, D) -> (V, K_max, P, Q, D) with garbage (not zeros) in the padding."""
    batch = torch.full((len(videos), max(len(x) for x in videos), *videos[0].shape[1:]), 7.0)
    for i, x in enumerate(videos):
        batch[i, : len(x)] = x
    return batch


@pytest.mark.parametrize("method", ["bipartite", "kmeans"])
def test_cluster_batch_equals_each_video_alone(bip, method):
    """Three videos of 8, 3 and 5 frames in one padded batch: each video's labels are its solo
    labels (k-means: seeded from its id, Lloyd frozen per video at its own convergence)."""
    tokens = torch.from_numpy(bip["tokens"])
    if method == "kmeans":  # its 300 batched iterations: a quicker token size
        tokens = tokens[..., :96].contiguous()
    videos, ids = [tokens, tokens[5:].flip(0).contiguous(), tokens[1:6] * 0.5], ["a", "b", "c"]
    out = cluster_batch(_padded(videos), [8, 3, 5], ids, method, n_clusters=8)
    assert out.labels.shape == (3, 8, 16, 16) and out.labels.dtype == torch.int64
    for i, x in enumerate(videos):
        solo = bipartite_clusters(x) if method == "bipartite" else kmeans_clusters(x, 8, stable_seed(ids[i]))
        assert torch.equal(out.labels[i, : len(x)], solo)
        assert bool((out.labels[i, len(x):] == -1).all())
    assert int(out.labels.max()) < out.num_labels == (8 * 12 if method == "bipartite" else 8)
    if method == "bipartite":
        np.testing.assert_array_equal(out.labels[0].numpy(), bip["labels_m25_i11"])
    early = cluster_batch(_padded(videos), [8, 3, 5], ids, method, n_clusters=8, sync_free=False)
    assert torch.equal(early.labels, out.labels)  # leaving once all converged changes nothing


@pytest.mark.parametrize("method", ["bipartite", "kmeans"])
def test_cluster_batch_never_waits_for_the_device(method):
    """Counted as CUDA would run it: no host sync for batches of 1 and 3 videos, and one batch of
    3 costs about the device ops of one video (the work is batched, not looped)."""
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randn(3, 4, 16, 16, 24, generator=gen)
    ops = {}
    for v in (1, 3):
        counter = DeviceCounter()
        counter.seed(tokens)
        with counter:
            out = cluster_batch(tokens[:v], [4, 2, 3][:v], ["a", "b", "c"][:v], method, n_clusters=5, num_iters=4)
        assert counter.total_syncs() == 0, counter.sites
        assert out.labels.shape == (v, 4, 16, 16)
        ops[v] = counter.ops["other"]
    assert ops[3] < 1.2 * ops[1]


def test_cluster_batch_errors():
    tokens = torch.randn(2, 3, 4, 4, 8)
    with pytest.raises(ValueError, match="num_frames"):
        cluster_batch(tokens, [3, 4], ["a", "b"])
    with pytest.raises(ValueError, match="num_frames"):
        cluster_batch(tokens, [3], ["a", "b"])
    with pytest.raises(ValueError, match="video_ids"):
        cluster_batch(tokens, [3, 1], ["a"])
    with pytest.raises(ValueError, match=r"\(V, K, P, Q, D\)"):
        cluster_batch(tokens[0], [3], ["a"])
    with pytest.raises(ValueError, match="exceeds the number of tokens"):
        cluster_batch(tokens, [3, 1], ["a", "b"], "kmeans", n_clusters=17)  # the shortest video has 16 tokens
    with pytest.raises(ValueError, match="method"):
        cluster_batch(tokens, [3, 1], ["a", "b"], "spectral")
