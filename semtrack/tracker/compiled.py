"""Opt-in `torch.compile` of the tracker's refinement (`CoTrackerThreeOffline.refine`), one graph per
length bucket.

`torch.compile` specialises a graph on its input shapes, so every new clip length or point count
would compile again (and after dynamo's recompile limit silently run eager). `OfflineTracker` with
compiled buckets therefore pads every call to a bucket (`bucket_shape`): clips per call, frames and
points (support grid included) each rounded up to the ladders of `semtrack.defaults`
(`CLIP_BUCKETS`, `FRAME_BUCKETS`, `POINT_BUCKETS`); the padding is masked exactly as the padding of
clips of different lengths in one call, so each clip's result is still its solo run's. The
refinement is a pure tensor function whose loop bounds follow from the shapes, compiled with
`fullgraph=True` (a graph break is an error) and `dynamic=False`: one compilation per bucket (and
per `chunk_bytes` a call runs with, one value on the CPU, at most `len(CUDA_CHUNK_CHOICES)` on CUDA).

The backend is inductor's `compile_fx` with the options of mode "reduce-overhead" on CUDA (CUDA
graphs) and of the default mode elsewhere, wrapped to count its calls: `CompiledRefine.counts`
{bucket: compilations}. Counting the backend's calls is exact whatever the torch version (2.4 on),
since dynamo calls it once per graph it compiles.
"""
from __future__ import annotations

import warnings
from collections import Counter

import torch

from semtrack.defaults import CLIP_BUCKETS, FRAME_BUCKETS, MAX_BUCKETS, POINT_BUCKETS


def bucket(value: int, ladder: tuple[int, ...]) -> int:
    """The smallest rung of `ladder` >= `value`; beyond the last rung, the next multiple of the last
    rung's step (the difference of the last two rungs)."""
    for rung in ladder:
        if value <= rung:
            return rung
    step = ladder[-1] - ladder[-2]
    return ladder[-1] + -(-(value - ladder[-1]) // step) * step


def bucket_shape(clips: int, frames: int, points: int) -> tuple[int, int, int]:
    """(clips, frames, points) of one tracker call -> the padded (B, T, N) it runs at; `points`
    counts every query of a clip, the support grid included."""
    return bucket(clips, CLIP_BUCKETS), bucket(frames, FRAME_BUCKETS), bucket(points, POINT_BUCKETS)


def _inductor(gm, example_inputs):
    """Inductor's `compile_fx` with the options of mode "reduce-overhead" (CUDA graphs) for CUDA
    inputs, of the default mode else (what `torch.compile(mode=...)` passes it)."""
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
    return compile_fx(gm, example_inputs, config_patches=list_mode_options("reduce-overhead" if cuda else "default",
                                                                          False))


class CompiledRefine:
    """`model.refine` compiled once per shape, with the compilations counted per bucket.

    Call it as `refine` (the arguments of `CoTrackerThreeOffline.refine`); `counts`: Counter
    {(B, T, N, chunk_bytes): compilations}; `compilations`: their total. At most `MAX_BUCKETS`
    distinct shapes are compiled; a call of a further shape runs eager, with a warning. `inner`
    (graph module, example inputs) -> callable compiles each graph dynamo captured: inductor by
    default (see the module docstring); `lambda gm, _: gm.forward` counts dynamo's graphs
    without compiling them (what decides the count; tests use it where inductor would only cost time).
    """

    def __init__(self, model: torch.nn.Module, inner=None):
        import torch._dynamo.config as dynamo_config

        # A graph per bucket, not a symbolic one: dynamo's recompile limits (8 graphs per function, then
        # silently eager) raised so that several trackers of a process each get their MAX_BUCKETS.
        for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(dynamo_config, name):
                setattr(dynamo_config, name, max(getattr(dynamo_config, name), 8 * MAX_BUCKETS))
        self.model = model
        self.counts: Counter = Counter()
        self.key: tuple | None = None
        self.inner = inner or _inductor
        self._fn = torch.compile(model.refine, backend=self._backend, fullgraph=True, dynamic=False)

    @property
    def compilations(self) -> int:
        return sum(self.counts.values())

    def _backend(self, gm, example_inputs):
        self.counts[self.key] += 1
        return self.inner(gm, example_inputs)

    def __call__(self, levels, stored, xy, *rest):
        iters, chunk_bytes = rest[-2:]
        self.key = (xy.shape[0], levels[0].shape[0], xy.shape[1], chunk_bytes)
        if self.key not in self.counts and len(self.counts) >= MAX_BUCKETS:
            warnings.warn(f"tracker: {len(self.counts)} shapes compiled already, the limit; "
                          f"{self.key} runs eager", RuntimeWarning, stacklevel=2)
            return self.model.refine(levels, stored, xy, *rest)
        if xy.is_cuda:
            torch.compiler.cudagraph_mark_step_begin()
        out = self._fn(levels, stored, xy, *rest)
        # CUDA graphs reuse their output buffers at the next replay (the backward pass's).
        return tuple(o.clone() for o in out) if xy.is_cuda else out
