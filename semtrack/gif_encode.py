"""GIF files from indexed frames, the LZW streams built with array operations (no per-pixel loop).

`encode_gif(indices, palette, durations_ms)` writes a GIF89a by hand: header, logical screen
descriptor, global colour table (padded to a power of two), NETSCAPE2.0 looping extension, then per
frame a graphic control extension (the delay; disposal "do not dispose"; no transparency), an image
descriptor covering the whole screen and the frame's LZW image data in <= 255-byte sub-blocks, and
the trailer.

The LZW streams are valid for any GIF decoder but are not the greedy LZW parse. Each frame is cut,
in scan order (runs cross row ends), into runs of one palette index; a run of index c and length L
is coded with LZW's self-referencing code: the literal c, then the code being defined at that
moment (the decoder reads it as the previous string plus its first index: "cc"), then the next one
("ccc"), ..., so k codes cover 1 + 2 + ... + k pixels; a remainder r <= k is the literal c (r = 1)
or the entry of length r this run defined. Every code after a clear code defines exactly one entry,
so each code's value and width follow from cumulative sums. Codes stay `min_code_size + 1` bits
wide (8 bits for <= 128 colours: one byte per code): a clear code starts every segment of at most
2**min_code_size - 2 codes, before the dictionary needs a wider code. Runs longer than `RUN_CHUNK`
pixels are coded as several runs, so no run needs more than `RUN_CODES` codes and a segment is
filled by the runs that start in its first `2**m - 2 - RUN_CODES + 1` codes, never splitting one.
Pixels in runs of length 1 cost one code each: natural frames compress less than with PIL's greedy
LZW (numbers in benchmarks/NOTES.md, "GIF LZW in numpy"), at a fraction of its CPU time.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

RUN_CODES = 12  # at most this many codes per run: a run of RUN_CHUNK pixels is 1 + 2 + ... + RUN_CODES
RUN_CHUNK = RUN_CODES * (RUN_CODES + 1) // 2  # pixels: longer runs are coded as several runs
GIF_TICK_MS = 10  # frame delays are stored in hundredths of a second
MAX_SIDE = 65535  # px: GIF's 16-bit sizes
LOOP_FOREVER = 0


def _run_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For run lengths L in [0, RUN_CHUNK]: k (the self-referencing codes' count, lengths 1..k, the
    first being the literal), r = L - k (k + 1) / 2 (the remainder, 0 <= r <= k) and the codes k + (r > 0)."""
    lengths = np.arange(RUN_CHUNK + 1)
    k = np.floor((np.sqrt(8 * lengths + 1) - 1) / 2).astype(np.int64)
    k -= k * (k + 1) // 2 > lengths  # guard the float square root
    k += (k + 1) * (k + 2) // 2 <= lengths
    r = lengths - k * (k + 1) // 2
    return k, r, k + (r > 0)


_RUN_K, _RUN_R, _RUN_N = _run_tables()


def min_code_size(colours: int) -> int:
    """The LZW minimum code size for a palette of `colours` entries: 7 up to 128 (so every code is
    one byte), 8 up to 256."""
    if not 1 <= colours <= 256:
        raise ValueError(f"a GIF palette has 1 to 256 colours, got {colours}")
    return 7 if colours <= 128 else 8


def lzw_codes(indices: np.ndarray, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The LZW code streams of frames: indices (T, H, W) uint8 (< 2**min_size) -> (codes (M,) uint16,
    each frame's stream starting with a clear code and ending with the end code, all codes
    `min_size + 1` bits wide; bounds (T + 1,) int64: frame t's codes are codes[bounds[t]:bounds[t + 1]])."""
    t_len, height, width = indices.shape
    clear, end, first_free = 1 << min_size, (1 << min_size) + 1, (1 << min_size) + 2
    capacity = (1 << min_size) - 2  # data codes per segment: the code after them (clear/end) is still min_size + 1 bits
    window = capacity - RUN_CODES + 1  # a segment holds the runs starting in its first `window` codes
    if window < 1:
        raise ValueError(f"min_size {min_size} leaves no room for runs of {RUN_CODES} codes")
    frame_px = height * width
    flat = np.ascontiguousarray(indices).reshape(-1)
    change = np.empty(flat.size, dtype=bool)
    change[0] = True
    np.not_equal(flat[1:], flat[:-1], out=change[1:])
    change[::frame_px] = True
    starts = np.flatnonzero(change)
    lengths = np.diff(starts, append=flat.size)
    long = np.flatnonzero(lengths > RUN_CHUNK)
    if len(long):  # cut long runs into chunks of RUN_CHUNK pixels (the last one shorter)
        pieces = (lengths[long] - 1) // RUN_CHUNK  # extra starts per long run
        offsets = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces) + 1
        starts = np.insert(starts, np.repeat(long + 1, pieces), np.repeat(starts[long], pieces) + RUN_CHUNK * offsets)
        lengths = np.diff(starts, append=flat.size)
    colour = flat[starts]
    count = _RUN_N[lengths]  # (R,) codes per run
    runs_per_frame = np.diff(np.searchsorted(starts, np.arange(t_len + 1) * frame_px))  # (T,)
    first_run = np.cumsum(runs_per_frame) - runs_per_frame

    # Code offsets with every frame starting on a multiple of `window`, the segment after its
    # previous frame's last run's (counted longer for this). Run i belongs to segment offset_i // window.
    last_run = first_run + runs_per_frame - 1
    last_start = np.add.reduceat(count, first_run) - count[last_run]  # (T,) in the frame's own codes
    padded = count.copy()
    padded[last_run] = (last_start // window + 1) * window - last_start  # the next frame: the next segment
    offset = np.cumsum(padded) - padded  # (R,) padded code offset of each run
    segment = offset // window  # (R,)
    segments = int(offset[-1] // window) + 1
    firsts = np.flatnonzero(np.diff(segment, prepend=-1))  # (S,) each segment's first run: none is empty
    position = offset - offset[firsts][segment]  # (R,) the run's first code's position after its clear code
    data = np.add.reduceat(count, firsts)  # (S,) data codes per segment
    frame_segments = np.diff(np.append(offset[first_run] // window, segments))  # (T,)
    last_segment = np.cumsum(frame_segments) - 1
    slots = data + 1  # a clear code, the data codes, and the end code after a frame's last segment
    slots[last_segment] += 1
    seg_out = np.cumsum(slots) - slots  # (S,) where each segment's clear code goes
    out = seg_out[segment] + 1 + position  # (R,) the slot of each run's first code

    # Every slot first gets the value of a self-referencing code there (the entry being defined:
    # first_free + position - 1), then runs' literals and remainders overwrite theirs.
    dtype = np.uint8 if first_free + capacity <= 256 else np.uint16
    ramp = np.arange(capacity + 2, dtype=np.int64) + first_free - 2
    ramp[0] = clear
    mask = np.arange(capacity + 2) < slots[:, None]
    codes = np.broadcast_to(ramp.astype(dtype), mask.shape)[mask]
    codes[seg_out[last_segment] + slots[last_segment] - 1] = end
    rest = _RUN_R[lengths]  # (R,)
    tail = np.flatnonzero(rest >= 2)
    tail_slot = out[tail] + _RUN_K[lengths[tail]]
    codes[tail_slot] = codes[out[tail] + rest[tail] - 1]  # the entry of length r this run defined
    codes[out] = colour
    single = np.flatnonzero(rest == 1)
    codes[out[single] + _RUN_K[lengths[single]]] = colour[single]
    bounds = np.append(seg_out[last_segment - frame_segments + 1], len(codes))
    return codes, bounds


def _pack(codes: np.ndarray, bits: int) -> bytes:
    """Codes (M,) of `bits` bits each, least significant bit first, as GIF packs them."""
    if bits == 8:
        return codes.astype(np.uint8).tobytes()
    spread = np.unpackbits(codes.astype("<u2").view(np.uint8), bitorder="little").reshape(-1, 16)[:, :bits]
    return np.packbits(spread.reshape(-1), bitorder="little").tobytes()


def _sub_blocks(data: bytes) -> bytes:
    """Data as GIF sub-blocks (a length byte, then <= 255 bytes), ended by the empty block."""
    raw = np.frombuffer(data, dtype=np.uint8)
    full = len(raw) // 255
    blocks = np.empty((full, 256), dtype=np.uint8)
    blocks[:, 0] = 255
    blocks[:, 1:] = raw[: full * 255].reshape(full, 255)
    rest = raw[full * 255:]
    tail = bytes([len(rest)]) + rest.tobytes() if len(rest) else b""
    return blocks.tobytes() + tail + b"\x00"


def encode_gif(
    indices: np.ndarray, palette: np.ndarray, durations_ms: Sequence[int], loop: int | None = LOOP_FOREVER
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
    codes, bounds = lzw_codes(indices, size)
    descriptor = b"\x2c\x00\x00\x00\x00" + _u16(width) + _u16(height) + b"\x00" + bytes([size])
    for t in range(t_len):
        ticks = max(0, min(65535, int(round(float(durations_ms[t]) / GIF_TICK_MS))))
        parts.append(b"\x21\xf9\x04\x04" + _u16(ticks) + b"\x00\x00")  # disposal 1: do not dispose
        parts.append(descriptor)
        parts.append(_sub_blocks(_pack(codes[bounds[t]: bounds[t + 1]], size + 1)))
    parts.append(b"\x3b")
    return b"".join(parts)


def _u16(value: int) -> bytes:
    return int(value).to_bytes(2, "little")
