"""Semantic query points from a cluster label map (REFERENCE.md sections 8, 9, 10 and 14).

For every cluster present in the K clustering frames' labels: its peak frame (most patches,
earliest on ties), its 16x16 mask upsampled to the clip size with torch's legacy "nearest" rule,
optionally split into 4-connected components, then `num_points_per_entity` well-spread pixels per
cluster (or component) and a CoTracker query `(t, x, y)` for each.

Samplers:
* "exact": scikit-learn KMeans (k-means++, `n_init` explicit, default 1, `random_state=42`) on all
  the entity's pixel coordinates, then per centre the closest member pixel (distances rounded to
  1e-9, first in row-major order on ties). Reproduces the research points (section 8.2) except
  that exact ties are broken deterministically (the research code flips those by 1 px with float
  noise). One KMeans per entity on the CPU: slow for big clips.
* "fast" (default): all entities of a video in one batched tensor computation on the labels'
  device: each entity's pixels are summarised by about `fast_samples` (default 256) weighted
  sub-blocks of its patch cells (every pixel when the entity is small), weighted Lloyd from a deterministic
  farthest-point start, then each centre snaps to its nearest member pixel (exact, via the
  cell rectangles). Same point counts and order of entities as "exact"; points within an entity in
  row-major order. Deterministic for a given input.

Query frame of a point = `cluster_frames[peak frame]` (fixed); `legacy_query_frames=True` gives
the research code's `cluster_frames[rank of the peak frame among all peak frames]`.

Entity mask rule: the upsampled mask is a block expansion of the label rows/columns that the
nearest rule keeps, so connected components and pixel sets are computed on that reduced grid of
cells (each a rectangle of pixels) instead of on the full-resolution mask; the result is
identical (scipy's 4-connectivity components, numbered in raster order of their first pixel).
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
import torch

SAMPLERS = ("fast", "exact")
NUM_POINTS_PER_ENTITY = 16  # points per cluster, or per component (research default)
GRID_SIZE = 16  # grid mode: a GRID_SIZE x GRID_SIZE grid of tracks (research default)
FAST_SAMPLES = 256  # weighted samples per entity (fast sampler): coverage within ~2 % of exact; 1024: ~1 %, 4x slower
FAST_MAX_ITER = 20  # weighted Lloyd iterations at most (coverage within 0.1 % of converged; stops earlier when settled)


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
    pos = torch.arange(out_size, dtype=torch.float32, device=device) * scale.to(device)
    return pos.floor().long().clamp_max(in_size - 1)


def peak_frames(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """labels (K, P, Q) int64 -> (present (C,) bool, peak (C,) int64) for cluster ids 0..C-1, C =
    max label + 1; peak = frame with the most patches of that id (earliest on ties)."""
    k = labels.shape[0]
    num = int(labels.max()) + 1
    counts = torch.zeros(k, num, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, labels.reshape(k, -1), torch.ones_like(labels.reshape(k, -1)))  # (K, C)
    return counts.sum(0) > 0, counts.argmax(0)


@dataclass
class _Entities:
    """Sampling units (clusters or their components) on the reduced cell grid of the clip."""

    cells: torch.Tensor  # (E, R, S) bool: cells of the entity on the reduced grid
    frame: torch.Tensor  # (E,) int64 clustering frame (the cluster's peak frame)
    cluster: torch.Tensor  # (E,) int64
    comp: torch.Tensor  # (E,) int64 component index within its cluster
    peak_frames: torch.Tensor  # (F,) int64 sorted distinct peak frames of all present clusters
    row_start: torch.Tensor  # (R,) first pixel row of each reduced row
    row_size: torch.Tensor  # (R,) pixel rows per reduced row
    col_start: torch.Tensor  # (S,)
    col_size: torch.Tensor  # (S,)
    row_of_pixel: torch.Tensor  # (H,) reduced row of every pixel row
    col_of_pixel: torch.Tensor  # (W,)

    def area(self) -> torch.Tensor:
        """(E,) int64 pixel count of each entity."""
        cell_area = self.row_size[:, None] * self.col_size[None, :]  # (R, S)
        return (self.cells * cell_area).sum(dim=(1, 2))

    def full_mask(self, e: int) -> np.ndarray:
        """(H, W) bool mask of entity e at clip resolution."""
        cells = self.cells[e].cpu().numpy()
        return cells[self.row_of_pixel.cpu().numpy()][:, self.col_of_pixel.cpu().numpy()]


def _blocks(index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Nondecreasing source index (L,) -> kept source cells, block starts, block sizes, and the
    block of every pixel."""
    kept, inverse, size = torch.unique_consecutive(index, return_inverse=True, return_counts=True)
    start = size.cumsum(0) - size
    return kept, start, size, inverse


def _entities(labels: torch.Tensor, clip_size: tuple[int, int], use_cc: bool) -> _Entities:
    from scipy import ndimage

    k, p, q = labels.shape
    h, w = clip_size
    device = labels.device
    present, peak = peak_frames(labels)
    ids = present.nonzero()[:, 0]  # (C,) ascending cluster ids
    order = torch.argsort(peak[ids] * (ids.max() + 1) + ids)  # visit: peak frame asc., then id asc.
    ids = ids[order]
    frames = peak[ids]
    peak_frames_used = torch.unique(frames)
    rows, row_start, row_size, row_of_pixel = _blocks(nearest_source_index(h, p, device))
    cols, col_start, col_size, col_of_pixel = _blocks(nearest_source_index(w, q, device))
    reduced = labels[frames][:, rows][:, :, cols]  # (C, R, S) peak-frame labels on kept cells
    cells = reduced == ids[:, None, None]  # (C, R, S) bool
    comp = torch.zeros_like(ids)
    if use_cc:
        structure = np.zeros((3, 3, 3), dtype=bool)
        structure[1] = ndimage.generate_binary_structure(2, 1)  # 4-connectivity within a plane only
        cc, num = ndimage.label(cells.cpu().numpy(), structure=structure)  # raster order of (plane, y, x)
        cc = torch.from_numpy(cc).to(device).long().flatten()  # (C*R*S,) 0 = background
        plane_of = torch.zeros(num + 1, dtype=torch.long, device=device)
        plane_of.scatter_(0, cc, torch.arange(cc.numel(), device=device) // (cells.shape[1] * cells.shape[2]))
        comp_ids = torch.arange(1, num + 1, device=device)
        plane = plane_of[1:]  # (num,) cluster (plane) of each component
        first = torch.full((len(ids),), num + 1, dtype=torch.long, device=device)
        first.scatter_reduce_(0, plane, comp_ids, reduce="amin")
        cells = cc.reshape(cells.shape)[plane] == comp_ids[:, None, None]  # (num, R, S)
        comp = comp_ids - first[plane]
        frames, ids = frames[plane], ids[plane]
    return _Entities(
        cells, frames, ids, comp, peak_frames_used, row_start, row_size, col_start, col_size, row_of_pixel, col_of_pixel
    )


def exact_pixel_points(pixels: np.ndarray, n: int, n_init: int = 1) -> np.ndarray:
    """The research rule for one entity (REFERENCE.md 8.2 step 3 with fixes 10 and 11).

    pixels: (M, 2) int (y, x) in row-major order, M >= n -> (n, 2) int64 (y, x): scikit-learn
    `KMeans(n_clusters=n, n_init=n_init, random_state=42)` on the coordinates, then for each centre
    (sklearn's order) the closest pixel, squared distances rounded to 1e-9 and the first pixel in
    row-major order on ties."""
    from sklearn.cluster import KMeans

    pixels = np.asarray(pixels, dtype=np.int64)
    centres = KMeans(n_clusters=n, n_init=n_init, random_state=42).fit(pixels.astype(np.float64)).cluster_centers_
    out = np.empty((n, 2), dtype=np.int64)
    for i, c in enumerate(centres):
        d2 = np.round(((pixels - c) ** 2).sum(axis=1), 9)
        out[i] = pixels[int(np.argmin(d2))]
    return out


def _sample_exact(ent: _Entities, n: int, small: torch.Tensor, n_init: int) -> list[np.ndarray]:
    """Per entity (y, x) int64 points: all pixels when small, else `exact_pixel_points`."""
    out = []
    for e in range(ent.cells.shape[0]):
        pixels = np.argwhere(ent.full_mask(e))  # (M, 2) (y, x) row-major
        out.append(pixels if bool(small[e]) else exact_pixel_points(pixels, n, n_init))
    return out


def _fast_samples(ent: _Entities, area: torch.Tensor, small: torch.Tensor, target: int):
    """Weighted sub-block samples of every entity, batched.

    -> pos (E, M, 2) float (y, x) centroid of each sub-block, weight (E, M) float (pixel count,
    0 = padding). Each entity's cells are split into sy x sx sub-blocks with sy*sx*cells ~ target;
    small entities (and any whose cells hold fewer pixels than the target) are split into pixels.
    """
    e, r, s = ent.cells.shape
    device = ent.cells.device
    ncell = ent.cells.flatten(1).sum(1)  # (E,)
    hmax, wmax = int(ent.row_size.max()), int(ent.col_size.max())
    per_cell = target / ncell.clamp_min(1).double()
    aspect = ent.row_size.double().mean() / ent.col_size.double().mean()  # square-ish sub-blocks
    sy = (per_cell * aspect).sqrt().round().clamp(1, hmax).long()
    sx = (per_cell / sy).round().clamp(1, wmax).long()
    whole = small | (area <= target)  # every pixel is its own sample
    sy = torch.where(whole, torch.full_like(sy, hmax), sy)
    sx = torch.where(whole, torch.full_like(sx, wmax), sx)
    per = sy * sx  # (E,) sub-blocks per cell
    m = int((ncell * per).max())
    flat = torch.arange(m, device=device)[None, :]  # (1, M)
    rank = flat // per[:, None]  # (E, M) which of the entity's cells
    sub = flat % per[:, None]
    u, v = sub // sx[:, None], sub % sx[:, None]
    # member cells first, in raster order
    cell_order = torch.argsort((~ent.cells).flatten(1).to(torch.uint8), dim=1, stable=True)  # (E, R*S)
    cell = cell_order.gather(1, rank.clamp_max(r * s - 1))  # (E, M)
    ci, cj = cell // s, cell % s
    h, w = ent.row_size[ci], ent.col_size[cj]
    y0 = ent.row_start[ci] + u * h // sy[:, None]
    y1 = ent.row_start[ci] + (u + 1) * h // sy[:, None]
    x0 = ent.col_start[cj] + v * w // sx[:, None]
    x1 = ent.col_start[cj] + (v + 1) * w // sx[:, None]
    weight = ((y1 - y0) * (x1 - x0)).double() * (rank < ncell[:, None])
    pos = torch.stack([(y0 + y1 - 1) / 2, (x0 + x1 - 1) / 2], dim=-1).double()  # (E, M, 2)
    return pos, weight


def _snap(ent: _Entities, centres: torch.Tensor) -> torch.Tensor:
    """centres (E, n, 2) float (y, x) -> (E, n, 2) int64 nearest member pixel (ties: first cell in
    raster order, nearest-integer rounding half up inside a cell)."""
    e, r, s = ent.cells.shape
    ys0, ys1 = ent.row_start.double(), (ent.row_start + ent.row_size - 1).double()  # (R,)
    xs0, xs1 = ent.col_start.double(), (ent.col_start + ent.col_size - 1).double()  # (S,)
    cy = centres[..., 0:1].add(0.5).floor()  # (E, n, 1)
    cx = centres[..., 1:2].add(0.5).floor()
    py = torch.minimum(torch.maximum(cy, ys0), ys1)  # (E, n, R)
    px = torch.minimum(torch.maximum(cx, xs0), xs1)  # (E, n, S)
    d2 = (py - centres[..., 0:1])[..., :, None] ** 2 + (px - centres[..., 1:2])[..., None, :] ** 2  # (E, n, R, S)
    d2 = d2.masked_fill(~ent.cells[:, None], float("inf")).flatten(2)
    best = d2.argmin(dim=2)  # (E, n)
    yi, xi = best // s, best % s
    return torch.stack([py.gather(2, yi[..., None])[..., 0], px.gather(2, xi[..., None])[..., 0]], dim=-1).long()


def _sample_fast(
    ent: _Entities, n: int, small: torch.Tensor, area: torch.Tensor, samples: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """All entities at once -> points (E, n, 2) int64 (y, x), valid (E, n) bool (small entities
    keep all their pixels, fewer than n, in row-major order)."""
    pos64, weight = _fast_samples(ent, area, small, samples)  # (E, M, 2), (E, M)
    pos, weight = pos64.float(), weight.float()
    e, m, _ = pos.shape
    valid = weight > 0

    def sqdist_to(point: torch.Tensor) -> torch.Tensor:  # (E, 2) -> (E, M) squared distance of every sample
        return (pos[..., 0] - point[:, None, 0]) ** 2 + (pos[..., 1] - point[:, None, 1]) ** 2

    # deterministic farthest-point start: the sample closest to the weighted centroid, then maximin
    mean = (pos * weight[..., None]).sum(1) / weight.sum(1).clamp_min(1)[:, None]  # (E, 2)
    nxt = sqdist_to(mean).masked_fill(~valid, float("inf")).argmin(1)  # (E,)
    idx = [nxt]
    mind = torch.full((e, m), float("inf"), device=pos.device)
    for _ in range(1, n):
        mind = torch.minimum(mind, sqdist_to(pos.gather(1, nxt[:, None, None].expand(-1, 1, 2))[:, 0]))
        nxt = mind.masked_fill(~valid, -1.0).argmax(1)
        idx.append(nxt)
    centres = pos.gather(1, torch.stack(idx, 1)[..., None].expand(-1, -1, 2))  # (E, n, 2)
    onehot = torch.empty(e, m, n, dtype=pos.dtype, device=pos.device)
    for _ in range(FAST_MAX_ITER):
        # nearest centre: argmin over k of |c_k|^2 - 2 p.c_k (|p|^2 is the same for every k)
        score = torch.baddbmm((centres**2).sum(-1)[:, None, :], pos, centres.transpose(1, 2), alpha=-2)  # (E, M, n)
        onehot.zero_().scatter_(2, score.argmin(-1, keepdim=True), weight[..., None])
        mass = onehot.sum(1)  # (E, n)
        new = (onehot.transpose(1, 2) @ pos) / mass.clamp_min(1e-12)[..., None]
        new = torch.where(mass[..., None] > 0, new, centres)  # an empty centre stays put
        shift = (new - centres).abs().max()
        centres = new
        if bool(shift < 1e-2):
            break
    pts = _snap(ent, centres.double())  # (E, n, 2)
    pos = pos64
    # small entities: their first `area` samples in row-major order are all their pixels
    raster = (pos[..., 0] * 1e6 + pos[..., 1]).masked_fill(~valid, float("inf"))
    first = raster.argsort(dim=1, stable=True)[:, :n] if m >= n else raster.argsort(dim=1, stable=True)
    pix = pos.gather(1, first[..., None].expand(-1, -1, 2)).long()  # (E, <=n, 2)
    if pix.shape[1] < n:
        pix = torch.cat([pix, pix.new_zeros(e, n - pix.shape[1], 2)], dim=1)
    slot = torch.arange(n, device=pos.device)[None, :]
    pts = torch.where(small[:, None, None], pix, pts)
    ok = torch.where(small[:, None], slot < area[:, None], torch.ones_like(slot, dtype=torch.bool))
    key = (pts[..., 0] * (1 << 20) + pts[..., 1]).masked_fill(~ok, 1 << 62)  # row-major within an entity
    perm = key.argsort(dim=1, stable=True)
    return pts.gather(1, perm[..., None].expand(-1, -1, 2)), ok.gather(1, perm)


def _filter_close(xy: torch.Tensor, t: torch.Tensor, min_dist: float) -> torch.Tensor:
    """Greedy in order: keep a point unless it is closer than min_dist to an earlier kept point of
    the same query frame. xy (N, 2), t (N,) -> keep (N,) bool. Solved as the fixed point of
    keep[i] = not any(conflict[i, j] and keep[j], j < i) (reached after at most N sweeps)."""
    n = xy.shape[0]
    d = torch.cdist(xy.double(), xy.double())
    earlier = torch.ones(n, n, dtype=torch.bool, device=xy.device).tril(-1)
    conflict = ((d < min_dist) & (t[:, None] == t[None, :]) & earlier).double()  # (N, N) [i, j]: j before i
    keep = torch.ones(n, dtype=torch.bool, device=xy.device)
    for _ in range(n):
        new = (conflict @ keep.double()) == 0
        if bool((new == keep).all()):
            break
        keep = new
    return keep


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
) -> QueryPoints:
    """Query points for one video (REFERENCE.md 8-10).

    labels: (K, P, Q) int64 cluster ids of the K clustering frames; cluster_frames: (K,) int64
    index of each clustering frame in the tracked clip; clip_size: (H, W) clip pixels.
    Every present cluster is sampled once, in its peak frame: `num_points_per_entity` points, or
    all its pixels when it has fewer (`<`); with `use_connected_components` every 4-connected
    component gets the full count, or all its pixels when it has at most that many (`<=`), and
    obj_ids are contiguous per (cluster id, component). `sampler`: "fast" (batched, default) or
    "exact" (research-exact; `n_init` is its KMeans n_init, 10 = scikit-learn <= 1.3 default);
    `fast_samples`: weighted samples per entity for "fast" (more = closer to exact, slower).
    `min_point_distance` > 0 drops points closer than that (px) to an earlier kept point with the
    same query frame. A cluster whose cells all vanish in a clip smaller than P x Q gets no points;
    N may be 0. Returns `QueryPoints` on the labels' device.
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 3 or labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise ValueError(f"labels must be an integer (K, P, Q) tensor, got {labels.dtype} {tuple(labels.shape)}")
    labels = labels.long()
    if labels.numel() == 0 or bool((labels < 0).any()):
        raise ValueError("labels must be non-empty with non-negative cluster ids")
    device = labels.device
    cluster_frames = torch.as_tensor(cluster_frames, device=device).long()
    if cluster_frames.shape != (labels.shape[0],):
        raise ValueError(f"cluster_frames must have shape ({labels.shape[0]},), got {tuple(cluster_frames.shape)}")
    h, w = (int(v) for v in clip_size)
    if h < 1 or w < 1:
        raise ValueError(f"clip_size must be positive (H, W), got {tuple(clip_size)}")
    n = num_points_per_entity
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"num_points_per_entity must be a positive int, got {n!r}")
    n = int(n)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if min_point_distance < 0:
        raise ValueError(f"min_point_distance must be >= 0, got {min_point_distance}")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    if fast_samples < n:
        raise ValueError(f"fast_samples must be >= num_points_per_entity ({n}), got {fast_samples}")

    ent = _entities(labels, (h, w), use_connected_components)
    area = ent.area()  # (E,)
    small = area <= n if use_connected_components else area < n  # take all pixels (REFERENCE.md 8.2 / 9)
    if sampler == "exact":
        groups = _sample_exact(ent, n, small, n_init)
        counts = torch.tensor([len(g) for g in groups], dtype=torch.long, device=device)
        yx = torch.from_numpy(np.concatenate(groups).reshape(-1, 2)).to(device)  # (N, 2)
        entity = torch.repeat_interleave(torch.arange(len(groups), device=device), counts)
    else:
        pts, ok = _sample_fast(ent, n, small, area, fast_samples)  # (E, n, 2), (E, n)
        yx = pts[ok]
        entity = torch.arange(pts.shape[0], device=device)[:, None].expand_as(ok)[ok]

    frame, cluster, comp = ent.frame[entity], ent.cluster[entity], ent.comp[entity]
    if use_connected_components:
        ncomp = torch.zeros(int(labels.max()) + 1, dtype=torch.long, device=device)
        ncomp.scatter_reduce_(0, ent.cluster, ent.comp + 1, reduce="amax")  # per cluster id
        offset = ncomp.cumsum(0) - ncomp  # ascending cluster id
        obj = offset[cluster] + comp
    else:
        obj = cluster
    if legacy_query_frames:
        t = cluster_frames[torch.searchsorted(ent.peak_frames, frame)]  # research bug: rank of the peak frame
    else:
        t = cluster_frames[frame]
    queries = torch.stack([t.float(), yx[:, 1].float(), yx[:, 0].float()], dim=1)  # (N, 3) (t, x, y)
    dropped = 0
    if min_point_distance > 0 and queries.shape[0] > 0:
        keep = _filter_close(queries[:, 1:], t, float(min_point_distance))
        dropped = int((~keep).sum())
        queries, obj, frame, cluster, comp = queries[keep], obj[keep], frame[keep], cluster[keep], comp[keep]
    return QueryPoints(queries, obj, frame, cluster, comp, dropped)


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
