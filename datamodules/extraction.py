"""The extraction job's DataModule: the CSV rows still to do, decoded into `Clip`s in DataLoader workers.

Which rows a process runs: the shard's rows (`semtrack.shards`), of which global rank r of a DDP run
takes every `world_size`-th from the r-th; of those, the ones not done yet by the ledger's rule
(`semtrack.ledger.DoneRule`). Each process checks only its own rows, so no rank waits for another.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import lightning as L
from torch.utils.data import DataLoader, Dataset

from datamodules.video import VideoCSVDataset
from semtrack.config import ExtractConfig
from semtrack.layout import job_layout
from semtrack.ledger import DoneRule, csv_keys, iter_records, latest_videos
from semtrack.records import Clip
from semtrack.shards import Shard, resolve_shard

BUCKET_MAX_BYTES = 2e9  # decoded frames held for length bucketing, at most (unless one batch needs more)


class PendingRows(Dataset):
    """The clips of the CSV rows `rows` (indices into `dataset`)."""

    def __init__(self, dataset: VideoCSVDataset, rows: list[int]):
        self.dataset, self.rows = dataset, list(rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Clip:
        return self.dataset[self.rows[i]]


def _frame_bytes(clip: Clip) -> int:
    return 0 if clip.frames is None else clip.frames.numel()


def _padded_frames(clips: Iterable[Clip]) -> int:
    """Frames of padding when `clips` share one tracker call (decode failures are not tracked: cost nothing)."""
    clips = list(clips)
    longest = max(c.num_frames for c in clips)
    return sum(longest - c.num_frames for c in clips if c.frames is not None)


def _cheapest_batch(window: list[Clip], size: int) -> list[int]:
    """Positions in `window` of the `size` clips whose frame counts are closest: of the runs of `size`
    consecutive clips in frame-count order, the one with the fewest padded frames; ties -> the run
    holding the oldest clip."""
    order = sorted(range(len(window)), key=lambda i: (window[i].num_frames, i))
    best, best_key = None, None
    for start in range(len(window) - size + 1):
        run = order[start:start + size]
        key = (_padded_frames(window[i] for i in run), min(run))
        if best_key is None or key < best_key:
            best, best_key = run, key
    return best


def _least_padding_partition(clips: list[Clip], batch_size: int) -> list[list[int]]:
    """Positions in `clips` split into ceil(len / batch_size) batches of at most `batch_size` clips with
    the fewest padded frames in all: runs of consecutive clips in frame-count order, chosen by dynamic
    programming over where each run ends. Each batch is in `clips`' order."""
    order = sorted(range(len(clips)), key=lambda i: (clips[i].num_frames, i))
    count = math.ceil(len(order) / batch_size)

    def padding(start: int, end: int) -> int:  # run order[start:end]
        return _padded_frames(clips[i] for i in order[start:end])

    # cost[g][j]: least padding of the first j clips in g runs; cut[g][j]: where the last run starts
    cost = [[math.inf] * (len(order) + 1) for _ in range(count + 1)]
    cut = [[0] * (len(order) + 1) for _ in range(count + 1)]
    cost[0][0] = 0
    for g in range(1, count + 1):
        for j in range(1, len(order) + 1):
            for i in range(max(0, j - batch_size), j):
                value = cost[g - 1][i] + padding(i, j)
                if value < cost[g][j]:
                    cost[g][j], cut[g][j] = value, i
    runs, end = [], len(order)
    for g in range(count, 0, -1):
        start = cut[g][end]
        runs.append(sorted(order[start:end]))
        end = start
    return sorted(runs)


def length_batches(clips: Iterable[Clip], batch_size: int, window: int, max_bytes: float) -> Iterator[list[Clip]]:
    """Batches of `batch_size` clips of similar length from `clips` (any order kept within a batch).

    Holds up to `window` decoded clips (fewer once they hold more than `max_bytes` of frames) and
    emits the `batch_size` of them with the least frame padding (`_cheapest_batch`), so the tracker
    pads little when it runs a batch in one call. The clips still held when `clips` ends are split
    with the least padding in all (`_least_padding_partition`), so the stragglers of a look-ahead
    window do not end up padded to one long clip. len(clips) / batch_size batches, rounded up; every
    batch but the last ceil(held / batch_size) holds exactly `batch_size` clips. `window <=
    batch_size`: CSV order.
    """
    held: list[Clip] = []
    for clip in clips:
        held.append(clip)
        while len(held) >= batch_size and (len(held) >= window or sum(map(_frame_bytes, held)) > max_bytes):
            take = _cheapest_batch(held, batch_size)
            yield [held[i] for i in sorted(take)]
            held = [c for i, c in enumerate(held) if i not in take]
    for run in _least_padding_partition(held, batch_size):
        yield [held[i] for i in run]


class ClipBatches:
    """The batches of one rank: `loader` yields its clips one by one (decoded in DataLoader workers),
    `length_batches` groups them. `len()` is exact (Lightning stops a loop after `len()` batches); a
    rank without rows gets one empty batch, so every rank reaches the writer's end-of-run merge."""

    def __init__(self, loader: DataLoader, batch_size: int, window: int, max_bytes: float):
        self.loader, self.batch_size, self.window, self.max_bytes = loader, batch_size, window, max_bytes

    def __len__(self) -> int:
        return max(1, math.ceil(len(self.loader) / self.batch_size))

    def __iter__(self) -> Iterator[list[Clip]]:
        return self._batches()  # a generator: nothing decodes until the first batch is asked for

    def _batches(self) -> Iterator[list[Clip]]:
        if len(self.loader) == 0:
            yield []
            return
        yield from length_batches(self.loader, self.batch_size, self.window, self.max_bytes)


@dataclass
class RowPlan:
    """What one process of a run does. `rows`: the run's rows (its shard, all ranks); `assigned`:
    this process's share; `pending`: the row indices of it still to do; `skipped`: done already;
    `adopted`: ledger records for valid pickles found without one; `csv_rows`, `csv_keys`: the
    CSV's row count and key digest (`semtrack.ledger.csv_keys`)."""

    rows: int
    assigned: int
    pending: list[int]
    skipped: int
    csv_rows: int
    csv_keys: str
    adopted: list[dict] = field(default_factory=list)


def assigned_rows(rows: list, shard: Shard, rank: int, world_size: int, debug: bool) -> tuple[list, int]:
    """-> (this process's rows, the run's row count): the shard's rows, every `world_size`-th from
    `rank`; in debug mode the first CSV row only, on rank 0."""
    run_rows = rows[:1] if debug else shard.rows(rows)
    return run_rows[rank::world_size], len(run_rows)


class ExtractionDataModule(L.LightningDataModule):
    """The CSV rows this process still has to do, decoded by `VideoCSVDataset` in DataLoader workers.

    A row is skipped (counted in `plan.skipped`) when the ledger records it done and its outputs are
    on disk (`semtrack.ledger.DoneRule`; a pickle without a record is validated and adopted), unless
    `config.rerun`; failed rows are retried. Debug mode runs the first CSV row, done or not.
    """

    def __init__(self, config: ExtractConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ExtractConfig()
        self.dataset: VideoCSVDataset | None = None
        self.plan: RowPlan | None = None

    def make_dataset(self) -> VideoCSVDataset:
        """The full dataset, read once (validates the CSV: ValueError naming the file and the culprit)."""
        if self.dataset is None:
            cfg = self.config
            kwargs = {"native_fps_datasets": cfg.native_fps_datasets} if cfg.native_fps_datasets is not None else {}
            self.dataset = VideoCSVDataset(
                cfg.csv_path, fps=cfg.fps, num_frames_clustering=cfg.num_frames_clustering, fps_rule=cfg.fps_rule,
                max_frames=cfg.max_frames, decoder=cfg.decoder, video_id_rule=cfg.video_id_rule, **kwargs,
            )
        return self.dataset

    def row_plan(self, dataset: VideoCSVDataset, rank: int = 0, world_size: int = 1) -> RowPlan:
        """This process's rows and which of them are still to do (reads the ledger, stats the outputs)."""
        cfg = self.config
        shard = Shard() if cfg.debug_mode else resolve_shard(cfg.num_shards, cfg.shard_index)
        mine, run_rows = assigned_rows(dataset.rows, shard, rank, world_size, cfg.debug_mode)
        layout = job_layout(cfg)
        rerun = cfg.rerun or cfg.debug_mode
        latest = {} if rerun else latest_videos(iter_records(layout), {(r.dataset, r.video_id) for r in mine})
        decided = DoneRule(layout, latest, want_gif=cfg.make_vis, verify=cfg.verify_outputs).plan(mine, rerun)
        return RowPlan(rows=run_rows, assigned=len(mine), pending=decided.pending, skipped=decided.skipped,
                       csv_rows=len(dataset.rows), csv_keys=csv_keys(dataset.rows), adopted=decided.adopted)

    def setup(self, stage: str | None = None) -> None:
        if self.plan is not None:
            return
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        self.plan = self.row_plan(self.make_dataset(), rank, world)

    def transfer_batch_to_device(self, batch: list[Clip], device, dataloader_idx: int) -> list[Clip]:
        """Clips stay on the CPU (pinned on CUDA): the pipeline moves what each stage needs, and the
        writer draws GIFs from the CPU frames."""
        return batch

    def predict_dataloader(self) -> ClipBatches:
        """This process's pending rows, decoded in `num_workers` processes and grouped into batches of
        similar length."""
        self.setup("predict")
        cfg, trainer = self.config, self.trainer
        accelerated = trainer is not None and trainer.strategy.root_device.type == "cuda"
        loader = DataLoader(PendingRows(self.dataset, self.plan.pending), batch_size=None, shuffle=False,
                            num_workers=cfg.num_workers, pin_memory=accelerated)
        return ClipBatches(loader, cfg.batch_size, cfg.batch_size * cfg.bucket_batches, BUCKET_MAX_BYTES)
