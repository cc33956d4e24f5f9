"""Offline predictor around the CoTracker3 model (ARCHITECTURE.md sec. 6), batched.

Unlike the official predictor it accepts several equal-length videos per call, can run under
bf16 autocast, and encodes the frames only once when tracking backward (the reversed pass reuses
the forward pass's feature pyramid flipped in time).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .model import CoTrackerThreeOffline

PRECISIONS = ("fp32", "bf16")


class OfflineTracker(nn.Module):
    """CoTracker3 offline predictor; with no arguments, the configuration of hub `cotracker3_offline`.

    `__call__(video (B, T, 3, H, W) float [0, 255], queries (B, N, 3) (t, x, y) input pixels or None,
    grid_size=0, grid_query_frame=0, segm_mask=None (B|1, 1, H, W), backward_tracking=False)`
    -> tracks (B, T, N, 2) float32 input pixels, visibility (B, T, N) bool.

    Modes (as the official predictor): queries given -> those points plus a 6x6 support grid
    (only when grid_size == 0 or segm_mask is given; dropped from the output); queries None and
    grid_size > 0 -> a grid_size^2 grid at frame `grid_query_frame` (filtered by batch element 0's
    segm_mask, which then also adds the support grid); neither -> dense mode (sec. 6.6).

    precision: "fp32" (reference, matches the official outputs) or "bf16" (autocast; sampling
    coordinates, the coordinate/logit state and the normalisations stay float32). bf16 is meant
    for CUDA: on CPUs without native bf16 convolutions it is much slower than fp32.
    encoder_chunk: frames (over the whole batch) per encoder call; bounds the encoder's memory
    (about 50 MB of activations per 384x512 frame in fp32) and does not change the result.
    interp_shape: (H, W), multiples of 4, the frames are resized to; default the model resolution
    (384, 512). Other sizes leave the official configuration (the motion features keep their
    384x512 constants), so outputs then differ from the official predictor's.
    """

    def __init__(
        self,
        model: CoTrackerThreeOffline | None = None,
        iters: int = 6,
        support_grid_size: int = 6,
        vis_threshold: float = 0.9,
        precision: str = "fp32",
        encoder_chunk: int = 16,
        interp_shape: tuple[int, int] | None = None,
    ):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model = model if model is not None else CoTrackerThreeOffline(encoder_chunk=encoder_chunk)
        self.model.encoder_chunk = encoder_chunk
        self.interp_shape = tuple(interp_shape) if interp_shape is not None else self.model.model_resolution
        self.iters = iters
        self.support_grid_size = support_grid_size
        self.vis_threshold = vis_threshold
        self.precision = precision

    # ----------------------------------------------------------------------------- helpers
    def grid_points(self, size: int) -> torch.Tensor:
        """G(size): (size^2, 2) float32 (x, y) model pixels, margin Wm/64, row-major with y outer."""
        hm, wm = self.interp_shape
        if size == 1:
            return torch.tensor([[wm / 2, hm / 2]], dtype=torch.float32)
        margin = wm / 64
        ys = torch.linspace(margin, hm - margin, size)
        xs = torch.linspace(margin, wm - margin, size)
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        return torch.stack([gx, gy], dim=-1).reshape(-1, 2)

    def _autocast(self, device: torch.device):
        if self.precision == "bf16":
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _scale(self, h: int, w: int, device: torch.device, inverse: bool = False) -> torch.Tensor:
        """Align-corners factors (2,) float32 (sx, sy): input -> model pixels, or back if `inverse`."""
        hm, wm = self.interp_shape
        if inverse:
            return torch.tensor([(w - 1) / (wm - 1), (h - 1) / (hm - 1)], dtype=torch.float32, device=device)
        return torch.tensor([(wm - 1) / (w - 1), (hm - 1) / (h - 1)], dtype=torch.float32, device=device)

    def _resize(self, video: torch.Tensor) -> torch.Tensor:
        """(B, T, 3, H, W) -> (B, T, 3, Hm, Wm) float32, bilinear, align_corners=True, no antialias."""
        b, t = video.shape[:2]
        frames = F.interpolate(
            video.reshape(b * t, *video.shape[2:]).float(), size=self.interp_shape, mode="bilinear", align_corners=True
        )
        return frames.view(b, t, *frames.shape[1:])

    def _track(self, pyramid: list[torch.Tensor], queries: torch.Tensor, backward: bool):
        """Model pass(es) on a precomputed pyramid; queries (B, N, 3) model pixels.

        Returns coords (B, T, N, 2) model pixels and vis probabilities (B, T, N), with frames
        before each query frame taken from the backward pass when `backward`.
        """
        t = pyramid[0].shape[1]
        coords, vis, _ = self.model.track(pyramid, queries, self.iters)
        if backward:
            rev = queries.clone()
            rev[..., 0] = t - 1 - queries[..., 0]
            coords_b, vis_b, _ = self.model.track([level.flip(1) for level in pyramid], rev, self.iters)
            frames = torch.arange(t, device=queries.device, dtype=queries.dtype)
            before = frames[None, :, None] < queries[:, None, :, 0]  # (B, T, N)
            coords = torch.where(before[..., None], coords_b.flip(1), coords)
            vis = torch.where(before, vis_b.flip(1), vis)
        return coords, vis

    def _finish(self, coords, vis, queries, h: int, w: int):
        """Threshold, overwrite each query frame with the query, rescale to input pixels.

        coords (B, T, N, 2), vis (B, T, N), queries (B, N, 3), all at model resolution.
        """
        b, _, n = vis.shape
        visible = vis > self.vis_threshold
        frame = queries[..., 0].long()[:, None, :]  # (B, 1, N)
        coords = coords.scatter(1, frame[..., None].expand(b, 1, n, 2), queries[:, None, :, 1:].to(coords.dtype))
        visible = visible.scatter(1, frame, True)
        return coords * self._scale(h, w, coords.device, inverse=True), visible

    # ----------------------------------------------------------------------------- forward
    @torch.no_grad()
    def forward(
        self,
        video: torch.Tensor,
        queries: torch.Tensor | None = None,
        grid_size: int = 0,
        grid_query_frame: int = 0,
        segm_mask: torch.Tensor | None = None,
        backward_tracking: bool = False,
    ):
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be (B, T, 3, H, W), got shape {tuple(video.shape)}")
        b, t, _, h, w = video.shape
        if min(h, w) < 2:
            raise ValueError(f"video frames must be at least 2x2 pixels, got {h}x{w}")
        device = video.device
        if queries is None and grid_size == 0:
            return self._dense(video, grid_query_frame, backward_tracking)
        if queries is not None:
            if queries.ndim != 3 or queries.shape[0] != b or queries.shape[2] != 3:
                raise ValueError(f"queries must be (B={b}, N, 3) (t, x, y), got shape {tuple(queries.shape)}")
            frame = queries[..., 0]
            if bool(((frame < 0) | (frame >= t)).any()):
                raise ValueError(f"query frames must lie in [0, {t - 1}] for a {t}-frame video")
            q = queries.to(device=device, dtype=torch.float32).clone()
            q[..., 1:] = q[..., 1:] * self._scale(h, w, device)
            support = grid_size == 0 or segm_mask is not None
        else:
            if not 0 <= grid_query_frame < t:
                raise ValueError(f"grid_query_frame={grid_query_frame} outside [0, {t - 1}]")
            points = self.grid_points(grid_size)
            if segm_mask is not None:
                points = self._mask_points(points, segm_mask)
            q = torch.cat([torch.full_like(points[:, :1], float(grid_query_frame)), points], dim=1)
            q = q.to(device)[None].expand(b, -1, -1)
            support = segm_mask is not None
        n = q.shape[1]
        if support:
            grid = self.grid_points(self.support_grid_size).to(device)
            extra = torch.cat([torch.zeros_like(grid[:, :1]), grid], dim=1)[None].expand(b, -1, -1)
            q = torch.cat([q, extra], dim=1)  # (B, N + 36, 3)
        resized = self._resize(video)
        with self._autocast(device):
            pyramid = self.model.pyramid(self.model.encode(resized))
            coords, vis = self._track(pyramid, q, backward_tracking)
        return self._finish(coords[:, :, :n], vis[:, :, :n], q[:, :n], h, w)

    def _mask_points(self, points: torch.Tensor, segm_mask: torch.Tensor) -> torch.Tensor:
        """Keep the grid points (P, 2) where batch element 0's mask (resized, nearest) is non-zero."""
        if segm_mask.ndim != 4 or segm_mask.shape[1] != 1:
            raise ValueError(f"segm_mask must be (B, 1, H, W), got shape {tuple(segm_mask.shape)}")
        mask = F.interpolate(segm_mask[:1].float().cpu(), size=self.interp_shape, mode="nearest")[0, 0]
        keep = mask[points[:, 1].round().long(), points[:, 0].round().long()] != 0
        return points[keep]

    def _dense(self, video: torch.Tensor, grid_query_frame: int, backward: bool):
        """Dense mode: an 80-wide grid of every step-th input pixel at every offset (sec. 6.6).

        The frames are encoded once and shared by all step^2 offset passes.
        """
        b, t, _, h, w = video.shape
        step = w // 80
        if step == 0:
            raise ValueError(f"dense mode needs a video at least 80 pixels wide, got width {w}")
        if not 0 <= grid_query_frame < t:
            raise ValueError(f"grid_query_frame={grid_query_frame} outside [0, {t - 1}]")
        gh, gw = h // step, w // step
        ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        base = torch.stack([xs, ys], dim=-1).reshape(-1, 2).float() * step  # (gh*gw, 2) (x, y)
        scale = self._scale(h, w, video.device)
        tracks, visible = [], []
        resized = self._resize(video)
        with self._autocast(video.device):
            pyramid = self.model.pyramid(self.model.encode(resized))
        for offset in range(step * step):
            pts = (base + torch.tensor([offset % step, offset // step], dtype=torch.float32)).to(video.device)
            q = torch.cat([torch.full_like(pts[:, :1], float(grid_query_frame)), pts * scale], dim=1)
            q = q[None].expand(b, -1, -1)
            with self._autocast(video.device):
                coords, vis = self._track(pyramid, q, backward)
            out = self._finish(coords, vis, q, h, w)
            tracks.append(out[0])
            visible.append(out[1])
        return torch.cat(tracks, dim=2), torch.cat(visible, dim=2)
