"""Running the stages of one batch of clips: calls, retries, failure pinning, clocks.

`StageRunner.run(stage, clips, fn, *inputs)` applies a stage function to the clips still alive,
one call per group (`calls`, e.g. `semtrack.tracking_memory.TrackingBudget.calls_by_length`); when a
call raises (CUDA out of memory included) its clips are retried one by one, so a failure is pinned on
one clip (stage + one-line reason) and the others go on.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from typing import Any, Callable, Sequence

import torch

from semtrack.records import Clip, Failure
from semtrack.util import one_line

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
