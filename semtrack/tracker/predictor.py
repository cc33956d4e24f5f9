"""Offline predictor around the CoTracker3 model (ARCHITECTURE.md sec. 6), batched.

Unlike the official predictor it tracks several clips per call, also of different lengths, sizes
and point counts (`track_many`: padded and masked so that each clip's result is its solo run's),
takes uint8 clips (converted and resized per encoder chunk), can run under bf16 autocast, and
encodes the frames only once when tracking backward (the reversed pass reads the same feature
pyramid in reverse order).

Query frames are validated without a device synchronisation: on the host for CPU query tensors
(ValueError), with `torch._assert_async` for queries already on an accelerator (an invalid frame
then fails as a device-side assert, which ends the CUDA context: pass CPU queries when their
frames are not known to be valid).
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from semtrack.transfer import upload

from .compiled import CompiledRefine, bucket_shape
from .memory import CHUNK_BYTES, ENCODER_CHUNK
from .model import CoTrackerThreeOffline, FeaturePyramid, pass_times

PRECISIONS = ("fp32", "bf16")


def _check_query_frames(frames: torch.Tensor, length: int, what: str) -> None:
    """Query frames (float, any shape) must lie in [0, length - 1]; checked without a device sync."""
    if frames.device.type == "cpu":
        if bool(((frames < 0) | (frames >= length)).any()):
            raise ValueError(f"{what}: query frames must lie in [0, {length - 1}] for a {length}-frame video")
    else:
        torch._assert_async(((frames >= 0) & (frames < length)).all(), f"{what}: query frame outside the video")


class OfflineTracker(nn.Module):
    """CoTracker3 offline predictor; with no arguments, the configuration of hub `cotracker3_offline`.

    `track_many(videos, queries=None, ...)`: a list of clips of any lengths, sizes and point
    counts -> one result per clip, equal to the clip's solo run (see there).

    `__call__(video (B, T, 3, H, W) [0, 255], queries (B, N, 3) (t, x, y) input pixels or None,
    grid_size=0, grid_query_frame=0, segm_mask=None (B|1, 1, H, W), backward_tracking=False)`
    -> tracks (B, T, N, 2) float32 input pixels, visibility (B, T, N) bool.

    Modes (as the official predictor): queries given -> those points plus a 6x6 support grid
    (only when grid_size == 0 or segm_mask is given; dropped from the output); queries None and
    grid_size > 0 -> a grid_size^2 grid at frame `grid_query_frame` (filtered by batch element 0's
    segm_mask, which then also adds the support grid); neither -> dense mode (sec. 6.6).

    precision: "fp32" (reference, matches the official outputs) or "bf16" (autocast; sampling
    coordinates, the coordinate/logit state, the feature pyramid and the normalisations stay
    float32). bf16 is meant for CUDA: on CPUs without native bf16 convolutions it is much slower.
    How a call chunks its work is an argument of `track_many` (`encoder_chunk`, `chunk_bytes`), so one
    tracker serves calls of any size; the other entry points use the defaults of `memory.py`.
    interp_shape: (H, W), multiples of 4, the frames are resized to; default the model resolution
    (384, 512). Other sizes leave the official configuration (the motion features keep their
    384x512 constants), so outputs then differ from the official predictor's.
    weights_id: what the model's weights are (`weights.resolve_weights`: "hub:...", "file:<path>", ...).

    `compile_buckets()` turns on the compiled refinement (`compiled.py`): `track_many` then pads every
    call to its bucket (`bucket_shape`) and runs one compiled graph per bucket; `compiled.counts`
    holds the compilations. The other entry points stay eager.
    """

    def __init__(
        self,
        model: CoTrackerThreeOffline | None = None,
        iters: int = 6,
        support_grid_size: int = 6,
        vis_threshold: float = 0.9,
        precision: str = "fp32",
        interp_shape: tuple[int, int] | None = None,
        weights_id: str | None = None,
    ):
        super().__init__()
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model = model if model is not None else CoTrackerThreeOffline()
        self.interp_shape = tuple(interp_shape) if interp_shape is not None else self.model.model_resolution
        self.iters = iters
        self.support_grid_size = support_grid_size
        self.vis_threshold = vis_threshold
        self.precision = precision
        self.weights_id = weights_id
        self.compiled: CompiledRefine | None = None

    def compile_buckets(self, inner=None) -> OfflineTracker:
        """Run `track_many`'s refinement compiled, one graph per bucket (`compiled.CompiledRefine`,
        `inner` its compiler: inductor by default); returns self."""
        self.compiled = CompiledRefine(self.model, inner)
        return self

    def padded_shape(self, clips: int, frames: int, points: int) -> tuple[int, int, int]:
        """(clips, frames, points incl. the support grid) a `track_many` call runs at: its bucket when
        compiled, else as given."""
        return bucket_shape(clips, frames, points) if self.compiled is not None else (clips, frames, points)

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

    def _scales(self, sizes: Sequence[tuple[int, int]], device, inverse: bool = False) -> torch.Tensor:
        """Align-corners factors (B, 1, 2) float32 (sx, sy) per clip size (H, W): input -> model
        pixels, or back if `inverse`."""
        hm, wm = self.interp_shape
        if inverse:
            factors = [[(w - 1) / (wm - 1), (h - 1) / (hm - 1)] for h, w in sizes]
        else:
            factors = [[(wm - 1) / (w - 1), (hm - 1) / (h - 1)] for h, w in sizes]
        return upload(torch.tensor(factors, dtype=torch.float32), device)[:, None]

    def _support(self, b: int, device) -> torch.Tensor:
        """The (B, 36, 3) support grid queries (t = 0) in model pixels."""
        grid = upload(self.grid_points(self.support_grid_size), device)
        return torch.cat([torch.zeros_like(grid[:, :1]), grid], dim=1)[None].expand(b, -1, -1)

    def _passes(self, pyramid: FeaturePyramid, queries: torch.Tensor, point_valid, backward: bool,
                chunk_bytes: int | None = CHUNK_BYTES, compiled: CompiledRefine | None = None):
        """Model pass(es) on a pyramid; queries (B, N, 3) model pixels, t in clip time.

        Returns coords (B, T, N, 2) model pixels and vis probabilities (B, T, N), with frames
        before each query frame taken from the backward pass when `backward`. The backward pass
        tracks every clip reversed within its own length. chunk_bytes: see `track_many`. With
        `compiled`, the passes run it.
        """
        coords, vis, _ = self.model.track(pyramid, queries, self.iters, point_valid, chunk_bytes=chunk_bytes,
                                          refine=compiled)
        if backward:
            t = pyramid.num_frames
            lengths = upload(torch.tensor(pyramid.lengths, dtype=queries.dtype), queries.device)[:, None]
            rev = queries.clone()
            rev[..., 0] = lengths - 1 - queries[..., 0]
            coords_b, vis_b, _ = self.model.track(pyramid, rev, self.iters, point_valid, reverse=True,
                                                chunk_bytes=chunk_bytes, refine=compiled)
            back = pass_times(pyramid.lengths, t, True, queries.device).T  # (B, T) pass time of clip frame t
            clip = torch.arange(pyramid.batch, device=queries.device)[:, None]
            frames = torch.arange(t, device=queries.device, dtype=queries.dtype)
            before = frames[None, :, None] < queries[:, None, :, 0]  # (B, T, N)
            coords = torch.where(before[..., None], coords_b[clip, back], coords)
            vis = torch.where(before, vis_b[clip, back], vis)
        return coords, vis

    def _run(self, clips: Sequence[torch.Tensor], queries: torch.Tensor, point_valid, backward: bool,
             encoder_chunk: int = ENCODER_CHUNK, chunk_bytes: int | None = CHUNK_BYTES, num_frames: int = 0,
             compiled: CompiledRefine | None = None):
        """Encode `clips` once and track queries (B, N, 3) model pixels -> coords, vis (see `_passes`).

        queries may hold more rows than clips (a compiled call's padding clips, one zero frame each);
        the pyramid holds at least `num_frames` frames; `compiled`: the passes' refinement."""
        with self._autocast(queries.device):
            pyramid = self.model.encode_clips(clips, self.interp_shape, encoder_chunk, num_frames, len(queries))
            return self._passes(pyramid, queries, point_valid, backward, chunk_bytes, compiled)

    def _finish(self, coords, vis, queries, scale):
        """Threshold, overwrite each query frame with the query, rescale to input pixels.

        coords (B, T, N, 2), vis (B, T, N), queries (B, N, 3), all at model resolution; scale
        (B, 1, 2) model -> input pixels. Returns tracks (B, T, N, 2) float32, visible (B, T, N) bool.
        """
        b, _, n = vis.shape
        visible = vis > self.vis_threshold
        frame = queries[..., 0].long()[:, None, :]  # (B, 1, N)
        coords = coords.scatter(1, frame[..., None].expand(b, 1, n, 2), queries[:, None, :, 1:].to(coords.dtype))
        visible = visible.scatter(1, frame, True)
        return coords * scale[:, None], visible

    # ----------------------------------------------------------------------------- many clips
    @torch.no_grad()
    def track_many(
        self,
        videos: Sequence[torch.Tensor],
        queries: Sequence[torch.Tensor] | None = None,
        grid_size: int = 0,
        grid_query_frame: int = 0,
        backward_tracking: bool = True,
        return_probs: bool = False,
        *,
        encoder_chunk: int = ENCODER_CHUNK,
        chunk_bytes: int | None = CHUNK_BYTES,
    ) -> list[tuple[torch.Tensor, ...]]:
        """Track points in several clips at once; each clip's result equals its solo run.

        videos: clips (T_i, 3, H_i, W_i), uint8 or float with values 0..255, on the tracker's
        device; lengths, sizes and point counts may all differ. queries: per clip (N_i, 3) float
        (t, x, y), t a frame index, x, y in that clip's pixels (queries mode: plus each clip's own
        6x6 support grid); or None with grid_size > 0 (grid mode: grid_size^2 points at frame
        grid_query_frame of every clip, no support grid). backward_tracking: frames before a
        query frame come from tracking the clip reversed (within its own length).
        encoder_chunk: frames (over all clips of the call) per encoder call; bounds the encoder's
        memory (about 50 MB of activations per 384x512 frame in fp32). chunk_bytes: intermediates of
        one chunk of the correlation and transformer steps (None: no chunking; larger chunks mean
        fewer kernel launches). Neither changes the result (`memory.estimate_tracking_bytes` takes
        the same two).

        Returns per clip (tracks (T_i, N_i, 2) float32 clip pixels, visible (T_i, N_i) bool), plus
        probs (T_i, N_i) float32 with return_probs: the visibility probability after the
        forward/backward merge, before the threshold (and before the query frame is forced
        visible). The clips are padded to the longest clip and the most points, with padded frames
        and points masked out, so one call runs one set of kernels for all of them.
        """
        clips = self._check_clips(videos)
        device = clips[0].device
        lengths = [c.shape[0] for c in clips]
        sizes = [tuple(c.shape[-2:]) for c in clips]
        if queries is not None:
            user, point_valid = self._user_queries(clips, queries, support=grid_size == 0)
            counts = [len(q) for q in queries]
        elif grid_size > 0:
            if not 0 <= grid_query_frame < min(lengths):
                raise ValueError(f"grid_query_frame={grid_query_frame} outside [0, {min(lengths) - 1}]")
            points = upload(self.grid_points(grid_size), device)
            user = torch.cat([torch.full_like(points[:, :1], float(grid_query_frame)), points], dim=1)
            user, point_valid = user[None].expand(len(clips), -1, -1), None
            counts = [len(points)] * len(clips)
        else:
            raise ValueError("track_many needs queries or grid_size > 0")
        num_frames = 0
        if self.compiled is not None:
            user, point_valid, num_frames = self._pad_to_bucket(user, point_valid, max(lengths),
                                                                support=queries is not None and grid_size == 0)
        coords, vis = self._run(clips, user, point_valid, backward_tracking, encoder_chunk, chunk_bytes, num_frames,
                                self.compiled)
        coords, vis, user = coords[: len(clips)], vis[: len(clips)], user[: len(clips)]
        n = max(counts)
        tracks, visible = self._finish(coords[:, :, :n], vis[:, :, :n], user[:, :n], self._scales(sizes, device, True))
        out = []
        for i, (t, k) in enumerate(zip(lengths, counts)):
            result = (tracks[i, :t, :k], visible[i, :t, :k])
            out.append(result + (vis[i, :t, :k],) if return_probs else result)
        return out

    def _pad_to_bucket(self, user: torch.Tensor, point_valid: torch.Tensor | None, frames: int, support: bool):
        """A compiled call's queries padded to its bucket (`padded_shape`): user (B, N, 3) -> (B', N', 3),
        padding points (0, 0, 0) inserted before the support grid (if `support`) and masked in
        point_valid (B', N') bool (never None); the padding clips' points all valid (their single
        frame of zero features gives finite values, which are dropped). -> (queries, point_valid, T')."""
        b, n = user.shape[:2]
        extra = self.support_grid_size**2 if support else 0
        b_pad, t_pad, n_pad = self.padded_shape(b, frames, n)
        if point_valid is None:
            point_valid = torch.ones(b, n, dtype=torch.bool, device=user.device)
        at = n - extra  # padding goes before the support grid
        user = torch.cat([user[:, :at], user.new_zeros(b, n_pad - n, 3), user[:, at:]], dim=1)
        point_valid = torch.cat([point_valid[:, :at], point_valid.new_zeros(b, n_pad - n), point_valid[:, at:]], dim=1)
        user = torch.cat([user, user.new_zeros(b_pad - b, n_pad, 3)])
        point_valid = torch.cat([point_valid, point_valid.new_ones(b_pad - b, n_pad)])
        return user, point_valid, t_pad

    @staticmethod
    def _check_clips(videos: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        if isinstance(videos, torch.Tensor) or len(videos) == 0:
            raise ValueError("videos must be a non-empty list of (T, 3, H, W) clips")
        for i, clip in enumerate(videos):
            if clip.ndim != 4 or clip.shape[1] != 3 or clip.shape[0] < 1:
                raise ValueError(f"video {i} must be (T, 3, H, W) with T >= 1, got shape {tuple(clip.shape)}")
            if min(clip.shape[-2:]) < 2:
                raise ValueError(f"video {i}: frames must be at least 2x2 pixels, got {tuple(clip.shape[-2:])}")
            if clip.device != videos[0].device:
                raise ValueError(f"video {i} is on {clip.device}, video 0 on {videos[0].device}")
        return list(videos)

    def _user_queries(self, clips, queries: Sequence[torch.Tensor], support: bool):
        """Per-clip queries (N_i, 3) clip pixels -> (B, N', 3) model pixels, padded to the most points
        (padding: (0, 0, 0)) and followed by the support grid if `support`; point_valid (B, N') bool
        or None when nothing is padded."""
        if isinstance(queries, torch.Tensor) or len(queries) != len(clips):
            raise ValueError(f"queries must be a list of {len(clips)} (N, 3) tensors, one per video")
        device = clips[0].device
        for i, (clip, q) in enumerate(zip(clips, queries)):
            if q.ndim != 2 or q.shape[1] != 3:
                raise ValueError(f"queries {i} must be (N, 3) (t, x, y), got shape {tuple(q.shape)}")
            _check_query_frames(q[:, 0], clip.shape[0], f"video {i}")
        counts = [len(q) for q in queries]
        n = max(counts)
        padded = torch.nn.utils.rnn.pad_sequence(
            [q.to(device=device, dtype=torch.float32) for q in queries], batch_first=True
        )  # (B, n, 3)
        scale = self._scales([tuple(c.shape[-2:]) for c in clips], device)
        user = torch.cat([padded[..., :1], padded[..., 1:] * scale], dim=-1)
        point_valid = None
        if any(k != n for k in counts):
            valid = [[j < k for j in range(n)] + [True] * (self.support_grid_size**2 if support else 0) for k in counts]
            point_valid = upload(torch.tensor(valid, dtype=torch.bool), device)
        if support:
            user = torch.cat([user, self._support(len(clips), device)], dim=1)
        return user, point_valid

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
            _check_query_frames(queries[..., 0], t, "video")
            q = queries.to(device=device, dtype=torch.float32)
            q = torch.cat([q[..., :1], q[..., 1:] * self._scales([(h, w)], device)], dim=-1)
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
            q = torch.cat([q, self._support(b, device)], dim=1)  # (B, N + 36, 3)
        coords, vis = self._run(list(video), q, None, backward_tracking)
        return self._finish(coords[:, :, :n], vis[:, :, :n], q[:, :n], self._scales([(h, w)] * b, device, True))

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
        scale = self._scales([(h, w)], video.device)[0]
        back = self._scales([(h, w)] * b, video.device, inverse=True)
        tracks, visible = [], []
        with self._autocast(video.device):
            pyramid = self.model.encode_clips(list(video), self.interp_shape)
        for offset in range(step * step):
            pts = (base + torch.tensor([offset % step, offset // step], dtype=torch.float32)).to(video.device)
            q = torch.cat([torch.full_like(pts[:, :1], float(grid_query_frame)), pts * scale], dim=1)
            q = q[None].expand(b, -1, -1)
            with self._autocast(video.device):
                coords, vis = self._passes(pyramid, q, None, backward)
            out = self._finish(coords, vis, q, back)
            tracks.append(out[0])
            visible.append(out[1])
        return torch.cat(tracks, dim=2), torch.cat(visible, dim=2)
