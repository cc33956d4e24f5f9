"""Python API: `semtrack.extract(csv_path, base_feat_path, **options)` runs the extraction job
in this process and returns its run report (the dict saved as `run_report.json`).

It builds the same objects as `scripts/extract.py` (`semtrack.cli`): `SemanticTracker`,
`ExtractionDataModule`, a `Trainer` with `TrackWriter` and the progress bar.
"""
from __future__ import annotations

from typing import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback

from semtrack.config import ExtractConfig
from semtrack.pipeline import ExtractionDataModule, SemanticTracker
from semtrack.writer import ExtractionProgressBar, TrackWriter, check_sidecar

TRAINER_OPTIONS = ("accelerator", "devices", "num_nodes", "strategy", "precision")
TRAINER_DEFAULTS = {
    "accelerator": "auto",
    "devices": 1,
    "precision": "32-true",
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}


def preflight(config: ExtractConfig, precision: str) -> None:
    """Checks before any video is read: the CSV is valid (ValueError naming the file and the
    culprit) and the output folder's config sidecar agrees with this run (or is created)."""
    ExtractionDataModule(config).make_dataset()
    check_sidecar(config, precision)


def job_callbacks(config: ExtractConfig, progress_bar: bool = True) -> list:
    """The writer (first) and, if wanted, the progress bar that reads its counts."""
    return [TrackWriter(config)] + ([ExtractionProgressBar()] if progress_bar else [])


def run(config: ExtractConfig, callbacks: Sequence[Callback | None] = (), **trainer_options) -> dict:
    """Run the job for `config` with `Trainer(**TRAINER_DEFAULTS, **trainer_options)`; -> report.

    `callbacks`: extra Lightning callbacks. The job's own (`job_callbacks`: the writer, the progress
    bar) go where the list holds `None`, else after all of them — so `[before, None, after]` runs
    `before`'s batch-end hook ahead of the writing and `after`'s once the batch is written.
    """
    options = {**TRAINER_DEFAULTS, **trainer_options}
    if list(callbacks).count(None) > 1:
        raise ValueError("callbacks: at most one None (where the job's writer and progress bar go)")
    job = job_callbacks(config, options.get("enable_progress_bar", True))
    extra = list(callbacks) if None in callbacks else [*callbacks, None]
    trainer = L.Trainer(**options, callbacks=[c for cb in extra for c in (job if cb is None else [cb])])
    preflight(config, trainer.precision)
    trainer.predict(SemanticTracker(config), datamodule=ExtractionDataModule(config), return_predictions=False)
    return job[0].report


def extract(csv_path: str, base_feat_path: str = "./semtrack_out", **options) -> dict:
    """Extract semantic point tracks for every row of `csv_path` into `base_feat_path`.

    `options`: any `ExtractConfig` field (e.g. `clustering_method="kmeans"`, `fps=10`,
    `weights="random"`, `make_vis=True`) and any `Trainer` argument (`accelerator`, `devices`,
    `precision`, ...) and `callbacks` (placed as `run` says). Returns the run report: counts (rows,
    done, failed, skipped), failures with stage and reason, per-stage mean seconds, throughput.

    Several devices from Python: use `strategy="ddp_spawn"` (the default DDP launcher re-runs the
    calling script), or the command line (`scripts/extract.py --devices N`).
    """
    trainer_options = {k: options.pop(k) for k in list(options) if k not in _config_fields()}
    config = ExtractConfig.from_dict({"csv_path": str(csv_path), "base_feat_path": str(base_feat_path), **options})
    return run(config, **trainer_options)


def _config_fields() -> set[str]:
    import dataclasses

    return {f.name for f in dataclasses.fields(ExtractConfig)}
