"""CoTracker3 offline model (`CoTrackerThreeOffline`), written from ARCHITECTURE.md sec. 2-5.

Module and parameter names match the official `scaled_offline.pth` state dict exactly, so that
checkpoint loads with `strict=True`. Coordinates use pixel centres at integers (align_corners=True)
everywhere; "feature units" are model-input pixels / `stride`.

The forward pass is split so callers can reuse work and batch clips of different lengths:
`encode_clips` (per-frame encoder over chunks of frames, padded to the longest clip) -> a
`FeaturePyramid` -> `track` (iterative refinement), which can also run each clip reversed within
its own length (the predictor's backward pass) by indexing the pyramid instead of copying it.
Every intermediate that grows with the clip is computed in chunks (see `memory.py`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from semtrack.transfer import upload

from .encoder import BasicEncoder
from .memory import (
    CHUNK_BYTES,
    CORR_POINT_FRAME_BYTES,
    ENCODER_CHUNK,
    MODEL_RESOLUTION,
    chunk_bounds,
    rows_per_chunk,
)
from .updateformer import EfficientUpdateFormer, Mlp


def time_embedding_table(length: int, dim: int) -> np.ndarray:
    """1-D sin/cos table (1, length, dim) float64: columns [0, dim/2) sin, [dim/2, dim) cos."""
    pos = np.arange(length, dtype=np.float64)
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angle = pos[:, None] * omega[None, :]
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)[None]


def resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(K, 3, H, W) uint8/float -> (K, 3, *size) float32: bilinear, align_corners=True, no antialias
    (the official predictor's resize; skipped when already that size, where it is the identity)."""
    x = frames.float()
    if tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)
    return x


def pass_times(lengths: Sequence[int], t_max: int, reverse: bool, device) -> torch.Tensor:
    """(T, B) int64: the pass time of stored frame t of clip b, reversed within the clip's length
    T_b if `reverse` (padded frames keep their index). The map is its own inverse."""
    rows = [[length - 1 - t if reverse and t < length else t for length in lengths] for t in range(t_max)]
    return upload(torch.tensor(rows, dtype=torch.long), device)


@dataclass
class FeaturePyramid:
    """Per-frame feature maps of a batch of clips, frame-major and padded to the longest clip.

    levels[l]: (T, B, C, h_l, w_l) float32, L2-normalised features (level 0) and their 2x2 average
    pools (levels 1..3); zero at the padded frames t >= lengths[b]. lengths: real frames per clip.
    """

    levels: list[torch.Tensor]
    lengths: list[int]

    @property
    def num_frames(self) -> int:
        return self.levels[0].shape[0]

    @property
    def batch(self) -> int:
        return self.levels[0].shape[1]

    @property
    def padded(self) -> bool:
        return any(t != self.num_frames for t in self.lengths)


def _encoder_chunks(lengths: Sequence[int], chunk: int) -> list[list[tuple[int, int, int]]]:
    """Split every clip's frames, in order, into chunks of <= `chunk` frames: [[(clip, t0, t1), ...], ...]."""
    chunks, current, size = [], [], 0
    for b, length in enumerate(lengths):
        t = 0
        while t < length:
            take = min(length - t, chunk - size)
            current.append((b, t, t + take))
            size, t = size + take, t + take
            if size == chunk:
                chunks.append(current)
                current, size = [], 0
    if current:
        chunks.append(current)
    return chunks


class CoTrackerThreeOffline(nn.Module):
    """The offline CoTracker3 model that the official hub entry `cotracker3_offline` builds.

    `forward(video (B, T, 3, H, W) float in [0, 255], queries (B, N, 3) (t, x, y) model-input
    pixels, iters)` -> coords (B, T, N, 2) model-input pixels, vis (B, T, N) and conf (B, T, N)
    probabilities. H and W must be multiples of `stride`.

    Per call, `encode_clips(..., encoder_chunk)` bounds how many frames go through the encoder at once
    and `track(..., chunk_bytes)` the intermediates of one chunk of the correlation / transformer steps
    (memory for long clips); neither changes the result.
    """

    def __init__(
        self,
        stride: int = 4,
        corr_radius: int = 3,
        corr_levels: int = 4,
        window_len: int = 60,
        num_virtual_tracks: int = 64,
        model_resolution: tuple[int, int] = MODEL_RESOLUTION,
        latent_dim: int = 128,
    ):
        super().__init__()
        self.stride = stride
        self.corr_radius = corr_radius
        self.corr_levels = corr_levels
        self.model_resolution = tuple(model_resolution)
        patch = 2 * corr_radius + 1
        self.input_dim = 2 + corr_levels * 256 + 84  # vis, conf, corr embeddings, motion encoding
        self.register_buffer(
            "time_emb", torch.from_numpy(time_embedding_table(window_len, self.input_dim)).float()
        )
        self.fnet = BasicEncoder(output_dim=latent_dim, stride=stride)
        self.updateformer = EfficientUpdateFormer(
            depth=3, input_dim=self.input_dim, hidden_size=384, num_heads=8, mlp_ratio=4.0,
            num_virtual_tracks=num_virtual_tracks,
        )
        self.corr_mlp = Mlp(patch**4, 384, 256, approximate="none")
        r = torch.arange(-corr_radius, corr_radius + 1, dtype=torch.float32)
        # Patch index s = i * patch + j: i is the x offset, j the y offset (ARCHITECTURE.md 3.3).
        offsets = torch.stack(torch.meshgrid(r, r, indexing="ij"), dim=-1).reshape(-1, 2)  # (49, 2) (dx, dy)
        self.register_buffer("patch_offsets", offsets, persistent=False)
        self.register_buffer("motion_freqs", 2.0 ** torch.arange(10, dtype=torch.float32), persistent=False)
        h, w = self.model_resolution  # the motion deltas' scale: the 384x512 feature size, whatever the input
        self.register_buffer("motion_scale", torch.tensor([w / stride, h / stride]), persistent=False)

    # ----------------------------------------------------------------------------- features
    def _prepare(self, frames: torch.Tensor, size: tuple[int, int] | None) -> torch.Tensor:
        """(K, 3, H, W) uint8/float [0, 255] -> (K, 3, h, w) float32 in [-1, 1], resized to `size` if given."""
        x = frames.float() if size is None else resize_frames(frames, size)
        return 2 * (x / 255.0) - 1.0

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(K, 3, h, w) in [-1, 1] -> pyramid levels of these frames, [(K, C, h/s/2^l, w/s/2^l)] float32."""
        f = self.fnet(x).float()
        sq = torch.sum(f * f, dim=1, keepdim=True)
        levels = [f / torch.sqrt(torch.clamp(sq, min=1e-12))]
        for _ in range(self.corr_levels - 1):
            levels.append(F.avg_pool2d(levels[-1], 2, stride=2))
        return levels

    def encode_clips(self, clips: Sequence[torch.Tensor], size: tuple[int, int] | None = None,
                     encoder_chunk: int = ENCODER_CHUNK, num_frames: int = 0, batch: int = 0) -> FeaturePyramid:
        """Encode every real frame of `clips` ((T_b, 3, H_b, W_b) uint8 or float, values 0..255).

        Frames go through the encoder in chunks of `encoder_chunk` (frames of several clips share a
        chunk); each chunk is converted to float and resized to `size` (H, W) on its own, so no
        full-clip float copy is made. Without `size` every clip must already be the model-input
        size. Padded frames are never encoded. H and W must be multiples of `stride`. The pyramid
        holds at least `num_frames` frames and `batch` clips: the clips after `len(clips)` are
        one-frame stand-ins of zero features (padding of a compiled call's bucket).
        """
        lengths = [int(c.shape[0]) for c in clips]
        lengths += [1] * (batch - len(lengths))
        h, w = tuple(size) if size is not None else tuple(clips[0].shape[-2:])
        if h % self.stride or w % self.stride:
            raise ValueError(f"video size {h}x{w} must be a multiple of the stride {self.stride}")
        if size is None and any(tuple(c.shape[-2:]) != (h, w) for c in clips):
            raise ValueError("clips of different sizes need a common `size` to be resized to")
        t_max, b = max(*lengths, num_frames), len(lengths)
        make = torch.zeros if any(t != t_max for t in lengths) else torch.empty
        levels, hl, wl = [], h // self.stride, w // self.stride
        for _ in range(self.corr_levels):
            levels.append(make(t_max, b, self.fnet.conv3.out_channels, hl, wl, device=clips[0].device))
            hl, wl = hl // 2, wl // 2
        for chunk in _encoder_chunks(lengths[: len(clips)], encoder_chunk):
            x = torch.cat([self._prepare(clips[v][t0:t1], size) for v, t0, t1 in chunk])
            feats = self._features(x)
            start = 0
            for v, t0, t1 in chunk:
                for level, feat in zip(levels, feats):
                    level[t0:t1, v] = feat[start : start + t1 - t0]
                start += t1 - t0
        return FeaturePyramid(levels, lengths)

    def query_features(self, pyramid: FeaturePyramid, frame: torch.Tensor, xy: torch.Tensor) -> list[torch.Tensor]:
        """Patch features around each query in its frame, per level.

        frame (B, N) int64 stored frame; xy (B, N, 2) level-0 feature units -> per level
        (B, N, P, C) with P = patch^2 in (x offset, y offset) order. Bilinear with border clamping
        (the semantics of grid_sample(align_corners=True, padding_mode="border")), read directly
        from each query's frame.
        """
        return self._query_features(pyramid.levels, frame, xy, self._limits(pyramid, xy.dtype, xy.device))

    @staticmethod
    def _limits(pyramid: FeaturePyramid, dtype: torch.dtype, device) -> list[torch.Tensor]:
        """Per level the (2,) largest sampling position (w - 1, h - 1) in that level's feature units."""
        return [upload(torch.tensor([f.shape[-1] - 1, f.shape[-2] - 1], dtype=dtype), device) for f in pyramid.levels]

    def _query_features(self, levels: Sequence[torch.Tensor], frame: torch.Tensor, xy: torch.Tensor,
                        limits: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """`query_features` on the pyramid's `levels` with their `limits` (`_limits`)."""
        clip = torch.arange(levels[0].shape[1], device=frame.device)[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        t = frame[:, :, None, None, None]  # (B, N, 1, 1, 1)
        feats = []
        for level, (fmap, limit) in enumerate(zip(levels, limits)):
            pts = torch.minimum((xy[:, :, None, :] / 2**level + self.patch_offsets).clamp(min=0), limit)  # (B, N, P, 2)
            low = pts.floor()
            frac = pts - low
            low = low.long()
            taps = torch.stack([low, torch.minimum(low + 1, limit.long())], dim=-1)  # (B, N, P, 2 (x, y), 2)
            weight = torch.stack([1 - frac, frac], dim=-1)  # (B, N, P, 2 (x, y), 2)
            corners = fmap[t, clip, :, taps[..., 1, :, None], taps[..., 0, None, :]]  # (B, N, P, 2 (y), 2 (x), C)
            weight = weight[..., 1, :, None] * weight[..., 0, None, :]  # (B, N, P, 2, 2)
            feats.append((corners * weight[..., None]).sum(dim=(3, 4)))
        return feats

    def time_embedding(self, t: int) -> torch.Tensor:
        """The (1, T, D) time embedding: the buffer, linearly resampled (align_corners=False) if T != 60."""
        if t == self.time_emb.shape[1]:
            return self.time_emb
        return F.interpolate(self.time_emb.transpose(1, 2), size=t, mode="linear", align_corners=False).transpose(1, 2)

    def _time_embeddings(self, lengths: Sequence[int], t_max: int) -> torch.Tensor:
        """(B, T, D): clip b's own `time_embedding(T_b)` (as a solo run), zero at padded frames."""
        tables = {t: self.time_embedding(t)[0] for t in sorted(set(lengths))}
        return torch.stack([F.pad(tables[t], (0, 0, 0, t_max - t)) for t in lengths])

    # ----------------------------------------------------------------------------- per-iteration pieces
    def _grid_affine(self, pyramid: FeaturePyramid) -> tuple[torch.Tensor, torch.Tensor]:
        """scale (L, 1, 1, 1, 2) and shift (L, 1, 1, P, 2) taking level-0 feature units xy to the
        grid_sample coordinates of the level-l patch points: grid = xy * scale + shift, i.e.
        (xy / 2^l + offset) normalised to [-1, 1] with align_corners=True."""
        sizes = upload(torch.tensor(
            [[max(f.shape[-1] - 1, 1), max(f.shape[-2] - 1, 1)] for f in pyramid.levels], dtype=torch.float32,
        ), self.patch_offsets.device)[:, None, None, None, :]  # (L, 1, 1, 1, 2) (w - 1, h - 1)
        levels = 2.0 ** torch.arange(len(pyramid.levels), dtype=torch.float32, device=sizes.device)
        return 2.0 / (levels[:, None, None, None, None] * sizes), 2.0 * self.patch_offsets / sizes - 1.0

    def _corr_embeddings(
        self, levels: Sequence[torch.Tensor], track_feats: list[torch.Tensor], grids: torch.Tensor, t0: int, t1: int
    ) -> list[torch.Tensor]:
        """corr_mlp embeddings of the 4-D correlation for stored frames [t0, t1) of every clip.

        track_feats: per level (B*N, C, P) query patches; grids (L, K*B, N, P, 2) grid_sample
        coordinates of the patch points around the current coords of stored frame t0 + k of clip
        b in row k*B + b -> per level (B, N, K, 256).
        """
        k, b = t1 - t0, levels[0].shape[1]
        n = grids.shape[2]
        embs = []
        for fmap, feat, grid in zip(levels, track_feats, grids):
            c, h, w = fmap.shape[2:]
            patches = F.grid_sample(
                fmap[t0:t1].reshape(k * b, c, h, w), grid, mode="bilinear", padding_mode="border", align_corners=True
            )  # (K*B, C, N, P)
            patches = patches.view(k, b, c, n, -1).permute(1, 3, 0, 4, 2).reshape(b * n, -1, c)  # (B*N, K*P, C)
            corr = torch.bmm(patches, feat)  # (B*N, K*P, P): [.., s, s'] frame patch s, query patch s'
            embs.append(self.corr_mlp(corr.view(b, n, k, -1)).float())  # (B, N, K, 256)
        return embs

    def _motion_deltas(self, coords: torch.Tensor, has_next: torch.Tensor | None) -> torch.Tensor:
        """coords (B, T, N, 2) feature units -> (B, T, N, 4) (fwd_x, fwd_y, bwd_x, bwd_y) frame differences
        divided by the 384x512 feature size; fwd is 0 where `has_next` (B, T, 1, 1) is False (each
        clip's last real frame), as at the last frame of a solo run."""
        zero = torch.zeros_like(coords[:, :1])
        fwd = torch.cat([coords[:, :-1] - coords[:, 1:], zero], dim=1)
        if has_next is not None:
            fwd = torch.where(has_next, fwd, 0.0)
        bwd = torch.cat([zero, coords[:, 1:] - coords[:, :-1]], dim=1)
        scale = self.motion_scale.to(coords.dtype)
        return torch.cat([fwd / scale, bwd / scale], dim=-1)

    def _motion_encoding(self, r: torch.Tensor) -> torch.Tensor:
        """(..., 4) motion deltas -> (..., 84): [r, sin(2^k r_c), sin(2^k r_c + pi/2)], index 4k + c."""
        scaled = (r[..., None, :] * self.motion_freqs[:, None]).flatten(-2)  # (..., 40)
        return torch.cat([r, torch.sin(scaled), torch.sin(scaled + math.pi / 2)], dim=-1)

    def _tokens(self, levels, track_feats, grid_affine, coords, state, tau, time_index, t0, t1, z):
        """Write the projected tokens of stored frames [t0, t1) into z (B, T, S, C) at their pass times.

        coords (B, T, N, 2) feature units, state (B, T, N, 6) (vis logit, conf logit, motion deltas),
        tau (B, T, D), all in pass time; time_index (T, B) pass time of each stored frame;
        grid_affine from `_grid_affine`. Returns z (allocated on the first call, in the input
        projection's dtype).
        """
        b, t, n = coords.shape[:3]
        ti = time_index[t0:t1]  # (K, B)
        clip = torch.arange(b, device=ti.device)[None]  # (1, B)
        scale, shift = grid_affine
        grids = coords[clip, ti].reshape(1, -1, n, 1, 2) * scale + shift  # (L, K*B, N, P, 2)
        embs = self._corr_embeddings(levels, track_feats, grids, t0, t1)  # per level (B, N, K, 256)
        rows = state[clip, ti].permute(1, 2, 0, 3)  # (B, N, K, 6)
        tokens = torch.cat([rows[..., :2], *embs, self._motion_encoding(rows[..., 2:])], dim=-1)
        tokens = tokens + tau[clip, ti].transpose(0, 1)[:, None]  # (B, N, K, D)
        out = self.updateformer.input_transform(tokens)  # (B, N, K, C)
        if z is None:
            z = out.new_empty(b, t, n + self.updateformer.num_virtual_tracks, out.shape[-1])
        z[clip, ti, :n] = out.permute(2, 0, 1, 3)
        return z

    # ----------------------------------------------------------------------------- tracking
    def track(
        self,
        pyramid: FeaturePyramid,
        queries: torch.Tensor,
        iters: int = 4,
        point_valid: torch.Tensor | None = None,
        reverse: bool = False,
        chunk_bytes: int | None = CHUNK_BYTES,
        refine=None,
    ):
        """Iterative refinement on precomputed features.

        queries (B, N, 3) (t, x, y): t a frame in this pass's time, x, y model-input pixels.
        point_valid (B, N) bool: False marks padding points, which no other point sees (they are
        masked as context of the virtual tracks, the only place points meet); None: all real.
        reverse: track every clip reversed within its own length (frame t' of the pass is frame
        T_b - 1 - t' of the clip), reading the same pyramid. Padded frames (t >= T_b) are masked
        as keys of the time attention. Each clip's result is that of a solo run. chunk_bytes: the
        intermediates of one chunk of the correlation / transformer steps (None: unchunked).
        refine: a compiled `refine` (`semtrack.tracker.compiled`) to run instead of the eager one;
        it always gets the frame masks, padded or not (one graph per shape).

        Returns coords (B, T, N, 2) model-input pixels, vis (B, T, N), conf (B, T, N) float32, in
        this pass's time; values at padded frames and points are meaningless (finite).
        """
        inputs = self.pass_inputs(pyramid, queries, reverse, masked=refine is not None)
        return (refine or self.refine)(pyramid.levels, *inputs, point_valid, iters, chunk_bytes)

    def pass_inputs(self, pyramid: FeaturePyramid, queries: torch.Tensor, reverse: bool, masked: bool = False):
        """What one pass needs besides the pyramid's levels, from the clips' lengths (host values):
        (stored (B, N) int64 query frame in stored time, xy (B, N, 2) feature units, time_index (T, B)
        int64 pass time of each stored frame, tau (B, T, D) time embeddings in pass time, frame_valid
        (B, T) bool and has_next (B, T, 1, 1) bool or both None when nothing is padded and not
        `masked`, grid_affine (`_grid_affine`), limits (`_limits`))."""
        t_max, device = pyramid.num_frames, queries.device
        lengths = upload(torch.tensor(pyramid.lengths), device)[:, None]  # (B, 1)
        frame = queries[..., 0].long()  # truncation, pass time
        stored = lengths - 1 - frame if reverse else frame
        xy = queries[..., 1:].float() / self.stride  # (B, N, 2) feature units
        limits = self._limits(pyramid, xy.dtype, xy.device)
        time_index = pass_times(pyramid.lengths, t_max, reverse, device)
        tau = self._time_embeddings(pyramid.lengths, t_max)  # (B, T, D)
        frame_valid = has_next = None
        if masked or pyramid.padded:
            steps = torch.arange(t_max, device=device)[None]  # (1, T)
            frame_valid = steps < lengths  # (B, T)
            has_next = (steps < lengths - 1)[:, :, None, None]  # (B, T, 1, 1)
        return stored, xy, time_index, tau, frame_valid, has_next, self._grid_affine(pyramid), limits

    def refine(self, levels: Sequence[torch.Tensor], stored, xy, time_index, tau, frame_valid, has_next,
               grid_affine, limits, point_valid, iters: int, chunk_bytes: int | None):
        """The iterations of `track` on the pyramid's `levels` and `pass_inputs`: tensors in, tensors
        out; the chunks follow from the shapes alone, so one shape runs one graph (`torch.compile`)."""
        t_max, b = levels[0].shape[:2]
        n = xy.shape[1]
        track_feats = [
            f.permute(0, 1, 3, 2).reshape(b * n, f.shape[-1], -1)
            for f in self._query_features(levels, stored, xy, limits)
        ]  # per level (B*N, C, P)
        coords = xy[:, None].expand(b, t_max, n, 2).clone()  # (B, T, N, 2)
        logits = xy.new_zeros(b, t_max, n, 2)  # (vis, conf) logits
        chunks = chunk_bounds(t_max, rows_per_chunk(b * n * CORR_POINT_FRAME_BYTES, chunk_bytes, t_max))
        for _ in range(iters):
            state = torch.cat([logits, self._motion_deltas(coords, has_next)], dim=-1)  # (B, T, N, 6)
            z = None
            for t0, t1 in chunks:
                z = self._tokens(levels, track_feats, grid_affine, coords, state, tau, time_index, t0, t1, z)
            delta = self.updateformer(z, n, frame_valid, point_valid, chunk_bytes)  # (B, T, N, 4)
            coords = coords + delta[..., :2]
            logits = logits + delta[..., 2:]
        probs = torch.sigmoid(logits)
        return coords * self.stride, probs[..., 0], probs[..., 1]

    def forward(self, video: torch.Tensor, queries: torch.Tensor, iters: int = 4):
        """video (B, T, 3, H, W) float [0, 255]; queries (B, N, 3) (t, x, y) in input pixels.

        Returns coords (B, T, N, 2) input pixels, vis (B, T, N), conf (B, T, N) float32.
        """
        return self.track(self.encode_clips(list(video)), queries, iters)
