"""`Pipeline.build`: what the LightningModule, the tests and the benchmarks run."""
from __future__ import annotations

import torch

from semtrack.config import ExtractConfig
from semtrack.pipeline import Pipeline
from semtrack.tracking_memory import TrackingMemory


def test_build_makes_both_models_by_one_vocabulary_and_the_memory_policy_and_sets_no_global_state():
    """Stand-in weights ("random") for both models: each says what it loaded; grid mode builds no DINOv2;
    the policy is the device's; the TF32 switch is left as it was."""
    before = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32)
    config = ExtractConfig(weights="random", dinov2_model="vits14", tracker_resolution=(64, 96),
                           max_tracking_memory_gb=3, matmul_precision="high")
    pipeline = Pipeline.build(config, torch.device("cpu"), "bf16-mixed")
    assert pipeline.weights_ids() == {"tracker": "random:recipe-seed0", "dinov2": pipeline.features.weights_id}
    assert pipeline.features.weights_id.startswith("random")
    assert pipeline.tracker.precision == "bf16" and pipeline.tracker.interp_shape == (64, 96)
    assert pipeline.memory == TrackingMemory.plan(config, torch.device("cpu"), "bf16", 0)
    assert pipeline.memory.budget == 3e9 and pipeline.memory.dtype_bytes == 2
    grid = Pipeline.build(ExtractConfig(weights="random", use_grid=True, tracker_resolution=(64, 96)),
                          torch.device("cpu"))
    assert grid.features is None and grid.weights_ids()["dinov2"] is None and grid.tracker.precision == "fp32"
    assert (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32) == before
