"""GIF files from indexed frames, written with array operations (no per-pixel loop): fast, not small.

`encode_gif(indices, palette, durations_ms)` writes a GIF89a by hand: header, logical screen
descriptor, global colour table (padded to a power of two), NETSCAPE2.0 looping extension, then per
frame a graphic control extension (the delay; disposal "do not dispose"; no transparency), an image
descriptor covering the whole screen and the frame's LZW image data in <= 255-byte sub-blocks, and
the trailer.

The LZW streams hold literal codes only: every pixel is one code, and a clear code comes before
every 2**m - 2 pixels (m the LZW minimum code size), before the dictionary would need a wider
code, so every code stays m + 1 bits wide. With <= 128 colours (m = 7) a code is one byte and a
frame's stream is its index bytes with a clear code every 126 of them: any GIF decoder reads it,
and it costs a copy instead of a dictionary search, about 1 ns per pixel against PIL's ~8-13, for
files about 2x larger than PIL's greedy LZW makes from video frames (benchmarks/NOTES.md, "GIF LZW
in numpy", also for the run coding that was measured and left out: 1.65x the size, slower than PIL).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

GIF_TICK_MS = 10  # GIF frame delays are whole hundredths of a second
MAX_SIDE = 65535  # px: GIF's 16-bit sizes
LOOP_FOREVER = 0


def min_code_size(colours: int) -> int:
    """The LZW minimum code size for a palette of `colours` entries: 7 up to 128 (so every code is
    one byte), 8 up to 256."""
    if not 1 <= colours <= 256:
        raise ValueError(f"a GIF palette has 1 to 256 colours, got {colours}")
    return 7 if colours <= 128 else 8


def lzw_codes(frames: np.ndarray, min_size: int) -> np.ndarray:
    """Literal-only LZW code streams: frames (T, P) uint8, each < 2**min_size -> codes (T, M) uint8
    (uint16 when min_size is 8), row t frame t's stream: a clear code before every 2**min_size - 2
    pixels, then the end code; every code min_size + 1 bits wide."""
    t_len, frame_px = frames.shape
    clear, end = 1 << min_size, (1 << min_size) + 1
    capacity = (1 << min_size) - 2  # pixels per clear code: the code after them is still min_size + 1 bits wide
    full, rest = divmod(frame_px, capacity)
    codes = np.empty((t_len, full * (capacity + 1) + (1 + rest if rest else 0) + 1),
                     dtype=np.uint8 if min_size < 8 else np.uint16)
    blocks = codes[:, : full * (capacity + 1)].reshape(t_len, full, capacity + 1)
    blocks[:, :, 0] = clear
    blocks[:, :, 1:] = frames[:, : full * capacity].reshape(t_len, full, capacity)
    if rest:
        codes[:, full * (capacity + 1)] = clear
        codes[:, full * (capacity + 1) + 1: -1] = frames[:, full * capacity:]
    codes[:, -1] = end
    return codes


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes (M,) of `bits` bits each as bytes (uint8), least significant bit first, as GIF packs them."""
    if bits == 8:
        return codes.astype(np.uint8, copy=False)
    spread = np.unpackbits(codes.astype("<u2").view(np.uint8), bitorder="little").reshape(-1, 16)[:, :bits]
    return np.packbits(spread.reshape(-1), bitorder="little")


def _sub_blocks(raw: np.ndarray) -> bytes:
    """Bytes (n,) uint8 as GIF sub-blocks (a length byte, then <= 255 bytes), ended by the empty block."""
    full = len(raw) // 255
    blocks = np.empty((full, 256), dtype=np.uint8)
    blocks[:, 0] = 255
    blocks[:, 1:] = raw[: full * 255].reshape(full, 255)
    rest = raw[full * 255:]
    tail = bytes([len(rest)]) + rest.tobytes() if len(rest) else b""
    return blocks.tobytes() + tail + b"\x00"


def encode_gif(
    indices: np.ndarray,
    palette: np.ndarray,
    durations_ms: Sequence[int],
    loop: int | None = LOOP_FOREVER,
) -> bytes:
    """A GIF89a of indexed frames sharing one palette.

    indices (T, H, W) uint8, each < K; palette (K, 3) uint8 RGB, 1 <= K <= 256; durations_ms (T,)
    frame delays in ms (stored in whole 10 ms ticks, rounded); loop: the NETSCAPE2.0 loop count
    (0 = forever, None = no looping extension). T >= 1, 1 <= H, W <= 65535. -> the file's bytes;
    every frame covers the screen, so decoding frame t gives exactly `palette[indices[t]]`.
    """
    indices = np.asarray(indices)
    palette = np.asarray(palette)
    if indices.ndim != 3 or indices.dtype != np.uint8 or min(indices.shape) < 1:
        raise ValueError(f"indices must be a non-empty (T, H, W) uint8 array, got {indices.dtype} {indices.shape}")
    t_len, height, width = indices.shape
    if max(height, width) > MAX_SIDE:
        raise ValueError(f"GIF frames are at most {MAX_SIDE} px on a side, got {width}x{height}")
    if palette.ndim != 2 or palette.shape[1] != 3 or palette.dtype != np.uint8:
        raise ValueError(f"palette must be a (K, 3) uint8 array, got {palette.dtype} {palette.shape}")
    colours = len(palette)
    size = min_code_size(colours)
    if int(indices.max()) >= colours:
        raise ValueError(f"indices reach {int(indices.max())}, the palette has {colours} colours")
    if len(durations_ms) != t_len:
        raise ValueError(f"{len(durations_ms)} durations for {t_len} frames")
    if loop is not None and not 0 <= loop <= 65535:
        raise ValueError(f"loop must be None or in [0, 65535], got {loop}")

    table_bits = max(int(colours - 1).bit_length(), 1)  # the colour table holds 2**table_bits entries
    table = np.zeros((1 << table_bits, 3), dtype=np.uint8)
    table[:colours] = palette
    parts = [b"GIF89a", _u16(width), _u16(height), bytes([0x80 | 0x70 | (table_bits - 1), 0, 0]), table.tobytes()]
    if loop is not None:
        parts.append(b"\x21\xff\x0bNETSCAPE2.0\x03\x01" + _u16(loop) + b"\x00")
    codes = lzw_codes(indices.reshape(t_len, height * width), size)  # (T, M)
    descriptor = b"\x2c\x00\x00\x00\x00" + _u16(width) + _u16(height) + b"\x00" + bytes([size])
    for t in range(t_len):
        ticks = max(0, min(65535, int(round(float(durations_ms[t]) / GIF_TICK_MS))))
        parts.append(b"\x21\xf9\x04\x04" + _u16(ticks) + b"\x00\x00")  # disposal 1: do not dispose
        parts.append(descriptor)
        parts.append(_sub_blocks(_pack(codes[t], size + 1)))
    parts.append(b"\x3b")
    return b"".join(parts)


def _u16(value: int) -> bytes:
    return int(value).to_bytes(2, "little")
