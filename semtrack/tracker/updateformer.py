"""Update transformer of CoTracker3 (`updateformer.*`, ARCHITECTURE.md sec. 5).

Tokens are laid out (B, T, S, C): T frames, S = N point tracks followed by the virtual tracks.
Attention uses `F.scaled_dot_product_attention` (softmax over the context axis, scale 48^-0.5),
with a boolean mask (True = attend) where clips of a batch are padded.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .memory import TOKEN_BYTES, chunk_bounds, rows_per_chunk


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2; `approximate` is "tanh" in the transformer, "none" (erf) in corr_mlp."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, approximate: str):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU(approximate=approximate)
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head attention: x (M, L, C) attends to context c (M, S, C) -> (M, L, C).

    `to_kv` packs K (channels 0..C-1) then V; head h uses channels [h*d, (h+1)*d). mask: None or
    (M, 1, 1, S) bool, False = context entry ignored.
    """

    def __init__(self, dim: int = 384, num_heads: int = 8):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        m, length, dim = x.shape
        heads = self.num_heads
        q = self.to_q(x).view(m, length, heads, dim // heads).transpose(1, 2)  # (M, h, L, d)
        k, v = self.to_kv(context).view(m, context.shape[1], 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (M, h, L, d)
        return self.to_out(out.transpose(1, 2).reshape(m, length, dim))


class AttnBlock(nn.Module):
    """Pre-norm self-attention block (non-affine LayerNorm, eps 1e-6): (M, L, C) -> (M, L, C)."""

    def __init__(self, dim: int = 384, num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, approximate="tanh")

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h, mask)
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Pre-norm cross-attention block: x (M, L, C) attends to context (M, S, C) -> (M, L, C).

    The context goes through the only affine LayerNorm of the model (`norm_context`, eps 1e-5).
    """

    def __init__(self, dim: int = 384, num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_context = nn.LayerNorm(dim)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, approximate="tanh")

    def forward(self, x: torch.Tensor, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.cross_attn(self.norm1(x), self.norm_context(context), mask)
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """Projected tokens (B, T, S, hidden) -> (B, T, N, 4) updates (dx, dy, dvis, dconf).

    Each layer: time self-attention over every track (points and the 64 virtual tracks), then per
    frame virtual<-point cross, virtual self, point<-virtual cross attention. The caller projects
    the 1110-wide tokens with `input_transform` into the buffer; `forward` runs the layers on it
    in place, over chunks of tracks (time attention) and of frames (space attention) so that one
    chunk's intermediates stay near `chunk_bytes`. All of these ops are row-wise, so chunking
    does not change the result.
    """

    def __init__(
        self,
        depth: int = 3,
        input_dim: int = 1110,
        hidden_size: int = 384,
        num_heads: int = 8,
        mlp_ratio: float = 4.0,
        num_virtual_tracks: int = 64,
    ):
        super().__init__()
        self.num_virtual_tracks = num_virtual_tracks
        self.virual_tracks = nn.Parameter(torch.randn(1, num_virtual_tracks, 1, hidden_size))  # key typo is official
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.flow_head = nn.Linear(hidden_size, 2)
        self.vis_conf_head = nn.Linear(hidden_size, 2)
        blocks = lambda cls: nn.ModuleList(cls(hidden_size, num_heads, mlp_ratio) for _ in range(depth))  # noqa: E731
        self.time_blocks = blocks(AttnBlock)
        self.space_virtual_blocks = blocks(AttnBlock)
        self.space_point2virtual_blocks = blocks(CrossAttnBlock)
        self.space_virtual2point_blocks = blocks(CrossAttnBlock)

    def forward(
        self,
        z: torch.Tensor,
        num_points: int,
        frame_valid: torch.Tensor | None = None,
        point_valid: torch.Tensor | None = None,
        chunk_bytes: int | None = None,
    ) -> torch.Tensor:
        """z (B, T, S, C): `input_transform`ed point tokens in z[:, :, :N] (N = num_points); it is
        overwritten (the virtual tracks go to z[:, :, N:], every layer updates it in place).

        frame_valid (B, T) bool: False marks padded frames, ignored as keys of the time attention;
        point_valid (B, N) bool: False marks padding points, ignored as context of the
        virtual<-point attention; None: nothing padded. chunk_bytes: None = no chunking.
        Returns (B, T, N, 4) float32.
        """
        b, t, s, c = z.shape
        n = num_points
        z[:, :, n:] = self.virual_tracks[:, :, 0].to(z.dtype)  # (1, 64, C) broadcast over (B, T)
        track_chunks = chunk_bounds(s, rows_per_chunk(b * t * TOKEN_BYTES, chunk_bytes, s))
        frame_chunks = chunk_bounds(b * t, rows_per_chunk(s * TOKEN_BYTES, chunk_bytes, b * t))
        space_mask = None
        if point_valid is not None:
            space_mask = point_valid[:, None, None, None, :].expand(b, t, 1, 1, n).reshape(b * t, 1, 1, n)
        rows = z.view(b * t, s, c)
        delta = z.new_empty(b * t, n, 4, dtype=torch.float32)
        layers = zip(
            self.time_blocks, self.space_virtual2point_blocks, self.space_virtual_blocks,
            self.space_point2virtual_blocks,
        )
        for layer, (time_block, v2p, virt, p2v) in enumerate(layers):
            for s0, s1 in track_chunks:
                self._time_attention(z, time_block, s0, s1, frame_valid)
            last = layer == len(self.time_blocks) - 1
            for r0, r1 in frame_chunks:
                point, virtual = rows[r0:r1, :n], rows[r0:r1, n:]
                virtual = virt(v2p(virtual, point, None if space_mask is None else space_mask[r0:r1]))
                point = p2v(point, virtual)
                if last:
                    delta[r0:r1] = torch.cat([self.flow_head(point), self.vis_conf_head(point)], dim=-1)
                else:
                    rows[r0:r1, :n] = point
                    rows[r0:r1, n:] = virtual
        return delta.view(b, t, n, 4)

    @staticmethod
    def _time_attention(z: torch.Tensor, block: AttnBlock, s0: int, s1: int, frame_valid: torch.Tensor | None):
        """Run the time block on tracks [s0, s1) of z (B, T, S, C), in place."""
        b, t, _, c = z.shape
        x = z[:, :, s0:s1].permute(0, 2, 1, 3).reshape(b * (s1 - s0), t, c)  # (B*r, T, C)
        mask = None
        if frame_valid is not None:
            mask = frame_valid.repeat_interleave(s1 - s0, dim=0)[:, None, None, :]  # (B*r, 1, 1, T)
        z[:, :, s0:s1] = block(x, mask).view(b, s1 - s0, t, c).permute(0, 2, 1, 3)
