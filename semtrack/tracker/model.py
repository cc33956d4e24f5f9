"""CoTracker3 offline model (`CoTrackerThreeOffline`), written from ARCHITECTURE.md sec. 2-5.

Module and parameter names match the official `scaled_offline.pth` state dict exactly, so that
checkpoint loads with `strict=True`. Coordinates use pixel centres at integers (align_corners=True)
everywhere; "feature units" are model-input pixels / `stride`.

The forward pass is split so callers can reuse work: `encode` (per-frame encoder, chunked over
frames) -> `pyramid` -> `track` (iterative refinement). The backward-tracking pass of the
predictor reuses the forward pass's pyramid flipped in time instead of re-encoding the frames.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .encoder import BasicEncoder
from .updateformer import EfficientUpdateFormer, Mlp


def time_embedding_table(length: int, dim: int) -> np.ndarray:
    """1-D sin/cos table (1, length, dim) float64: columns [0, dim/2) sin, [dim/2, dim) cos."""
    pos = np.arange(length, dtype=np.float64)
    omega = 1.0 / 10000.0 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angle = pos[:, None] * omega[None, :]
    return np.concatenate([np.sin(angle), np.cos(angle)], axis=1)[None]


def _normalise(coord: torch.Tensor, size: int) -> torch.Tensor:
    """Pixel coordinate (centres at integers) -> grid_sample's [-1, 1] with align_corners=True."""
    return 2.0 * coord / max(size - 1, 1) - 1.0


class CoTrackerThreeOffline(nn.Module):
    """The offline CoTracker3 model that the official hub entry `cotracker3_offline` builds.

    `forward(video (B, T, 3, H, W) float in [0, 255], queries (B, N, 3) (t, x, y) model-input
    pixels, iters)` -> coords (B, T, N, 2) model-input pixels, vis (B, T, N) and conf (B, T, N)
    probabilities. H and W must be multiples of `stride`.

    `encoder_chunk` bounds how many frames go through the encoder at once (memory for long clips);
    it does not change the result.
    """

    def __init__(
        self,
        stride: int = 4,
        corr_radius: int = 3,
        corr_levels: int = 4,
        window_len: int = 60,
        num_virtual_tracks: int = 64,
        model_resolution: tuple[int, int] = (384, 512),
        latent_dim: int = 128,
        encoder_chunk: int = 200,
    ):
        super().__init__()
        self.stride = stride
        self.corr_radius = corr_radius
        self.corr_levels = corr_levels
        self.model_resolution = tuple(model_resolution)
        self.encoder_chunk = encoder_chunk
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

    # ----------------------------------------------------------------------------- features
    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) float in [0, 255] -> L2-normalised features (B, T, C, H/s, W/s) float32."""
        b, t, _, h, w = video.shape
        if h % self.stride or w % self.stride:
            raise ValueError(f"video size {h}x{w} must be a multiple of the stride {self.stride}")
        frames = video.reshape(b * t, 3, h, w)
        fmaps = None
        for start in range(0, b * t, self.encoder_chunk):
            x = 2 * (frames[start : start + self.encoder_chunk] / 255.0) - 1.0
            f = self.fnet(x).float()  # (M, C, h/s, w/s)
            sq = torch.sum(f * f, dim=1, keepdim=True)
            if fmaps is None:
                fmaps = f.new_empty(b * t, *f.shape[1:])
            fmaps[start : start + len(f)] = f / torch.sqrt(torch.clamp(sq, min=1e-12))
        return fmaps.view(b, t, *fmaps.shape[1:])

    def pyramid(self, fmaps: torch.Tensor) -> list[torch.Tensor]:
        """(B, T, C, h, w) -> `corr_levels` maps, level l is 2x2-average-pooled l times (not renormalised)."""
        b, t = fmaps.shape[:2]
        levels = [fmaps]
        for _ in range(self.corr_levels - 1):
            prev = levels[-1]
            pooled = F.avg_pool2d(prev.reshape(b * t, *prev.shape[2:]), 2, stride=2)
            levels.append(pooled.view(b, t, *pooled.shape[1:]))
        return levels

    def query_features(self, fmap: torch.Tensor, frame: torch.Tensor, xy: torch.Tensor) -> torch.Tensor:
        """Patch features around the queries in their query frame.

        fmap (B, T, C, h, w); frame (B, N) int64; xy (B, N, 2) in this level's pixels
        -> (B, C, N, P) with P = patch^2 in (x offset, y offset) order.
        """
        b, t, _, h, w = fmap.shape
        pts = xy[:, :, None, :] + self.patch_offsets  # (B, N, P, 2)
        tt = frame.to(pts.dtype)[:, :, None, None].expand(*pts.shape[:3], 1)
        grid = torch.cat([_normalise(pts[..., :1], w), _normalise(pts[..., 1:], h), _normalise(tt, t)], dim=-1)
        out = F.grid_sample(
            fmap.transpose(1, 2), grid[:, :, :, None, :], mode="bilinear", padding_mode="border", align_corners=True
        )  # (B, C, N, P, 1)
        return out[..., 0]

    def corr_volume(self, fmap: torch.Tensor, track_feat: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
        """4-D correlation between patches around the current coords and the query patches.

        fmap (B, T, C, h, w); track_feat (B, C, N, P); coords (B, T, N, 2) in this level's pixels
        -> (B, N, T, P, P) indexed [.., s, s'] with s the frame patch and s' the query patch.
        """
        b, t, c, h, w = fmap.shape
        n = coords.shape[2]
        pts = coords.reshape(b * t, n, 1, 2) + self.patch_offsets  # (B*T, N, P, 2)
        grid = torch.cat([_normalise(pts[..., :1], w), _normalise(pts[..., 1:], h)], dim=-1)
        patches = F.grid_sample(
            fmap.reshape(b * t, c, h, w), grid, mode="bilinear", padding_mode="border", align_corners=True
        )  # (B*T, C, N, P)
        patches = patches.view(b, t, c, n, -1)
        return torch.einsum("btcns,bcnr->bntsr", patches, track_feat)

    def corr_embedding(
        self, pyramid: list[torch.Tensor], track_feats: list[torch.Tensor], coords: torch.Tensor
    ) -> torch.Tensor:
        """coords (B, T, N, 2) feature units -> corr_mlp embeddings of all levels (B, N, T, 256 * levels)."""
        embs = []
        for level, (fmap, feat) in enumerate(zip(pyramid, track_feats)):
            corr = self.corr_volume(fmap, feat, coords / 2**level)  # (B, N, T, P, P)
            embs.append(self.corr_mlp(corr.flatten(3)).float())
        return torch.cat(embs, dim=-1)

    def motion_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords (B, T, N, 2) feature units -> (B, N, T, 84) encoding of forward/backward frame differences."""
        zero = torch.zeros_like(coords[:, :1])
        fwd = torch.cat([coords[:, :-1] - coords[:, 1:], zero], dim=1)
        bwd = torch.cat([zero, coords[:, 1:] - coords[:, :-1]], dim=1)
        h, w = self.model_resolution
        scale = coords.new_tensor([w / self.stride, h / self.stride])
        r = torch.cat([fwd / scale, bwd / scale], dim=-1).transpose(1, 2)  # (B, N, T, 4)
        freqs = 2.0 ** torch.arange(10, dtype=r.dtype, device=r.device)
        scaled = (r[..., None, :] * freqs[:, None]).flatten(-2)  # (B, N, T, 40), index 4k + c
        return torch.cat([r, torch.sin(scaled), torch.sin(scaled + math.pi / 2)], dim=-1)

    def time_embedding(self, t: int) -> torch.Tensor:
        """The (1, T, D) time embedding: the buffer, linearly resampled (align_corners=False) if T != 60."""
        if t == self.time_emb.shape[1]:
            return self.time_emb
        return F.interpolate(self.time_emb.transpose(1, 2), size=t, mode="linear", align_corners=False).transpose(1, 2)

    # ----------------------------------------------------------------------------- tracking
    def track(self, pyramid: list[torch.Tensor], queries: torch.Tensor, iters: int = 4):
        """Iterative refinement on precomputed features (see `forward` for shapes)."""
        b, t = pyramid[0].shape[:2]
        n = queries.shape[1]
        frame = queries[..., 0].long()  # truncation
        xy = queries[..., 1:].float() / self.stride  # (B, N, 2) feature units
        track_feats = [self.query_features(fmap, frame, xy / 2**lvl) for lvl, fmap in enumerate(pyramid)]
        coords = xy[:, None].expand(b, t, n, 2).clone()  # (B, T, N, 2)
        logits = xy.new_zeros(b, n, t, 2)  # (vis, conf) logits, (B, N, T, 2)
        tau = self.time_embedding(t)[:, None]  # (1, 1, T, D)
        for _ in range(iters):
            corr = self.corr_embedding(pyramid, track_feats, coords)  # (B, N, T, 1024)
            tokens = torch.cat([logits, corr, self.motion_encoding(coords)], dim=-1) + tau
            delta = self.updateformer(tokens).float()  # (B, N, T, 4)
            coords = coords + delta[..., :2].transpose(1, 2)
            logits = logits + delta[..., 2:]
        probs = torch.sigmoid(logits).transpose(1, 2)  # (B, T, N, 2)
        return coords * self.stride, probs[..., 0], probs[..., 1]

    def forward(self, video: torch.Tensor, queries: torch.Tensor, iters: int = 4):
        """video (B, T, 3, H, W) float [0, 255]; queries (B, N, 3) (t, x, y) in input pixels.

        Returns coords (B, T, N, 2) input pixels, vis (B, T, N), conf (B, T, N) float32.
        """
        return self.track(self.pyramid(self.encode(video)), queries, iters)
