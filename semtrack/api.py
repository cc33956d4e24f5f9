"""Assembling and running the extraction job: the one place that builds its Trainer.

`semtrack.extract(csv_path, base_feat_path, **options)` runs the job in this process and returns
its run report (the dict saved as `run_report.json`). The command line (`semtrack.cli`) and the
benchmarks build the same objects through `build_trainer` and `run`.
"""
from __future__ import annotations

import dataclasses
import logging
import warnings
from typing import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback

from datamodules.extraction import ExtractionDataModule
from semtrack.config import ExtractConfig
from semtrack.module import SemanticTracker
from semtrack.sidecar import check_sidecar
from semtrack.writer import ExtractionProgressBar, TrackWriter

TRAINER_DEFAULTS = {
    "accelerator": "auto",
    "devices": 1,
    "precision": "32-true",
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}


class _DropTips(logging.Filter):
    """Lightning's advertising lines ("Tip: ... litlogger") are not information about the run."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Tip:" not in record.getMessage()


def quiet_lightning() -> None:
    """Silence what Lightning prints that says nothing about this job: tips, its own deprecation
    notice about torch's pytree, and the warning that a non-DataLoader (our length-bucketed batches)
    has no batch indices (the writer does not use them)."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropTips())
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def build_trainer(config: ExtractConfig, callbacks: Sequence[Callback] = (), **trainer_options
                  ) -> tuple[L.Trainer, TrackWriter]:
    """`Trainer(**TRAINER_DEFAULTS, **trainer_options)` with the job's writer (and, unless
    `enable_progress_bar=False`, its progress bar) ahead of `callbacks`; -> (trainer, writer)."""
    quiet_lightning()
    options = {**TRAINER_DEFAULTS, **trainer_options}
    writer = TrackWriter(config)
    job = [writer] + ([ExtractionProgressBar(writer)] if options.get("enable_progress_bar", True) else [])
    return L.Trainer(**options, callbacks=[*job, *callbacks]), writer


def preflight(config: ExtractConfig, precision: str) -> None:
    """Checks before any video is read: the CSV is valid (ValueError naming the file and the
    culprit) and the output folder's config sidecar agrees with this run (or is created)."""
    ExtractionDataModule(config).make_dataset()
    check_sidecar(config, precision)


def predict(trainer: L.Trainer, config: ExtractConfig) -> None:
    """Run the job on a built trainer (predictions are not collected: the writer has them)."""
    preflight(config, trainer.precision)
    trainer.predict(SemanticTracker(config), datamodule=ExtractionDataModule(config), return_predictions=False)


def run(config: ExtractConfig, callbacks: Sequence[Callback] = (), **trainer_options) -> dict:
    """Run the job for `config`; `callbacks` run after the job's writer. -> the run report."""
    trainer, writer = build_trainer(config, callbacks, **trainer_options)
    predict(trainer, config)
    return writer.report


def extract(csv_path: str, base_feat_path: str = "./semtrack_out", **options) -> dict:
    """Extract semantic point tracks for every row of `csv_path` into `base_feat_path`.

    `options`: any `ExtractConfig` field (e.g. `clustering_method="kmeans"`, `fps=10`,
    `weights="random"`, `make_vis=True`), any `Trainer` argument (`accelerator`, `devices`,
    `precision`, ...) and `callbacks` (run after the writer). Returns the run report: counts (rows,
    done, failed, skipped), failures with stage and reason, per-stage mean seconds, throughput.

    Several devices from Python: use `strategy="ddp_spawn"` (the default DDP launcher re-runs the
    calling script), or the command line (`scripts/extract.py --devices N`).
    """
    fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    trainer_options = {k: options.pop(k) for k in list(options) if k not in fields}
    config = ExtractConfig.from_dict({"csv_path": str(csv_path), "base_feat_path": str(base_feat_path), **options})
    return run(config, **trainer_options)
