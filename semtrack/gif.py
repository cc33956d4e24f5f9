"""Visualisations: trail GIFs (REFERENCE.md 12.1) and debug cluster overlays (12.2), drawn with numpy and PIL.

A trail GIF shows on every tracked frame the fading trails of the last `TRAIL_SEGMENTS` segments, a
dot and the entity id of every point, and a counter (track frame index and source time). Differences
from the research renderer (REFERENCE.md 14.23): only the visible window of the trail is drawn; the
GIF plays at the clip's real frame rate (durations from its timestamps); entities are coloured from
a fixed categorical palette indexed by id (`ENTITY_PALETTE`), so an id keeps its colour whatever the
other ids of the video are; ids are crisp text outlined in black or white (whichever contrasts
more); frames are scaled down to `DEFAULT_MAX_WIDTH` pixels wide unless asked otherwise; all frames
share one palette (no dithering), which keeps files small and entity colours exact.

How it is drawn, with array operations whose count does not grow with the number of points: the
trail segments of the whole clip are rasterised once (PIL's width-1 line rule, vectorised) and
alpha-blended into a copy of the clip in TRAIL_SEGMENTS passes; PIL maps the clip to the shared
palette in one call; then each frame gets its dots and ids (rendered once per distinct id as a
"stamp" of palette indices) in one scatter, and its counter.
"""
from __future__ import annotations

import functools
import io
import numbers
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from semtrack.defaults import DEFAULT_MAX_WIDTH, GIF_ENCODERS
from semtrack.gif_encode import GIF_TICK_MS, encode_gif
from semtrack.safeio import atomic_write

TRAIL_SEGMENTS = 4  # segments shown behind each point (research: alpha is 0 from 5 frames back)
DOT_RADIUS = 2  # px: a filled disc, PIL's ellipse over [x - 2, y - 2, x + 2, y + 2]
TEXT_PX = 12  # size of PIL's default (FreeType) font for the ids and the counter, drawn without antialiasing
TEXT_OUTLINE_PX = 1  # outline around every glyph
ID_RAISE_PX = 4  # px from a dot's centre up to its id's baseline: 3 as before, plus the outline; starts at the dot's x
COUNTER_MARGIN_PX = 3  # the counter's top-left corner, from the frame's
TEXT_STAMPS_CACHED = 1024  # rendered texts (ids, counters) kept per process: <= 12 kB each (a counter)

# 32 categorical colours (RGB). Made by greedy farthest-point selection (Glasbey's method) in CIELAB
# over the RGB grid of step 15, restricted to lightness L* in [30, 90] and chroma >= 25, starting
# from the most saturated colour: any two differ by CIE76 Delta E >= 32, consecutive ones by >= 35.
ENTITY_PALETTE: tuple[tuple[int, int, int], ...] = (
    (0, 0, 255), (0, 255, 0), (255, 0, 15), (45, 195, 240),
    (255, 105, 210), (105, 105, 0), (30, 120, 255), (90, 240, 165),
    (135, 30, 45), (255, 225, 0), (255, 195, 180), (75, 75, 120),
    (240, 135, 0), (0, 105, 90), (240, 0, 255), (105, 180, 0),
    (255, 0, 105), (210, 180, 255), (120, 15, 165), (225, 225, 135),
    (255, 120, 105), (135, 30, 105), (0, 135, 60), (165, 240, 225),
    (150, 105, 75), (195, 120, 150), (0, 255, 120), (165, 60, 0),
    (135, 165, 120), (90, 75, 255), (195, 120, 255), (0, 150, 240),
)
BLACK, WHITE = (0, 0, 0), (255, 255, 255)  # text outlines; the counter is white outlined in black
# The GIF palette's fixed entries, exact in every GIF: entity colour k is index k, then black and white.
FIXED_COLOURS = (*ENTITY_PALETTE, BLACK, WHITE)
BLACK_INDEX, WHITE_INDEX = len(ENTITY_PALETTE), len(ENTITY_PALETTE) + 1
GIF_COLOURS = 128  # shared GIF palette: FIXED_COLOURS first, the rest quantised from the frames
PALETTE_SAMPLE_FRAMES = 3  # frames (first, middle, last) the content colours are quantised from
MIN_FRAME_MS = 20  # shortest frame delay: browsers show 0 and 10 ms delays as 100 ms


def entity_colours(obj_ids: np.ndarray) -> list[tuple[int, int, int]]:
    """One RGB colour per point: `ENTITY_PALETTE[id % 32]`. obj_ids (N,) int -> N (r, g, b) tuples."""
    ids = np.mod(np.asarray(obj_ids, dtype=np.int64).reshape(-1), len(ENTITY_PALETTE))
    return [ENTITY_PALETTE[i] for i in ids]


def label_colours(labels: np.ndarray) -> np.ndarray:
    """Colour a label map with `ENTITY_PALETTE` (id % 32): labels (...) int -> (..., 3) uint8 RGB."""
    table = np.asarray(ENTITY_PALETTE, dtype=np.uint8)  # (32, 3)
    return table[np.mod(np.asarray(labels, dtype=np.int64), len(table))]


def frame_durations_ms(frame_times: np.ndarray, default_ms: float = 100.0) -> list[int]:
    """Per-frame display times (ms) from presentation times (T,) seconds: the gap to the next frame
    (the last frame repeats the median gap), in whole GIF ticks (10 ms) placed so that every frame
    starts within 5 ms of its real time (12 fps: 80, 90, 80 ms, ...), at least MIN_FRAME_MS."""
    times = np.asarray(frame_times, dtype=np.float64)
    if times.size < 2:
        return [int(round(default_ms))] * int(times.size)
    gaps = np.diff(times) * 1000.0
    ends = np.cumsum(np.append(gaps, np.median(gaps)))  # (T,) ms from the first frame
    ticks = np.round(ends / GIF_TICK_MS).astype(np.int64) * GIF_TICK_MS
    return [max(int(d), MIN_FRAME_MS) for d in np.diff(ticks, prepend=0)]


def outline_index(colour: tuple[int, int, int]) -> int:
    """BLACK_INDEX or WHITE_INDEX: the outline with the higher WCAG contrast ratio against `colour`
    (black for light colours, white for dark ones, so every id reads against its outline)."""
    c = np.asarray(colour, dtype=np.float64) / 255.0
    luminance = float(np.dot([0.2126, 0.7152, 0.0722], np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)))
    return BLACK_INDEX if (luminance + 0.05) / 0.05 >= 1.05 / (luminance + 0.05) else WHITE_INDEX


def counter_text(index: int, num_frames: int, seconds: float) -> str:
    """The counter of track frame `index` (0-based, as in `pred_tracks[index]`) at source time `seconds`."""
    return f"{index}/{num_frames - 1}  {seconds:.2f} s"


# ----------------------------------------------------------------------------- scaling


def fitted_size(width: int, height: int, max_width: int | None) -> tuple[int, int]:
    """(width, height) scaled down to at most `max_width` pixels wide, aspect kept (height rounded,
    at least 1). `max_width=None` or a frame already narrow enough: unchanged (never upscaled)."""
    if max_width is None:
        return width, height
    if isinstance(max_width, bool) or not isinstance(max_width, numbers.Integral) or max_width < 1:
        raise ValueError(f"max_width must be None or a positive int (pixels), got {max_width!r}")
    if width <= max_width:
        return width, height
    return int(max_width), max(1, int(round(height * max_width / width)))


def resize_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(T, H, W, 3) uint8 -> (T, size[1], size[0], 3) uint8 (PIL antialiased bilinear); same size: as is."""
    if (frames.shape[2], frames.shape[1]) == tuple(size):
        return frames
    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize(size, Image.BILINEAR)) for f in frames])


def scale_points(xy: np.ndarray, source_size: tuple[int, int], size: tuple[int, int]) -> np.ndarray:
    """(x, y) pixel coordinates (..., 2) from an image of `source_size` (W, H) to one of `size`
    (W', H'), pixel centres aligned: x' = (x + 0.5) W' / W - 0.5 (likewise y)."""
    scale = np.array([size[0] / source_size[0], size[1] / source_size[1]])
    return (np.asarray(xy, dtype=np.float64) + 0.5) * scale - 0.5


# ----------------------------------------------------------------------------- stamps


@functools.lru_cache(maxsize=1)
def _font() -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=TEXT_PX)


@functools.lru_cache(maxsize=256)
def _glyph(char: str) -> tuple[np.ndarray, int, int, float]:
    """One character of the text font drawn without antialiasing: (mask (h, w) bool, left and top of
    the mask from the pen point on the baseline, advance in px)."""
    font = _font()
    left, top, right, bottom = font.getbbox(char, anchor="ls")
    canvas = Image.new("L", (max(right - left, 1), max(bottom - top, 1)), 0)
    draw = ImageDraw.Draw(canvas)
    draw.fontmode = "1"
    draw.text((-left, -top), char, fill=1, font=font, anchor="ls")
    return np.asarray(canvas) > 0, left, top, font.getlength(char)


@functools.lru_cache(maxsize=TEXT_STAMPS_CACHED)
def _text_stamp(text: str, fill: int, outline: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`text` set from cached glyphs with a `TEXT_OUTLINE_PX` outline (the glyphs dilated by a square):
    (dy, dx) int64 offsets of its pixels from the pen's start on the baseline and their palette
    indices (`fill` for glyphs, `outline` around them), read-only (cached: a process drawing many
    GIFs renders each id and each counter of a common frame rate once)."""
    pen, placed = 0.0, []
    for char in text:
        mask, left, top, advance = _glyph(char)
        placed.append((mask, round(pen) + left, top))
        pen += advance
    x0 = min(x for _, x, _ in placed) - TEXT_OUTLINE_PX
    y0 = min(y for _, _, y in placed) - TEXT_OUTLINE_PX
    width = max(x + m.shape[1] for m, x, _ in placed) - x0 + TEXT_OUTLINE_PX
    height = max(y + m.shape[0] for m, _, y in placed) - y0 + TEXT_OUTLINE_PX
    glyphs = np.zeros((height, width), dtype=bool)
    for mask, x, y in placed:
        glyphs[y - y0: y - y0 + mask.shape[0], x - x0: x - x0 + mask.shape[1]] |= mask
    grown = glyphs.copy()
    for shift in range(1, TEXT_OUTLINE_PX + 1):  # a square dilation, one row and one column at a time
        grown[shift:] |= glyphs[:-shift]
        grown[:-shift] |= glyphs[shift:]
    rows = grown.copy()
    for shift in range(1, TEXT_OUTLINE_PX + 1):
        grown[:, shift:] |= rows[:, :-shift]
        grown[:, :-shift] |= rows[:, shift:]
    dy, dx = np.nonzero(grown)
    values = np.where(glyphs[dy, dx], fill, outline).astype(np.uint8)
    stamp = (dy.astype(np.int64) + y0, dx.astype(np.int64) + x0, values)
    for array in stamp:
        array.flags.writeable = False
    return stamp


@functools.lru_cache(maxsize=1)
def _dot_offsets() -> tuple[np.ndarray, np.ndarray]:
    """(dy, dx) of the pixels of a dot centred on (0, 0): PIL's filled ellipse over [-r, r]^2."""
    size = 2 * DOT_RADIUS + 1
    canvas = Image.new("L", (size, size), 0)
    ImageDraw.Draw(canvas).ellipse([0, 0, size - 1, size - 1], fill=1)
    dy, dx = np.nonzero(np.asarray(canvas))
    return dy.astype(np.int64) - DOT_RADIUS, dx.astype(np.int64) - DOT_RADIUS


def _point_stamps(obj_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Every point's dot followed by its id (text rendered once per distinct id), points in order, as
    the research renderer draws them: (dy, dx, palette index, owning point), each (K,)."""
    ids = np.asarray(obj_ids, dtype=np.int64).reshape(-1)  # (N,)
    if len(ids) == 0:
        empty = np.zeros(0, np.int64)
        return empty, empty, np.zeros(0, np.uint8), empty
    unique, which = np.unique(ids, return_inverse=True)
    dot_dy, dot_dx = _dot_offsets()
    parts = []
    for value in unique.tolist():
        colour = value % len(ENTITY_PALETTE)
        text_dy, text_dx, text_values = _text_stamp(str(value), colour, outline_index(ENTITY_PALETTE[colour]))
        parts.append((np.concatenate([dot_dy, text_dy - ID_RAISE_PX]), np.concatenate([dot_dx, text_dx]),
                      np.concatenate([np.full(len(dot_dy), colour, np.uint8), text_values])))
    lengths = np.array([len(p[0]) for p in parts], dtype=np.int64)[which]  # (N,) pixels per point
    owner = np.repeat(np.arange(len(ids)), lengths)  # (K,)
    packed = [np.concatenate([p[k] for p in parts]) for k in range(3)]
    starts = np.concatenate([[0], np.cumsum([len(p[0]) for p in parts])[:-1]])[which]  # (N,)
    gather = np.arange(len(owner)) - np.repeat(np.cumsum(lengths) - lengths, lengths) + starts[owner]
    return packed[0][gather], packed[1][gather], packed[2][gather], owner


# ----------------------------------------------------------------------------- trails


def _trail_alpha(i: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Weight of segment t -> t + 1 in frame i, i - t <= TRAIL_SEGMENTS (research rule)."""
    return np.maximum(1.0 - 0.9 * (i - t) / ((i + 1) * 0.99), 0.1)


COORDINATE_LIMIT = 2**20  # px: track positions are clipped to +-this before rounding (keeps int64 exact)


def _inside_range(a: np.ndarray, d: np.ndarray, width: int, height: int):
    """Liang-Barsky: the part u in [lo, hi] of each segment a + u d, u in [0, 1] ((S, 2) int64 (x, y))
    inside [-1, width] x [-1, height], one pixel beyond the frame. -> (crosses (S,) bool, lo, hi (S,))."""
    lo, hi = np.zeros(len(a)), np.ones(len(a))
    crosses = np.ones(len(a), dtype=bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        for axis, bound in ((0, width), (1, height)):
            for p, q in ((-d[:, axis], a[:, axis] + 1.0), (d[:, axis], bound - a[:, axis])):
                ratio = q / p
                crosses &= ~((p == 0) & (q < 0))
                lo = np.where(p < 0, np.maximum(lo, ratio), lo)
                hi = np.where(p > 0, np.minimum(hi, ratio), hi)
    return crosses & (lo <= hi), lo, hi


def _rasterise(p0: np.ndarray, p1: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """The frame's pixels of width-1 lines p0 -> p1 (S, 2) float (x, y), endpoints rounded half to even
    (Python's round()), by PIL's rule: one pixel per step along the major axis, the minor offset
    rounded half away from zero. Only the steps near the frame are generated, so a far-away point
    costs no more than the frame's size. -> (segment (P,) int64, pixel y * width + x (P,) int64)."""
    a = np.rint(np.clip(p0, -COORDINATE_LIMIT, COORDINATE_LIMIT)).astype(np.int64)
    d = np.rint(np.clip(p1, -COORDINATE_LIMIT, COORDINATE_LIMIT)).astype(np.int64) - a
    n = np.abs(d).max(axis=1)  # (S,) steps along the major axis
    crosses, lo, hi = _inside_range(a, d, width, height)
    seg = np.flatnonzero(crosses)
    first = np.maximum(np.floor(lo[seg] * n[seg]).astype(np.int64) - 1, 0)  # (S',) steps that can be inside
    count = np.minimum(np.ceil(hi[seg] * n[seg]).astype(np.int64) + 1, n[seg]) - first + 1
    k = np.arange(count.sum()) - np.repeat(np.cumsum(count) - count, count) + np.repeat(first, count)  # (P,)
    steps = np.repeat(np.maximum(n[seg], 1), count)

    def along(axis: int) -> np.ndarray:
        size = np.repeat(np.abs(d[seg, axis]), count)
        return np.repeat(a[seg, axis], count) + np.repeat(np.sign(d[seg, axis]), count) * (
            (2 * k * size + steps) // (2 * steps))

    x, y = along(0), along(1)
    inside = (x >= 0) & (x < width) & (y >= 0) & (y < height)
    return np.repeat(seg, count)[inside], y[inside] * width + x[inside]


def _point_states(tracks: np.ndarray, visibility: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """tracks (T, N, 2), visibility (T, N) -> (tracks float64, alive (T, N): visible at this frame or a
    later one, finite (T, N): both coordinates finite)."""
    tracks = np.asarray(tracks, dtype=np.float64)
    alive = np.flip(np.logical_or.accumulate(np.flip(np.asarray(visibility, dtype=bool), 0), axis=0), 0)
    return tracks, alive, np.isfinite(tracks).all(axis=-1)


def _check_shapes(frames: np.ndarray, tracks, visibility, obj_ids, frame_times=None) -> None:
    t_len, n = np.shape(visibility) if np.ndim(visibility) == 2 else (0, 0)
    if (t_len < 1 or frames.ndim != 4 or frames.shape[0] != t_len or frames.shape[3] != 3
            or np.shape(tracks) != (t_len, n, 2) or np.shape(obj_ids) != (n,)
            or (frame_times is not None and np.shape(frame_times) != (t_len,))):
        raise ValueError(f"frames {frames.shape}, tracks {np.shape(tracks)}, visibility {np.shape(visibility)}, "
                         f"obj_ids {np.shape(obj_ids)} and frame_times {np.shape(frame_times)} do not fit "
                         "(T, H, W, 3), (T, N, 2), (T, N), (N,), (T,) with T >= 1")


def trail_video(frames: np.ndarray, tracks: np.ndarray, visibility: np.ndarray, obj_ids: np.ndarray) -> np.ndarray:
    """A copy of frames (T, H, W, 3) uint8 with the fading trails blended in (no dots, ids or counter).

    tracks (T, N, 2) float (x, y) pixels; visibility (T, N) bool; obj_ids (N,) int. Segment t -> t + 1
    of point j is drawn for a point visible at t or later with both positions finite, in its entity
    colour, as a width-1 line between the rounded positions; frame i shows the last TRAIL_SEGMENTS
    segments t < i, oldest first, each blended with weight max(1 - 0.9 (i - t) / (0.99 (i + 1)), 0.1)
    (the research rule), exactly as PIL's `ImageDraw.line` and `Image.blend` draw them.
    """
    video = np.array(frames, dtype=np.uint8)  # (T, H, W, 3)
    _check_shapes(video, tracks, visibility, obj_ids)
    tracks, alive, finite = _point_states(tracks, visibility)
    colours = np.asarray(entity_colours(obj_ids), dtype=np.float32).reshape(-1, 3)  # (N, 3)
    t_len, height, width = video.shape[:3]
    t, j = np.nonzero(alive[:-1] & finite[:-1] & finite[1:])  # segments, t-major
    seg, pixels = _rasterise(tracks[t, j], tracks[t + 1, j], width, height)  # (P,) each
    start = t[seg]  # (P,) the segment's first frame
    colour = colours[j[seg]]  # (P, 3)
    flat = video.reshape(-1)  # channel c of pixel p of frame f at (f * H * W + p) * 3 + c
    for age in range(min(TRAIL_SEGMENTS, t_len - 1), 0, -1):  # every frame's oldest segment first
        shown = start + age < t_len
        frame = start[shown] + age
        where = (frame * (height * width) + pixels[shown])[:, None] * 3 + np.arange(3)  # (P', 3)
        alpha = _trail_alpha(frame, frame - age).astype(np.float32)[:, None]
        before = flat.take(where).astype(np.float32)
        np.put(flat, where, (before + alpha * (colour[shown] - before)).astype(np.uint8))
    return video


# ----------------------------------------------------------------------------- rendering


def _shared_palette(samples: list[np.ndarray]) -> np.ndarray:
    """The GIF palette (K <= GIF_COLOURS, 3) uint8: FIXED_COLOURS, then the colours of the sample
    frames (H, W, 3) uint8 quantised at half resolution (fast octree)."""
    halves = [Image.fromarray(s).reduce(2) for s in samples]
    montage = Image.new("RGB", (max(h.width for h in halves), sum(h.height for h in halves)))
    top = 0
    for h in halves:
        montage.paste(h, (0, top))
        top += h.height
    content = montage.quantize(GIF_COLOURS - len(FIXED_COLOURS), method=Image.Quantize.FASTOCTREE)
    rgb = np.asarray(content.getpalette(), dtype=np.uint8).reshape(-1, 3)
    used = sorted(index for _, index in content.getcolors())
    return np.concatenate([np.asarray(FIXED_COLOURS, dtype=np.uint8), rgb[used]])


def render_indexed(
    frames: np.ndarray, tracks: np.ndarray, visibility: np.ndarray, obj_ids: np.ndarray, frame_times: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Draw fading trails (`trail_video`), dots, entity ids and the counter: the frames as the GIF holds them.

    frames (T, H, W, 3) uint8; tracks (T, N, 2) float (x, y) pixels; visibility (T, N) bool;
    obj_ids (N,) int; frame_times (T,) seconds (for the counter). A point is drawn at and after frame
    t while it is visible at some frame >= t. Dots are radius-2 discs and ids crisp text outlined by
    `outline_index` (baseline ID_RAISE_PX above the dot's centre), both in exactly the entity colour, drawn point after
    point (a later point's dot and id cover an earlier one's); the counter (`counter_text`, white
    outlined in black) sits in the top-left corner.
    -> (indices (T, H, W) uint8 into palette, palette (K, 3) uint8 RGB, K <= GIF_COLOURS);
    `palette[indices]` is the RGB video.
    """
    frames = np.asarray(frames)
    _check_shapes(frames, tracks, visibility, obj_ids, frame_times)
    video = trail_video(frames, tracks, visibility, obj_ids)  # (T, H, W, 3)
    tracks, alive, finite = _point_states(tracks, visibility)
    t_len, height, width = video.shape[:3]
    picks = np.unique(np.linspace(0, t_len - 1, PALETTE_SAMPLE_FRAMES).round().astype(int))
    palette = _shared_palette([video[i] for i in picks])
    template = Image.new("P", (1, 1))
    template.putpalette(palette.reshape(-1).tolist())
    tall = Image.fromarray(video.reshape(t_len * height, width, 3))  # one call: one colour cache for all frames
    indexed = np.asarray(tall.quantize(palette=template, dither=Image.Dither.NONE)).reshape(t_len, height, width)

    # A stamp reaches `reach` px from its point, so points farther than that outside the frame are
    # not drawn, and the others are stamped into the frame padded by `pad` > 2 * reach with no bounds
    # check; a point not drawn in a frame is stamped around (reach, reach), wholly inside the padding
    # (rows and columns < pad), which is cut off. One scatter per frame, point after point (a later
    # point's dot and id cover an earlier one's).
    dy, dx, values, owner = _point_stamps(obj_ids)
    reach = int(max(np.abs(dy).max(initial=0), np.abs(dx).max(initial=0)))
    pad = 2 * reach + 1
    padded_width = width + 2 * pad
    offsets = dy * padded_width + dx  # (K,)
    with np.errstate(invalid="ignore"):
        centre = np.where(finite[..., None], np.rint(tracks), -reach - 1)  # (T, N, 2)
        in_reach = (centre >= -reach).all(-1) & (centre[..., 0] < width + reach) & (centre[..., 1] < height + reach)
    drawn = alive & in_reach  # (T, N)
    centre_flat = np.where(drawn, (centre[..., 1] + pad) * padded_width + centre[..., 0] + pad,
                           reach * padded_width + reach).astype(np.int64)  # (T, N)
    lengths = np.bincount(owner, minlength=len(obj_ids))  # (N,) stamp pixels per point

    times = np.asarray(frame_times, dtype=np.float64)
    out = np.empty((t_len, height, width), dtype=np.uint8)
    canvas = np.empty((height + 2 * pad, padded_width), dtype=np.uint8)
    inner = canvas[pad: pad + height, pad: pad + width]
    for i in range(t_len):
        inner[...] = indexed[i]
        np.put(canvas, np.repeat(centre_flat[i], lengths) + offsets, values)
        out[i] = inner
        cy, cx, cv = _text_stamp(counter_text(i, t_len, float(times[i])), WHITE_INDEX, BLACK_INDEX)
        cy, cx = cy - cy.min() + COUNTER_MARGIN_PX, cx - cx.min() + COUNTER_MARGIN_PX  # its top-left corner
        fits = (cy >= 0) & (cy < height) & (cx >= 0) & (cx < width)
        out[i][cy[fits], cx[fits]] = cv[fits]
    return out, palette


# ----------------------------------------------------------------------------- files


def gif_bytes(
    frames: np.ndarray,
    tracks: np.ndarray,
    visibility: np.ndarray,
    obj_ids: np.ndarray,
    frame_times: np.ndarray,
    max_width: int | None = DEFAULT_MAX_WIDTH,
    encoder: str = "pil",
) -> bytes:
    """The trail GIF of a clip: an infinitely looping GIF at the clip's real frame rate.

    frames (T, H, W, 3) uint8; tracks (T, N, 2) (x, y) pixels of those frames; visibility (T, N);
    obj_ids (N,); frame_times (T,) seconds. `max_width` (pixels, None = full size) scales frames and
    tracks down together before drawing, so dots and text keep their pixel size. All frames share one
    palette of at most GIF_COLOURS colours (no dithering) in which dots, ids and counter are exact.
    `encoder` (one of GIF_ENCODERS) writes the frames; both decode to the same pixels.
    Plain arrays in, bytes out: a top-level function, so it can run in a worker process.
    """
    if encoder not in GIF_ENCODERS:
        raise ValueError(f"encoder must be one of {GIF_ENCODERS}, got {encoder!r}")
    frames = np.asarray(frames)
    source = (frames.shape[2], frames.shape[1])
    size = fitted_size(*source, max_width)
    tracks = scale_points(tracks, source, size) if size != source else np.asarray(tracks)
    indices, palette = render_indexed(resize_frames(frames, size), tracks, visibility, obj_ids, frame_times)
    encode = encode_gif if encoder == "literal" else encode_gif_pil
    return encode(indices, palette, frame_durations_ms(frame_times), loop=0)


def encode_gif_pil(indices: np.ndarray, palette: np.ndarray, durations_ms: list[int], loop: int = 0) -> bytes:
    """`semtrack.gif_encode.encode_gif`'s file written by PIL instead (its greedy LZW: smaller files,
    ≈ 13x the encoding CPU): indices (T, H, W) uint8 into palette (K, 3) uint8, one duration per frame."""
    flat_palette = palette.reshape(-1).tolist()
    images = []
    for index in indices:
        image = Image.frombytes("P", (index.shape[1], index.shape[0]), index.tobytes())
        image.putpalette(flat_palette)
        images.append(image)
    buffer = io.BytesIO()  # optimize=False: PIL's transparent "unchanged" pixels speckle video
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=durations_ms,
                   loop=loop, optimize=False)
    return buffer.getvalue()


def save_trail_gif(
    path: str | os.PathLike,
    frames: np.ndarray,
    tracks: np.ndarray,
    visibility: np.ndarray,
    obj_ids: np.ndarray,
    frame_times: np.ndarray,
    max_width: int | None = DEFAULT_MAX_WIDTH,
    encoder: str = "pil",
) -> None:
    """Write `gif_bytes` (same arguments) to `path`, atomically."""
    data = gif_bytes(frames, tracks, visibility, obj_ids, frame_times, max_width, encoder)
    with atomic_write(path) as f:
        f.write(data)


def save_cluster_overlay(
    path: str | os.PathLike,
    frame: np.ndarray,
    labels: np.ndarray,
    points: np.ndarray,
    point_ids: np.ndarray,
    max_width: int | None = DEFAULT_MAX_WIDTH,
) -> None:
    """Debug PNG (atomic): the frame beside a 50 % blend with its coloured label map and the points.

    frame (H, W, 3) uint8; labels (P, Q) int cluster ids (coloured by `label_colours`, upscaled
    nearest to the frame); points (M, 2) (x, y) pixels sampled in this frame, with their entity ids
    point_ids (M,). `max_width` (pixels, None = full size) scales each half down, points with it.
    """
    frame = np.asarray(frame)
    source = (frame.shape[1], frame.shape[0])
    w, h = fitted_size(*source, max_width)
    points = scale_points(np.asarray(points).reshape(-1, 2), source, (w, h))
    colour = Image.fromarray(label_colours(labels)).resize((w, h), Image.NEAREST)
    original = Image.fromarray(resize_frames(frame[None], (w, h))[0]).convert("RGB")
    blended = Image.blend(original, colour, 0.5)
    draw = ImageDraw.Draw(blended)
    for (x, y), c in zip(points, entity_colours(point_ids)):
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=c, outline=(255, 255, 255))
    canvas = Image.new("RGB", (2 * w, h))
    canvas.paste(original, (0, 0))
    canvas.paste(blended, (w, 0))
    with atomic_write(path) as f:
        canvas.save(f, format="PNG")
