"""Track pickles: atomic writing and safe, validated reading.

A track file is the research format (REFERENCE section 11): a plain `pickle` of a dict of torch tensors

    pred_tracks      float (T, N, 2)  (x, y) in clip pixels of each tracked frame (float16 as written)
    pred_visibility  bool  (T, N)
    obj_ids          int64 (N,)       entity id of each point
    point_queries    int64 (N,)       query frame of each point (index into T)

plus, in files written by semtrack, one namespaced key `"semtrack"`: a dict of metadata (plain Python
values and tensors, e.g. `frame_times` float64 (T,) seconds of the source frames that were tracked).
Research training code does `pickle.load` and ignores the extra key. `per_point_queries` is never
written: training code changes behaviour when it appears (REFERENCE 13.2).

Pickles are code. `load_tracks` unpickles with a restricted unpickler that admits only the few
callables a dict of tensors needs, and rebuilds tensor storages with `torch.load(weights_only=True)`
instead of torch's own `torch.storage._load_from_bytes` (which unpickles the embedded bytes with
`weights_only=False`, i.e. runs whatever they contain).
"""
from __future__ import annotations

import collections
import io
import math
import os
import pickle
import pickletools
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path

import torch

REQUIRED_KEYS = ("pred_tracks", "pred_visibility", "obj_ids", "point_queries")
META_KEY = "semtrack"
# Keys research pickles may also hold (REFERENCE 11 and 13.2); kept in `TrackFile.extra`.
_OPTIONAL_KEYS = ("per_point_queries", "pt_dict")
_ALT_OBJ_ID_PREFIX = "obj_ids_"
_META_SCALARS = (str, int, float, bool, type(None))
# Opcodes a dict of tensors never needs: object construction outside `find_class`'s control
# (BUILD runs `__setstate__` on any object), persistent ids and the copyreg extension registry.
_FORBIDDEN_OPCODES = frozenset(
    {"BUILD", "INST", "OBJ", "NEWOBJ", "NEWOBJ_EX", "PERSID", "BINPERSID", "EXT1", "EXT2", "EXT4"}
)


class TrackFileError(ValueError):
    """A file that is not a valid track pickle (missing, truncated, unsafe, wrong schema)."""


@dataclass
class TrackFile:
    """One video's tracks, validated.

    tracks: (T, N, 2) float32, (x, y) pixels of the clip as decoded at extraction.
    visibility: (T, N) bool.
    obj_ids: (N,) int64 entity id per point.
    query_frames: (N,) int64 query frame per point (index into T); `point_queries` in the file.
    meta: the `"semtrack"` metadata dict ({} for research pickles).
    extra: other research keys present in the file (`obj_ids_*`, `per_point_queries`, `pt_dict`).
    """

    tracks: torch.Tensor
    visibility: torch.Tensor
    obj_ids: torch.Tensor
    query_frames: torch.Tensor
    meta: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.tracks.shape[0])

    @property
    def num_points(self) -> int:
        return int(self.tracks.shape[1])


# ---------------------------------------------------------------------------------------------
# Schema
# ---------------------------------------------------------------------------------------------


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"tensor {value.dtype} {tuple(value.shape)}"
    return type(value).__name__


def _check_meta_value(value, where: str) -> None:
    """Metadata may hold plain values, lists/tuples/dicts (str keys) of them, and CPU tensors."""
    if isinstance(value, _META_SCALARS):
        return
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise ValueError(f"{where}: only dense tensors are allowed, got {value.layout}")
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_meta_value(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, str):
                raise ValueError(f"{where}: keys must be str, got {k!r}")
            _check_meta_value(v, f"{where}[{k!r}]")
        return
    raise ValueError(f"{where}: {type(value).__name__} is not allowed (plain values, lists, dicts, tensors)")


def _validate(data, squeeze: bool = True) -> TrackFile:
    """Check a loaded/to-be-saved dict against the schema; -> TrackFile. Raises ValueError.
    `squeeze`: accept (and drop) a leading batch dim of 1 on tracks/visibility (research files)."""
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
    if vis.dtype != torch.bool or tuple(vis.shape) != (t, n):
        got = _describe(data["pred_visibility"])
        raise ValueError(f"'pred_visibility' must be a bool ({t}, {n}) tensor, got {got}")
    for key, value in (("obj_ids", obj_ids), ("point_queries", queries)):
        if value.dtype != torch.int64 or tuple(value.shape) != (n,):
            raise ValueError(f"{key!r} must be an int64 ({n},) tensor (N from 'pred_tracks'), got {_describe(value)}")
    tracks = tracks.float()  # (T, N, 2) float32: what TrackFile holds
    if not bool(torch.isfinite(tracks).all()):
        raise ValueError("'pred_tracks' contains NaN or infinite coordinates")
    if n and (int(queries.min()) < 0 or int(queries.max()) >= t):
        raise ValueError(f"'point_queries' must lie in [0, {t}), got [{int(queries.min())}, {int(queries.max())}]")
    meta = data.get(META_KEY, {})
    if not isinstance(meta, dict):
        raise ValueError(f"{META_KEY!r} must be a dict, got {type(meta).__name__}")
    _check_meta_value(meta, META_KEY)
    frame_times = meta.get("frame_times")
    if frame_times is not None and not (
        isinstance(frame_times, torch.Tensor) and frame_times.is_floating_point() and tuple(frame_times.shape) == (t,)
    ):
        raise ValueError(f"'{META_KEY}.frame_times' must be a float ({t},) tensor, got {_describe(frame_times)}")
    clip_size = meta.get("clip_size")
    if clip_size is not None and not (
        isinstance(clip_size, (list, tuple)) and len(clip_size) == 2
        and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in clip_size)
    ):
        raise ValueError(f"'{META_KEY}.clip_size' must be [H, W] positive ints, got {clip_size!r}")
    for key in data:
        if key == "per_point_queries" or (isinstance(key, str) and key.startswith(_ALT_OBJ_ID_PREFIX)):
            value = data[key]
            if not (isinstance(value, torch.Tensor) and not value.is_floating_point() and value.shape[:1] == (n,)):
                raise ValueError(f"{key!r} must be an integer tensor with N = {n} rows, got {_describe(value)}")
    extra = {k: data[k] for k in data if k not in REQUIRED_KEYS and k != META_KEY}
    return TrackFile(tracks, vis, obj_ids, queries, meta, extra)


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


def save_tracks(path: str | os.PathLike, tracks: dict) -> None:
    """Validate `tracks` (the module docstring's schema) and write it atomically to `path`.

    Writes `<path>.tmp-<pid>` in the same folder (created if needed), flushes and fsyncs it, then
    `os.replace`s it onto `path`: a crash leaves either the old file, the complete new one, or no
    file, never a partial one. The temporary file is removed on any error. Tensors are written as
    compact CPU copies with the standard `pickle` module (protocol 4) in torch's own tensor format,
    as the research script did, but with a fixed storage key: equal dicts give identical files.
    Raises ValueError (naming `path`) for a dict that does not match the schema, including any
    `per_point_queries` key.
    """
    path = Path(path)
    if isinstance(tracks, dict) and "per_point_queries" in tracks:
        raise ValueError(f"{path}: refusing to write 'per_point_queries' (it changes training behaviour)")
    try:
        _validate(tracks, squeeze=False)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None
    payload = _compact(tracks)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            _DeterministicPickler(f, protocol=4).dump(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------


def _storage_from_bytes(data: bytes):
    """Safe stand-in for `torch.storage._load_from_bytes`: the embedded legacy `torch.save` bytes
    are read with `weights_only=True` (storages only, no arbitrary callables), onto the CPU."""
    if not isinstance(data, (bytes, bytearray)):
        raise pickle.UnpicklingError(f"tensor storage must be bytes, got {type(data).__name__}")
    try:
        storage = torch.load(io.BytesIO(bytes(data)), weights_only=True, map_location="cpu")
    except Exception as exc:
        detail = re.search(r"[^\n]*(?:GLOBAL|[Uu]nsupported)[^\n]*", str(exc))  # torch's reason line
        raise pickle.UnpicklingError(
            "embedded tensor storage refused by torch.load(weights_only=True)"
            + (f": {detail.group(0).strip()}" if detail else f": {type(exc).__name__}")
        ) from None
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"embedded tensor data is a {type(storage).__name__}, not a storage")
    return storage


def _is_int_tuple(value) -> bool:
    return isinstance(value, tuple) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)


def _rebuild_tensor(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    """Checked `torch._utils._rebuild_tensor_v2`: a plain dense tensor from a storage, no hooks."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    if not (isinstance(storage_offset, int) and storage_offset >= 0 and _is_int_tuple(size)
            and _is_int_tuple(stride) and len(size) == len(stride)):
        raise pickle.UnpicklingError("tensor with an invalid offset, size or stride")
    if requires_grad not in (True, False) or backward_hooks or metadata:
        raise pickle.UnpicklingError("tensor with gradient state, hooks or metadata")
    numel = math.prod(size)
    if numel and storage_offset + sum((s - 1) * st for s, st in zip(size, stride)) >= storage._size():
        raise pickle.UnpicklingError("tensor view outside its storage")
    return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False, collections.OrderedDict())


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what a dict of (CPU) tensors needs."""

    _ALLOWED = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("collections", "OrderedDict"): collections.OrderedDict,
    }

    def find_class(self, module: str, name: str):
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}") from None

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _check_opcodes(data: bytes) -> None:
    """Reject a stream that is not one well-formed pickle or that uses opcodes a dict of tensors
    does not need (see `_FORBIDDEN_OPCODES`). Parses only; runs nothing."""
    end = 0
    for opcode, _, pos in pickletools.genops(data):
        if opcode.name in _FORBIDDEN_OPCODES:
            raise pickle.UnpicklingError(f"forbidden pickle opcode {opcode.name} at byte {pos}")
        end = pos
    if end + 1 != len(data):
        raise pickle.UnpicklingError(f"{len(data) - end - 1} trailing bytes after the pickle")


def load_tracks(path: str | os.PathLike) -> TrackFile:
    """Read and validate one track pickle (semtrack's or the research script's) -> `TrackFile`.

    Research pickles (no `"semtrack"` key) load with `meta = {}`; a leading batch dim of 1 on
    `pred_tracks` / `pred_visibility` is squeezed as the training code does. Tracks come back as
    float32. Raises `TrackFileError` (a ValueError) naming the file and the problem for a missing or
    unreadable file, a truncated or non-pickle file, a pickle that references anything outside what a
    dict of tensors needs (nothing in it is run), or a schema mismatch (keys, dtypes, shapes, lengths).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TrackFileError(f"{path}: cannot read track file ({exc.strerror or exc})") from None
    if not data:
        raise TrackFileError(f"{path}: empty file (0 bytes)")
    try:
        _check_opcodes(data)
        obj = _RestrictedUnpickler(io.BytesIO(data)).load()
    except Exception as exc:  # any unpickling failure: truncated, garbage, forbidden, bad storage
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise TrackFileError(f"{path}: not a valid track pickle: {reason[:300]}") from None
    try:
        return _validate(obj)
    except ValueError as exc:
        raise TrackFileError(f"{path}: {exc}") from None
