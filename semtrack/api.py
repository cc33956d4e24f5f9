"""Assembling and running the extraction job: the one place that builds its Trainer.

`semtrack.extract(csv_path, base_feat_path, **options)` runs the job in this process and returns
the folder's report (the dict saved as `run_report.json`). The command line (`semtrack.cli`) and
the benchmarks build the same objects through `build_trainer` and `run`.

How a run ends: normally (the report says which videos failed); `RunInterrupted` after SIGTERM or
SIGINT (the report is written; `signum` says which); `RunFailed` when it stopped after processing
had started (a folder that cannot be written, an error in the loop; the report is written as far
as it can be); any other exception means it could not start (nothing was processed).
"""
from __future__ import annotations

import dataclasses
import logging
import re
import signal
import sys
import warnings
from typing import Sequence

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from datamodules.extraction import ExtractionDataModule
from semtrack.config import ExtractConfig
from semtrack.hygiene import check_writable
from semtrack.ledger import read_records
from semtrack.module import SemanticTracker
from semtrack.report import build_report
from semtrack.safeio import shown
from semtrack.sidecar import check_sidecar
from semtrack.stopping import Stopped
from semtrack.util import one_line
from semtrack.writer import ExtractionProgressBar, TrackWriter

TRAINER_DEFAULTS = {
    "accelerator": "auto",
    "devices": 1,
    "precision": "32-true",
    "logger": False,
    "enable_checkpointing": False,
    "enable_model_summary": False,
}


# What Lightning logs that says nothing about this job, besides its advertising ("Tip: ... litlogger"): the
# accelerator banner of every Trainer ("GPU available: ..."), the DDP start-up lines.
NOISE_PREFIXES = ("GPU available", "TPU available", "HPU available", "IPU available", "LOCAL_RANK:",
                  "Initializing distributed", "distributed_backend=", "All distributed processes registered",
                  "-" * 20)
NOISY_LOGGERS = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
                 "lightning.fabric.utilities.distributed", "lightning.pytorch.accelerators.cuda")


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return "Tip:" not in message and not message.lstrip().startswith(NOISE_PREFIXES)


def quiet_lightning() -> None:
    """Silence what Lightning prints that says nothing about this job: `NOISE_PREFIXES`, its own
    deprecation notice about torch's pytree, LightningCLI's advice against `args` (the command line
    hands it the translated flags), and the warning that a non-DataLoader (our length-bucketed
    batches) has no batch indices (the writer does not use them)."""
    for name in NOISY_LOGGERS:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise())
    warnings.filterwarnings("ignore", message="Couldn't infer the batch indices")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended")


def build_trainer(config: ExtractConfig, callbacks: Sequence[Callback] = (), **trainer_options
                  ) -> tuple[L.Trainer, TrackWriter]:
    """`Trainer(**TRAINER_DEFAULTS, **trainer_options)` with the job's writer (and, unless
    `enable_progress_bar=False`, its progress bar) ahead of `callbacks`; -> (trainer, writer).
    ValueError (one line) for an option the Trainer refuses (an accelerator that is not there,
    devices it cannot use, an unknown argument)."""
    quiet_lightning()
    options = {**TRAINER_DEFAULTS, **trainer_options}
    options["enable_progress_bar"] = options.get("enable_progress_bar") is not False  # a YAML null: the bar
    writer = TrackWriter(config)
    job = [writer] + ([ExtractionProgressBar(writer)] if options["enable_progress_bar"] else [])
    try:
        trainer = L.Trainer(**options, callbacks=[*job, *callbacks])
    except (MisconfigurationException, TypeError, ValueError) as exc:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        reason = f"unknown Trainer argument --trainer.{unknown[1]}" if unknown else first
        raise ValueError(f"invalid Trainer option: {reason}") from None
    return trainer, writer


class RunInterrupted(Exception):
    """The run stopped on SIGTERM or SIGINT (`signum`) at a video boundary; `report` as saved."""

    def __init__(self, signum: int, report: dict | None):
        self.signum, self.report = signum, report
        super().__init__(f"stopped by {signal.Signals(signum).name}; run the same command again to resume")


class RunFailed(Exception):
    """The run stopped after processing had started (the message says why); `report` as saved."""

    def __init__(self, reason: str, report: dict | None):
        self.report = report
        super().__init__(reason)


def preflight(config: ExtractConfig, precision: str, datamodule: ExtractionDataModule | None = None
              ) -> ExtractionDataModule:
    """Checks before any video is read (ValueError / OSError naming the culprit): the shard is valid
    (the job, `semtrack.job.Job`, is made with the datamodule), the CSV is valid, its datasets and
    video ids fit the output folder (`OutputLayout.check_names`), the folder's config sidecar agrees
    with this run, both models' weights are there (`check_weights`), and the folder can be written
    (the first check that creates anything). -> the datamodule, holding the job and the CSV."""
    datamodule = datamodule if datamodule is not None else ExtractionDataModule(config)
    layout = datamodule.job.layout
    rows = datamodule.make_dataset().rows
    layout.check_names(rows, debug=config.debug_mode)
    check_sidecar(config, precision)
    check_weights(config)
    check_writable(layout)
    if rank_zero_only.rank == 0:  # the rank Lightning reads from the launcher's environment
        print(f"semtrack: {len(rows)} rows in {shown(str(config.source))}; checking which are done in "
              f"{shown(layout.root)}",
              file=sys.stderr, flush=True)
    return datamodule


def check_weights(config: ExtractConfig) -> None:
    """Both models' weights on disk (official and URL files fetched when they can be), before the
    output folder is touched: one `WeightsError` line naming every model without them."""
    # Imported here: DataLoader workers import this module's neighbours and need neither model.
    from semtrack.features import model_weights
    from semtrack.tracker.weights import COTRACKER3
    from semtrack.weights import check_sources

    sources = [(config.tracker_weights, COTRACKER3)]
    if not config.use_grid:
        sources.append((config.dinov2_weights, model_weights(config.dinov2_model)))
    check_sources(sources)


def execute(trainer: L.Trainer, writer: TrackWriter, model: SemanticTracker, datamodule: ExtractionDataModule) -> None:
    """`trainer.predict` (predictions not collected: the writer has them), its end mapped to
    `RunInterrupted` / `RunFailed` (module docstring); the writer's lock, thread and signal handlers
    are released whatever happens."""
    try:
        trainer.predict(model, datamodule=datamodule, return_predictions=False)
    except BaseException as exc:
        stop = writer.stop
        if stop.signum is not None:
            raise RunInterrupted(stop.signum, writer.report) from exc
        if writer.started and isinstance(exc, Exception):
            reason = stop.reason or (exc.reason if isinstance(exc, Stopped) else None) or one_line(exc)
            raise RunFailed(reason, writer.report) from exc
        raise
    finally:
        writer.release()
    if writer.report is None:  # the run happened in spawned processes: read what rank 0 saved
        layout = datamodule.job.layout
        writer.report = build_report(layout, read_records(layout))
    last = (writer.report or {}).get("last_run") or {}
    if writer.stop.signum is not None and last.get("status") == "stopped":  # a signal during the last batch
        raise RunInterrupted(writer.stop.signum, writer.report)


def predict(trainer: L.Trainer, config: ExtractConfig) -> None:
    """Run the job on a built trainer (its writer is the first callback)."""
    writer = next(c for c in trainer.callbacks if isinstance(c, TrackWriter))
    writer.stop.install()  # signals during the checks below stop the run too
    try:
        datamodule = preflight(config, trainer.precision)
    except BaseException:
        writer.release()
        raise
    execute(trainer, writer, SemanticTracker(config), datamodule)


def run(config: ExtractConfig, callbacks: Sequence[Callback] = (), **trainer_options) -> dict:
    """Run the job for `config`; `callbacks` run after the job's writer. -> the folder's report."""
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
    calling script), or the command line (`scripts/extract.py --devices N`). Raises `RunInterrupted`
    on SIGTERM / SIGINT and `RunFailed` when the run stops early (both carry the report).
    """
    fields = {f.name for f in dataclasses.fields(ExtractConfig)}
    trainer_options = {k: options.pop(k) for k in list(options) if k not in fields}
    config = ExtractConfig.from_dict({"csv_path": str(csv_path), "base_feat_path": str(base_feat_path), **options})
    return run(config, **trainer_options)
