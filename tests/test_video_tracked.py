"""`semtrack.video.TrackedFramePlan`: the decoded frames a track file's frames were tracked on."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from semtrack.video import TrackedFramePlan
from semtrack.video.tracked import TIME_TOLERANCE_S

DECODED = np.arange(30, dtype=np.float64) / 30.0  # (30,) s: a 30 fps clip, 1 s


def test_recorded_times_pick_the_decoded_frames_with_those_timestamps():
    recorded = torch.tensor([0.0, 0.1, 0.2, 0.3, 0.4], dtype=torch.float64) + 2e-4  # (T=5,) s, 10 fps, jitter
    plan = TrackedFramePlan.of(recorded, 5, [4, 1, 1])
    assert plan.frame_times == pytest.approx((0.4002, 0.1002, 0.1002))
    idx, rate = plan(DECODED, 30.0)
    assert rate is None and idx.dtype == np.int64
    assert idx.tolist() == [12, 3, 3]


def test_all_frames_by_default_in_order():
    plan = TrackedFramePlan.of(np.array([0.0, 0.5, 29 / 30]), 3)
    assert plan.track_frames == (0, 1, 2)
    assert plan(DECODED, 30.0)[0].tolist() == [0, 15, 29]


def test_a_recorded_time_no_decoded_frame_matches_is_refused():
    plan = TrackedFramePlan.of([0.0, 0.5 + 1 / 60], 2)  # halfway between two decoded frames
    assert 1 / 60 > TIME_TOLERANCE_S
    with pytest.raises(ValueError, match="no decoded frame at the tracked time 0.5167 s"):
        plan(DECODED, 30.0)


def test_without_recorded_times_the_research_rule():
    plan = TrackedFramePlan.of(None, 4, [0, 2, 3])
    assert plan.frame_times is None
    expected = np.linspace(0, 29, 4).astype(np.int64)[[0, 2, 3]]  # [0, 19, 29]
    assert plan(DECODED, 30.0)[0].tolist() == expected.tolist() == [0, 19, 29]
