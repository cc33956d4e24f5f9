"""The GPU step (`Pipeline.__call__`, what `predict_step` runs) makes a constant number of host syncs
per batch, whatever the batch size: counted as on CUDA with `tests/_device_count.py`.

Semantic mode: 2 per batch (every clip's point count read once before tracking, the results'
copy back), none inside the stages; grid mode: 1 (the copy back). Batching changes no result.
"""
from __future__ import annotations

import pytest
import torch

from _device_count import DeviceCounter, cuda_code_paths
from datamodules.video import VideoCSVDataset
from semtrack.config import ExtractConfig
from semtrack.features import DinoV2Extractor
from semtrack.pipeline import Pipeline
from semtrack.tracker import load_tracker
from semtrack.tracking_memory import TrackingMemory

pytestmark = pytest.mark.usefixtures("one_thread")
CLIPS = ("tiny_ssv2.webm", "bear_ssv2.webm")  # two sizes
TRACK_TOL = 1e-4  # px: the tracker batches clips exactly up to float sums, as tests/test_tracker_batching.py
SETTINGS = dict(weights="random", dinov2_model="vits14", max_frames=3, num_frames_clustering=2,
                num_points_per_entity=1, tracker_resolution=(64, 96), cotracker_grid_size=2)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, videos_dir):
    csv = tmp_path_factory.mktemp("step") / "clips.csv"
    csv.write_text("video_path,dataset\n" + "".join(f"{videos_dir / name},ssv2\n" for name in CLIPS))
    dataset = VideoCSVDataset(csv, max_frames=SETTINGS["max_frames"],
                              num_frames_clustering=SETTINGS["num_frames_clustering"])
    clips = [dataset[i] for i in range(len(dataset))]
    assert all(c.frames is not None for c in clips)
    features = DinoV2Extractor("vits14", checkpoint="random").eval()
    tracker = load_tracker("random", interp_shape=SETTINGS["tracker_resolution"])
    return clips, features, tracker


def counted_step(setup, size: int, **options) -> tuple[DeviceCounter, list]:
    """The step on the clips in batches of `size`, as on CUDA -> the counter and the results."""
    clips, features, tracker = setup
    config, device = ExtractConfig(**SETTINGS, **options), torch.device("cuda")
    pipeline = Pipeline(config, features, tracker, device, TrackingMemory.plan(config, device, "fp32", 0))
    counter, results = DeviceCounter(), []
    counter.seed(features, tracker)
    with counter, cuda_code_paths(counter):
        for start in range(0, len(clips), size):
            results += pipeline(clips[start:start + size]).results
    assert all(r.ok for r in results), [r.failure for r in results]
    return counter, results


@pytest.mark.parametrize("use_grid, per_batch", [(False, 2), (True, 1)])
def test_the_step_syncs_a_constant_number_of_times_per_batch(setup, use_grid, per_batch):
    outputs = {}
    for size in (1, 2):
        counter, outputs[size] = counted_step(setup, size, use_grid=use_grid)
        batches = -(-len(CLIPS) // size)
        assert dict(counter.syncs_by_kind()) == {"d2h": per_batch * batches}, (size, counter.sites)
        assert all(counter.total_syncs(stage) == 0 for stage in ("features", "clustering", "points", "tracking"))
        assert counter.ops["tracking"] > 0 and (use_grid or counter.ops["features"] > 0)
    for solo, batched in zip(outputs[1], outputs[2]):  # batching changes no point and no visibility
        a, b = solo.tracks, batched.tracks
        assert torch.equal(a.obj_ids, b.obj_ids) and torch.equal(a.query_frames, b.query_frames)
        assert torch.equal(a.visibility, b.visibility)
        assert (a.tracks - b.tracks).abs().max() <= TRACK_TOL, (a.tracks - b.tracks).abs().max()
