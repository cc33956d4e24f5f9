"""The LightningModule of the extraction job: a `Pipeline` (see `Pipeline.build`) run in `predict_step`."""
from __future__ import annotations

import lightning as L
import torch

from semtrack.config import ExtractConfig
from semtrack.pipeline import BatchResult, Pipeline, set_matmul_precision
from semtrack.records import Clip


class SemanticTracker(L.LightningModule):
    """DINOv2 + clustering + query points + CoTracker3 for batches of `Clip`s.

    `predict_step(clips: list[Clip]) -> BatchResult`. `configure_model` (in every rank's process) sets
    the process-wide TF32 switch (`set_matmul_precision`) and builds the pipeline on the rank's device:
    bad weights fail there, before any video is read. The models are this module's children, so
    Lightning sees them.
    """

    def __init__(self, config: ExtractConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ExtractConfig()
        self.pipeline: Pipeline | None = None

    def configure_model(self) -> None:
        if self.pipeline is not None:
            return
        trainer = self._trainer
        device, precision = (trainer.strategy.root_device, str(trainer.precision)) if trainer else ("cpu", "32-true")
        set_matmul_precision(self.config.matmul_precision)
        self.pipeline = Pipeline.build(self.config, torch.device(device), precision)
        self.features, self.tracker = self.pipeline.features, self.pipeline.tracker

    def weights_ids(self) -> dict[str, str | None]:
        return self.pipeline.weights_ids()

    def predict_step(self, batch: list[Clip], batch_idx: int = 0, dataloader_idx: int = 0) -> BatchResult:
        return self.pipeline(batch)
