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


def _run_tables() -> tuple[np.ndarray, np.ndarray]:
    """For run lengths L in [0, RUN_CHUNK] (uint8): the codes of the run, k + (r > 0), and the
    remainder r = L - k (k + 1) / 2 (0 <= r <= k), k being the most codes of lengths 1, 2, ..., k that fit."""
    lengths = np.arange(RUN_CHUNK + 1)
    k = np.floor((np.sqrt(8 * lengths + 1) - 1) / 2).astype(np.int64)
    k -= k * (k + 1) // 2 > lengths  # guard the float square root
    k += (k + 1) * (k + 2) // 2 <= lengths
    r = lengths - k * (k + 1) // 2
    return (k + (r > 0)).astype(np.uint8), r.astype(np.uint8)


_RUN_COUNT, _RUN_REST = _run_tables()


def min_code_size(colours: int) -> int:
    """The LZW minimum code size for a palette of `colours` entries: 7 up to 128 (so every code is
    one byte), 8 up to 256."""
    if not 1 <= colours <= 256:
        raise ValueError(f"a GIF palette has 1 to 256 colours, got {colours}")
    return 7 if colours <= 128 else 8


def _runs(flat: np.ndarray, frame_px: int) -> tuple[np.ndarray, np.ndarray]:
    """Runs of one value in flat (N,) uint8, cut at every frame start and every RUN_CHUNK pixels:
    (starts (R,) int64, lengths (R,) int32)."""
    change = np.empty(flat.size, dtype=bool)
    change[0] = True
    np.not_equal(flat[1:], flat[:-1], out=change[1:])
    change[::frame_px] = True
    starts = np.flatnonzero(change)
    lengths = np.empty(len(starts), dtype=np.int32)
    np.subtract(starts[1:], starts[:-1], out=lengths[:-1], casting="unsafe")
    lengths[-1] = flat.size - starts[-1]
    long = np.flatnonzero(lengths > RUN_CHUNK)
    if len(long):  # rare in video: cut into chunks of RUN_CHUNK pixels (the last one shorter)
        pieces = (lengths[long] - 1) // RUN_CHUNK  # extra starts per long run
        offsets = np.arange(pieces.sum()) - np.repeat(np.cumsum(pieces) - pieces, pieces) + 1
        starts = np.insert(starts, np.repeat(long + 1, pieces), np.repeat(starts[long], pieces) + RUN_CHUNK * offsets)
        lengths = np.diff(starts, append=flat.size).astype(np.int32)
    return starts, lengths


def lzw_codes(indices: np.ndarray, min_size: int, runs: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The LZW code streams of frames: indices (T, H, W) uint8 (< 2**min_size) -> (codes (M,) uint8
    (uint16 when min_size is 8), each frame's stream starting with a clear code and ending with the
    end code, every code `min_size + 1` bits wide; bounds (T + 1,) int64: frame t's codes are
    codes[bounds[t]:bounds[t + 1]]). `runs=False`: one literal code per pixel (faster, larger)."""
    t_len, height, width = indices.shape
    frame_px = height * width
    flat = np.ascontiguousarray(indices).reshape(-1)
    clear, end, first_free = 1 << min_size, (1 << min_size) + 1, (1 << min_size) + 2
    capacity = (1 << min_size) - 2  # data codes per segment: the code after them (clear/end) is still min_size + 1 bits
    dtype = np.uint8 if min_size < 8 else np.uint16
    if not runs:
        return _literal_codes(flat.reshape(t_len, frame_px).astype(dtype, copy=False), clear, end, capacity)
    window = capacity - RUN_CODES + 1  # a segment holds the runs starting in its first `window` codes
    row = capacity + 2  # a segment's slots: its clear code, data codes, the end code after a frame's last segment
    starts, lengths = _runs(flat, frame_px)
    total = len(starts)
    colour = flat[starts].astype(dtype, copy=False)
    count = _RUN_COUNT.take(lengths)  # (R,) uint8 codes per run

    # Code offsets with every frame starting on a multiple of `window`, in the segment after its
    # previous frame's last run's (that run counted longer for this). Run i is in segment offset_i // window.
    first_run = np.searchsorted(starts, np.arange(t_len) * frame_px)  # (T,)
    last_run = np.append(first_run[1:], total) - 1
    last_count = count[last_run]
    last_start = np.add.reduceat(count, first_run, dtype=np.int64) - last_count  # (T,) in the frame's own codes
    count[last_run] = (last_start // window + 1) * window - last_start
    offset = np.cumsum(count, dtype=np.int32)
    offset -= count  # (R,) padded code offset of each run's first code
    count[last_run] = last_count
    segment = offset // window  # (R,)
    segments = int(segment[-1]) + 1
    firsts = np.searchsorted(offset, np.arange(segments, dtype=np.int32) * window)  # (S,): no segment is empty
    first_offset = offset[firsts]
    slot = (np.arange(segments, dtype=np.int32) * row + 1 - first_offset).take(segment)
    slot += offset  # (R,) each run's first code in the (S, row) table of segments
    lasts = np.append(firsts[1:], total) - 1
    data = offset[lasts] + count[lasts] - first_offset  # (S,) data codes per segment
    frame_last = segment[last_run]  # (T,)
    used = data + 1
    used[frame_last] += 1

    # Every data slot first holds the self-referencing code there (the entry being defined,
    # first_free + position - 1); then the runs' literals, and their remainders: the entry of
    # length r this run defined, r - 1 codes after its literal (that literal itself when r = 1).
    ramp = np.arange(row, dtype=np.int64) + first_free - 2
    ramp[0] = clear
    table = np.empty((segments, row), dtype=dtype)
    table[:] = ramp.astype(dtype)
    flat_table = table.reshape(-1)
    flat_table[slot] = colour
    rest = _RUN_REST.take(lengths)
    tails = np.flatnonzero(rest)
    tail_slot = slot[tails]
    flat_table[tail_slot + count[tails] - 1] = flat_table[tail_slot + rest[tails] - 1]
    table[frame_last, used[frame_last] - 1] = end
    codes = table[np.arange(row) < used[:, None]]
    ends = np.cumsum(used)
    bounds = np.append(0, ends[frame_last])
    return codes, bounds


def _literal_codes(frames: np.ndarray, clear: int, end: int, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """Streams of literal codes only: frames (T, P) -> a clear code before every `capacity` pixels
    and the end code after each frame, as `lzw_codes` returns them."""
    t_len, frame_px = frames.shape
    full, rest = divmod(frame_px, capacity)
    per_frame = full * (capacity + 1) + (1 + rest if rest else 0) + 1
    codes = np.empty((t_len, per_frame), dtype=frames.dtype)
    blocks = codes[:, : full * (capacity + 1)].reshape(t_len, full, capacity + 1)
    blocks[:, :, 0] = clear
    blocks[:, :, 1:] = frames[:, : full * capacity].reshape(t_len, full, capacity)
    if rest:
        codes[:, full * (capacity + 1)] = clear
        codes[:, full * (capacity + 1) + 1: -1] = frames[:, full * capacity:]
    codes[:, -1] = end
    return codes.reshape(-1), np.arange(t_len + 1, dtype=np.int64) * per_frame


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
    indices: np.ndarray,
    palette: np.ndarray,
    durations_ms: Sequence[int],
    loop: int | None = LOOP_FOREVER,
    runs: bool = True,
) -> bytes:
    """A GIF89a of indexed frames sharing one palette.

    indices (T, H, W) uint8, each < K; palette (K, 3) uint8 RGB, 1 <= K <= 256; durations_ms (T,)
    frame delays in ms (stored in whole 10 ms ticks, rounded); loop: the NETSCAPE2.0 loop count
    (0 = forever, None = no looping extension); runs: code runs of one index (False: every pixel
    a literal code, faster and larger). T >= 1, 1 <= H, W <= 65535. -> the file's bytes;
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
    codes, bounds = lzw_codes(indices, size, runs)
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
