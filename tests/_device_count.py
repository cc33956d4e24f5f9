"""Count what a GPU would see of code run on the CPU: device ops and would-be host syncs.

`DeviceCounter` runs code under a `TorchFunctionMode` and a `TorchDispatchMode` and follows which
tensors live on "the device". The device is `COUNTED_DEVICE` (`torch.device("cpu", 0)`): a CPU
device that torch tells apart from the host (`torch.device("cpu")`), so code built for
`device=COUNTED_DEVICE` runs on the CPU while every upload is a real `_to_copy` and every factory
call names the device. A tensor is on the device when a factory made it there, an upload put it
there, it is a seeded model parameter or buffer, or an op made it from a device tensor.

Each aten op with a device tensor among its inputs (or a factory on the device) is one device op
(one kernel launch on CUDA). An op is a would-be host sync when CUDA would have to wait for the
device before the host can go on:

    item              `_local_scalar_dense` (`.item()`, `bool(t)`, `int(t)`, `if t:`), `equal`
    nonzero           `nonzero`, `argwhere`, and boolean-mask `index` / `index_put_` (they call it)
    masked_select     its output size depends on the data
    unique            `_unique2`, `unique_dim`, `unique_consecutive`
    repeat_interleave with a tensor of repeats and no `output_size`
    bincount          its output size is the data's maximum
    d2h               `.cpu()`, `.to("cpu")`, `.numpy()`, `.tolist()`, `__array__` of a device tensor
    h2d               a blocking upload: `.to(device)` without `non_blocking=True`, or
                      `torch.tensor(data, device=...)` / `torch.as_tensor(..., device=...)`

Each sync is attributed to the innermost frame of the project (`semtrack/`, `datamodules/`) that
called it, as "path:line". Counts are kept per stage (`with counter.stage("features"): ...`).
"""
from __future__ import annotations

import contextlib
import sys
from collections import Counter, defaultdict
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.weak import WeakIdKeyDictionary

COUNTED_DEVICE = torch.device("cpu", 0)
REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIRS = tuple(str(REPO_ROOT / name) + "/" for name in ("semtrack", "datamodules"))
SYNC_KINDS = ("item", "nonzero", "masked_select", "unique", "repeat_interleave", "bincount", "d2h", "h2d")

aten = torch.ops.aten
_ITEM = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
_NONZERO = {aten.nonzero.default, aten.argwhere.default}
_MASK_INDEX = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
_UNIQUE = {aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten._unique.default}
_REPEAT = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_D2H_METHODS = {"cpu", "numpy", "tolist", "__array__"}
_MAKERS = {"tensor", "as_tensor", "asarray"}


def _is_counted_device(device) -> bool:
    if isinstance(device, str):
        device = torch.device(device)
    return isinstance(device, torch.device) and device == COUNTED_DEVICE


def _is_host(device) -> bool:
    if isinstance(device, str):
        device = torch.device(device)
    return isinstance(device, torch.device) and device.type == "cpu" and device.index is None


def _target_device(args, kwargs):
    """The device a `Tensor.to(...)` call moves to (None: a dtype-only or same-device call)."""
    if "device" in kwargs:
        return kwargs["device"]
    for arg in args[1:]:
        if isinstance(arg, (str, torch.device)):
            return arg
        if isinstance(arg, torch.Tensor):
            return None  # `.to(other)`: follows `other`, which the dispatch side sees
    return None


def project_site() -> str:
    """'path:line' of the innermost project frame on the stack (or the innermost non-torch frame)."""
    frame, fallback = sys._getframe(2), None
    while frame is not None:
        name = frame.f_code.co_filename
        if name.startswith(PROJECT_DIRS):
            return f"{Path(name).relative_to(REPO_ROOT)}:{frame.f_lineno}"
        if fallback is None and "/torch/" not in name and name != __file__:
            fallback = f"{name}:{frame.f_lineno}"
        frame = frame.f_back
    return fallback or "?"


class _Functions(TorchFunctionMode):
    """Python-level calls: downloads and uploads that the aten level cannot tell apart on the CPU."""

    def __init__(self, counter: DeviceCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        counter = self.counter
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is not None and counter.on_device(source):
            if name in _D2H_METHODS or (name == "to" and _is_host(_target_device(args, kwargs))):
                counter.sync("d2h")
                with counter.paused():
                    out = func(*args, **kwargs)
                    return out.detach() if out is source else out  # on the CPU: an alias, on the host
        if name in _MAKERS and _is_counted_device(kwargs.get("device")) and source is None:
            counter.sync("h2d")
            out = func(*args, **kwargs)
            counter.mark(out)
            return out
        return func(*args, **kwargs)


class _Dispatch(TorchDispatchMode):
    """aten ops: device ops, data-dependent syncs, uploads; device-ness flows from inputs to outputs."""

    def __init__(self, counter: DeviceCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if counter.is_paused:
            return func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        if func is aten._to_copy.default and _is_counted_device(kwargs.get("device")):
            device = True
            if not any(counter.on_device(t) for t in tensors) and not kwargs.get("non_blocking", False):
                counter.sync("h2d")
        elif tensors:
            device = any(counter.on_device(t) for t in tensors)
        else:
            device = _is_counted_device(kwargs.get("device"))  # a factory
        out = func(*args, **kwargs)
        if device:
            counter.op(func, args, kwargs)
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    counter.mark(t)
        return out


class DeviceCounter:
    """Device ops and would-be host syncs of the code run inside `with counter:` (module docstring).

    `ops[stage]`: device ops; `syncs[stage][kind]`: syncs by kind (`SYNC_KINDS`); `sites`:
    Counter of "path:line" of every sync. `seed(*modules_or_tensors)` declares what already lives on
    the device (model parameters and buffers) before counting.
    """

    def __init__(self):
        self._device = WeakIdKeyDictionary()
        self.ops: Counter = Counter()
        self.syncs: dict[str, Counter] = defaultdict(Counter)
        self.sites: Counter = Counter()
        self.current = "other"
        self.is_paused = False
        self._modes: list = []

    # ------------------------------------------------------------------ bookkeeping
    def seed(self, *things) -> None:
        for thing in things:
            if isinstance(thing, torch.nn.Module):
                for t in (*thing.parameters(), *thing.buffers()):
                    self.mark(t)
            elif isinstance(thing, torch.Tensor):
                self.mark(thing)

    def mark(self, tensor: torch.Tensor) -> None:
        self._device[tensor] = True

    def on_device(self, tensor: torch.Tensor) -> bool:
        return tensor in self._device

    @contextlib.contextmanager
    def stage(self, name: str):
        """Attribute what runs inside to stage `name`."""
        before, self.current = self.current, name
        try:
            yield
        finally:
            self.current = before

    @contextlib.contextmanager
    def paused(self):
        """Neither count nor mark what runs inside (the counter's own aliases)."""
        before, self.is_paused = self.is_paused, True
        try:
            yield
        finally:
            self.is_paused = before

    def sync(self, kind: str) -> None:
        self.syncs[self.current][kind] += 1
        self.sites[project_site()] += 1

    def op(self, func, args, kwargs) -> None:
        self.ops[self.current] += 1
        if func in _ITEM:
            self.sync("item")
        elif func in _NONZERO:
            self.sync("nonzero")
        elif func in _MASK_INDEX and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                         for i in tree_leaves(args[1])):
            self.sync("nonzero")
        elif func is aten.masked_select.default:
            self.sync("masked_select")
        elif func in _UNIQUE:
            self.sync("unique")
        elif func in _REPEAT and kwargs.get("output_size") is None:
            self.sync("repeat_interleave")
        elif func is aten.bincount.default:
            self.sync("bincount")

    # ------------------------------------------------------------------ totals
    def total_syncs(self, stage: str | None = None) -> int:
        stages = [stage] if stage is not None else list(self.syncs)
        return sum(sum(self.syncs[s].values()) for s in stages)

    def syncs_by_kind(self) -> Counter:
        out: Counter = Counter()
        for counts in self.syncs.values():
            out.update(counts)
        return out

    def __enter__(self) -> DeviceCounter:
        self._modes = [_Functions(self), _Dispatch(self)]
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        self._modes = []
