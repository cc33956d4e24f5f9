"""Semantic clustering of DINOv2 patch tokens (REFERENCE.md sections 6, 7 and 14).

Two methods, both on tensors on the tokens' device:

* `bipartite_clusters`: per-frame bipartite token merging (all frames of all videos batched),
  sequential temporal merge of the per-frame centroids, cosine assignment of every patch. Labels
  are identical to the research code's; fixes (section 14): stable descending sort for exact score
  ties, an epsilon in every normalisation, float32 regardless of the input dtype, -inf masking of
  padded centroids when several videos are clustered at once.
* `kmeans_clusters`: one global k-means over all tokens of a video. `init="random"` reproduces the
  research rule (first k of `randperm` from a generator seeded with `seed` on the tokens' device,
  zero-vector empty clusters, absolute tolerance). The permutation for a seed differs between CPU
  and CUDA, so CPU and GPU labels differ; each is reproducible on its own device. Seed per video
  with `stable_seed(video_id)` so results do not depend on processing order.

`cluster_batch` is the clustering stage for a padded batch of videos: either method for all of them
in one computation that never waits for the device (`sync_free=True`), each video's labels equal to
its solo labels; `cluster` is the same for a list of videos.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Sequence

import torch

from semtrack.defaults import CLUSTERING_METHODS, MERGE_RATIO, N_CLUSTERS, NUM_ITERS, merge_schedule
from semtrack.transfer import upload
from semtrack.util import stable_seed

KMEANS_INITS = ("random", "kmeans++")
EPS = 1e-12  # normalisation floor: a zero token gets a zero direction instead of NaN
TEMPORAL_THRESHOLD = 0.2  # a frame centroid is new if its best cosine to U is below this (strict)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension (division by the norm, floored at EPS)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


def _onehot_sums(device: torch.device) -> bool:
    """Sum merged tokens with a one-hot matmul (deterministic) instead of index_add, whose GPU
    atomics reorder the float sums from run to run. CPU keeps index_add (sequential)."""
    return device.type != "cpu"


def merge_step(x: torch.Tensor, r: int) -> torch.Tensor:
    """One bipartite merge iteration (REFERENCE.md 6.1) on a batch of token sequences.

    x: (B, n, D) float raw tokens -> (B, n - r, D): the unmerged A tokens (even positions) in
    descending best-score order, then all B tokens (odd positions), each B token replaced by the
    unweighted average of itself and the A tokens merged into it.
    """
    metric = _normalise(x)
    a, b = metric[:, ::2], metric[:, 1::2]  # (B, ceil(n/2), D), (B, floor(n/2), D)
    scores = torch.bmm(a, b.transpose(1, 2))  # (B, nA, nB) cosine
    best, dst = scores.max(dim=-1)  # (B, nA): first index on exact ties
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices  # (B, nA)
    src_idx, unm_idx = order[:, :r], order[:, r:]
    xa, xb = x[:, ::2], x[:, 1::2]
    d = x.shape[-1]
    unm = xa.gather(1, unm_idx[..., None].expand(-1, -1, d))  # (B, nA - r, D)
    src = xa.gather(1, src_idx[..., None].expand(-1, -1, d))  # (B, r, D)
    dst_src = dst.gather(1, src_idx)  # (B, r) B position receiving each source
    if not _onehot_sums(x.device):  # sequential index_add: the research code's summation order
        bsz, nb = xb.shape[:2]
        flat = (dst_src + torch.arange(bsz, device=x.device)[:, None] * nb).flatten()  # (B*r,)
        summed = xb.reshape(bsz * nb, d).index_add(0, flat, src.reshape(-1, d)).reshape(bsz, nb, d)
        ones = torch.ones_like(flat, dtype=x.dtype)
        count = torch.ones(bsz * nb, dtype=x.dtype, device=x.device).index_add_(0, flat, ones).reshape(bsz, nb, 1)
    else:  # one-hot matmul: deterministic on GPUs (atomic adds would reorder the sums run to run)
        nb = torch.arange(xb.shape[1], device=x.device)
        onehot = (dst_src[..., None] == nb).to(x.dtype).transpose(1, 2)  # (B, nB, r)
        summed = xb + onehot @ src
        count = 1 + onehot.sum(dim=2, keepdim=True)
    return torch.cat([unm, summed / count], dim=1)


def merge_frames(tokens: torch.Tensor, merge_ratio: float = MERGE_RATIO, num_iters: int = NUM_ITERS) -> torch.Tensor:
    """Per-frame bipartite merging of every frame at once.

    tokens: (B, N, D) float (B frames of N tokens in raster order) -> (B, K_f, D) float32 per-frame
    centroids in the algorithm's final order, K_f = merge_schedule(N, merge_ratio, num_iters)[-1].
    """
    if tokens.dim() != 3:
        raise ValueError(f"tokens must be (B, N, D), got shape {tuple(tokens.shape)}")
    schedule = merge_schedule(tokens.shape[1], merge_ratio, num_iters)
    x = tokens.float()
    for n, n_next in zip(schedule[:-1], schedule[1:]):
        x = merge_step(x, n - n_next)
    return x


def temporal_merge(
    frame_centroids: torch.Tensor, num_frames: torch.Tensor | None = None, threshold: float = TEMPORAL_THRESHOLD
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Temporal centroid merge (REFERENCE.md 6.2) for V videos at once, without host syncs.

    frame_centroids: (V, T, K, D) float; num_frames: (V,) int64 valid frames per video on the same
    device (default T; later frames are ignored).
    Returns `centroids` (V, T*K, D) raw vectors of U (rows >= count[v] are zero padding),
    `provenance` (V, T*K, 2) int64 (frame, index in that frame; -1 padding) and `count` (V,) int64.
    U starts as all of frame 0; a later frame's vector is appended (after the whole frame was
    tested, in its order) if its best cosine to the current U is < threshold. One small batched
    matmul and one scatter per frame; the loop over frames is the algorithm's sequential definition.
    """
    v, t, k, d = frame_centroids.shape
    device = frame_centroids.device
    frame_valid = torch.ones(v, t, dtype=torch.bool, device=device)  # (V, T)
    if num_frames is not None:
        frame_valid = torch.arange(t, device=device)[None, :] < num_frames[:, None]
    fn = _normalise(frame_centroids)  # (V, T, K, D)
    cap = t * k
    # slot `cap` is scratch: the vectors of a frame that are not new are written there
    u_norm = fn.new_zeros(v, cap + 1, d)
    prov = torch.full((v, cap + 1, 2), -1, dtype=torch.long, device=device)
    u_norm[:, :k] = fn[:, 0]
    kk = torch.arange(k, device=device)
    prov[:, :k, 0] = 0
    prov[:, :k, 1] = kk
    count = torch.full((v,), k, dtype=torch.long, device=device)
    slots = torch.arange(cap, device=device)
    origins = torch.stack(torch.meshgrid(torch.arange(t, device=device), kk, indexing="ij"), dim=-1)  # (T, K, 2)
    origins = origins[None].expand(v, t, k, 2).unbind(1)  # per frame (V, K, 2) (frame, index)
    frames, frame_valid = fn.unbind(1), frame_valid[..., None].unbind(1)  # per frame (V, K, D), (V, 1)
    u_t = u_norm[:, :cap].transpose(1, 2)  # (V, D, cap): a view, so it sees the writes below
    for ti in range(1, t):
        sims = torch.bmm(frames[ti], u_t).masked_fill(slots >= count[:, None, None], float("-inf"))  # (V, K, cap)
        new = (sims.amax(dim=-1) < threshold) & frame_valid[ti]  # (V, K)
        pos = torch.where(new, (count[:, None] - 1) + new.cumsum(dim=1), cap)[..., None]  # (V, K, 1) target slot
        u_norm.scatter_(1, pos.expand(v, k, d), frames[ti])
        prov.scatter_(1, pos.expand(v, k, 2), origins[ti])
        count = count + new.sum(dim=1)
    prov = prov[:, :cap]
    valid = slots[None, :] < count[:, None]  # (V, cap)
    f_idx, k_idx = prov[..., 0].clamp_min(0), prov[..., 1].clamp_min(0)
    rows = torch.arange(v, device=device)[:, None].expand(v, cap)
    centroids = frame_centroids[rows, f_idx, k_idx] * valid[..., None]
    return centroids, prov, count


def assign_labels(tokens: torch.Tensor, centroids: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Cosine assignment (REFERENCE.md 6.3) of every token to the valid centroids of its video.

    tokens: (V, T, N, D); centroids: (V, U, D) with the first `count[v]` rows valid ->
    labels (V, T, N) int64 (first index on exact ties). Padded rows are masked with -inf.
    """
    v, t, n, d = tokens.shape
    cos = _normalise(tokens.float()).reshape(v, t * n, d) @ _normalise(centroids.float()).transpose(1, 2)
    invalid = torch.arange(centroids.shape[1], device=tokens.device)[None, None, :] >= count[:, None, None]
    cos = cos.masked_fill(invalid, float("-inf"))  # (V, T*N, U)
    return cos.argmax(dim=-1).reshape(v, t, n)


def _check_tokens(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a (T, P, Q, D) tensor, got {getattr(x, 'shape', type(x))}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {x.dtype}")
    if x.shape[0] < 1 or x.shape[1] * x.shape[2] < 1 or x.shape[3] < 1:
        raise ValueError(f"{name} has an empty dimension: shape {tuple(x.shape)}")


def _check_batch(tokens: torch.Tensor, num_frames) -> list[int]:
    """A padded batch (V, K, P, Q, D) and its host frame counts -> the counts as ints (ValueError if bad)."""
    if not isinstance(tokens, torch.Tensor) or tokens.dim() != 5 or not tokens.is_floating_point():
        shape = tuple(getattr(tokens, "shape", ()))
        raise ValueError(f"tokens must be a float (V, K, P, Q, D) tensor, got {getattr(tokens, 'dtype', None)} {shape}")
    v, k = tokens.shape[:2]
    if v < 1:
        raise ValueError("tokens: empty batch of videos (V = 0)")
    _check_tokens(tokens[0], "tokens[0]")
    if isinstance(num_frames, torch.Tensor):
        num_frames = num_frames.tolist()
    lengths = [int(n) for n in num_frames]
    if len(lengths) != v or any(not 1 <= n <= k for n in lengths):
        raise ValueError(f"num_frames must be V={v} values in [1, {k}], got {lengths}")
    return lengths


def _upload(values: Sequence[int], device: torch.device) -> torch.Tensor:
    """Host ints -> (len,) int64 on `device`, copied without waiting for the device."""
    return upload(torch.tensor(values, dtype=torch.long), device)


def _bipartite_batch(tokens: torch.Tensor, lengths: Sequence[int], merge_ratio: float, num_iters: int,
                     sync_free: bool) -> torch.Tensor:
    """Bipartite labels of a padded batch: tokens (V, K, P, Q, D) float, lengths (host) -> (V, K, P, Q)
    int64, -1 in padded frames. Every frame (padding included) is merged in one batched computation;
    padded frames never enter the temporal merge, so each video's labels equal its solo labels.
    Unless `sync_free`, the assignment only scores the largest video's U (one host read)."""
    v, t, p, q, d = tokens.shape
    schedule = merge_schedule(p * q, merge_ratio, num_iters)  # validates before any work
    num_frames = _upload(lengths, tokens.device)
    x = tokens.float().reshape(v, t, p * q, d)
    frames = merge_frames(x.reshape(v * t, p * q, d), merge_ratio, num_iters).reshape(v, t, schedule[-1], d)
    centroids, _, count = temporal_merge(frames, num_frames)
    if not sync_free:
        centroids = centroids[:, : int(count.max())]
    labels = assign_labels(x, centroids, count).reshape(v, t, p, q)
    frame_valid = torch.arange(t, device=tokens.device)[None, :] < num_frames[:, None]  # (V, T)
    return labels.masked_fill(~frame_valid[:, :, None, None], -1)


def bipartite_clusters(
    tokens: torch.Tensor | Sequence[torch.Tensor],
    merge_ratio: float = MERGE_RATIO,
    num_iters: int = NUM_ITERS,
    num_frames: torch.Tensor | Sequence[int] | None = None,
) -> torch.Tensor | list[torch.Tensor]:
    """Bipartite clustering (REFERENCE.md 6): patch tokens -> per-patch cluster labels.

    * tokens (T, P, Q, D) float -> labels (T, P, Q) int64 (ids index the merged centroid set U).
    * a list of V such tensors (any T each, same P, Q, D) -> a list of V label tensors; all videos
      are clustered in one batched computation and each result equals the single-video result.
    * a padded batch (V, T_max, P, Q, D) with `num_frames` (V,) valid frames per video ->
      (V, T_max, P, Q) int64, padded frames labelled -1.

    Computed in float32 on the tokens' device (any float input dtype is accepted). Labels are in
    [0, T_max * K_f) with K_f = merge_schedule(P * Q, merge_ratio, num_iters)[-1].
    """
    if isinstance(tokens, (list, tuple)):
        if len(tokens) == 0:
            raise ValueError("tokens: empty list of videos")
        for i, x in enumerate(tokens):
            _check_tokens(x, f"tokens[{i}]")
        if len({tuple(x.shape[1:]) for x in tokens}) != 1:
            raise ValueError(f"all videos need the same (P, Q, D); got {[tuple(x.shape[1:]) for x in tokens]}")
        lengths = [x.shape[0] for x in tokens]
        labels = _bipartite_batch(_pad(tokens), lengths, merge_ratio, num_iters, sync_free=False)
        return [labels[i, :n] for i, n in enumerate(lengths)]
    if tokens.dim() == 4:
        if num_frames is not None:
            raise ValueError("num_frames is only for a padded (V, T_max, P, Q, D) batch")
        _check_tokens(tokens, "tokens")
        return _bipartite_batch(tokens[None], [tokens.shape[0]], merge_ratio, num_iters, sync_free=False)[0]
    if tokens.dim() != 5 or not tokens.is_floating_point():
        shape = tuple(tokens.shape)
        raise ValueError(f"tokens must be float (T, P, Q, D) or (V, T, P, Q, D), got {tokens.dtype} {shape}")
    lengths = _check_batch(tokens, [tokens.shape[1]] * len(tokens) if num_frames is None else num_frames)
    return _bipartite_batch(tokens, lengths, merge_ratio, num_iters, sync_free=False)


def _pad(tokens: Sequence[torch.Tensor]) -> torch.Tensor:
    """Videos (K_i, P, Q, D) -> a zero-padded float32 batch (V, K_max, P, Q, D)."""
    batch = tokens[0].new_zeros((len(tokens), max(x.shape[0] for x in tokens), *tokens[0].shape[1:]),
                                dtype=torch.float32)
    for i, x in enumerate(tokens):
        batch[i, : x.shape[0]] = x
    return batch


def _multinomial_one(w: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index drawn with probability proportional to w (N,) -> (1,) int64: the draw of
    `torch.multinomial(w, 1, generator=generator)` (argmax of w / Exp(1) noise, the same random
    numbers) without its validity checks, which read the device."""
    return (w / torch.empty_like(w).exponential_(1, generator=generator)).argmax(-1, keepdim=True)


def _kmeans_pp_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) -> (k,) int64 row indices of x (N, D)."""
    n = x.shape[0]
    idx = torch.empty(k, dtype=torch.long, device=x.device)
    idx[:1] = torch.randint(n, (1,), generator=generator, device=x.device)
    d2 = ((x - x.index_select(0, idx[:1])) ** 2).sum(dim=1)  # (N,)
    for i in range(1, k):
        w = d2.clamp_min(0)
        w = torch.where(w.sum() > 0, w, torch.ones_like(w))
        idx[i : i + 1] = _multinomial_one(w, generator)
        d2 = torch.minimum(d2, ((x - x.index_select(0, idx[i : i + 1])) ** 2).sum(dim=1))
    return idx


def _check_kmeans(n_clusters, num_tokens: int, init: str, max_iter: int, tol: float, shape: str) -> int:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, numbers.Integral) or n_clusters < 1:
        raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
    if n_clusters > num_tokens:
        raise ValueError(f"n_clusters={n_clusters} exceeds the number of tokens ({shape} = {num_tokens})")
    if init not in KMEANS_INITS:
        raise ValueError(f"init must be one of {KMEANS_INITS}, got {init!r}")
    if max_iter < 1 or tol < 0:
        raise ValueError(f"need max_iter >= 1 and tol >= 0, got max_iter={max_iter}, tol={tol}")
    return int(n_clusters)


def _kmeans_batch(
    x: torch.Tensor,
    num_tokens: Sequence[int],
    n_clusters: int,
    seeds: Sequence[int],
    init: str,
    max_iter: int,
    tol: float,
    reseed_empty: bool,
    init_indices: torch.Tensor | None,
    sync_free: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """k-means of V videos at once: x (V, N, D) float32, the first `num_tokens[v]` rows of video v
    valid (host ints) -> labels (V, N) int64 (padded rows: garbage), centroids (V, k, D) float32.

    Each video's start is drawn from its own generator (seeded with `seeds[v]` on x's device), so
    results do not depend on the batch. Lloyd runs `max_iter` iterations; a video's centroids are
    frozen from the iteration its shift drops below `tol` (the solo loop's stopping point), so no
    host sync is needed. Unless `sync_free`, the loop ends once every video is frozen (a host sync
    per iteration; the same result with less work where syncs are free, as on the CPU)."""
    v, n, d = x.shape
    device = x.device
    counts_dev = _upload(num_tokens, device)
    valid = (torch.arange(n, device=device)[None, :] < counts_dev[:, None]).to(x.dtype)  # (V, N)
    if init_indices is None:
        starts = []
        for i in range(v):
            gen = torch.Generator(device=device)
            gen.manual_seed(int(seeds[i]))
            if init == "random":
                starts.append(torch.randperm(num_tokens[i], generator=gen, device=device)[:n_clusters])
            else:
                starts.append(_kmeans_pp_init(x[i, : num_tokens[i]], n_clusters, gen))
        init_indices = torch.stack(starts)  # (V, k)
    centroids = x.gather(1, init_indices[..., None].expand(v, n_clusters, d)).clone()  # (V, k, D)
    ids = torch.arange(n_clusters, device=device)
    done = torch.zeros(v, dtype=torch.bool, device=device)
    for _ in range(max_iter):
        dist = torch.cdist(x, centroids)  # (V, N, k)
        labels = dist.argmin(dim=2)
        onehot = (labels[..., None] == ids).to(x.dtype) * valid[..., None]  # (V, N, k): matmul sums are deterministic
        counts = onehot.sum(dim=1)  # (V, k)
        new = (onehot.transpose(1, 2) @ x) / counts.clamp_min(1)[..., None]
        if reseed_empty:  # the j-th empty centroid (in id order) moves to the j-th farthest token
            empty = counts == 0  # (V, k)
            own = dist.gather(2, labels[..., None])[..., 0].masked_fill(valid == 0, float("-inf"))  # (V, N)
            far = own.argsort(dim=1, descending=True, stable=True)
            pick = far.gather(1, (empty.long().cumsum(dim=1) - 1).clamp_min(0))  # (V, k)
            new = torch.where(empty[..., None], x.gather(1, pick[..., None].expand(v, n_clusters, d)), new)
        shift = (new - centroids).abs().amax(dim=(1, 2))  # (V,)
        centroids = torch.where(done[:, None, None], centroids, new)
        done = done | (shift < tol)
        if not sync_free and bool(done.all()):
            break
    return torch.cdist(x, centroids).argmin(dim=2), centroids


def kmeans_clusters(
    tokens: torch.Tensor,
    n_clusters: int,
    seed: int,
    init: str = "random",
    max_iter: int = 300,
    tol: float = 1e-4,
    reseed_empty: bool | None = None,
    init_indices: torch.Tensor | None = None,
    return_centroids: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Global k-means over all tokens of one video (REFERENCE.md 7), on the tokens' device.

    tokens (T, P, Q, D) float -> labels (T, P, Q) int64 in [0, n_clusters) (some possibly unused);
    with `return_centroids` also the (n_clusters, D) float32 centroids.

    init="random" (research rule): the first k of `torch.randperm(T*P*Q)` drawn from a generator
    seeded with `seed` on the tokens' device. CPU and CUDA permutations differ, so labels differ
    between devices (each is reproducible). init="kmeans++": D^2 seeding from the same generator.
    `init_indices` (k,) overrides both (Lloyd from given rows). Lloyd: Euclidean `cdist`, nearest
    centroid (first on ties), mean update, stop when no centroid coordinate moved by >= tol
    (absolute), labels recomputed from the final centroids. An empty cluster becomes the zero
    vector (research behaviour) unless `reseed_empty`, which moves each empty centroid to one of
    the tokens farthest from their own centroids. `reseed_empty=None` (default): reseed with
    init="kmeans++", not with the research-compatible init="random". Checks convergence on the host
    after every iteration; `cluster_batch` is the same computation without host syncs.
    """
    _check_tokens(tokens, "tokens")
    t, p, q, d = tokens.shape
    n = t * p * q
    n_clusters = _check_kmeans(n_clusters, n, init, max_iter, tol, f"{t}x{p}x{q}")
    if reseed_empty is None:
        reseed_empty = init != "random"
    if init_indices is not None:
        init_indices = torch.as_tensor(init_indices, dtype=torch.long, device=tokens.device)
        if init_indices.shape != (n_clusters,):
            raise ValueError(f"init_indices must have shape ({n_clusters},), got {tuple(init_indices.shape)}")
        init_indices = init_indices[None]
    labels, centroids = _kmeans_batch(tokens.float().reshape(1, n, d), [n], n_clusters, [seed], init, max_iter, tol,
                                      reseed_empty, init_indices, sync_free=False)
    labels = labels[0].reshape(t, p, q)
    return (labels, centroids[0]) if return_centroids else labels


@dataclass
class ClusterBatch:
    """Labels of a padded batch of videos.

    labels: (V, K_max, P, Q) int64 cluster ids, -1 in padded frames (frames >= num_frames[v]).
    num_labels: host int, a bound fixed by the shapes and settings alone (no data): every label is
    < num_labels. Bipartite: K_max * K_f (K_f centroids per frame after merging); k-means: k.
    """

    labels: torch.Tensor
    num_labels: int


def cluster_batch(
    tokens: torch.Tensor,
    num_frames: Sequence[int],
    video_ids: Sequence[str],
    method: str = "bipartite",
    n_clusters: int = N_CLUSTERS,
    merge_ratio: float = MERGE_RATIO,
    num_iters: int = NUM_ITERS,
    kmeans_init: str = "random",
    sync_free: bool = True,
) -> ClusterBatch:
    """The clustering stage for a padded batch of V videos, in one computation.

    tokens: (V, K_max, P, Q, D) float on the device (DINOv2 patch tokens of each video's clustering
    frames, zero or any finite padding after its first num_frames[v] frames); num_frames: V host
    ints in [1, K_max]; video_ids: V ids (k-means seeds each video with `stable_seed(video_id)`).
    -> `ClusterBatch` (labels (V, K_max, P, Q) int64 on the device, -1 in padded frames).
    Each video's labels equal its solo result (`bipartite_clusters` / `kmeans_clusters`).

    Bipartite merges every frame of the batch at once and runs the temporal merge and assignment
    for all videos together.

    sync_free=True (for GPUs): the host never waits for the device: fixed shapes (the merged set U
    keeps its K_max * K_f capacity) and k-means runs Lloyd for all videos together for its full 300
    iterations, each video frozen once converged. sync_free=False (for the CPU, where reading a
    value costs nothing): U is trimmed to the largest video's and k-means runs one video at a time,
    each stopping at its convergence (a host read per iteration). The labels are the same.
    """
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"method must be one of {CLUSTERING_METHODS}, got {method!r}")
    lengths = _check_batch(tokens, num_frames)
    v, t, p, q, d = tokens.shape
    if len(video_ids) != v:
        raise ValueError(f"video_ids must name the V={v} videos, got {len(video_ids)}")
    if method == "bipartite":
        labels = _bipartite_batch(tokens, lengths, merge_ratio, num_iters, sync_free)
        return ClusterBatch(labels, t * merge_schedule(p * q, merge_ratio, num_iters)[-1])
    n_clusters = _check_kmeans(n_clusters, min(lengths) * p * q, kmeans_init, 300, 1e-4, f"{min(lengths)}x{p}x{q}")
    x, seeds = tokens.float().reshape(v, t * p * q, d), [stable_seed(vid) for vid in video_ids]
    sizes = [n * p * q for n in lengths]
    reseed = kmeans_init != "random"
    if sync_free:
        flat, _ = _kmeans_batch(x, sizes, n_clusters, seeds, kmeans_init, 300, 1e-4, reseed, None, sync_free=True)
    else:  # one video at a time, each leaving Lloyd at its own convergence
        flat = x.new_zeros(v, t * p * q, dtype=torch.long)
        for i, n in enumerate(sizes):
            flat[i, :n] = _kmeans_batch(x[i : i + 1, :n], [n], n_clusters, seeds[i : i + 1], kmeans_init, 300, 1e-4,
                                        reseed, None, sync_free=False)[0][0]
    frame_valid = torch.arange(t, device=tokens.device)[None, :] < _upload(lengths, tokens.device)[:, None]
    labels = flat.reshape(v, t, p, q).masked_fill(~frame_valid[:, :, None, None], -1)
    return ClusterBatch(labels, n_clusters)


def cluster(
    tokens: Sequence[torch.Tensor],
    video_ids: Sequence[str],
    method: str = "bipartite",
    n_clusters: int = N_CLUSTERS,
    merge_ratio: float = MERGE_RATIO,
    num_iters: int = NUM_ITERS,
    kmeans_init: str = "random",
    sync_free: bool = True,
) -> list[torch.Tensor]:
    """`cluster_batch` for a list of videos: tokens (K_i, P, Q, D) float each -> labels (K_i, P, Q)
    int64 each (k-means seeded with `stable_seed(video_id)`: results independent of which videos
    share the call)."""
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"method must be one of {CLUSTERING_METHODS}, got {method!r}")
    if len(tokens) == 0:
        raise ValueError("tokens: empty list of videos")
    for i, x in enumerate(tokens):
        _check_tokens(x, f"tokens[{i}]")
    if len({tuple(x.shape[1:]) for x in tokens}) > 1:
        raise ValueError(f"all videos need the same (P, Q, D); got {[tuple(x.shape[1:]) for x in tokens]}")
    lengths = [x.shape[0] for x in tokens]
    result = cluster_batch(_pad(tokens), lengths, video_ids, method, n_clusters, merge_ratio, num_iters, kmeans_init,
                           sync_free)
    return [result.labels[i, :n] for i, n in enumerate(lengths)]
