"""Track pickles: atomic writing and safe, validated, bounded reading.

A track file is the research format (REFERENCE section 11): a plain `pickle` of a dict of torch tensors

    pred_tracks      float (T, N, 2)  (x, y) in clip pixels of each tracked frame (float16 as written)
    pred_visibility  bool  (T, N)
    obj_ids          int64 (N,)       entity id of each point
    point_queries    int64 (N,)       query frame of each point (index into T)

plus, in files written by semtrack, one namespaced key `"semtrack"`: a dict of metadata (plain Python
values and tensors, e.g. `frame_times` float64 (T,) seconds of the source frames that were tracked and,
optionally, `confidence` float (T, N) the tracker's visibility probabilities). Research training code
does `pickle.load` and ignores the extra key. `per_point_queries` is never written: training code
changes behaviour when it appears (REFERENCE 13.2).

Pickles are code. `loads_tracks` / `load_tracks` run nothing from the file and bound the time and memory
a file can cost: `semtrack.safepickle.unpickle` checks the opcode stream before unpickling and builds the
dict with a restricted unpickler (its docstring says how), then the dict is checked against the schema.
Any failure is a `TrackFileError` naming the file.
"""
from __future__ import annotations

import collections
import io
import os
import pickle
import pickletools
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

import semtrack
from semtrack.safeio import UnsafeFile, atomic_write, check_regular
from semtrack.safepickle import MAX_DEPTH, MAX_ELEMENTS, MAX_VALUES
from semtrack.safepickle import torch_save_kind as _torch_save_kind
from semtrack.safepickle import unpickle as _unpickle

REQUIRED_KEYS = ("pred_tracks", "pred_visibility", "obj_ids", "point_queries")
META_KEY = "semtrack"
# Keys research pickles may also hold (REFERENCE 11 and 13.2); kept in `TrackFile.extra`.
_OPTIONAL_KEYS = ("per_point_queries", "pt_dict")
_ALT_OBJ_ID_PREFIX = "obj_ids_"
_META_SCALARS = (str, int, float, bool, type(None))

# Bounds on what one track file may cost to read: the tensor elements, values, nesting depth and pickle
# opcodes are bounded in `semtrack.safepickle` (MAX_ELEMENTS, MAX_VALUES, MAX_DEPTH, MAX_PICKLE_OPCODES).
# File size: every element at 8 bytes (float64 / int64) plus 64 MiB for the pickle's own structure.
MAX_FILE_BYTES = 8 * MAX_ELEMENTS + 2**26


class TrackFileError(ValueError):
    """A file that is not a valid track pickle (missing, truncated, unsafe, oversized, wrong schema)."""


@dataclass
class TrackFile:
    """One video's tracks, validated.

    tracks: (T, N, 2) float32, (x, y) pixels of the clip as decoded at extraction; T >= 1, N >= 1.
    visibility: (T, N) bool.
    obj_ids: (N,) int64 entity id per point.
    query_frames: (N,) int64 query frame per point (index into T); `point_queries` in the file.
    meta: the `"semtrack"` metadata dict ({} for research pickles).
    extra: other research keys present in the file (`obj_ids_*`, `per_point_queries`, `pt_dict`).
    tracks_dtype: the dtype `pred_tracks` had in the file (float16 for semtrack and research files).
    """

    tracks: torch.Tensor
    visibility: torch.Tensor
    obj_ids: torch.Tensor
    query_frames: torch.Tensor
    meta: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    tracks_dtype: torch.dtype = torch.float16

    @property
    def num_frames(self) -> int:
        return int(self.tracks.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.tracks.shape[1])

    def as_dict(self) -> dict:
        """The file's dict in the research format, as research training code reads it:
        `pred_tracks` (T, N, 2) in `tracks_dtype` (float16 for semtrack and research files; a leading batch
        dim of 1 is not restored), `pred_visibility` (T, N) bool, `obj_ids` (N,) int64, `point_queries`
        (N,) int64, the extra research keys as stored, and `"semtrack": meta` unless meta is empty. The
        tensors other than `pred_tracks` are this TrackFile's own, not copies. For a semtrack file,
        `dumps_tracks(load_tracks(p).as_dict())` gives the file's bytes."""
        data = {
            "pred_tracks": self.tracks.to(self.tracks_dtype),
            "pred_visibility": self.visibility,
            "obj_ids": self.obj_ids,
            "point_queries": self.query_frames,
            **self.extra,
        }
        if self.meta:
            data[META_KEY] = self.meta
        return data


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {value.dtype} {tuple(value.shape)}"
    return type(value).__name__


def _where(path) -> str:
    """`path` is () for the dict itself, else (parent path, key): -> e.g. "semtrack['config'][2]"."""
    keys = []
    while path:
        path, key = path
        keys.append(key)
    if not keys:
        return "the dict"
    top, *rest = reversed(keys)
    return str(top) + "".join(f"[{k!r}]" for k in rest)


def _check_meta_leaf(value, path) -> None:
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise ValueError(f"{_where(path)}: only dense tensors are allowed, got {value.layout}")
    elif not isinstance(value, _META_SCALARS):
        raise ValueError(f"{_where(path)}: {type(value).__name__} is not allowed (plain values, lists, dicts, tensors)")


def _check_values(data: dict) -> None:
    """Walk every value of the dict, iteratively, counting as `semtrack.safepickle.check_pickle` does
    (each value and each dict key once per reference, so a cycle or a "billion laughs" stops at the
    bound): at most `MAX_VALUES` values and containers nested at most `MAX_DEPTH` deep (the dict is
    depth 1). Under `"semtrack"` only plain values, lists, tuples, dicts with str keys and dense tensors are allowed.
    Raises ValueError naming the value."""
    pending = [(data, (), 0, False)]  # (value, path, containers around it, under "semtrack")
    visits = 0
    while pending:
        value, path, depth, in_meta = pending.pop()
        visits += 1 + (len(value) if isinstance(value, dict) else 0)
        if visits + len(pending) > MAX_VALUES:
            raise ValueError(f"{_where(path)}: more than {MAX_VALUES} values (a shared value counts at each reference)")
        if isinstance(value, dict):
            bad_keys = [k for k in value if not isinstance(k, str)] if in_meta else []
            if bad_keys:
                raise ValueError(f"{_where(path)}: keys must be str, got {bad_keys[:3]}")
            children = value.items()
        elif isinstance(value, (list, tuple)):
            children = enumerate(value)
        else:
            if in_meta:
                _check_meta_leaf(value, path)
            continue
        if depth >= MAX_DEPTH:
            raise ValueError(f"{_where(path)}: containers nested more than {MAX_DEPTH} deep")
        pending.extend((v, (path, k), depth + 1, in_meta or (not path and k == META_KEY)) for k, v in children)


def _check_frame_times(frame_times, t: int) -> None:
    where = f"'{META_KEY}.frame_times'"
    if not (isinstance(frame_times, torch.Tensor) and frame_times.is_floating_point()
            and tuple(frame_times.shape) == (t,)):
        raise ValueError(f"{where} must be a float ({t},) tensor, got {_describe(frame_times)}")
    if not bool(torch.isfinite(frame_times).all()):
        raise ValueError(f"{where} contains NaN or infinite times")
    if not bool((frame_times[1:] >= frame_times[:-1]).all()):
        raise ValueError(f"{where} must be non-decreasing (source timestamps of the tracked frames)")


def _check_meta(meta, t: int, n: int) -> None:
    """The `"semtrack"` dict's keys with a fixed form (its value types: `_check_values`)."""
    if not isinstance(meta, dict):
        raise ValueError(f"{META_KEY!r} must be a dict, got {type(meta).__name__}")
    if meta.get("frame_times") is not None:
        _check_frame_times(meta["frame_times"], t)
    confidence = meta.get("confidence")
    if confidence is not None and not (
        isinstance(confidence, torch.Tensor) and confidence.is_floating_point() and tuple(confidence.shape) == (t, n)
    ):
        raise ValueError(f"'{META_KEY}.confidence' must be a float ({t}, {n}) tensor, got {_describe(confidence)}")
    clip_size = meta.get("clip_size")
    if clip_size is not None and not (
        isinstance(clip_size, (list, tuple)) and len(clip_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in clip_size)
    ):
        raise ValueError(f"'{META_KEY}.clip_size' must be [H, W] positive ints, got {clip_size!r}")


def _check_keys(data) -> None:
    if not isinstance(data, dict):
        raise ValueError(f"expected a dict of tensors, got {type(data).__name__}")
    missing = [k for k in REQUIRED_KEYS if k not in data]
    if missing:
        raise ValueError(f"missing keys {missing} (has {sorted(map(str, data))})")
    unknown = [
        k for k in data
        if k not in REQUIRED_KEYS and k != META_KEY and k not in _OPTIONAL_KEYS
        and not (isinstance(k, str) and k.startswith(_ALT_OBJ_ID_PREFIX))
    ]
    if unknown:
        raise ValueError(f"unexpected keys {unknown}")
    for key in REQUIRED_KEYS:
        if not isinstance(data[key], torch.Tensor):
            raise ValueError(f"{key!r} must be a torch tensor, got {_describe(data[key])}")


def _check_extra(data, n: int) -> None:
    """Research keys: `per_point_queries` and `obj_ids_*` are integer tensors with N rows."""
    for key, value in data.items():
        if key == "per_point_queries" or (isinstance(key, str) and key.startswith(_ALT_OBJ_ID_PREFIX)):
            if not (isinstance(value, torch.Tensor) and not value.is_floating_point() and value.shape[:1] == (n,)):
                raise ValueError(f"{key!r} must be an integer tensor with N = {n} rows, got {_describe(value)}")


def _validate(data, squeeze: bool = True) -> TrackFile:
    """Check a loaded/to-be-saved dict against the schema; -> TrackFile. Raises ValueError.
    `squeeze`: accept (and drop) a leading batch dim of 1 on tracks/visibility (research files)."""
    _check_keys(data)
    _check_values(data)
    tracks, vis = data["pred_tracks"], data["pred_visibility"]
    obj_ids, queries = data["obj_ids"], data["point_queries"]
    if squeeze and tracks.dim() == 4 and tracks.shape[0] == 1:  # research files may keep the batch dim
        tracks = tracks[0]
    if squeeze and vis.dim() == 3 and vis.shape[0] == 1:
        vis = vis[0]
    if not tracks.is_floating_point() or tracks.dim() != 3 or tracks.shape[2] != 2:
        raise ValueError(f"'pred_tracks' must be a float (T, N, 2) tensor, got {_describe(data['pred_tracks'])}")
    t, n = tracks.shape[:2]
    if t < 1:
        raise ValueError("'pred_tracks' has no frames (T = 0)")
    if n < 1:
        raise ValueError("'pred_tracks' has no points (N = 0)")
    if vis.dtype != torch.bool or tuple(vis.shape) != (t, n):
        got = _describe(data["pred_visibility"])
        raise ValueError(f"'pred_visibility' must be a bool ({t}, {n}) tensor, got {got}")
    for key, value in (("obj_ids", obj_ids), ("point_queries", queries)):
        if value.dtype != torch.int64 or tuple(value.shape) != (n,):
            raise ValueError(f"{key!r} must be an int64 ({n},) tensor (N from 'pred_tracks'), got {_describe(value)}")
    tracks_dtype = tracks.dtype
    tracks = tracks.float()  # (T, N, 2) float32: what TrackFile holds
    if not bool(torch.isfinite(tracks).all()):
        raise ValueError("'pred_tracks' contains NaN or infinite coordinates")
    if int(queries.min()) < 0 or int(queries.max()) >= t:
        raise ValueError(f"'point_queries' must lie in [0, {t}), got [{int(queries.min())}, {int(queries.max())}]")
    meta = data.get(META_KEY, {})
    _check_meta(meta, t, n)
    _check_extra(data, n)
    extra = {k: data[k] for k in data if k not in REQUIRED_KEYS and k != META_KEY}
    return TrackFile(tracks, vis, obj_ids, queries, meta, extra, tracks_dtype)


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


# dtypes torch pickles through `_rebuild_tensor_v2` + a typed storage (the research files' path)
_V2_DTYPES = frozenset({
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.bool, torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
})
_FIXED_STORAGE_KEY = "0"


def _binunicode(text: str) -> bytes:
    data = text.encode()
    return b"X" + struct.pack("<I", len(data)) + data


def _storage_bytes(tensor: torch.Tensor) -> bytes:
    """The legacy `torch.save` bytes torch embeds for a tensor's storage, with the storage key
    (torch uses the storage's memory address) replaced by a fixed one, so that equal tensors give
    equal bytes. The file layout is: 4 small pickles (magic, protocol, system info, the storage
    record), a pickled list of storage keys, then the raw data. If the key cannot be located
    exactly (twice, in the pickles), torch's bytes are returned unchanged."""
    storage = torch.storage.TypedStorage(wrap_storage=tensor.untyped_storage(), dtype=tensor.dtype, _internal=True)
    buf = io.BytesIO()
    torch.save(storage, buf, _use_new_zipfile_serialization=False)
    raw = buf.getvalue()
    f = io.BytesIO(raw)
    for _ in range(4):
        for _ in pickletools.genops(f):
            pass
    keys = [arg for op, arg, _ in pickletools.genops(f) if op.name == "BINUNICODE"]
    header_end = f.tell()
    if len(keys) != 1:
        return raw
    old, new = _binunicode(keys[0]), _binunicode(_FIXED_STORAGE_KEY)
    header = raw[:header_end]
    if header.count(old) != 2:
        return raw
    return header.replace(old, new) + raw[header_end:]


class _StorageBytes:
    """Pickles as `torch.storage._load_from_bytes(data)`, as torch pickles a typed storage."""

    def __init__(self, data: bytes):
        self.data = data

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.data,)


class _DeterministicPickler(pickle.Pickler):
    """The standard pickler, with plain CPU tensors reduced exactly as torch reduces them
    (`_rebuild_tensor_v2(_load_from_bytes(b), offset, size, stride, False, OrderedDict())`) except
    for the storage key inside `b`: the same dict gives the same bytes in every process."""

    def reducer_override(self, obj):
        if (
            type(obj) is not torch.Tensor or obj.dtype not in _V2_DTYPES or obj.device.type != "cpu"
            or obj.layout != torch.strided or obj.requires_grad or obj.is_conj() or obj.is_neg()
            or obj.untyped_storage().nbytes() != obj.numel() * obj.element_size() or not obj.is_contiguous()
        ):
            return NotImplemented  # anything unusual: torch's own reduce
        args = (_StorageBytes(_storage_bytes(obj)), obj.storage_offset(), tuple(obj.shape), obj.stride(),
                False, collections.OrderedDict())
        return torch._utils._rebuild_tensor_v2, args


def _compact(value):
    """CPU copies with their own storage (pickling a view would write the whole base storage)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").clone(memory_format=torch.contiguous_format)
    if isinstance(value, dict):
        return {k: _compact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_compact(v) for v in value)
    return value


def tracks_dict(result, weights: dict, options: dict) -> dict:
    """The track file's dict of a tracked video (what `dumps_tracks` writes).

    result: a `semtrack.records.VideoResult` with tracks; weights: {"tracker": id, "dinov2": id or
    None} of the loaded models; options: the run's output options (`semtrack.sidecar.run_options`),
    kept as the metadata's `config`. Tracks are stored as float16 (T, N, 2), visibility bool (T, N),
    ids and query frames int64 (N,), confidence float16 (T, N) when present.
    """
    clip, tr = result.clip, result.tracks
    meta = {
        "frame_times": clip.frame_times.to(torch.float64),
        "source_fps": float(clip.source_fps),
        "fps": None if clip.fps is None else float(clip.fps),
        "fps_rule": options["fps_rule"],
        "clip_size": list(clip.size),
        "video_path": clip.video_path,
        "dataset": clip.dataset,
        "video_id": clip.video_id,
        "decoder": clip.decoder,
        "mode": "grid" if options["use_grid"] else "semantic",
        "num_dropped_points": int(tr.num_dropped),
        "version": semtrack.__version__,
        "tracker_weights": weights["tracker"],
        "dinov2_weights": weights["dinov2"],
        "config": dict(options),
    }
    if tr.confidence is not None:
        meta["confidence"] = tr.confidence.to(torch.float16)
    return {
        "pred_tracks": tr.tracks.to(torch.float16),
        "pred_visibility": tr.visibility.to(torch.bool),
        "obj_ids": tr.obj_ids.to(torch.int64),
        "point_queries": tr.query_frames.to(torch.int64),
        META_KEY: meta,
    }


def dumps_tracks(tracks: dict) -> bytes:
    """Validate `tracks` (the module docstring's schema) and pickle it -> the bytes of its track file.

    Tensors are written as compact CPU copies with the standard `pickle` module (protocol 4) in torch's
    own tensor format, as the research script did, but with a fixed storage key: equal dicts give
    identical bytes in every process. Raises ValueError for a dict that does not match the schema,
    including any `per_point_queries` key.
    """
    if isinstance(tracks, dict) and "per_point_queries" in tracks:
        raise ValueError("refusing to write 'per_point_queries' (it changes training behaviour)")
    _validate(tracks, squeeze=False)
    buf = io.BytesIO()
    _DeterministicPickler(buf, protocol=4).dump(_compact(tracks))
    return buf.getvalue()


def save_tracks(path: str | os.PathLike, tracks: dict) -> None:
    """Write `dumps_tracks(tracks)` atomically to `path`.

    Through `semtrack.safeio.atomic_write`: a crash leaves either the old file, the complete new one,
    or no file, never a partial one. Raises ValueError (naming `path`) for a dict that does not match
    the schema, before anything is written.
    """
    path = Path(path)
    try:
        data = dumps_tracks(tracks)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    with atomic_write(path) as f:
        f.write(data)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _reason(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    if not isinstance(exc, (pickle.UnpicklingError, ValueError)) or not text:
        text = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return text[:300]


def loads_tracks(data: bytes, name: str) -> TrackFile:
    """Read and validate one track pickle's bytes (semtrack's or the research script's) -> `TrackFile`.

    Research pickles (no `"semtrack"` key) load with `meta = {}`; a leading batch dim of 1 on
    `pred_tracks` / `pred_visibility` is squeezed as the training code does. Tracks come back as
    float32. Nothing in `data` is run, and reading it costs bounded time and memory (module docstring).
    Raises `TrackFileError` (a ValueError) whose message starts with `name` (e.g. the file or tar member)
    for every failure: empty, oversized, a `torch.save` archive, truncated or not a pickle, anything
    outside what a dict of tensors needs, bounds exceeded, or a schema mismatch (keys, dtypes, shapes,
    lengths, N = 0, non-finite values, non-finite or decreasing frame times).
    """
    if not data:
        raise TrackFileError(f"{name}: empty file (0 bytes)")
    if len(data) > MAX_FILE_BYTES:
        raise TrackFileError(f"{name}: {len(data)} bytes, more than a track file holds ({MAX_FILE_BYTES})")
    try:
        kind = _torch_save_kind(data)
        if kind:
            raise TrackFileError(
                f"{name}: a torch.save archive ({kind} format), not a track pickle: track files are a plain"
                " pickle of the dict of tensors (pickle.dump, or semtrack.trackfile.save_tracks)"
            )
        try:
            obj = _unpickle(data)
        except Exception as exc:  # truncated, garbage, forbidden, bounds, bad storage, out of memory, ...
            raise TrackFileError(f"{name}: not a valid track pickle: {_reason(exc)}") from None
        return _validate(obj)
    except TrackFileError:
        raise
    except Exception as exc:
        raise TrackFileError(f"{name}: {_reason(exc)}") from None


def _read_at_most(f, limit: int, first: int) -> bytes:
    """Up to `limit` bytes of binary file `f`: `first` bytes, then 1 MiB pieces (no buffer beyond that)."""
    chunks, total, piece = [], 0, first
    while total < limit:
        chunk = f.read(min(piece, limit - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
        piece = 2**20
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def load_tracks(path: str | os.PathLike) -> TrackFile:
    """`loads_tracks` of the file at `path`; its errors name `path`. A missing or unreadable file, one
    that is not a regular file (a FIFO does not block: it is refused, as are devices) or one larger than
    `MAX_FILE_BYTES` is a `TrackFileError` too, refused before it is read."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            size = check_regular(fd, path, None).st_size
            if size > MAX_FILE_BYTES:
                raise TrackFileError(f"{path}: {size} bytes, more than a track file holds ({MAX_FILE_BYTES})")
            data = _read_at_most(f, MAX_FILE_BYTES + 1, first=max(size + 1, 2**20))
    except TrackFileError:
        raise
    except UnsafeFile as exc:
        raise TrackFileError(str(exc)) from None
    except OSError as exc:
        raise TrackFileError(f"{path}: cannot read track file ({exc.strerror or exc})") from None
    except Exception as exc:
        raise TrackFileError(f"{path}: cannot read track file ({_reason(exc)})") from None
    return loads_tracks(data, str(path))
