"""Semantic query points from cluster label maps (REFERENCE.md sections 8, 9, 10 and 14).

For every cluster present in a video's K clustering frames' labels: its peak frame (most patches,
earliest on ties), its 16x16 mask upsampled to the clip size with torch's legacy "nearest" rule,
optionally split into 4-connected components, then `num_points_per_entity` well-spread pixels per
cluster (or component) and a CoTracker query `(t, x, y)` for each.

`select_query_points_batch` samples a padded batch of videos (each its own clip size) in one
computation; `select_query_points` is the same for one video.

Samplers:
* "fast" (default): every entity of every video in one batched tensor computation on the labels'
  device, without host syncs: each entity's pixels are summarised by about `fast_samples`
  (default 256) weighted sub-blocks of its patch cells (every pixel when the entity is small),
  weighted Lloyd from a deterministic farthest-point start, then each centre
  snaps to its nearest member pixel (exact, via the cell rectangles). Same point counts and order
  of entities as "exact"; points within an entity in row-major order. Deterministic for a given
  input, and a video's points do not depend on the other videos of its batch.
* "exact": scikit-learn KMeans (k-means++, `n_init` explicit, default 1, `random_state=42`) on all
  the entity's pixel coordinates, then per centre its closest pixel. `tie_rule="first"` (default):
  the closest of all the entity's pixels, distances rounded to 1e-9, the first in row-major order
  on exact ties (deterministic). `tie_rule="research"`: the research code's rule, the `argmin` of
  the float64 distances `sqrt(sum((members - centre) ** 2))` over the members of that k-means
  cluster, so its float noise and membership decide ties. One KMeans per entity on the host: slow
  for big clips.

Query frame of a point = `cluster_frames[peak frame]` (fixed); `legacy_query_frames=True` gives
the research code's `cluster_frames[rank of the peak frame among all peak frames]`.

Entity mask rule: the upsampled mask is a block expansion of the label rows/columns that the
nearest rule keeps, so connected components and pixel sets are computed on those cells (each a
rectangle of pixels; cells no pixel maps to, in clips smaller than 16 px, are dropped) instead of
on the full-resolution mask; the result is identical (scipy's 4-connectivity components, numbered
in raster order of their first pixel).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, fields, replace
from typing import Sequence

import numpy as np
import torch

from semtrack.defaults import FAST_SAMPLES, NUM_POINTS_PER_ENTITY
from semtrack.transfer import upload

SAMPLERS = ("fast", "exact")
TIE_RULES = ("first", "research")  # exact sampler ties: first pixel in row-major order, or the research rule
FAST_MAX_ITER = 20  # weighted Lloyd iterations at most (coverage within 0.1 % of converged)
FAST_TOL = 1e-2  # px: a video's Lloyd centres are final once none moved by this much in an iteration


@dataclass
class QueryPoints:
    """Query points of one video, in the research visiting order (peak frame asc., cluster id
    asc., component asc.).

    queries: (N, 3) float32 (t, x, y): t = query frame (index into the tracked clip), x = column,
    y = row in clip pixels. obj_ids: (N,) int64 (cluster id, or contiguous component id with
    connected components). source_frames: (N,) int64 clustering-frame index (0..K-1) each point
    was sampled in. clusters: (N,) int64 cluster id. components: (N,) int64 component index within
    its cluster (0 without connected components). num_dropped: points removed by
    `min_point_distance` (not included in the arrays).
    """

    queries: torch.Tensor
    obj_ids: torch.Tensor
    source_frames: torch.Tensor
    clusters: torch.Tensor
    components: torch.Tensor
    num_dropped: int = 0

    def __len__(self) -> int:
        return self.queries.shape[0]


@dataclass
class QueryPointsBatch:
    """Query points of V videos, padded to N per video (the batch form of `QueryPoints`).

    queries: (V, N, 3) float32 (t, x, y) in each video's own clip pixels; the first counts[v] rows
    of video v are its points in the research visiting order, the rest zeros. obj_ids,
    source_frames, clusters, components: (V, N) int64 as in `QueryPoints`, -1 after the points.
    valid: (V, N) bool, True for the first counts[v] rows. counts: (V,) int64 points per video.
    num_dropped: (V,) int64 points removed by `min_point_distance`. All on the labels' device.
    N is fixed by the shapes and settings, not by the data (entities the batch could hold times
    num_points_per_entity): read `counts` once (a host sync) to trim it.
    """

    queries: torch.Tensor
    obj_ids: torch.Tensor
    source_frames: torch.Tensor
    clusters: torch.Tensor
    components: torch.Tensor
    valid: torch.Tensor
    counts: torch.Tensor
    num_dropped: torch.Tensor

    def clip(self, v: int) -> QueryPoints:
        """Video v's `QueryPoints` (reads its count and drop count: host syncs)."""
        n = int(self.counts[v])
        return QueryPoints(self.queries[v, :n], self.obj_ids[v, :n], self.source_frames[v, :n], self.clusters[v, :n],
                           self.components[v, :n], int(self.num_dropped[v]))


@dataclass
class GridPoints:
    """Per-track ids for grid mode: the tracker places a grid_size x grid_size grid at
    `grid_query_frame` (no DINOv2, no clustering); these give every grid track obj_id 0 and that
    query frame, so ids and query frames have the tracks' length G*G (the research code wrote the
    semantic points' ids instead, with a different length).

    obj_ids: (G*G,) int64 zeros; query_frames: (G*G,) int64."""

    grid_size: int
    obj_ids: torch.Tensor
    query_frames: torch.Tensor


def grid_query_points(grid_size: int, grid_query_frame: int = 0, device=None) -> GridPoints:
    """Ids and query frames for grid mode (see `GridPoints`); call the tracker with
    `queries=None, grid_size=grid_size, grid_query_frame=grid_query_frame` for the points."""
    if isinstance(grid_size, bool) or not isinstance(grid_size, numbers.Integral) or grid_size < 1:
        raise ValueError(f"grid_size must be a positive int, got {grid_size!r}")
    if grid_query_frame < 0:
        raise ValueError(f"grid_query_frame must be >= 0, got {grid_query_frame}")
    grid_size = int(grid_size)
    g2 = grid_size * grid_size
    return GridPoints(
        grid_size=grid_size,
        obj_ids=torch.zeros(g2, dtype=torch.long, device=device),
        query_frames=torch.full((g2,), int(grid_query_frame), dtype=torch.long, device=device),
    )


def nearest_source_index(out_size: int, in_size: int, device=None) -> torch.Tensor:
    """Source cell of every output pixel for torch's legacy nearest upsampling (REFERENCE.md 8.1).

    -> (out_size,) int64: min(floor(float32(y * float32(in_size / out_size))), in_size - 1)."""
    scale = torch.tensor(in_size / out_size, dtype=torch.float32)
    pos = torch.arange(out_size, dtype=torch.float32) * scale
    return pos.floor().long().clamp_max(in_size - 1).to(device)


def peak_frames(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (K, P, Q) int64 -> (present (C,) bool, peak (C,) int64) for cluster ids 0..C-1, C =
    max label + 1; peak = frame with the most patches of that id (earliest on ties)."""
    k = labels.shape[0]
    num = int(labels.max()) + 1
    counts = torch.zeros(k, num, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels.reshape(k, -1), torch.ones_like(labels.reshape(k, -1)))  # (K, C)
    return counts.sum(0) > 0, counts.argmax(0)


def _to(obj, device: torch.device):
    """A dataclass with its tensor fields moved to `device` (host -> device without waiting)."""
    moved = {f.name: upload(getattr(obj, f.name), device) for f in fields(obj)
             if isinstance(getattr(obj, f.name), torch.Tensor)}
    return replace(obj, **moved)


@dataclass
class _Geometry:
    """How each video's clip pixels map to its P x Q label cells (torch's legacy nearest rule): every
    cell is a rectangle of pixels; cells no pixel maps to (a clip under P or Q pixels) have size 0
    and are not `kept`. Built on the host from the clip sizes alone."""

    row_start: torch.Tensor  # (V, P) int64 first pixel row of each cell row
    row_size: torch.Tensor  # (V, P) int64 pixel rows per cell row (0: dropped)
    col_start: torch.Tensor  # (V, Q)
    col_size: torch.Tensor  # (V, Q)
    kept: torch.Tensor  # (V, P, Q) bool cells with pixels
    hmax: torch.Tensor  # (V,) int64 largest cell height
    wmax: torch.Tensor  # (V,) int64 largest cell width
    aspect: torch.Tensor  # (V,) float64 mean kept cell height / mean kept cell width
    source_rows: list  # V (H,) int64 numpy: cell row of every pixel row
    source_cols: list  # V (W,)
    num_samples: int  # fast sampler: samples per entity that every entity of the batch fits in


def _geometry(sizes: Sequence[tuple[int, int]], p: int, q: int, target: int) -> _Geometry:
    """The cell geometry of V clips (H, W) over P x Q label maps, on the host; `target`: the fast
    sampler's samples per entity (`fast_samples`), which bounds `num_samples`."""
    rows = {f.name: [] for f in fields(_Geometry) if f.name != "num_samples"}
    num_samples = 1
    for h, w in sizes:
        ry, rx = nearest_source_index(h, p), nearest_source_index(w, q)
        row_size, col_size = torch.bincount(ry, minlength=p), torch.bincount(rx, minlength=q)
        kept_rows, kept_cols = row_size > 0, col_size > 0
        aspect = row_size[kept_rows].double().mean() / col_size[kept_cols].double().mean()
        hmax, wmax = row_size.max(), col_size.max()
        for name, value in (("row_start", row_size.cumsum(0) - row_size), ("row_size", row_size),
                            ("col_start", col_size.cumsum(0) - col_size), ("col_size", col_size),
                            ("kept", kept_rows[:, None] & kept_cols[None, :]), ("hmax", hmax), ("wmax", wmax),
                            ("aspect", aspect), ("source_rows", ry.numpy()), ("source_cols", rx.numpy())):
            rows[name].append(value)
        # the most samples `_fast_samples` can give an entity of this clip: any number of cells with
        # its sub-block rule, or (an entity of at most `target` pixels) every pixel of its cells
        ncell = torch.arange(1, int(kept_rows.sum() * kept_cols.sum()) + 1)
        sy, sx = _subblocks(ncell, target, aspect, hmax, wmax)
        split = int((ncell * sy * sx).max())
        min_cell = int(row_size[kept_rows].min() * col_size[kept_cols].min())
        whole = min(len(ncell), target // min_cell) * int(hmax * wmax)
        num_samples = max(num_samples, split, whole)
    stacked = {k: torch.stack(v) for k, v in rows.items() if k not in ("source_rows", "source_cols")}
    return _Geometry(**stacked, source_rows=rows["source_rows"], source_cols=rows["source_cols"],
                     num_samples=num_samples)


def _subblocks(ncell: torch.Tensor, target: int, aspect: torch.Tensor, hmax: torch.Tensor, wmax: torch.Tensor):
    """Sub-blocks per cell (rows sy, columns sx) splitting an entity of `ncell` cells into about
    `target` square-ish samples: int64 tensors shaped like ncell (aspect, hmax, wmax broadcast)."""
    per_cell = target / ncell.clamp_min(1).double()
    sy = (per_cell * aspect).sqrt().round().clamp_min(1).minimum(hmax.double()).long()
    sx = (per_cell / sy).round().clamp_min(1).minimum(wmax.double()).long()
    return sy, sx


@dataclass
class _Entities:
    """Sampling units (clusters, or their components) of V videos, E per video, in the research
    visiting order (peak frame asc., cluster id asc., component asc.), the valid ones first."""

    cells: torch.Tensor  # (V, E, P, Q) bool: the entity's label cells (kept cells only)
    frame: torch.Tensor  # (V, E) int64 clustering frame (its cluster's peak frame)
    cluster: torch.Tensor  # (V, E) int64
    comp: torch.Tensor  # (V, E) int64 component index within its cluster
    valid: torch.Tensor  # (V, E) bool
    used_frames: torch.Tensor  # (V, K) bool: the peak frame of some present cluster
    num_ids: int  # every cluster id < num_ids


def _cluster_entities(labels: torch.Tensor, kept: torch.Tensor, num_ids: int) -> _Entities:
    """One entity per cluster id (E = num_ids, the absent ones invalid), without host syncs.

    labels (V, K, P, Q) int64 in [0, num_ids), -1 in padded frames; kept (V, P, Q) bool."""
    v, k, p, q = labels.shape
    flat = labels.reshape(v, k, p * q)
    counts = labels.new_zeros(v, k, num_ids).scatter_add_(2, flat.clamp_min(0), (flat >= 0).long())  # (V, K, C)
    present = counts.sum(dim=1) > 0  # (V, C)
    peak = counts.argmax(dim=1)  # (V, C) earliest frame on ties
    cluster = torch.where(present, peak, k).argsort(dim=1, stable=True)  # (V, C) visiting order, absent ids last
    frame, valid = peak.gather(1, cluster), present.gather(1, cluster)
    at_peak = labels.gather(1, frame[..., None, None].expand(v, num_ids, p, q))  # (V, C, P, Q)
    cells = (at_peak == cluster[..., None, None]) & kept[:, None] & valid[..., None, None]
    used = labels.new_zeros(v, k).scatter_add_(1, frame, valid.long()) > 0
    return _Entities(cells, frame, cluster, torch.zeros_like(cluster), valid, used, num_ids)


def _first(ent: _Entities, e: int) -> _Entities:
    """The first e entities of every video (the valid ones come first)."""
    return replace(ent, cells=ent.cells[:, :e], frame=ent.frame[:, :e], cluster=ent.cluster[:, :e],
                   comp=ent.comp[:, :e], valid=ent.valid[:, :e])


def _select(ent: _Entities, picks: Sequence[torch.Tensor]) -> _Entities:
    """Host entities: video i keeps its entities `picks[i]` (int64 indices, in that order), padded
    to the longest (at least one) with invalid entities."""
    v, _, p, q = ent.cells.shape
    e = max([1, *(len(x) for x in picks)])
    index = torch.zeros(v, e, dtype=torch.long)
    valid = torch.zeros(v, e, dtype=torch.bool)
    for i, x in enumerate(picks):
        index[i, : len(x)], valid[i, : len(x)] = x, True
    cells = ent.cells.gather(1, index[..., None, None].expand(v, e, p, q)) & valid[..., None, None]
    frame, cluster, comp = (x.gather(1, index) for x in (ent.frame, ent.cluster, ent.comp))
    return _Entities(cells, frame, cluster, comp, valid, ent.used_frames, ent.num_ids)


def _host_entities(labels: torch.Tensor, geo: _Geometry, use_cc: bool) -> _Entities:
    """Entities of a batch on the host: labels (V, K, P, Q) on the CPU -> as many entities per video
    as the batch needs; with `use_cc` every cluster split into its 4-connected components (scipy,
    on the kept cells)."""
    ent = _cluster_entities(labels, geo.kept, max(int(labels.max()) + 1, 1))
    ent = _select(ent, [row.nonzero()[:, 0] for row in ent.valid])
    if not use_cc:
        return ent
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), dtype=bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)  # 4-connectivity within a plane only
    v, _, p, q = ent.cells.shape
    planes, comps, cells = [], [], []
    for i in range(v):
        rows, cols = geo.kept[i].any(1).nonzero()[:, 0], geo.kept[i].any(0).nonzero()[:, 0]
        reduced = ent.cells[i, : int(ent.valid[i].sum())][:, rows][:, :, cols]  # (C, R, S) each cluster's kept cells
        cc, num = ndimage.label(reduced.numpy(), structure=structure)  # numbered in raster order of (plane, y, x)
        cc = torch.from_numpy(cc).long()
        plane = torch.zeros(num + 1, dtype=torch.long)
        plane.scatter_(0, cc.flatten(), torch.arange(cc.numel()) // (cc.shape[1] * cc.shape[2]))
        plane = plane[1:]  # (num,) the cluster (plane) of each component
        comp_ids = torch.arange(1, num + 1)
        first = torch.full((reduced.shape[0],), num + 1, dtype=torch.long)
        first.scatter_reduce_(0, plane, comp_ids, reduce="amin")
        full = torch.zeros(num, p, q, dtype=torch.bool)
        full[:, rows[:, None], cols[None, :]] = cc[plane] == comp_ids[:, None, None]
        planes.append(plane)
        comps.append(comp_ids - first[plane])
        cells.append(full)
    out = _select(ent, planes)
    for i, (comp, full) in enumerate(zip(comps, cells)):
        out.comp[i, : len(comp)], out.cells[i, : len(comp)] = comp, full
    return out


def _area(ent: _Entities, geo: _Geometry) -> torch.Tensor:
    """(V, E) int64 pixel count of each entity."""
    cell_area = geo.row_size[:, :, None] * geo.col_size[:, None, :]  # (V, P, Q)
    return (ent.cells * cell_area[:, None]).sum(dim=(2, 3))


def _per_entity(x: torch.Tensor, e: int) -> torch.Tensor:
    """A per-video tensor (V, ...) repeated for each of the video's e entities -> (V * e, ...)."""
    return x[:, None].expand(x.shape[0], e, *x.shape[1:]).reshape(-1, *x.shape[1:])


def _fast_samples(cells: torch.Tensor, geo: dict, area: torch.Tensor, small: torch.Tensor, target: int, m: int):
    """Weighted sub-block samples of B entities, batched.

    cells (B, P, Q) bool; geo: each entity's video geometry (row_start, row_size (B, P), col_start,
    col_size (B, Q), hmax, wmax (B,) int64, aspect (B,) float64); m: samples per entity (a bound
    from `_geometry`). -> pos (B, m, 2) float64 (y, x) centroid of each sub-block, weight (B, m)
    float64 (pixel count, 0 = padding). Each entity's cells are split into sy x sx sub-blocks with
    sy*sx*cells ~ target; small entities (and any whose cells hold at most target pixels) are split
    into pixels.
    """
    b, p, q = cells.shape
    device = cells.device
    ncell = cells.flatten(1).sum(1)  # (B,)
    hmax, wmax = geo["hmax"], geo["wmax"]
    sy, sx = _subblocks(ncell, target, geo["aspect"], hmax, wmax)
    whole = small | (area <= target)  # every pixel is its own sample
    sy = torch.where(whole, hmax, sy)
    sx = torch.where(whole, wmax, sx)
    per = sy * sx  # (B,) sub-blocks per cell
    flat = torch.arange(m, device=device)[None, :]  # (1, M)
    rank = flat // per[:, None]  # (B, M) which of the entity's cells
    sub = flat % per[:, None]
    u, v = sub // sx[:, None], sub % sx[:, None]
    # member cells first, in raster order
    cell_order = torch.argsort((~cells).flatten(1).to(torch.uint8), dim=1, stable=True)  # (B, P*Q)
    cell = cell_order.gather(1, rank.clamp_max(p * q - 1))  # (B, M)
    ci, cj = cell // q, cell % q
    h, w = geo["row_size"].gather(1, ci), geo["col_size"].gather(1, cj)
    y_start, x_start = geo["row_start"].gather(1, ci), geo["col_start"].gather(1, cj)
    y0 = y_start + u * h // sy[:, None]
    y1 = y_start + (u + 1) * h // sy[:, None]
    x0 = x_start + v * w // sx[:, None]
    x1 = x_start + (v + 1) * w // sx[:, None]
    weight = ((y1 - y0) * (x1 - x0)).double() * (rank < ncell[:, None])
    pos = torch.stack([(y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2], dim=-1).double()  # (B, M, 2)
    return pos, weight


def _snap(cells: torch.Tensor, geo: dict, centres: torch.Tensor) -> torch.Tensor:
    """centres (B, n, 2) float64 (y, x) -> (B, n, 2) int64 nearest member pixel of each entity
    (cells (B, P, Q); ties: first cell in raster order, nearest-integer rounding half up inside a cell)."""
    q = cells.shape[2]
    ys0 = geo["row_start"].double()[:, None, :]  # (B, 1, P)
    ys1 = (geo["row_start"] + geo["row_size"] - 1).double()[:, None, :]
    xs0 = geo["col_start"].double()[:, None, :]  # (B, 1, Q)
    xs1 = (geo["col_start"] + geo["col_size"] - 1).double()[:, None, :]
    cy = centres[..., 0:1].add(0.5).floor()  # (B, n, 1)
    cx = centres[..., 1:2].add(0.5).floor()
    py = torch.minimum(torch.maximum(cy, ys0), ys1)  # (B, n, P)
    px = torch.minimum(torch.maximum(cx, xs0), xs1)  # (B, n, Q)
    d2 = (py - centres[..., 0:1])[..., :, None] ** 2 + (px - centres[..., 1:2])[..., None, :] ** 2  # (B, n, P, Q)
    d2 = d2.masked_fill(~cells[:, None], float("inf")).flatten(2)
    best = d2.argmin(dim=2)  # (B, n)
    yi, xi = best // q, best % q
    return torch.stack([py.gather(2, yi[..., None])[..., 0], px.gather(2, xi[..., None])[..., 0]], dim=-1).long()


def _sample_fast(
    ent: _Entities, geo: _Geometry, n: int, small: torch.Tensor, area: torch.Tensor, target: int, sync_free: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every entity of every video at once, without host syncs -> points (V, E, n, 2) int64 (y, x),
    ok (V, E, n) bool (small entities keep all their pixels, fewer than n, in row-major order).

    Lloyd runs FAST_MAX_ITER iterations; a video's centres are frozen from the iteration where none
    of them moved by FAST_TOL (the point a one-video loop would stop at), so its points do not
    depend on the other videos. Unless `sync_free`, the loop ends once every video is frozen (a host
    sync per iteration; the same points)."""
    v, e, p, q = ent.cells.shape
    cells = ent.cells.reshape(v * e, p, q)
    small, area = small.reshape(-1), area.reshape(-1)
    g = {name: _per_entity(getattr(geo, name), e)
         for name in ("row_start", "row_size", "col_start", "col_size", "hmax", "wmax", "aspect")}
    m = geo.num_samples
    pos64, weight64 = _fast_samples(cells, g, area, small, target, m)  # (B, M, 2), (B, M)
    pos, weight = pos64.float(), weight64.float()
    b = pos.shape[0]
    valid = weight > 0

    def sqdist_to(point: torch.Tensor) -> torch.Tensor:  # (B, 2) -> (B, M) squared distance of every sample
        return ((pos - point[:, None]) ** 2).sum(-1)

    # deterministic farthest-point start: the sample closest to the weighted centroid, then maximin
    mean = (pos * weight[..., None]).sum(1) / weight.sum(1).clamp_min(1)[:, None]  # (B, 2)
    nxt = sqdist_to(mean).masked_fill(~valid, float("inf")).argmin(1)  # (B,)
    idx = [nxt]
    mind = torch.full((b, m), float("inf"), device=pos.device)
    entity = torch.arange(b, device=pos.device)
    for _ in range(1, n):
        mind = torch.minimum(mind, sqdist_to(pos[entity, nxt]))
        nxt = mind.masked_fill(~valid, -1.0).argmax(1)
        idx.append(nxt)
    centres = pos[entity[:, None], torch.stack(idx, 1)]  # (B, n, 2)
    onehot = torch.empty(b, m, n, dtype=pos.dtype, device=pos.device)
    w = weight[..., None]  # (B, M, 1)
    done = torch.zeros(v, dtype=torch.bool, device=pos.device)
    for _ in range(FAST_MAX_ITER):
        # nearest centre: argmin over k of |c_k|^2 - 2 p.c_k (|p|^2 is the same for every k)
        score = torch.baddbmm((centres**2).sum(-1)[:, None, :], pos, centres.transpose(1, 2), alpha=-2)  # (B, M, n)
        onehot.zero_().scatter_(2, score.argmin(-1, keepdim=True), w)  # matmul sums: deterministic on GPUs
        mass = onehot.sum(1)[..., None]  # (B, n, 1)
        new = torch.bmm(onehot.transpose(1, 2), pos) / mass.clamp_min(1e-12)
        new = torch.where(mass > 0, new, centres)  # an empty centre stays put
        shift = (new - centres).abs().reshape(v, -1).amax(1)  # (V,)
        centres = torch.where(done[:, None].expand(v, e).reshape(b, 1, 1), centres, new)
        done = done | (shift < FAST_TOL)
        if not sync_free and bool(done.all()):
            break
    pts = _snap(cells, g, centres.double())  # (B, n, 2)
    # small entities: their first `area` samples in row-major order are all their pixels
    raster = (pos64[..., 0] * 1e6 + pos64[..., 1]).masked_fill(~valid, float("inf"))
    first = raster.argsort(dim=1, stable=True)[:, :n]
    pix = pos64.gather(1, first[..., None].expand(-1, -1, 2)).long()  # (B, <=n, 2)
    if pix.shape[1] < n:
        pix = torch.cat([pix, pix.new_zeros(b, n - pix.shape[1], 2)], dim=1)
    slot = torch.arange(n, device=pos.device)[None, :]
    pts = torch.where(small[:, None, None], pix, pts)
    ok = torch.where(small[:, None], slot < area[:, None], torch.ones_like(slot, dtype=torch.bool))
    key = (pts[..., 0] * (1 << 20) + pts[..., 1]).masked_fill(~ok, 1 << 62)  # row-major within an entity
    perm = key.argsort(dim=1, stable=True)
    pts, ok = pts.gather(1, perm[..., None].expand(-1, -1, 2)), ok.gather(1, perm)
    return pts.reshape(v, e, n, 2), ok.reshape(v, e, n)


def exact_pixel_points(pixels: np.ndarray, n: int, n_init: int = 1, tie_rule: str = "first") -> np.ndarray:
    """The research rule for one entity (REFERENCE.md 8.2 step 3 with fix 10, and fix 11 unless
    tie_rule="research").

    pixels: (M, 2) int (y, x) in row-major order, M >= n -> (n, 2) int64 (y, x): scikit-learn
    `KMeans(n_clusters=n, n_init=n_init, random_state=42)` on the coordinates, then for each centre
    (sklearn's order) its closest pixel: with tie_rule="first" the closest of all pixels, squared
    distances rounded to 1e-9 and the first in row-major order on ties; with "research" the
    `argmin` of `sqrt(sum((members - centre) ** 2))` in float64 over the members of that k-means
    cluster (all pixels if it has none)."""
    from sklearn.cluster import KMeans

    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule must be one of {TIE_RULES}, got {tie_rule!r}")
    pixels = np.asarray(pixels, dtype=np.int64)
    km = KMeans(n_clusters=n, n_init=n_init, random_state=42).fit(pixels.astype(np.float64))
    return closest_pixels(pixels, km.cluster_centers_, km.labels_, tie_rule)


def closest_pixels(pixels: np.ndarray, centres: np.ndarray, members: np.ndarray, tie_rule: str = "first") -> np.ndarray:
    """The pixel chosen for each centre (`exact_pixel_points`' last step).

    pixels (M, 2) int (y, x) row-major; centres (n, 2) float64; members (M,) int k-means cluster of
    each pixel -> (n, 2) int64 (y, x)."""
    out = np.empty((len(centres), 2), dtype=np.int64)
    for i, c in enumerate(centres):
        if tie_rule == "research":
            own = pixels[members == i]
            own = own if len(own) else pixels
            out[i] = own[int(np.argmin(np.sqrt(np.sum((own - c) ** 2, axis=1))))]
        else:
            d2 = np.round(((pixels - c) ** 2).sum(axis=1), 9)
            out[i] = pixels[int(np.argmin(d2))]
    return out


def _sample_exact(
    ent: _Entities, geo: _Geometry, n: int, small: torch.Tensor, n_init: int, tie_rule: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Host entities -> points (V, E, n, 2) int64 (y, x), ok (V, E, n) bool: all pixels of a small
    entity (row-major), else `exact_pixel_points`."""
    v, e = ent.valid.shape
    pts = torch.zeros(v, e, n, 2, dtype=torch.long)
    ok = torch.zeros(v, e, n, dtype=torch.bool)
    for i in range(v):
        for j in range(int(ent.valid[i].sum())):
            mask = ent.cells[i, j].numpy()[geo.source_rows[i]][:, geo.source_cols[i]]
            pixels = np.argwhere(mask)  # (M, 2) (y, x) row-major
            got = pixels if bool(small[i, j]) else exact_pixel_points(pixels, n, n_init, tie_rule)
            pts[i, j, : len(got)] = torch.from_numpy(got)
            ok[i, j, : len(got)] = True
    return pts, ok


def _assemble(ent: _Entities, pts: torch.Tensor, ok: torch.Tensor, cluster_frames: torch.Tensor, use_cc: bool,
              legacy_query_frames: bool) -> QueryPointsBatch:
    """Entities' points (V, E, S, 2) (y, x) with ok (V, E, S) -> the batch's query points, each
    video's in entity order (the visiting order), packed to the front."""
    v, e, s = ok.shape
    if use_cc:  # contiguous ids: ascending cluster id, then component
        ncomp = torch.zeros(v, ent.num_ids, dtype=torch.long, device=ok.device)
        ncomp.scatter_reduce_(1, ent.cluster, (ent.comp + 1) * ent.valid, reduce="amax")
        obj = (ncomp.cumsum(1) - ncomp).gather(1, ent.cluster) + ent.comp  # (V, E)
    else:
        obj = ent.cluster
    frame = ent.frame
    if legacy_query_frames:  # research bug: the rank of the peak frame among all peak frames
        used = ent.used_frames.long()
        frame = (used.cumsum(1) - used).gather(1, frame)
    t = cluster_frames.gather(1, frame)  # (V, E)
    order = (~ok).reshape(v, e * s).to(torch.uint8).argsort(dim=1, stable=True)  # points first, in order
    valid = ok.reshape(v, e * s).gather(1, order)

    def per_point(x: torch.Tensor) -> torch.Tensor:  # (V, E) -> (V, E*S) in point order, -1 after the points
        return x[..., None].expand(v, e, s).reshape(v, e * s).gather(1, order).masked_fill(~valid, -1)

    yx = pts.reshape(v, e * s, 2).gather(1, order[..., None].expand(v, e * s, 2))
    queries = torch.stack([per_point(t), yx[..., 1], yx[..., 0]], dim=-1).float().masked_fill(~valid[..., None], 0)
    counts = ok.sum(dim=(1, 2))
    return QueryPointsBatch(queries, per_point(obj), per_point(ent.frame), per_point(ent.cluster),
                            per_point(ent.comp), valid, counts, torch.zeros_like(counts))


def _filter_close(xy: torch.Tensor, t: torch.Tensor, valid: torch.Tensor, min_dist: float) -> torch.Tensor:
    """Greedy in order, per video: keep a point unless it is closer than min_dist to an earlier kept
    point of the same query frame. xy (V, N, 2), t (V, N), valid (V, N) -> keep (V, N) bool (False
    for invalid points). Solved as the fixed point of keep[i] = not any(conflict[i, j] and keep[j],
    j < i), reached after at most N sweeps (one host sync per sweep)."""
    n = xy.shape[1]
    d = torch.cdist(xy.double(), xy.double())
    earlier = torch.ones(n, n, dtype=torch.bool, device=xy.device).tril(-1)
    conflict = (d < min_dist) & (t[:, :, None] == t[:, None, :]) & earlier & valid[:, None, :]  # [v, i, j]: j before i
    conflict = conflict.double()
    keep = valid.clone()
    for _ in range(n):
        new = ((conflict @ keep.double()[..., None])[..., 0] == 0) & valid
        if bool((new == keep).all()):
            break
        keep = new
    return keep


def _drop_close(batch: QueryPointsBatch, min_dist: float) -> QueryPointsBatch:
    """`batch` without the points `_filter_close` drops, packed again (reads the largest count)."""
    n = max(int(batch.counts.max()), 1)
    keep = _filter_close(batch.queries[:, :n, 1:], batch.queries[:, :n, 0], batch.valid[:, :n], min_dist)
    order = (~keep).to(torch.uint8).argsort(dim=1, stable=True)
    valid = keep.gather(1, order)

    def pack(x: torch.Tensor, fill) -> torch.Tensor:
        x = x[:, :n]
        index = order if x.dim() == 2 else order[..., None].expand_as(x)
        mask = valid if x.dim() == 2 else valid[..., None]
        return x.gather(1, index).masked_fill(~mask, fill)

    counts = keep.sum(dim=1)
    return QueryPointsBatch(pack(batch.queries, 0), pack(batch.obj_ids, -1), pack(batch.source_frames, -1),
                            pack(batch.clusters, -1), pack(batch.components, -1), valid, counts,
                            batch.num_dropped + batch.counts - counts)


def _check_options(n, sampler: str, min_point_distance: float, n_init: int, fast_samples: int, tie_rule: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"num_points_per_entity must be a positive int, got {n!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if tie_rule not in TIE_RULES:
        raise ValueError(f"tie_rule must be one of {TIE_RULES}, got {tie_rule!r}")
    if min_point_distance < 0:
        raise ValueError(f"min_point_distance must be >= 0, got {min_point_distance}")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    if fast_samples < n:
        raise ValueError(f"fast_samples must be >= num_points_per_entity ({n}), got {fast_samples}")
    return int(n)


def select_query_points_batch(
    labels: torch.Tensor,
    cluster_frames: torch.Tensor,
    clip_sizes: Sequence[tuple[int, int]],
    num_labels: int,
    num_points_per_entity: int = NUM_POINTS_PER_ENTITY,
    sampler: str = "fast",
    use_connected_components: bool = False,
    legacy_query_frames: bool = False,
    min_point_distance: float = 0,
    n_init: int = 1,
    fast_samples: int = FAST_SAMPLES,
    tie_rule: str = "first",
    sync_free: bool = True,
) -> QueryPointsBatch:
    """Query points for a padded batch of V videos (REFERENCE.md 8-10), in one computation.

    labels: (V, K_max, P, Q) int64 cluster ids of each video's clustering frames on the device, -1
    in padded frames (`clustering.cluster_batch`'s labels); cluster_frames: (V, K_max) int64 on the
    same device, index of each clustering frame in the video's tracked clip (any value in padded
    frames); clip_sizes: V host (H, W), each video's clip pixels; num_labels: host int, every label
    < num_labels (`ClusterBatch.num_labels`: fixed by the settings, so shapes do not depend on the
    data). -> `QueryPointsBatch` on the device, each video's points equal to `select_query_points`
    on it alone, in its own clip's pixels.

    Host syncs with sync_free=True (for GPUs): none with the fast sampler without connected
    components (fixed shapes: every possible cluster id is an entity slot, Lloyd runs its
    FAST_MAX_ITER iterations); "exact" or `use_connected_components` download the labels once
    (scipy / scikit-learn on the host, "exact" one video at a time); `min_point_distance` > 0 reads
    the largest count and checks its greedy filter per sweep. sync_free=False (for the CPU, where
    reading costs nothing): the fast sampler keeps only as many entity slots as the fullest video
    needs and leaves Lloyd once every video settled. The points are the same. The other options
    are `select_query_points`'.
    """
    n = _check_options(num_points_per_entity, sampler, min_point_distance, n_init, fast_samples, tie_rule)
    if not isinstance(labels, torch.Tensor) or labels.dim() != 4 or labels.dtype != torch.int64:
        raise ValueError(f"labels must be an int64 (V, K, P, Q) tensor, got {getattr(labels, 'dtype', None)} "
                         f"{tuple(getattr(labels, 'shape', ()))}")
    v, k, p, q = labels.shape
    if v < 1 or k < 1 or p < 1 or q < 1:
        raise ValueError(f"labels has an empty dimension: shape {tuple(labels.shape)}")
    if not isinstance(cluster_frames, torch.Tensor) or cluster_frames.shape != (v, k):
        shape = tuple(getattr(cluster_frames, "shape", ()))
        raise ValueError(f"cluster_frames must be a ({v}, {k}) tensor, got {shape}")
    sizes = [(int(h), int(w)) for h, w in clip_sizes]
    if len(sizes) != v or any(h < 1 or w < 1 for h, w in sizes):
        raise ValueError(f"clip_sizes must be V={v} positive (H, W), got {list(clip_sizes)}")
    if isinstance(num_labels, bool) or not isinstance(num_labels, numbers.Integral) or num_labels < 1:
        raise ValueError(f"num_labels must be a positive int, got {num_labels!r}")
    device = labels.device
    geo = _geometry(sizes, p, q, fast_samples)
    on_host = sampler == "exact" or use_connected_components
    if on_host:  # scipy / scikit-learn: the one download
        ent = _host_entities(labels.cpu(), geo, use_connected_components)
    else:
        geo = _to(geo, device)
        ent = _cluster_entities(labels, geo.kept, int(num_labels))
        if not sync_free:  # only as many entities as the fullest video has
            ent = _first(ent, max(int(ent.valid.sum(1).max()), 1))
    area = _area(ent, geo)  # (V, E)
    small = area <= n if use_connected_components else area < n  # take all pixels (REFERENCE.md 8.2 / 9)
    if sampler == "exact":
        pts, ok = _sample_exact(ent, geo, n, small, n_init, tie_rule)
        pts, ok = upload(pts, device), upload(ok, device)
    else:
        if on_host:
            ent, geo = _to(ent, device), _to(geo, device)
            small, area = upload(small, device), upload(area, device)
        pts, ok = _sample_fast(ent, geo, n, small, area, fast_samples, sync_free)
    if on_host and sampler == "exact":
        ent = _to(ent, device)
    batch = _assemble(ent, pts, ok, cluster_frames.long(), use_connected_components, legacy_query_frames)
    if min_point_distance > 0:
        batch = _drop_close(batch, float(min_point_distance))
    return batch


def select_query_points(
    labels: torch.Tensor,
    cluster_frames: torch.Tensor,
    clip_size: tuple[int, int],
    num_points_per_entity: int = NUM_POINTS_PER_ENTITY,
    sampler: str = "fast",
    use_connected_components: bool = False,
    legacy_query_frames: bool = False,
    min_point_distance: float = 0,
    n_init: int = 1,
    fast_samples: int = FAST_SAMPLES,
    tie_rule: str = "first",
) -> QueryPoints:
    """Query points for one video (REFERENCE.md 8-10).

    labels: (K, P, Q) int64 cluster ids of the K clustering frames; cluster_frames: (K,) int64
    index of each clustering frame in the tracked clip; clip_size: (H, W) clip pixels.
    Every present cluster is sampled once, in its peak frame: `num_points_per_entity` points, or
    all its pixels when it has fewer (`<`); with `use_connected_components` every 4-connected
    component gets the full count, or all its pixels when it has at most that many (`<=`), and
    obj_ids are contiguous per (cluster id, component). `sampler`: "fast" (batched, default) or
    "exact" (research-exact; `n_init` is its KMeans n_init, 10 = scikit-learn <= 1.3 default;
    `tie_rule` "first" or "research" how it breaks closest-pixel ties, see the module docstring);
    `fast_samples`: weighted samples per entity for "fast" (more = closer to exact, slower).
    `min_point_distance` > 0 drops points closer than that (px) to an earlier kept point with the
    same query frame. A cluster whose cells all vanish in a clip smaller than P x Q gets no points;
    N may be 0. Returns `QueryPoints` on the labels' device (`select_query_points_batch` of this one
    video, with host checks).
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 3 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be an integer (K, P, Q) tensor, got {labels.dtype} {tuple(labels.shape)}")
    labels = labels.long()
    if labels.numel() == 0 or bool((labels < 0).any()):
        raise ValueError("labels must be non-empty with non-negative cluster ids")
    cluster_frames = torch.as_tensor(cluster_frames).to(labels.device).long()
    if cluster_frames.shape != (labels.shape[0],):
        raise ValueError(f"cluster_frames must have shape ({labels.shape[0]},), got {tuple(cluster_frames.shape)}")
    h, w = (int(v) for v in clip_size)
    if h < 1 or w < 1:
        raise ValueError(f"clip_size must be positive (H, W), got {tuple(clip_size)}")
    batch = select_query_points_batch(
        labels[None], cluster_frames[None], [(h, w)], int(labels.max()) + 1, num_points_per_entity, sampler,
        use_connected_components, legacy_query_frames, min_point_distance, n_init, fast_samples, tie_rule,
        sync_free=False,
    )
    return batch.clip(0)
def coverage(labels: torch.Tensor, clip_size: tuple[int, int], points: QueryPoints) -> np.ndarray:
    """Evaluation metric: for every (cluster, component) group of `points`, the mean Euclidean
    distance (px) from each pixel of its mask in its source frame to the nearest of its points.
    The mask is the component's when any point has a component index > 0 (connected components
    split some cluster), else the whole cluster's.
    -> (G, 2) float64 rows (mean distance, pixel count), groups in point order."""
    from scipy import ndimage

    lab = torch.as_tensor(labels).cpu()
    h, w = clip_size
    ry, rx = nearest_source_index(h, lab.shape[1]).numpy(), nearest_source_index(w, lab.shape[2]).numpy()
    key = torch.stack([points.source_frames, points.clusters, points.components], 1).cpu().numpy()  # (N, 3)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    xy = points.queries[:, 1:].cpu().double().numpy()
    out = []
    cc = points.components.cpu().numpy().max(initial=0) > 0
    for g in np.argsort(first):
        f, c, comp = key[first[g]]
        mask = lab[f].numpy()[ry][:, rx] == c
        if cc:
            comps, _ = ndimage.label(mask)
            mask = comps == comp + 1
        pix = np.argwhere(mask)[:, ::-1].astype(np.float64)  # (M, 2) (x, y)
        pts = xy[inverse == g]
        best = np.full(len(pix), np.inf)
        for p in pts:
            best = np.minimum(best, ((pix - p) ** 2).sum(1))
        out.append((np.sqrt(best).mean(), len(pix)))
    return np.array(out, dtype=np.float64).reshape(-1, 2)
