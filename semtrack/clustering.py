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

`cluster` is the pipeline's clustering stage: either method over several videos at once.
"""
from __future__ import annotations

import math
import numbers
from typing import Sequence

import torch
import torch.nn.functional as F

from semtrack.util import stable_seed

CLUSTERING_METHODS = ("bipartite", "kmeans")
KMEANS_INITS = ("random", "kmeans++")
MERGE_RATIO = 25  # percent of a frame's tokens merged per bipartite iteration (research default)
MAX_MERGE_RATIO = 50  # a bipartite step can merge at most the A half of the tokens
NUM_ITERS = 11  # bipartite merge iterations (research default)
N_CLUSTERS = 32  # k of k-means (research default)
EPS = 1e-12  # normalisation floor: a zero token gets a zero direction instead of NaN
TEMPORAL_THRESHOLD = 0.2  # a frame centroid is new if its best cosine to U is below this (strict)


def _normalise(x: torch.Tensor) -> torch.Tensor:
    """L2-normalise the last dimension (division by the norm, floored at EPS)."""
    return x / x.norm(dim=-1, keepdim=True).clamp_min(EPS)


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
    scores = a @ b.transpose(1, 2)  # (B, nA, nB) cosine
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
        onehot = F.one_hot(dst_src, xb.shape[1]).to(x.dtype).transpose(1, 2)  # (B, nB, r)
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
    """Temporal centroid merge (REFERENCE.md 6.2) for V videos at once.

    frame_centroids: (V, T, K, D) float; num_frames: (V,) int64 valid frames per video (default T).
    Returns `centroids` (V, U, D) raw vectors of U (U = max count; rows >= count[v] are zero
    padding), `provenance` (V, U, 2) int64 (frame, index in that frame; -1 padding) and `count`
    (V,) int64.
    U starts as all of frame 0; a later frame's vector is appended (after the whole frame was
    tested, in its order) if its best cosine to the current U is < threshold. One small batched
    matmul per frame; the loop over frames is the algorithm's sequential definition.
    """
    v, t, k, d = frame_centroids.shape
    device = frame_centroids.device
    if num_frames is None:
        num_frames = torch.full((v,), t, dtype=torch.long, device=device)
    fn = _normalise(frame_centroids)  # (V, T, K, D)
    cap = t * k
    u_norm = torch.zeros(v, cap, d, dtype=fn.dtype, device=device)
    prov = torch.full((v, cap, 2), -1, dtype=torch.long, device=device)
    u_norm[:, :k] = fn[:, 0]
    kk = torch.arange(k, device=device)
    prov[:, :k, 0] = 0
    prov[:, :k, 1] = kk
    count = torch.full((v,), k, dtype=torch.long, device=device)
    slots = torch.arange(cap, device=device)
    rows = torch.arange(v, device=device)[:, None].expand(v, k)  # (V, K)
    for ti in range(1, t):
        sims = fn[:, ti] @ u_norm.transpose(1, 2)  # (V, K, cap)
        sims = sims.masked_fill(slots[None, None, :] >= count[:, None, None], float("-inf"))
        new = (sims.max(dim=-1).values < threshold) & (ti < num_frames)[:, None]  # (V, K)
        pos = count[:, None] + new.long().cumsum(dim=1) - 1  # (V, K) target slot of each new vector
        pos = torch.where(new, pos, torch.full_like(pos, cap))  # cap = dropped (out of range)
        keep = pos < cap
        u_norm[rows[keep], pos[keep]] = fn[:, ti][keep]
        prov[rows[keep], pos[keep], 0] = ti
        prov[rows[keep], pos[keep], 1] = kk.expand(v, k)[keep]
        count = count + new.sum(dim=1)
    width = int(count.max())  # trim the padding to the largest U
    prov = prov[:, :width]
    valid = slots[None, :width] < count[:, None]  # (V, U)
    f_idx, k_idx = prov[..., 0].clamp_min(0), prov[..., 1].clamp_min(0)
    centroids = frame_centroids[rows[:, :1].expand(v, width), f_idx, k_idx] * valid[..., None]
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

    Computed in float32 on the tokens' device (any float input dtype is accepted).
    """
    if isinstance(tokens, (list, tuple)):
        if len(tokens) == 0:
            raise ValueError("tokens: empty list of videos")
        for i, x in enumerate(tokens):
            _check_tokens(x, f"tokens[{i}]")
        if len({tuple(x.shape[1:]) for x in tokens}) != 1:
            raise ValueError(f"all videos need the same (P, Q, D); got {[tuple(x.shape[1:]) for x in tokens]}")
        lengths = [x.shape[0] for x in tokens]
        batch = tokens[0].new_zeros((len(tokens), max(lengths), *tokens[0].shape[1:]), dtype=torch.float32)
        for i, x in enumerate(tokens):
            batch[i, : x.shape[0]] = x
        labels = bipartite_clusters(batch, merge_ratio, num_iters, lengths)
        return [labels[i, :n] for i, n in enumerate(lengths)]
    if tokens.dim() == 4:
        if num_frames is not None:
            raise ValueError("num_frames is only for a padded (V, T_max, P, Q, D) batch")
        _check_tokens(tokens, "tokens")
        return bipartite_clusters(tokens[None], merge_ratio, num_iters)[0]
    if tokens.dim() != 5 or not tokens.is_floating_point():
        shape = tuple(tokens.shape)
        raise ValueError(f"tokens must be float (T, P, Q, D) or (V, T, P, Q, D), got {tokens.dtype} {shape}")
    v, t, p, q, d = tokens.shape
    if v < 1:
        raise ValueError("tokens: empty batch of videos (V = 0)")
    _check_tokens(tokens[0], "tokens[0]")
    lengths = torch.as_tensor(t if num_frames is None else num_frames, dtype=torch.long, device=tokens.device)
    lengths = lengths.expand(v) if lengths.dim() == 0 else lengths
    if lengths.shape != (v,) or bool((lengths < 1).any()) or bool((lengths > t).any()):
        raise ValueError(f"num_frames must be V={v} values in [1, {t}], got {lengths.tolist()}")
    frame_valid = torch.arange(t, device=tokens.device)[None, :] < lengths[:, None]  # (V, T)
    x = tokens.float().reshape(v, t, p * q, d)
    frames = merge_frames(x[frame_valid], merge_ratio, num_iters)  # (sum T_v, K_f, D): every real frame at once
    per_frame = frames.new_zeros(v, t, *frames.shape[1:])
    per_frame[frame_valid] = frames
    centroids, _, count = temporal_merge(per_frame, lengths)
    labels = assign_labels(x, centroids, count).reshape(v, t, p, q)
    return labels.masked_fill(~frame_valid[:, :, None, None], -1)


def _kmeans_pp_init(x: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (D^2 sampling) -> (k,) int64 row indices of x (N, D)."""
    n = x.shape[0]
    idx = torch.empty(k, dtype=torch.long, device=x.device)
    idx[0] = torch.randint(n, (1,), generator=generator, device=x.device)[0]
    d2 = ((x - x[idx[0]]) ** 2).sum(dim=1)  # (N,)
    for i in range(1, k):
        w = d2.clamp_min(0)
        w = w if bool(w.sum() > 0) else torch.ones_like(w)
        idx[i] = torch.multinomial(w, 1, generator=generator)[0]
        d2 = torch.minimum(d2, ((x - x[idx[i]]) ** 2).sum(dim=1))
    return idx


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
    init="kmeans++", not with the research-compatible init="random".
    """
    _check_tokens(tokens, "tokens")
    t, p, q, d = tokens.shape
    x = tokens.float().reshape(-1, d)  # (N, D)
    n = x.shape[0]
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, numbers.Integral) or n_clusters < 1:
        raise ValueError(f"n_clusters must be a positive int, got {n_clusters!r}")
    if n_clusters > n:
        raise ValueError(f"n_clusters={n_clusters} exceeds the number of tokens ({t}x{p}x{q} = {n})")
    n_clusters = int(n_clusters)
    if init not in KMEANS_INITS:
        raise ValueError(f"init must be one of {KMEANS_INITS}, got {init!r}")
    if max_iter < 1 or tol < 0:
        raise ValueError(f"need max_iter >= 1 and tol >= 0, got max_iter={max_iter}, tol={tol}")
    if reseed_empty is None:
        reseed_empty = init != "random"
    if init_indices is not None:
        idx = torch.as_tensor(init_indices, dtype=torch.long, device=x.device)
        if idx.shape != (n_clusters,):
            raise ValueError(f"init_indices must have shape ({n_clusters},), got {tuple(idx.shape)}")
    else:
        gen = torch.Generator(device=x.device)
        gen.manual_seed(int(seed))
        if init == "random":
            idx = torch.randperm(n, generator=gen, device=x.device)[:n_clusters]
        else:
            idx = _kmeans_pp_init(x, n_clusters, gen)
    centroids = x[idx].clone()  # (k, D)
    for _ in range(max_iter):
        dist = torch.cdist(x, centroids)  # (N, k)
        labels = dist.argmin(dim=1)
        onehot = F.one_hot(labels, n_clusters).to(x.dtype)  # (N, k): matmul sums are deterministic on GPUs too
        counts = onehot.sum(dim=0)  # (k,)
        new = (onehot.T @ x) / counts.clamp_min(1)[:, None]
        if reseed_empty and bool((counts == 0).any()):
            own = dist.gather(1, labels[:, None])[:, 0]  # (N,) distance to own centroid
            far = own.argsort(descending=True, stable=True)
            empty = (counts == 0).nonzero()[:, 0]
            new[empty] = x[far[: empty.numel()]]
        shift = (new - centroids).abs().max()
        centroids = new
        if bool(shift < tol):
            break
    labels = torch.cdist(x, centroids).argmin(dim=1).reshape(t, p, q)
    return (labels, centroids) if return_centroids else labels


def cluster(
    tokens: Sequence[torch.Tensor],
    video_ids: Sequence[str],
    method: str = "bipartite",
    n_clusters: int = N_CLUSTERS,
    merge_ratio: float = MERGE_RATIO,
    num_iters: int = NUM_ITERS,
    kmeans_init: str = "random",
) -> list[torch.Tensor]:
    """The clustering stage for several videos: tokens (K_i, P, Q, D) float each -> labels (K_i, P, Q)
    int64 each. Bipartite clusters all videos in one batched computation; k-means runs per video,
    seeded with `stable_seed(video_id)` (results independent of which videos share the call)."""
    if method not in CLUSTERING_METHODS:
        raise ValueError(f"method must be one of {CLUSTERING_METHODS}, got {method!r}")
    if method == "bipartite":
        return bipartite_clusters(list(tokens), merge_ratio, num_iters)
    return [kmeans_clusters(x, n_clusters, stable_seed(vid), init=kmeans_init) for x, vid in zip(tokens, video_ids)]
