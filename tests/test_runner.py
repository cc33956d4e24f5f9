"""The stage runner: calls, retries, failure pinning, clocks (the tracking memory: test_tracking_memory.py)."""
from __future__ import annotations

import torch

from semtrack.records import Clip, Failure
from semtrack.runner import StageRunner


def clip(row: int, frames: int = 4, size=(8, 8)) -> Clip:
    """A clip whose frames live on the meta device (no memory)."""
    return Clip(row, f"v{row}", "d", f"/v{row}.mp4", frames=torch.empty(frames, 3, *size, dtype=torch.uint8,
                                                                          device="meta"))


def test_a_failing_call_is_retried_clip_by_clip_and_the_failure_pinned():
    """A stage that raises on a call (as CUDA OOM would) pins the failure on the one clip that still
    fails alone; the others of the call go on, and later stages see only the live clips."""
    clips = [clip(i) for i in range(3)]
    run, calls = StageRunner(torch.device("cpu")), []

    def stage(group, values):
        calls.append([c.row for c in group])
        if any(c.row == 1 for c in group):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB\nmore detail")
        return [v * 10 for v in values]

    out = run.run("tracking", clips, stage, {0: 1, 1: 2, 2: 3})
    assert out == {0: 10, 2: 30}
    assert calls == [[0, 1, 2], [0], [1], [2]]
    assert run.failures == {1: Failure("tracking", "OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")}
    assert [c.row for c in run.alive(clips)] == [0, 2]
    assert run.run("next", clips, lambda group: [c.row for c in group]) == {0: 0, 2: 2}
    seconds, videos = run.clock.totals()["tracking"]
    assert videos == 3 and seconds >= 0  # retries count no new videos
