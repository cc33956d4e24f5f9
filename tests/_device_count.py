"""Count what a GPU would see of code run on the CPU: device ops and would-be host syncs.

`DeviceCounter` runs code under a `TorchFunctionMode` and a `TorchDispatchMode` and follows which
tensors would live on the GPU ("device tensors") although everything runs on the CPU:

* seeds: model parameters and buffers (`seed`), and whatever the code uploads;
* an upload: `.to(device)` / `.cuda()` of a host tensor with an explicit device;
* a factory called with an explicit `device=` (`torch.zeros(n, device=x.device)`), or made by an op
  inside a call that has a device tensor among its arguments;
* the output of any op with a device tensor among its inputs.

Everything else is a host tensor (`torch.arange(n)`, `torch.from_numpy(a)`, a clip's frames before
their upload). Downloads (`.cpu()`, `.numpy()`, `.tolist()`, `__array__`, `.to("cpu")` with the
string) give host tensors. Code that moves a device tensor to the host with `.to(torch.device(...))`
is not seen as a download: on the CPU that device cannot be told apart from the host.

Each aten op with a device tensor among its inputs (or a factory on the device) is one device op
(one kernel launch on CUDA). An op is a would-be host sync when CUDA would have to wait for the
device before the host can go on:

    item              `_local_scalar_dense` (`.item()`, `bool(t)`, `int(t)`, `if t:`), `equal`
    nonzero           `nonzero`, `argwhere`, and boolean-mask `index` / `index_put_` (they call it)
    masked_select     its output size depends on the data
    unique            `_unique2`, `unique_dim`, `unique_consecutive`
    repeat_interleave with a tensor of repeats and no `output_size`
    bincount          its output size is the data's maximum
    d2h               a download (above)
    h2d               a blocking upload: pageable memory, which CUDA copies after a stream sync:
                      `.to(device)` without `non_blocking=True`, `torch.tensor(data, device=...)`,
                      `x.new_tensor(data)`, or a host tensor (not a 0-d scalar) given to an op on
                      device tensors (`x[[0, 2]]`, `x[host_index]`), which CUDA uploads first

    stream            a stream synchronisation (`torch.cuda.current_stream().synchronize()`,
                      `Event.synchronize()`), seen under `cuda_code_paths`

Each sync is attributed to the innermost frame of the project (`semtrack/`, `datamodules/`) that
called it, as "path:line". Counts are kept per stage (`with counter.stage("features"): ...`).

`cuda_code_paths(counter)` runs the job's `Pipeline` as it runs on CUDA: stand-ins for the
`torch.cuda` calls it makes (events, the stream), the branches that ask a tensor's own device
(which stays the CPU here) taken as on CUDA, and every stage of `StageRunner` counted as its stage.
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

REPO_ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIRS = tuple(str(REPO_ROOT / name) + "/" for name in ("semtrack", "datamodules"))
SYNC_KINDS = ("item", "nonzero", "masked_select", "unique", "repeat_interleave", "bincount", "d2h", "h2d", "stream")

aten = torch.ops.aten
_ITEM = {aten._local_scalar_dense.default, aten.equal.default, aten.is_nonzero.default}
_NONZERO = {aten.nonzero.default, aten.argwhere.default}
_MASK_INDEX = {aten.index.Tensor, aten.index_put_.default, aten.index_put.default, aten._index_put_impl_.default}
_UNIQUE = {aten._unique2.default, aten.unique_dim.default, aten.unique_consecutive.default, aten._unique.default}
_REPEAT = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
_D2H_METHODS = {"cpu", "numpy", "tolist", "__array__"}
_UPLOADS = {"to", "cuda"}
_FROM_DATA = {"tensor", "as_tensor", "asarray"}  # make a tensor from host data


def _move_target(name: str, args, kwargs):
    """The device a `.to(...)` / `.cuda()` call names (None: a dtype-only call, or `.to(other)`)."""
    if name == "cuda":
        return "cuda"
    if kwargs.get("device") is not None:
        return kwargs["device"]
    return next((a for a in args[1:] if isinstance(a, (str, torch.device))), None)


def project_site() -> str:
    """'path:line' of the innermost project frame on the stack (or the innermost frame outside torch)."""
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
    """Python-level calls: where tensors move and which factories name a device."""

    def __init__(self, counter: DeviceCounter):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter, name = self.counter, getattr(func, "__name__", "")
        source = args[0] if args and isinstance(args[0], torch.Tensor) else None
        if source is not None and counter.on_device(source):
            if name in _D2H_METHODS or (name == "to" and _move_target(name, args, kwargs) == "cpu"):
                counter.sync("d2h")
                with counter.paused():
                    out = func(*args, **kwargs)
                    return out.detach() if out is source else out  # on the CPU: the same tensor
            if name == "new_tensor":
                counter.sync("h2d")
                with counter.paused():
                    out = func(*args, **kwargs)
                counter.mark(out)
                return out
        elif source is not None and name in _UPLOADS and _move_target(name, args, kwargs) is not None:
            if not kwargs.get("non_blocking", False):
                counter.sync("h2d")
            with counter.paused():
                out = func(*_on_cpu(args), **_on_cpu(kwargs)) if name == "to" else source
                out = out.detach() if out is source else out  # on the CPU: the same tensor
            counter.mark(out)
            return out
        explicit = kwargs.get("device") is not None
        if explicit and name in _FROM_DATA and not (source is not None and counter.on_device(source)):
            counter.sync("h2d")
        args, kwargs = _on_cpu(args), _on_cpu(kwargs)
        device_call = explicit or any(isinstance(t, torch.Tensor) and counter.on_device(t)
                                      for t in tree_leaves((args, kwargs)))
        with counter.device_call(device_call):
            out = func(*args, **kwargs)
        if explicit:
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    counter.mark(t)
        return out


def _on_cpu(tree):
    """`device="cuda"` anywhere in a call's arguments becomes the CPU: CUDA code paths run here."""
    if isinstance(tree, dict):
        return {k: _on_cpu(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_on_cpu(v) for v in tree)
    if isinstance(tree, torch.device) and tree.type == "cuda" or tree == "cuda":
        return torch.device("cpu")
    return tree


class _Dispatch(TorchDispatchMode):
    """aten ops: device ops, data-dependent syncs, implicit uploads; device-ness flows to outputs."""

    def __init__(self, counter: DeviceCounter):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if counter.is_paused:
            return func(*args, **kwargs)
        tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        on_device = [counter.on_device(t) for t in tensors]
        device = any(on_device) if tensors else counter.in_device_call
        out = func(*args, **kwargs)
        if device:
            if any(not d and t.dim() > 0 for t, d in zip(tensors, on_device)):
                counter.sync("h2d")  # CUDA would upload this host tensor first
            counter.op(func, args, kwargs)
            for t in tree_leaves(out):
                if isinstance(t, torch.Tensor):
                    counter.mark(t)
        return out


class DeviceCounter:
    """Device ops and would-be host syncs of the code run inside `with counter:` (module docstring).

    `ops[stage]`: device ops; `syncs[stage][kind]`: syncs by kind (`SYNC_KINDS`); `sites`:
    Counter of "path:line" of every sync. `seed(*modules_or_tensors)` declares what already lives on
    the device (model parameters and buffers) before counting. Calls that name `device="cuda"` run
    on the CPU, so code may take its CUDA branches (`device.type == "cuda"`) under the counter as
    long as it calls nothing of `torch.cuda` itself.
    """

    def __init__(self):
        self._device = WeakIdKeyDictionary()
        self.ops: Counter = Counter()
        self.syncs: dict[str, Counter] = defaultdict(Counter)
        self.sites: Counter = Counter()
        self.current = "other"
        self.is_paused = False
        self.in_device_call = False
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

    @contextlib.contextmanager
    def device_call(self, flag: bool):
        """Factories made inside (ops without tensor inputs) are on the device when `flag`."""
        before, self.in_device_call = self.in_device_call, flag or self.in_device_call
        try:
            yield
        finally:
            self.in_device_call = before

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


class _Event:
    """`torch.cuda.Event` stand-in: records nothing, times 0 ms; `synchronize` is a stream sync."""

    def __init__(self, counter: DeviceCounter):
        self.counter = counter

    def record(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        self.counter.sync("stream")

    def elapsed_time(self, other) -> float:
        return 0.0


class _Stream:
    """`torch.cuda.current_stream()` stand-in: `synchronize` is a stream sync."""

    def __init__(self, counter: DeviceCounter):
        self.counter = counter

    def synchronize(self) -> None:
        self.counter.sync("stream")


@contextlib.contextmanager
def cuda_code_paths(counter: DeviceCounter):
    """Run `semtrack.pipeline.Pipeline(..., device=torch.device("cuda"))` on the CPU as on CUDA.

    * `torch.cuda.Event` / `torch.cuda.current_stream` are stand-ins (`_Event`, `_Stream`);
    * the branches that ask a tensor's device take CUDA's side: the PIL-identical resize runs its
      device form (`fixed_point_resize`), clustering sums merged tokens with its one-hot matmul,
      the tracker checks query frames with `torch._assert_async`;
    * each `StageRunner` stage (its clock's span) is counted as that stage.
    """
    from semtrack import clustering, features, resize, runner
    from semtrack.tracker import predictor

    clock_call = runner.StageClock.__call__

    @contextlib.contextmanager
    def staged(clock, stage: str, videos: int):
        with counter.stage(stage), clock_call(clock, stage, videos):
            yield

    def check_on_device(frames: torch.Tensor, length: int, what: str) -> None:
        torch._assert_async(((frames >= 0) & (frames < length)).all(), f"{what}: query frame outside the video")

    patches = [
        (torch.cuda, "Event", lambda *a, **k: _Event(counter)),
        (torch.cuda, "current_stream", lambda *a, **k: _Stream(counter)),
        (features, "resize_pil_identical", resize.fixed_point_resize),
        (clustering, "_onehot_sums", lambda device: True),
        (predictor, "_check_query_frames", check_on_device),
        (runner.StageClock, "__call__", staged),
    ]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    try:
        for owner, name, value in patches:
            setattr(owner, name, value)
        yield counter
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)
