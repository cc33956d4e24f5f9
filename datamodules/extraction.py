"""The extraction job's DataModule: the CSV rows still to do, decoded into `Clip`s in DataLoader workers.

Which rows a process runs: the shard's rows (`semtrack.shards`), of which global rank r of a DDP run
takes every `world_size`-th from the r-th; of those, the ones not done yet by the ledger's rule
(`semtrack.ledger.DoneRule`). Each process checks only its own rows, so no rank waits for another.
"""
from __future__ import annotations

import functools
import math
import os
from typing import Iterable, Iterator

import lightning as L
from torch.utils.data import DataLoader

from datamodules.video import PendingRows, VideoCSVDataset, worker_start
from semtrack.config import ExtractConfig
from semtrack.job import Job, RowPlan
from semtrack.records import Clip

BUCKET_MAX_BYTES = 2e9  # decoded frames held for length bucketing, at most (unless one batch needs more)


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
    programming over where each run ends. Each batch is in `clips`' order.

    With n clips, b = `batch_size`, g = ceil(n / b) runs and slack s = g b - n < b, every run holds
    b - s to b clips, so the first k runs end between k b - s and k b: at most (s + 1)^2 choices per
    run, each priced in O(1) from prefix sums; O(n b) in all after the sort."""
    order = sorted(range(len(clips)), key=lambda i: (clips[i].num_frames, i))
    n = len(order)
    count = math.ceil(n / batch_size)
    slack = count * batch_size - n
    tracked, frames = [0], [0]  # prefix sums over `order`: clips tracked (decoded), their frames
    for i in order:
        ok = clips[i].frames is not None
        tracked.append(tracked[-1] + ok)
        frames.append(frames[-1] + (clips[i].num_frames if ok else 0))

    def padding(start: int, end: int) -> int:  # run order[start:end]: padded to its last (longest) clip
        return clips[order[end - 1]].num_frames * (tracked[end] - tracked[start]) - (frames[end] - frames[start])

    def ends(g: int) -> range:  # where the g-th run can end
        return range(max(0, g * batch_size - slack), min(g * batch_size, n) + 1)

    # cost[g][j]: least padding of the first j clips in g runs; cut[g][j]: where the last run starts
    cost = [dict.fromkeys(ends(g), math.inf) for g in range(count + 1)]
    cut = [dict.fromkeys(ends(g), 0) for g in range(count + 1)]
    cost[0][0] = 0
    for g in range(1, count + 1):
        before = ends(g - 1)
        for j in cost[g]:
            for i in range(max(j - batch_size, before.start), min(j, before.stop)):
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


class ExtractionDataModule(L.LightningDataModule):
    """The CSV rows this process still has to do, decoded by `VideoCSVDataset` in DataLoader workers.

    A row is skipped (counted in `job.plan.skipped`) when the ledger records it done and its outputs
    are on disk (`semtrack.ledger.DoneRule`; a pickle without a record is validated and adopted),
    unless `config.rerun`; failed rows are retried as `config.retry_failed` says (`DoneRule`).
    Debug mode runs the first CSV row, done or not.
    `job` (`semtrack.job.Job`, made from the config unless given) gets this process's plan and its
    number of decoding processes in `setup`.
    """

    def __init__(self, config: ExtractConfig | None = None, job: Job | None = None):
        super().__init__()
        self.config = config if config is not None else ExtractConfig()
        self.job = job if job is not None else Job.of(self.config)
        self.dataset: VideoCSVDataset | None = None

    def make_dataset(self) -> VideoCSVDataset:
        """The full dataset, read once (validates the CSV: ValueError naming the file and the culprit)."""
        if self.dataset is None:
            cfg = self.config
            kwargs = {"native_fps_datasets": cfg.native_fps_datasets} if cfg.native_fps_datasets is not None else {}
            self.dataset = VideoCSVDataset(
                cfg.csv_path, fps=cfg.fps, num_frames_clustering=cfg.num_frames_clustering, fps_rule=cfg.fps_rule,
                max_frames=cfg.max_frames, decoder=cfg.decoder, video_id_rule=cfg.video_id_rule,
                video_path=cfg.video_path, dataset=cfg.dataset, limit=cfg.limit, **kwargs,
            )
        return self.dataset

    def row_plan(self, dataset: VideoCSVDataset, rank: int = 0, world_size: int = 1) -> RowPlan:
        """This process's rows and which of them are still to do (reads the ledger, stats the outputs)."""
        return self.job.plan_rows(dataset.rows, rank, world_size, dataset.target_fps)

    def setup(self, stage: str | None = None) -> None:
        trainer = self.trainer
        where = (trainer.global_rank, trainer.world_size, trainer.num_devices) if trainer is not None else (0, 1, 1)
        dataset = self.make_dataset()
        self.job.settle(dataset.rows, *where, fps_of=dataset.target_fps)

    def transfer_batch_to_device(self, batch: list[Clip], device, dataloader_idx: int) -> list[Clip]:
        """Clips stay on the CPU (pinned on CUDA): the pipeline moves what each stage needs, and the
        writer draws GIFs from the CPU frames."""
        return batch

    def predict_dataloader(self) -> ClipBatches:
        """This process's pending rows, decoded in `job.num_workers` processes and grouped into batches
        of similar length."""
        self.setup("predict")
        cfg, trainer, job = self.config, self.trainer, self.job
        accelerated = trainer is not None and trainer.strategy.root_device.type == "cuda"
        # Workers ignore SIGTERM / SIGINT / SIGHUP: a signal to the whole process group lets them finish
        # the batch in hand while the main process stops at the next boundary (`semtrack.stopping`).
        loader = DataLoader(PendingRows(self.dataset, job.plan.pending), batch_size=None, shuffle=False,
                            num_workers=job.num_workers, pin_memory=accelerated,
                            worker_init_fn=functools.partial(worker_start, os.getpid()))
        return ClipBatches(loader, cfg.batch_size, cfg.batch_size * cfg.bucket_batches, BUCKET_MAX_BYTES)
