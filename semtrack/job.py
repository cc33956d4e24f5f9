"""What one extraction job is, decided once: its options, output folder and shard, and, once the
process knows its rank, the rows it runs, how many processes decode them and how many threads compute.

`Job.of(config)` is made once per process (by `datamodules.extraction.ExtractionDataModule`, which
the preflight checks of `semtrack.api` build or are given) and passed to what needs it: the
DataModule fills in `plan`, `num_workers` and `num_threads` in its `setup`; the writer applies the
threads (`torch.set_num_threads`) and its `Run` reads the rest.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from semtrack.config import ExtractConfig
from semtrack.layout import OutputLayout
from semtrack.ledger import DoneRule, SequenceTracker, csv_keys, iter_records, latest_videos
from semtrack.shards import Shard, resolve_shard

MAX_DEFAULT_WORKERS = 8  # decoding processes per device without --num_workers, at most (memory: one torch each)


@dataclass
class RowPlan:
    """What one process of a run does. `rows`: the run's rows (its shard, all ranks); `assigned`:
    this process's share; `pending`: the row indices of it still to do; `skipped`: done already, or
    failed earlier and not retried (`not_retried` of them, `--retry_failed`);
    `adopted`: ledger records for valid pickles found without one; `csv_rows`, `csv_keys`: the
    row count and key digest (`semtrack.ledger.csv_keys`) of the CSV, or of its first row in debug
    mode; `datasets`: the CSV's datasets; `notes`: one line per ledger file or line skipped and per
    pickle not adopted, and why; `row_fps`: {row index: target frame rate, None = native} of this
    process's rows (recorded with each video); `last_seq`: the highest ledger `seq` of the folder when
    planned (this process's records count on from it)."""

    rows: int
    assigned: int
    pending: list[int]
    skipped: int
    csv_rows: int
    csv_keys: str
    adopted: list[dict] = field(default_factory=list)
    datasets: tuple[str, ...] = ()
    notes: list[str] = field(default_factory=list)
    row_fps: dict[int, float | None] = field(default_factory=dict)
    last_seq: int = 0
    not_retried: int = 0


def assigned_rows(rows: list, shard: Shard, rank: int, world_size: int, debug: bool) -> tuple[list, int]:
    """-> (this process's rows, the run's row count): the shard's rows, every `world_size`-th from
    `rank`; in debug mode the first CSV row only, on rank 0."""
    run_rows = rows[:1] if debug else shard.rows(rows)
    return run_rows[rank::world_size], len(run_rows)


def cpus_per_device(local_world_size: int, environ: Mapping[str, str] = os.environ, cpus: int | None = None) -> int:
    """The CPUs one device's process may count on: those this process may run on
    (`os.sched_getaffinity`), shared by the `local_world_size` processes of this node, unless SLURM
    bound each task to its own (`SLURM_CPUS_PER_TASK` equals that count); at least 1."""
    cpus = len(os.sched_getaffinity(0)) if cpus is None else cpus
    per_task = environ.get("SLURM_CPUS_PER_TASK", "")
    own = per_task.isdigit() and int(per_task) == cpus
    return cpus if own or local_world_size <= 1 else max(1, cpus // local_world_size)


def default_num_workers(local_world_size: int, environ: Mapping[str, str] = os.environ,
                        cpus: int | None = None) -> tuple[int, str]:
    """Decoding processes per device when `--num_workers` is not given -> (count, how it was chosen):
    the CPUs per device (`cpus_per_device`) but one, left to the main process; at least 1, at most
    `MAX_DEFAULT_WORKERS`."""
    per_device = cpus_per_device(local_world_size, environ, cpus)
    count = min(MAX_DEFAULT_WORKERS, max(1, per_device - 1))
    return count, f"{per_device} CPU(s) per device, one left to the main process, at most {MAX_DEFAULT_WORKERS}"


def default_num_threads(local_world_size: int, num_workers: int, ceiling: int,
                        environ: Mapping[str, str] = os.environ, cpus: int | None = None) -> tuple[int, str]:
    """torch intra-op threads of the main process when `--num_threads` is not given -> (count, how it
    was chosen): the process's CPUs (`cpus_per_device`) less one per decoding worker (each decodes
    with one thread), at least 1 and at most `ceiling` (torch's count before the run: its default of
    physical cores, or OMP_NUM_THREADS). So the ranks and workers of a node never run more threads
    than it has CPUs."""
    per_device = cpus_per_device(local_world_size, environ, cpus)
    count = max(1, min(ceiling, per_device - num_workers))
    return count, f"{per_device} CPU(s) per device less {num_workers} decoding worker(s)"


@dataclass
class Job:
    """One extraction job in one process: `config` (an `ExtractConfig`), the output `layout` it writes
    (the config's folder, or its `debug/` folder in debug mode), its `shard` of the CSV rows; `plan`
    (this process's rows), `num_workers` (its decoding processes), `num_threads` (its torch threads)
    and `cpus_per_device` once its rank is known."""

    config: ExtractConfig
    layout: OutputLayout
    shard: Shard
    plan: RowPlan | None = None
    num_workers: int | None = None
    workers_note: str = ""  # how num_workers was chosen, for the start-up line
    cpus_per_device: int | None = None  # `cpus_per_device` of this node (sizes the GIF workers)
    num_threads: int | None = None  # torch intra-op threads of the main process
    threads_note: str = ""  # how num_threads was chosen, for the start-up line

    @classmethod
    def of(cls, config: ExtractConfig) -> Job:
        """The job of `config`: its layout, and its shard from the flags or the SLURM array (ValueError
        for an invalid shard). Debug mode runs the first row into `<folder>/debug/`, unsharded."""
        layout = config.layout.debug if config.debug_mode else config.layout
        shard = Shard() if config.debug_mode else resolve_shard(config.num_shards, config.shard_index)
        return cls(config, layout, shard)

    def plan_rows(self, rows: Sequence, rank: int = 0, world_size: int = 1,
                  fps_of: Callable[[object], float | None] | None = None) -> RowPlan:
        """This process's rows of the CSV's `rows` and which are still to do (reads the ledger, stats the
        outputs; `semtrack.ledger.DoneRule`). `fps_of(row)`: the row's target frame rate (None =
        native), part of what a done row must match; None: not checked."""
        cfg = self.config
        mine, run_rows = assigned_rows(list(rows), self.shard, rank, world_size, cfg.debug_mode)
        rerun = cfg.rerun or cfg.debug_mode
        notes: list[str] = []
        sequence = SequenceTracker()  # read on --rerun too: this run's records must sort after the folder's
        latest = latest_videos(sequence.watch(iter_records(self.layout, notes)),
                               {(r.dataset, r.video_id) for r in mine})
        row_fps = {r.index: fps_of(r) for r in mine} if fps_of is not None else None
        rule = DoneRule(self.layout, {} if rerun else latest, want_gif=cfg.make_vis, verify=cfg.verify_outputs,
                        options=cfg.output_options(), row_fps=row_fps, check_fps=cfg.max_frames is None,
                        retry_failed=cfg.retry_failed)
        decided = rule.plan(mine, rerun)
        folder_rows = list(rows)[:1] if cfg.debug_mode else rows  # the debug folder only ever holds the first row
        return RowPlan(rows=run_rows, assigned=len(mine), pending=decided.pending, skipped=decided.skipped,
                       csv_rows=len(folder_rows), csv_keys=csv_keys(folder_rows), adopted=decided.adopted,
                       datasets=tuple(sorted({r.dataset for r in rows})), notes=notes + rule.refused,
                       row_fps=row_fps or {}, last_seq=sequence.last, not_retried=decided.not_retried)

    def settle(self, rows: Sequence, rank: int, world_size: int, local_world_size: int,
               fps_of: Callable[[object], float | None] | None = None) -> None:
        """Fill in `plan`, `num_workers` and `num_threads` for global `rank` of `world_size` processes,
        `local_world_size` of them on this node (once; later calls keep the first plan). `fps_of`: see
        `plan_rows`."""
        if self.plan is not None:
            return
        self.plan = self.plan_rows(rows, rank, world_size, fps_of)
        self.cpus_per_device = cpus_per_device(local_world_size)
        if self.config.num_workers is not None:
            self.num_workers, self.workers_note = self.config.num_workers, "--num_workers"
        else:
            self.num_workers, self.workers_note = default_num_workers(local_world_size)
        if self.config.num_threads is not None:
            self.num_threads, self.threads_note = self.config.num_threads, "--num_threads"
        else:
            self.num_threads, self.threads_note = default_num_threads(
                local_world_size, self.num_workers, torch.get_num_threads())
