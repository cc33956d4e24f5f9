"""Which track frames and which points a training item holds.

`uniform_frame_indices` spreads an item's frames over the tracked frames as the research training did;
`sample_points` draws a fixed number of points, cluster-proportionally, padding with `PAD`.
"""
from __future__ import annotations

import numpy as np
import torch

PAD = -1  # obj_ids / query_frames / point_indices of padded points


def uniform_frame_indices(num_track_frames: int, num_frames: int) -> torch.Tensor:
    """`linspace(0, T-1, num_frames)` truncated to int64 (research rule; repeats frames if T is small)."""
    return torch.from_numpy(np.linspace(0, num_track_frames - 1, num_frames).astype(np.int64))


def _allocate(sizes: torch.Tensor, budget: int) -> torch.Tensor:
    """Points per entity (E,) int64: 1 each, the remaining `budget - E` proportional to entity size,
    never more than an entity has. Needs E <= budget < sizes.sum()."""
    alloc = torch.ones_like(sizes)
    left = budget - int(alloc.sum())
    while left > 0:
        room = sizes - alloc  # (E,)
        share = left * sizes.double() / float(sizes[room > 0].sum()) * (room > 0)
        add = torch.minimum(share.floor().long(), room)
        if int(add.sum()) == 0:  # hand out the last few by largest fractional share, ties to the first
            order = torch.argsort(-(share - share.floor()) - (room > 0).double(), stable=True)
            add = torch.zeros_like(sizes)
            add[order[:left]] = 1
            add = torch.minimum(add, room)
        alloc += add
        left -= int(add.sum())
    return alloc


def sample_points(obj_ids: torch.Tensor, num_points: int, generator: torch.Generator | None = None):
    """Choose `num_points` of N points, cluster-proportionally.

    obj_ids: (N,) int64 entity id per point. N <= num_points: every point, then padding. Otherwise
    each entity gets at least one point (if there are more entities than `num_points`, a random
    `num_points` entities get one each) and the rest are shared in proportion to entity size; points
    inside an entity are drawn uniformly without replacement. `generator` None = torch's global RNG.
    -> (indices (num_points,) int64 into N, sorted, `-1` for padding; mask (num_points,) bool, True = real).
    """
    n = int(obj_ids.numel())
    indices = torch.full((num_points,), PAD, dtype=torch.int64)
    if n <= num_points:
        indices[:n] = torch.arange(n)
        return indices, indices >= 0
    entities, inverse, sizes = torch.unique(obj_ids, return_inverse=True, return_counts=True)
    if len(entities) >= num_points:
        alloc = torch.zeros_like(sizes)
        alloc[torch.randperm(len(entities), generator=generator)[:num_points]] = 1
    else:
        alloc = _allocate(sizes, num_points)
    chosen = []
    for e in torch.nonzero(alloc).flatten().tolist():
        members = torch.nonzero(inverse == e).flatten()  # (size_e,)
        chosen.append(members[torch.randperm(len(members), generator=generator)[: int(alloc[e])]])
    return torch.cat(chosen).sort().values, torch.ones(num_points, dtype=torch.bool)
