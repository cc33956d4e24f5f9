"""Update transformer of CoTracker3 (`updateformer.*`, ARCHITECTURE.md sec. 5).

Tokens are laid out (B, N, T, C): N point tracks, T frames. Attention uses
`F.scaled_dot_product_attention` (softmax over the context axis, scale 48^-0.5).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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

    `to_kv` packs K (channels 0..C-1) then V; head h uses channels [h*d, (h+1)*d).
    """

    def __init__(self, dim: int = 384, num_heads: int = 8):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_kv = nn.Linear(dim, 2 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        m, length, dim = x.shape
        heads = self.num_heads
        q = self.to_q(x).view(m, length, heads, dim // heads).transpose(1, 2)  # (M, h, L, d)
        k, v = self.to_kv(context).view(m, context.shape[1], 2, heads, dim // heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)  # (M, h, L, d)
        return self.to_out(out.transpose(1, 2).reshape(m, length, dim))


class AttnBlock(nn.Module):
    """Pre-norm self-attention block (non-affine LayerNorm, eps 1e-6): (M, L, C) -> (M, L, C)."""

    def __init__(self, dim: int = 384, num_heads: int = 8, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dim, approximate="tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.attn(h, h)
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

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.cross_attn(self.norm1(x), self.norm_context(context))
        return x + self.mlp(self.norm2(x))


class EfficientUpdateFormer(nn.Module):
    """(B, N, T, input_dim) tokens -> (B, N, T, 4) updates (dx, dy, dvis, dconf).

    Each layer: time self-attention over every track (points and the 64 virtual tracks), then per
    frame virtual<-point cross, virtual self, point<-virtual cross attention.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, t, _ = x.shape
        z = self.input_transform(x)  # (B, N, T, C)
        virtual = self.virual_tracks.expand(b, -1, t, -1).to(z.dtype)
        z = torch.cat([z, virtual], dim=1)  # (B, S, T, C), S = N + 64
        s, c = z.shape[1], z.shape[-1]
        for time_block, v2p, virt, p2v in zip(
            self.time_blocks,
            self.space_virtual2point_blocks,
            self.space_virtual_blocks,
            self.space_point2virtual_blocks,
        ):
            z = time_block(z.reshape(b * s, t, c)).view(b, s, t, c)
            z = z.permute(0, 2, 1, 3).reshape(b * t, s, c)  # (B*T, S, C)
            point, virtual = z[:, :n], z[:, n:]
            virtual = v2p(virtual, point)
            virtual = virt(virtual)
            point = p2v(point, virtual)
            z = torch.cat([point, virtual], dim=1).view(b, t, s, c).permute(0, 2, 1, 3)  # (B, S, T, C)
        point = z[:, :n]
        return torch.cat([self.flow_head(point), self.vis_conf_head(point)], dim=-1)
