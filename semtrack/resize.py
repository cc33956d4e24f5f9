"""The resize in front of the feature backbones: uint8 frames (T, 3, H, W) -> (T, 3, *size) uint8.

* `resize_pil`: Pillow's bilinear antialiased `Image.resize`, frame by frame on the CPU (the research
  inputs).
* `fixed_point_resize`: Pillow's fixed-point filter computed exactly with tensor ops, batched on the
  frames' device, so PIL-identical pixels on a GPU too (`resize_pil_identical` picks one of the two
  by device).
* `resize_tensor`: PyTorch's own antialiased kernel (the uint8 kernel on the CPU, the float kernel
  rounded elsewhere): fastest, pixels depend on the device.
"""
from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from semtrack.transfer import upload

_PRECISION_BITS = 22  # Pillow's fixed-point filter coefficients: units of 2**-22


def _tent(x: float) -> float:
    x = -x if x < 0.0 else x
    return 1.0 - x if x < 1.0 else 0.0


@functools.lru_cache(maxsize=64)
def pil_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
    """Pillow's antialiased bilinear filter for one axis of n_in -> n_out pixels, exactly as Pillow
    computes it: (index, weight), both int64 (n_out, K); output i = sum_k weight[i, k] * in[index[i, k]]
    in units of 2**-22 (rows with fewer taps are padded with weight 0).

    Output i is centred at source coordinate c = (i + 0.5) * n_in / n_out; the tent of half-width
    s = max(n_in / n_out, 1) covers the source pixels int(c - s + 0.5) .. int(c + s + 0.5) - 1
    (clipped to the image); pixel j weighs tent((j - c + 0.5) / s), normalised by the sum accumulated
    in order, then rounded to int(0.5 + w * 2**22). All in float64 as Pillow does, term by term.
    """
    scale = n_in / n_out
    support = max(scale, 1.0)
    inverse = 1.0 / support
    rows = []
    for i in range(n_out):
        centre = (i + 0.5) * scale
        lo, hi = max(int(centre - support + 0.5), 0), min(int(centre + support + 0.5), n_in)
        raw = [_tent((j - centre + 0.5) * inverse) for j in range(lo, hi)]
        total = 0.0
        for w in raw:
            total += w
        rows.append((lo, [int(0.5 + (w / total if total != 0.0 else w) * (1 << _PRECISION_BITS)) for w in raw]))
    taps = max(len(w) for _, w in rows)
    index, weight = np.zeros((n_out, taps), np.int64), np.zeros((n_out, taps), np.int64)
    for i, (lo, ws) in enumerate(rows):
        index[i] = lo  # padding taps read the first pixel with weight 0
        index[i, :len(ws)] = np.arange(lo, lo + len(ws))
        weight[i, :len(ws)] = ws
    return index, weight


@functools.lru_cache(maxsize=1)
def _pillow_major() -> int:
    from importlib.metadata import version

    return int(version("pillow").split(".")[0])


def pil_height_first(h: int, w: int, out_h: int, out_w: int) -> bool:
    """Whether Pillow resamples the height before the width for (h, w) -> (out_h, out_w).

    Pillow >= 13 (python-pillow/Pillow#9549, "If height is scaled down significantly more than width,
    resize vertically first") does so when the height shrinks by more than twice as many pixels as
    the width: h - out_h > 2 (w - out_w). Earlier versions always start with the width. Either pass
    reads only the source rows / columns the other needs, which changes no value.
    """
    return _pillow_major() >= 13 and h > out_h and h - out_h > 2 * (w - out_w)


def _fixed_point_round(acc: torch.Tensor) -> torch.Tensor:
    """int32 sums in units of 2**-22 -> round half up to whole grey levels, clamped to 0..255."""
    return ((acc + (1 << (_PRECISION_BITS - 1))) >> _PRECISION_BITS).clamp_(0, 255)


def _resample_rows(x: torch.Tensor, n_out: int) -> torch.Tensor:
    """One Pillow filter pass of integer pixels (..., H, W) along the rows (dim -2) -> int32 (..., n_out, W)."""
    index, weight = pil_taps(x.shape[-2], n_out)
    index, weight = upload(torch.from_numpy(index), x.device), upload(torch.from_numpy(weight).int(), x.device)
    acc = None
    for k in range(index.shape[1]):  # products < 2**30, sums < 2**31: exact in int32
        term = x.index_select(-2, index[:, k]).to(torch.int32) * weight[:, k, None]
        acc = term if acc is None else acc.add_(term)
    return _fixed_point_round(acc)


def _resample(x: torch.Tensor, axis: str, n_out: int) -> torch.Tensor:
    """One pass along "height" or "width" (done on a transposed copy: whole-row gathers are the fast kind)."""
    if axis == "height":
        return _resample_rows(x, n_out)
    return _resample_rows(x.transpose(-1, -2).contiguous(), n_out).transpose(-1, -2)


def fixed_point_resize(frames: torch.Tensor, size: tuple[int, int] = (224, 224)) -> torch.Tensor:
    """Pillow's bilinear `Image.resize` of uint8 (T, 3, H, W) -> (T, 3, *size) uint8, bit for bit, on
    the frames' device: two separable passes (`pil_taps`) in exact int32 arithmetic, each rounded
    to whole grey levels as Pillow does, in Pillow's pass order (`pil_height_first`). Transient
    memory: one uint8 copy of the frames plus int32 arrays of the once-resampled size."""
    h, w = frames.shape[-2:]
    passes = [("width", size[1])] if w != size[1] else []
    passes += [("height", size[0])] if h != size[0] else []
    if pil_height_first(h, w, *size):
        passes.reverse()
    x = frames  # uint8 until gathered: the full-size copies stay 1 byte per value
    for axis, n_out in passes:
        x = _resample(x, axis, n_out)
    return x.to(torch.uint8).contiguous()


def resize_pil(frames: torch.Tensor, size: tuple[int, int] = (224, 224)) -> torch.Tensor:
    """The research resize: each frame through PIL bilinear (antialiased) -> (T, 3, *size) uint8, CPU."""
    from PIL import Image

    hwc = frames.permute(0, 2, 3, 1).cpu().numpy()  # (T, H, W, 3) uint8
    out = [np.asarray(Image.fromarray(f).resize((size[1], size[0]), Image.BILINEAR)) for f in hwc]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


def resize_pil_identical(frames: torch.Tensor, size: tuple[int, int] = (224, 224)) -> torch.Tensor:
    """PIL's pixels for uint8 (T, 3, H, W) frames -> (T, 3, *size) uint8 on the frames' device:
    PIL itself on the CPU (the cheapest there), `fixed_point_resize` elsewhere."""
    if frames.device.type == "cpu":
        return resize_pil(frames, size)
    return fixed_point_resize(frames, size)


def resize_tensor(frames: torch.Tensor, size: tuple[int, int] = (224, 224)) -> torch.Tensor:
    """PyTorch's antialiased bilinear resize of uint8 (T, 3, H, W) -> (T, 3, *size) uint8 on their device:
    the uint8 kernel on the CPU, the float kernel rounded to the nearest grey level elsewhere."""
    if frames.device.type == "cpu":
        return F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
    out = F.interpolate(frames.float(), size=size, mode="bilinear", antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)
