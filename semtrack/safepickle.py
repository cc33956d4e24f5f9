"""Safe, bounded unpickling of a dict of CPU tensors (the shape of a track file): runs nothing from the data.

`unpickle(data)` is the one entry point; it refuses anything else with `pickle.UnpicklingError` (a malformed
opcode stream may raise ValueError, EOFError, ...: callers catch Exception). Two passes:
1. `check_pickle` follows the opcode stream symbolically before anything is unpickled: only the opcodes
   and the four callables a dict of tensors needs, dict keys and set elements that hash in constant time,
   memo indices and opcode count bounded, no cycles, bounded nesting depth and bounded size with every
   reference to a shared value counted (no "billion laughs");
2. `RestrictedUnpickler` then builds it, with checked stand-ins for those callables: tensor storages are
   rebuilt with `torch.load(weights_only=True)` after the same structure check of their embedded headers
   (torch's own `torch.storage._load_from_bytes` unpickles them with `weights_only=False`, i.e. runs
   whatever they contain), and every tensor view must lie inside its storage without overlapping
   elements, all tensors together holding at most `MAX_ELEMENTS` elements.
`torch_save_kind` tells a `torch.save` archive (which this refuses) apart, for a clearer error.
"""
from __future__ import annotations

import collections
import io
import math
import pickle
import pickletools
import re
import zipfile

import torch

# Bounds on what one track file may cost to read. The largest legitimate file tracks a few thousand frames
# x a few thousand points; its dict holds a dozen tensors and a few dozen metadata values.
# Tensor elements of all tensors together: 8192 frames x 8192 points x 4 (x, y, visibility, confidence).
MAX_ELEMENTS = 2**28
# Opcodes in one pickle, and memo slots it may use: a semtrack file has a few hundred; a research file's
# precomputed `pt_dict` (index lists of a few hundred entries per sampling type and point count) some thousands.
MAX_PICKLE_OPCODES = 200_000
# Values a pickle's object holds, counting every reference to a shared value each time (dict keys count).
MAX_VALUES = 200_000
# Container nesting (the root dict is depth 1; semtrack files nest 4 deep: file > "semtrack" > "config" > list).
MAX_DEPTH = 32

# The callables a dict of tensors needs: (module, name) -> (what the call gives, as `check_pickle` models
# it; the `RestrictedUnpickler` method that stands in for it).
_ADMITTED_CALLS = {
    ("torch._utils", "_rebuild_tensor_v2"): ("object", "_rebuild_tensor"),  # a tensor
    ("torch.storage", "_load_from_bytes"): ("object", "_storage_from_bytes"),  # a storage
    ("_codecs", "encode"): ("object", "_latin1_bytes"),  # bytes, as protocol 2 writes them
    ("collections", "OrderedDict"): ("dict", "_empty_ordered_dict"),  # a tensor's (empty) backward hooks
}
# Classes the storage record inside a tensor's embedded legacy `torch.save` bytes names (never called).
_STORAGE_CLASSES = frozenset(
    ("torch", f"{kind}Storage") for kind in (
        "Half", "BFloat16", "Float", "Double", "ComplexFloat", "ComplexDouble",
        "Bool", "Byte", "Char", "Short", "Int", "Long",
    )
)
# The pickles before the raw data in legacy `torch.save` bytes: magic number, protocol version, system
# info, the storage record, the list of storage keys.
_LEGACY_HEADER_PICKLES = 5
_LEAF_KINDS = {
    "NONE": "const", "NEWTRUE": "const", "NEWFALSE": "const",
    "INT": "int", "BININT": "int", "BININT1": "int", "BININT2": "int", "LONG": "int", "LONG1": "int",
    "FLOAT": "scalar", "BINFLOAT": "scalar", "BINBYTES": "scalar", "SHORT_BINBYTES": "scalar", "BINBYTES8": "scalar",
    "STRING": "str", "BINSTRING": "str", "SHORT_BINSTRING": "str",
    "UNICODE": "str", "BINUNICODE": "str", "SHORT_BINUNICODE": "str", "BINUNICODE8": "str",
}
_EMPTY_CONTAINERS = {"EMPTY_LIST": "list", "EMPTY_TUPLE": "tuple", "EMPTY_DICT": "dict", "EMPTY_SET": "set"}
_MARKED_CONTAINERS = {"LIST": "list", "TUPLE": "tuple", "DICT": "dict", "FROZENSET": "frozenset"}
_SMALL_TUPLES = {"TUPLE1": 1, "TUPLE2": 2, "TUPLE3": 3}
_HASH_BOUND = 2**61 - 1  # ints below this hash to themselves (no crafted collisions)
_NAME_CHARS = 256  # longest str value kept for STACK_GLOBAL names
_TORCH_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy `torch.save` file


class _Value:
    """What the unpickler's stack holds, as `check_pickle` models it: a kind ("str", "int", "const",
    "scalar", "global", "object", or a container kind), a short value (str, int, or (module, name)) and,
    for containers, the values they hold (a dict's keys and values alternately)."""

    __slots__ = ("kind", "value", "items")

    def __init__(self, kind: str, value=None, items: list | None = None):
        self.kind, self.value, self.items = kind, value, items


class _PickleModel:
    """The unpickler's stack, marks and memo, followed opcode by opcode (`step`); refuses anything a dict
    of tensors does not need, and anything that would make the real unpickler do more than linear work.
    `calls`: admitted callables, (module, name) -> (result kind, ...); `classes`: admitted globals that
    are never called; `persistent_ids`: whether BINPERSID may occur."""

    def __init__(self, calls: dict, classes: frozenset, persistent_ids: bool):
        self.calls, self.classes = calls, classes
        self.stack: list[_Value] = []
        self.marks: list[int] = []
        self.memo: dict[int, _Value] = {}
        handlers = {
            "PROTO": self._proto, "FRAME": self._ignore, "MARK": self._mark, "POP": self._pop,
            "POP_MARK": self._pop_mark, "DUP": self._dup, "APPEND": self._append, "APPENDS": self._appends,
            "SETITEM": self._setitem, "SETITEMS": self._setitems, "ADDITEMS": self._additems,
            "GLOBAL": self._global, "STACK_GLOBAL": self._stack_global, "REDUCE": self._reduce,
        }
        handlers.update(dict.fromkeys(_LEAF_KINDS, self._leaf))
        handlers.update(dict.fromkeys(_EMPTY_CONTAINERS, self._empty))
        handlers.update(dict.fromkeys(_MARKED_CONTAINERS, self._marked))
        handlers.update(dict.fromkeys(_SMALL_TUPLES, self._small_tuple))
        handlers.update(dict.fromkeys(("PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"), self._put))
        handlers.update(dict.fromkeys(("GET", "BINGET", "LONG_BINGET"), self._get))
        if persistent_ids:
            handlers["BINPERSID"] = self._persistent_id
        self.handlers = handlers

    def step(self, name: str, arg, pos: int) -> None:
        handler = self.handlers.get(name)
        if handler is None:
            raise pickle.UnpicklingError(f"forbidden pickle opcode {name} at byte {pos}")
        handler(name, arg, pos)

    # stack access, with the unpickler's rule that nothing below the last mark may be popped
    def pop(self) -> _Value:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise pickle.UnpicklingError("unpickling stack underflow")
        return self.stack.pop()

    def top(self) -> _Value:
        if len(self.stack) <= (self.marks[-1] if self.marks else 0):
            raise pickle.UnpicklingError("unpickling stack underflow")
        return self.stack[-1]

    def pop_to_mark(self) -> list[_Value]:
        if not self.marks:
            raise pickle.UnpicklingError("could not find MARK")
        start = self.marks.pop()
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def target(self, kind: str, opcode: str) -> _Value:
        value = self.top()
        if value.kind != kind:
            raise pickle.UnpicklingError(f"{opcode} on {value.kind}, not on a {kind}")
        return value

    def admitted_global(self, module, name) -> _Value:
        if (module, name) not in self.calls and (module, name) not in self.classes:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return _Value("global", (module, name))

    # one handler per opcode group: (opcode name, its argument, its byte offset)
    def _proto(self, name, arg, pos):
        if not 0 <= arg <= pickle.HIGHEST_PROTOCOL:
            raise pickle.UnpicklingError(f"unsupported pickle protocol {arg}")

    def _ignore(self, name, arg, pos):
        pass

    def _leaf(self, name, arg, pos):
        kind = "const" if isinstance(arg, bool) or arg is None else _LEAF_KINDS[name]
        keep = arg if kind == "int" or (kind == "str" and len(arg) <= _NAME_CHARS) else None
        self.stack.append(_Value(kind, keep))

    def _empty(self, name, arg, pos):
        self.stack.append(_Value(_EMPTY_CONTAINERS[name], items=[]))

    def _marked(self, name, arg, pos):
        items = self.pop_to_mark()
        kind = _MARKED_CONTAINERS[name]
        if kind == "dict":
            _check_key_value_pairs(items, name)
        elif kind == "frozenset":
            _check_keys_hash_fast(items, name)
        self.stack.append(_Value(kind, items=items))

    def _small_tuple(self, name, arg, pos):
        items = [self.pop() for _ in range(_SMALL_TUPLES[name])][::-1]
        self.stack.append(_Value("tuple", items=items))

    def _mark(self, name, arg, pos):
        self.marks.append(len(self.stack))

    def _pop(self, name, arg, pos):
        if self.marks and self.marks[-1] == len(self.stack):
            self.marks.pop()  # as the unpickler does: POP right after MARK discards the mark
        else:
            self.pop()

    def _pop_mark(self, name, arg, pos):
        self.pop_to_mark()

    def _dup(self, name, arg, pos):
        self.stack.append(self.top())

    def _append(self, name, arg, pos):
        value = self.pop()
        self.target("list", name).items.append(value)

    def _appends(self, name, arg, pos):
        items = self.pop_to_mark()
        self.target("list", name).items.extend(items)

    def _setitem(self, name, arg, pos):
        value, key = self.pop(), self.pop()
        _check_key_value_pairs([key, value], name)
        self.target("dict", name).items.extend((key, value))

    def _setitems(self, name, arg, pos):
        items = self.pop_to_mark()
        _check_key_value_pairs(items, name)
        self.target("dict", name).items.extend(items)

    def _additems(self, name, arg, pos):
        items = self.pop_to_mark()
        _check_keys_hash_fast(items, name)
        self.target("set", name).items.extend(items)

    def _put(self, name, arg, pos):
        index = len(self.memo) if name == "MEMOIZE" else arg
        if index >= MAX_PICKLE_OPCODES:  # the unpickler's memo is an array of (twice) that size
            raise pickle.UnpicklingError(f"memo index {index} at byte {pos} (at most {MAX_PICKLE_OPCODES})")
        self.memo[index] = self.top()

    def _get(self, name, arg, pos):
        if arg not in self.memo:
            raise pickle.UnpicklingError(f"memo index {arg} at byte {pos} was never set")
        self.stack.append(self.memo[arg])

    def _global(self, name, arg, pos):
        self.stack.append(self.admitted_global(*arg.split(" ", 1)))

    def _stack_global(self, name, arg, pos):
        gname, module = self.pop(), self.pop()
        if gname.kind != "str" or module.kind != "str" or gname.value is None or module.value is None:
            raise pickle.UnpicklingError("STACK_GLOBAL needs two short str names")
        self.stack.append(self.admitted_global(module.value, gname.value))

    def _reduce(self, name, arg, pos):
        args, func = self.pop(), self.pop()
        if func.kind != "global" or func.value not in self.calls or args.kind != "tuple":
            raise pickle.UnpicklingError(
                f"REDUCE needs an admitted global and an argument tuple, got {func.kind} and {args.kind}")
        kind = self.calls[func.value][0]
        if kind == "dict" and args.items:
            raise pickle.UnpicklingError(f"{'.'.join(func.value)} is admitted only empty")
        self.stack.append(_Value(kind, items=[] if kind == "dict" else None))

    def _persistent_id(self, name, arg, pos):
        self.pop()
        self.stack.append(_Value("object"))


def _hashes_fast(value: _Value) -> bool:
    """Dict keys and set elements the unpickler hashes: only values that hash in constant time without
    crafted collisions (str, small ints, None, bools); never tuples, whose hash walks all they hold."""
    return value.kind in ("str", "const") or (value.kind == "int" and abs(value.value) < _HASH_BOUND)


def _check_keys_hash_fast(keys: list[_Value], opcode: str) -> None:
    for key in keys:
        if not _hashes_fast(key):
            raise pickle.UnpicklingError(f"{opcode}: a {key.kind} as dict key or set element (str, int, None only)")


def _check_key_value_pairs(items: list[_Value], opcode: str) -> None:
    if len(items) % 2:
        raise pickle.UnpicklingError(f"{opcode} with an odd number of items")
    _check_keys_hash_fast(items[0::2], opcode)


def _check_expansion(root: _Value) -> None:
    """Refuse a value that contains itself, nests containers more than `MAX_DEPTH` deep, or holds more
    than `MAX_VALUES` values when every reference to a shared value is counted. Linear in the graph."""
    size: dict[int, int] = {}  # id -> values under it, itself included
    on_path: set[int] = set()  # containers whose contents are being counted (the current path)
    pending = [(root, False)]
    while pending:
        node, counted = pending.pop()
        if node.items is None or id(node) in size:
            continue
        if counted:
            on_path.discard(id(node))
            size[id(node)] = 1 + sum(size.get(id(v), 1) for v in node.items)
            if size[id(node)] > MAX_VALUES:
                raise pickle.UnpicklingError(
                    f"more than {MAX_VALUES} values (a shared value counts at each reference)")
            continue
        if id(node) in on_path:
            raise pickle.UnpicklingError("a container that contains itself")
        on_path.add(id(node))
        if len(on_path) > MAX_DEPTH:
            raise pickle.UnpicklingError(f"containers nested more than {MAX_DEPTH} deep")
        pending.append((node, True))
        pending.extend((v, False) for v in node.items if v.items is not None and id(v) not in size)


def check_pickle(stream, calls: dict = _ADMITTED_CALLS, classes: frozenset = frozenset(),
                  persistent_ids: bool = False) -> None:
    """Follow one pickle from `stream` (binary, positioned at its start; left just after its STOP)
    without unpickling it; raise `pickle.UnpicklingError` (or ValueError for a malformed opcode stream)
    if it is more than `MAX_PICKLE_OPCODES` opcodes, uses an opcode or global outside `calls` / `classes`
    (persistent ids only if `persistent_ids`), or builds anything `_PickleModel` / `_check_expansion`
    refuse. Runs nothing."""
    model = _PickleModel(calls, classes, persistent_ids)
    for count, (opcode, arg, pos) in enumerate(pickletools.genops(stream), 1):
        if count > MAX_PICKLE_OPCODES:
            raise pickle.UnpicklingError(f"more than {MAX_PICKLE_OPCODES} pickle opcodes")
        if opcode.name == "STOP":
            _check_expansion(model.pop())
            return
        model.step(opcode.name, arg, pos)
    raise pickle.UnpicklingError("pickle exhausted before STOP")


def _is_int_tuple(value) -> bool:
    return type(value) is tuple and all(type(v) is int and v >= 0 for v in value)


def _fits_without_overlap(offset: int, size: tuple, stride: tuple, storage_size: int) -> bool:
    """Whether a (size, stride) view at `offset` addresses distinct elements, all inside a storage of
    `storage_size` elements: along the dims of size > 1, by increasing stride, each stride exceeds the
    farthest offset the smaller ones reach (so no stride 0 and no interleaving)."""
    if 0 in size:
        return True
    reach = 0
    for st, sz in sorted((st, sz) for sz, st in zip(size, stride) if sz > 1):
        if st <= reach:
            return False
        reach += st * (sz - 1)
    return offset + reach < storage_size


class RestrictedUnpickler(pickle.Unpickler):
    """Admits only what a dict of (CPU) tensors needs (`_ADMITTED_CALLS`, through the checked methods
    below), for a stream `check_pickle` accepted. Bounds what the file's values can amplify: tensor
    elements in all (`MAX_ELEMENTS`), and the bytes `_codecs.encode` makes and storages decode (each at
    most the file's size)."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self._byte_budget = {"made": len(data), "decoded": len(data)}
        self._elements = 0

    def find_class(self, module: str, name: str):
        if (module, name) not in _ADMITTED_CALLS:
            raise pickle.UnpicklingError(f"forbidden global {module}.{name}")
        return getattr(self, _ADMITTED_CALLS[module, name][1])

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not allowed")

    def _spend_bytes(self, budget: str, nbytes: int) -> None:
        self._byte_budget[budget] -= nbytes
        if self._byte_budget[budget] < 0:
            raise pickle.UnpicklingError(f"bytes {budget} while unpickling exceed the file's own size")

    def _latin1_bytes(self, text, encoding):
        """`_codecs.encode` exactly as protocol 2 pickles bytes: `encode(str, "latin1")` -> bytes."""
        if type(text) is not str or type(encoding) is not str or encoding != "latin1":
            raise pickle.UnpicklingError("_codecs.encode is admitted only as (str, 'latin1'), protocol 2's bytes")
        self._spend_bytes("made", len(text))
        return text.encode("latin-1")

    def _empty_ordered_dict(self, *args, **kwargs):
        if args or kwargs:
            raise pickle.UnpicklingError("collections.OrderedDict is admitted only empty")
        return collections.OrderedDict()

    def _storage_from_bytes(self, data):
        """Safe stand-in for `torch.storage._load_from_bytes`: the embedded legacy `torch.save` bytes
        get the structure check, then are read with `weights_only=True` (storages only, no arbitrary
        callables), onto the CPU."""
        if type(data) is not bytes:
            raise pickle.UnpicklingError(f"tensor storage must be bytes, got {type(data).__name__}")
        self._spend_bytes("decoded", len(data))
        stream = io.BytesIO(data)
        try:
            for _ in range(_LEGACY_HEADER_PICKLES):
                check_pickle(stream, calls={}, classes=_STORAGE_CLASSES, persistent_ids=True)
        except (pickle.UnpicklingError, ValueError) as exc:
            raise pickle.UnpicklingError(f"embedded tensor storage refused before torch.load: {exc}") from None
        try:
            storage = torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
        except Exception as exc:
            detail = re.search(r"[^\n]*(?:GLOBAL|[Uu]nsupported)[^\n]*", str(exc))  # torch's reason line
            raise pickle.UnpicklingError(
                "embedded tensor storage refused by torch.load(weights_only=True)"
                + (f": {detail.group(0).strip()}" if detail else f": {type(exc).__name__}")
            ) from None
        if not isinstance(storage, torch.storage.TypedStorage):
            raise pickle.UnpicklingError(f"embedded tensor data is a {type(storage).__name__}, not a storage")
        return storage

    def _rebuild_tensor(self, storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
        """Checked `torch._utils._rebuild_tensor_v2`: a plain dense view of a storage, no hooks, whose
        elements are distinct and inside the storage; checked before the view exists."""
        if not isinstance(storage, torch.storage.TypedStorage):
            raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
        if not (type(storage_offset) is int and storage_offset >= 0 and _is_int_tuple(size)
                and _is_int_tuple(stride) and len(size) == len(stride)):
            raise pickle.UnpicklingError("tensor with an invalid offset, size or stride")
        if (type(requires_grad) is not bool or type(backward_hooks) not in (dict, collections.OrderedDict)
                or backward_hooks or metadata not in (None, {})):
            raise pickle.UnpicklingError("tensor with gradient state, hooks or metadata")
        if not _fits_without_overlap(storage_offset, size, stride, storage._size()):
            raise pickle.UnpicklingError(
                f"tensor view outside its storage or with overlapping elements (stride 0 or overlapping strides):"
                f" offset {storage_offset}, size {size[:8]}, stride {stride[:8]}, storage {storage._size()}"
            )
        self._elements += math.prod(size)
        if self._elements > MAX_ELEMENTS:
            raise pickle.UnpicklingError(f"the file's tensors hold more than {MAX_ELEMENTS} elements in all")
        return torch._utils._rebuild_tensor_v2(storage, storage_offset, size, stride, False, collections.OrderedDict())


def torch_save_kind(data: bytes) -> str | None:
    """'zip' or 'legacy' if `data` is a `torch.save` archive (default zip format, or the legacy format
    that starts with torch's magic number pickle), else None."""
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                names = archive.namelist()
        except (zipfile.BadZipFile, ValueError, OSError):
            return None
        return "zip" if any(n.endswith("data.pkl") for n in names) else None
    prefixes = (pickle.dumps(_TORCH_MAGIC, protocol=p) for p in range(2, pickle.HIGHEST_PROTOCOL + 1))
    return "legacy" if any(data.startswith(prefix) for prefix in prefixes) else None


def unpickle(data: bytes):
    """`check_pickle` the whole of `data`, then unpickle it with `RestrictedUnpickler`."""
    stream = io.BytesIO(data)
    check_pickle(stream)
    if stream.tell() != len(data):
        raise pickle.UnpicklingError(f"{len(data) - stream.tell()} trailing bytes after the pickle")
    return RestrictedUnpickler(data).load()
