"""Training transforms of frames and their tracks, kept consistent with each other.

A transform is a callable (frames (F,3,H,W) uint8, tracks (F,P,2) float (x, y), visibility (F,P) bool)
-> the same three. Coordinates are pixels, pixel centres at integers (pixel i spans [i-0.5, i+0.5]);
every transform keeps that convention. Points a crop leaves become invisible (coordinates kept).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F


def _resize_frames(frames: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased) resize of (F,3,H,W) uint8 to (F,3,h,w) uint8."""
    out = F.interpolate(frames.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def resize_tracks(tracks: torch.Tensor, old: tuple[int, int], new: tuple[int, int]) -> torch.Tensor:
    """tracks (..., 2) (x, y) in pixels of frames of size `old` = (h, w) -> pixels of size `new`.
    Pixel-centre convention: x' = (x + 0.5) * w'/w - 0.5 (same for y)."""
    scale = tracks.new_tensor([new[1] / old[1], new[0] / old[0]])
    return (tracks + 0.5) * scale - 0.5


def _crop(frames, tracks, visibility, top: int, left: int, height: int, width: int):
    """Crop a window; points outside it become invisible (coordinates kept, in crop pixels)."""
    frames = frames[..., top : top + height, left : left + width]
    tracks = tracks - tracks.new_tensor([left, top])
    x, y = tracks[..., 0], tracks[..., 1]
    inside = (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)
    return frames, tracks, visibility & inside


def _pair(size) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


class Compose:
    """Apply track transforms in order."""

    def __init__(self, transforms: Sequence[Callable]):
        self.transforms = list(transforms)

    def __call__(self, frames, tracks, visibility):
        for t in self.transforms:
            frames, tracks, visibility = t(frames, tracks, visibility)
        return frames, tracks, visibility


class Resize:
    """Resize to `size` = (h, w), or an int: the shorter side becomes `size` (aspect kept)."""

    def __init__(self, size: int | tuple[int, int]):
        self.size = size

    def __call__(self, frames, tracks, visibility):
        h, w = frames.shape[-2:]
        if isinstance(self.size, int):
            s = self.size / min(h, w)
            new = (max(1, round(h * s)), max(1, round(w * s)))
        else:
            new = _pair(self.size)
        return _resize_frames(frames, new), resize_tracks(tracks, (h, w), new), visibility


class CenterCrop:
    """Central (h, w) window (an int: square). Points leaving it become invisible."""

    def __init__(self, size: int | tuple[int, int]):
        self.size = _pair(size)

    def __call__(self, frames, tracks, visibility):
        h, w = frames.shape[-2:]
        ch, cw = self.size
        if ch > h or cw > w:
            raise ValueError(f"CenterCrop{self.size} is larger than the frames ({h}, {w})")
        return _crop(frames, tracks, visibility, (h - ch) // 2, (w - cw) // 2, ch, cw)


class HorizontalFlip:
    """Mirror left-right with probability `p` (global torch RNG): x' = W - 1 - x."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, frames, tracks, visibility):
        if self.p < 1 and float(torch.rand(())) >= self.p:
            return frames, tracks, visibility
        w = frames.shape[-1]
        tracks = tracks.clone()
        tracks[..., 0] = (w - 1) - tracks[..., 0]
        return frames.flip(-1), tracks, visibility


class RandomResizedCropFlip:
    """Training augmentation: a random crop (area fraction in `scale`, aspect ratio in `ratio`, the
    same window for every frame) resized to `size` = (h, w), then a horizontal flip with probability
    `flip_p`. Global torch RNG (seeded per DataLoader worker)."""

    def __init__(self, size: int | tuple[int, int], scale=(0.5, 1.0), ratio=(3 / 4, 4 / 3), flip_p: float = 0.5):
        self.size, self.scale, self.ratio = _pair(size), scale, ratio
        self.flip = HorizontalFlip(flip_p)

    def _window(self, h: int, w: int) -> tuple[int, int, int, int]:
        for _ in range(10):
            area = h * w * float(torch.empty(()).uniform_(*self.scale))
            log_r = torch.empty(()).uniform_(math.log(self.ratio[0]), math.log(self.ratio[1]))
            aspect = math.exp(float(log_r))
            cw, ch = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, ()))
                left = int(torch.randint(0, w - cw + 1, ()))
                return top, left, ch, cw
        side = min(h, w)  # fallback: central square
        return (h - side) // 2, (w - side) // 2, side, side

    def __call__(self, frames, tracks, visibility):
        top, left, ch, cw = self._window(*frames.shape[-2:])
        frames, tracks, visibility = _crop(frames, tracks, visibility, top, left, ch, cw)
        frames, tracks = _resize_frames(frames, self.size), resize_tracks(tracks, (ch, cw), self.size)
        return self.flip(frames, tracks, visibility)
