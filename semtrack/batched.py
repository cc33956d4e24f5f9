"""The GPU step's per-batch intermediates: one padded tensor set per stage call, a `Row` per clip.

A stage runs once for all clips of a call and returns a padded batch (`Tokens`, `Labels`, or
`points.QueryPointsBatch`); each clip's output is its `Row` (the batch and the clip's index in it),
so the next stage takes the batch as it is (`groups`). Only when a call was retried clip by clip
(a failure) do the rows of the next call come from several batches; then each is cut to a batch of
its own clip (`row_batch`) and the next stage runs once per clip.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch


@dataclass(frozen=True)
class Tokens:
    """DINOv2 tokens of V clips' clustering frames.

    tokens: (V, K_max, 16, 16, D) float32 on the device (rows after a clip's K_v frames: any finite
    values); lengths: the V host K_v; cluster_frames: (V, K_max) int64 on the device, each clustering
    frame's index into its clip (0 after K_v)."""

    tokens: torch.Tensor
    lengths: list[int]
    cluster_frames: torch.Tensor

    def row_batch(self, i: int) -> Tokens:
        k = self.lengths[i]
        return Tokens(self.tokens[i:i + 1, :k], [k], self.cluster_frames[i:i + 1, :k])


@dataclass(frozen=True)
class Labels:
    """Cluster labels of V clips: labels (V, K_max, 16, 16) int64 on the device, -1 after a clip's
    K_v frames; num_labels: host int, every label below it; lengths, cluster_frames as `Tokens`'."""

    labels: torch.Tensor
    num_labels: int
    lengths: list[int]
    cluster_frames: torch.Tensor

    def row_batch(self, i: int) -> Labels:
        k = self.lengths[i]
        return Labels(self.labels[i:i + 1, :k], self.num_labels, [k], self.cluster_frames[i:i + 1, :k])

    def clip_labels(self, i: int) -> torch.Tensor:
        """(K_i, 16, 16) int64: clip i's labels."""
        return self.labels[i, : self.lengths[i]]


@dataclass(frozen=True)
class Row:
    """Clip `index` of a stage's padded `batch`."""

    batch: Any
    index: int


def rows(batch: Any, count: int) -> list[Row]:
    """The `count` clips of `batch`, in order."""
    return [Row(batch, i) for i in range(count)]


def groups(items: Sequence[Row]) -> list[tuple[Any, list[int]]]:
    """[(batch, positions in `items`)]: the one batch when `items` are all its clips in order, else a
    batch of one clip per item (`row_batch`)."""
    first = items[0].batch
    if all(r.batch is first and r.index == i for i, r in enumerate(items)) and _size(first) == len(items):
        return [(first, list(range(len(items))))]
    return [(r.batch.row_batch(r.index), [pos]) for pos, r in enumerate(items)]


def per_group(items: Sequence[Row], stage: Callable[[Any, list[int]], Any]) -> list[Row]:
    """A batched `stage(batch, members)` over `items` (its result a batch of the members' clips, in
    order) -> per item its `Row` of the result: one call for a whole batch, else one per item (`groups`)."""
    out: list[Row] = [None] * len(items)
    for batch, members in groups(items):
        for m, row in zip(members, rows(stage(batch, members), len(members))):
            out[m] = row
    return out


def _size(batch: Any) -> int:
    return len(batch.lengths)
