"""The LightningModule of the extraction job: builds the models, runs `Pipeline` in `predict_step`."""
from __future__ import annotations

import lightning as L
import torch

from semtrack.config import ExtractConfig
from semtrack.pipeline import TRACKER_PRECISION, BatchResult, Pipeline
from semtrack.records import Clip
from semtrack.tracking_memory import TrackingMemory


class SemanticTracker(L.LightningModule):
    """DINOv2 + clustering + query points + CoTracker3 for batches of `Clip`s.

    `predict_step(clips: list[Clip]) -> BatchResult`. The models are built in `configure_model`
    (bad weights fail there, before any video is read); grid mode builds no DINOv2.
    """

    def __init__(self, config: ExtractConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ExtractConfig()
        self.features: torch.nn.Module | None = None
        self.tracker: torch.nn.Module | None = None
        self.pipeline: Pipeline | None = None

    def tracker_precision(self) -> str:
        """The tracker's precision for the Trainer's ("bf16" under bf16-mixed, else "fp32")."""
        precision = str(self._trainer.precision) if self._trainer is not None else "32-true"
        if precision not in TRACKER_PRECISION:
            raise ValueError(f"precision {precision!r} is not supported; use one of {sorted(TRACKER_PRECISION)}")
        return TRACKER_PRECISION[precision]

    def configure_model(self) -> None:
        if self.tracker is not None:
            return
        # Imported here: spawned DataLoader workers import the job's modules and need neither model.
        from semtrack.features import DinoV2Extractor
        from semtrack.tracker import load_tracker

        cfg = self.config
        precision = self.tracker_precision()
        torch.set_float32_matmul_precision(cfg.matmul_precision)  # TF32 matmuls or not ...
        torch.backends.cudnn.allow_tf32 = cfg.matmul_precision != "highest"  # ... and convolutions
        if not cfg.use_grid:
            checkpoint = None if cfg.dinov2_weights == "official" else cfg.dinov2_weights
            self.features = DinoV2Extractor(cfg.dinov2_model, checkpoint=checkpoint, preprocess=cfg.dinov2_preprocess)
        self.tracker = load_tracker(cfg.tracker_weights, precision=precision, interp_shape=cfg.tracker_resolution)

    def weights_ids(self) -> dict[str, str | None]:
        """What the models loaded: {"tracker": id, "dinov2": id or None in grid mode} (see `weights_id`)."""
        return {"tracker": self.tracker.weights_id,
                "dinov2": None if self.features is None else self.features.weights_id}

    def on_predict_start(self) -> None:
        model_bytes = torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else 0
        memory = TrackingMemory.plan(self.config, self.device, self.tracker_precision(), model_bytes)
        self.pipeline = Pipeline(self.config, self.features, self.tracker, self.device, memory)

    def predict_step(self, batch: list[Clip], batch_idx: int = 0, dataloader_idx: int = 0) -> BatchResult:
        return self.pipeline(batch)
