"""Running the stages of one batch of clips: calls, retries, failure pinning, clocks, memory budget.

`StageRunner.run(stage, clips, fn, *inputs)` applies a stage function to the clips still alive,
one call per group (`calls`); when a call raises (CUDA out of memory included) its clips are
retried one by one, so a failure is pinned on one clip (stage + one-line reason) and the others go
on. `TrackingBudget.calls` cuts tracking work into calls whose estimated memory fits a budget and
refuses, untried, a clip that does not fit alone, naming the fix.
"""
from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch

from semtrack.records import Clip, Failure
from semtrack.util import one_line

GB = 1e9
Calls = Callable[[list[Clip]], "tuple[list[list[Clip]], dict[int, str]]"]


class StageClock:
    """Per-stage seconds without synchronising the device: CUDA events, read once the device caught up."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list[tuple[str, int, Any, Any]] = []

    @contextlib.contextmanager
    def __call__(self, stage: str, videos: int):
        """Time the body as `videos` videos of `stage` (also when it raises)."""
        if self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self.marks.append((stage, videos, start, end))
        else:
            start = time.perf_counter()
            try:
                yield
            finally:
                self.marks.append((stage, videos, start, time.perf_counter()))

    def totals(self) -> dict[str, tuple[float, int]]:
        """{stage: (seconds, videos)}; on CUDA call it after the device has caught up."""
        out: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        for stage, videos, start, end in self.marks:
            out[stage][0] += start.elapsed_time(end) / 1000.0 if self.cuda else end - start
            out[stage][1] += videos
        return {stage: (seconds, int(videos)) for stage, (seconds, videos) in out.items()}


def one_call(clips: list[Clip]) -> tuple[list[list[Clip]], dict[int, str]]:
    """Every clip in one call, none refused."""
    return [clips], {}


class StageRunner:
    """The stages of one batch: which clips are alive, why the others failed, how long each stage took.

    `failures`: {row: Failure} of this batch; `clock`: the per-stage clock.
    """

    def __init__(self, device: torch.device):
        self.clock = StageClock(device)
        self.failures: dict[int, Failure] = {}

    def fail(self, clip: Clip, stage: str, reason: str) -> None:
        self.failures[clip.row] = Failure(stage, reason)

    def alive(self, clips: Sequence[Clip]) -> list[Clip]:
        return [c for c in clips if c.row not in self.failures]

    def run(self, stage: str, clips: Sequence[Clip], fn: Callable[..., list], *inputs: dict[int, Any],
            calls: Calls = one_call) -> dict[int, Any]:
        """`fn(clips, *[input values of those clips]) -> [output per clip]` over the clips alive.

        `inputs`: {row: value} of earlier stages. `calls` cuts the clips into calls and may refuse
        some (recorded as failures of this stage, untried). A call that raises is retried clip by
        clip; a clip that still raises fails with `one_line(exc)`. Returns {row: output}.
        """
        todo, refused = calls(self.alive(clips))
        todo = [group for group in todo if group]
        for row, reason in refused.items():
            self.failures[row] = Failure(stage, reason)
        out: dict[int, Any] = {}
        for group in todo:
            if not self._call(stage, group, fn, inputs, out, len(group)) and len(group) > 1:
                for clip in group:
                    self._call(stage, [clip], fn, inputs, out, 0)  # the retries count no new videos
        return out

    def _call(self, stage: str, group: list[Clip], fn, inputs, out: dict, videos: int) -> bool:
        try:
            with self.clock(stage, videos):
                results = fn(group, *([values[c.row] for c in group] for values in inputs))
        except Exception as exc:  # noqa: BLE001 - any failure is pinned on a clip
            if isinstance(exc, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()
            if len(group) == 1:
                self.fail(group[0], stage, one_line(exc))
            return False
        out.update((clip.row, result) for clip, result in zip(group, results))
        return True


class TrackingBudget:
    """Cuts tracking calls to fit `limit` bytes (None: no limit).

    `need(clips, frames)` estimates the bytes of one call on `clips` (each cut to `frames` frames
    when given); it must grow with the clips and the frames. `describe(clip)` names the work
    ("T frames x N points at HxW") in the refusal reason.
    """

    def __init__(self, limit: float | None, need: Callable[[Sequence[Clip], int | None], float],
                 describe: Callable[[Clip], str]):
        self.limit, self.need, self.describe = limit, need, describe

    def calls(self, clips: list[Clip]) -> tuple[list[list[Clip]], dict[int, str]]:
        """-> (balanced consecutive calls that fit, {row: reason} for clips that do not fit alone)."""
        if self.limit is None:
            return [clips], {}
        refused = {c.row: self.refusal(c) for c in clips if self.need([c], None) > self.limit}
        fit = [c for c in clips if c.row not in refused]
        greedy, start = [], 0  # consecutive calls, each as long as fits
        while start < len(fit):
            size = 1
            while start + size < len(fit) and self.need(fit[start:start + size + 1], None) <= self.limit:
                size += 1
            greedy.append(fit[start:start + size])
            start += size
        balanced = _balanced(fit, len(greedy))  # as many calls, of near-equal length, if those fit too
        if all(self.need(call, None) <= self.limit for call in balanced):
            return balanced, refused
        return greedy, refused

    def calls_by_length(self, clips: list[Clip]) -> tuple[list[list[Clip]], dict[int, str]]:
        """`calls` on the clips in order of frame count: a call of several clips pads little."""
        return self.calls(sorted(clips, key=lambda c: c.num_frames))

    def refusal(self, clip: Clip) -> str:
        """Why `clip` is not tracked, naming the fix: the largest --max_frames that fits, or a budget that would."""
        need, frames = self.need([clip], None), clip.num_frames
        lo, hi = 1, frames  # lo: the largest frame count that fits (estimates grow with frames), or 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if self.need([clip], mid) <= self.limit else (lo, mid - 1)
        # max_frames changes outputs, so the config sidecar wants a new output folder for it.
        fix = f"use --max_frames {lo} (with a new --base_feat_path) or " if lo >= 2 else "use "
        return (f"needs ≈{need / GB:.3g} GB to track {self.describe(clip)}; budget {self.limit / GB:.3g} GB; "
                f"{fix}--max_tracking_memory_gb {math.ceil(need / GB * 100) / 100:g}")


def _balanced(clips: list[Clip], count: int) -> list[list[Clip]]:
    """`clips` cut into `count` consecutive calls of near-equal length (at most `count`)."""
    if not count:
        return []
    chunk = math.ceil(len(clips) / count)
    return [clips[i:i + chunk] for i in range(0, len(clips), chunk)]
