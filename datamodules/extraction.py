"""The extraction job's DataModule: the CSV rows still to do, decoded into `Clip`s in DataLoader workers."""
from __future__ import annotations

import math
from typing import Iterable, Iterator

import lightning as L
from torch.utils.data import DataLoader, Dataset

from datamodules.video import VideoCSVDataset
from semtrack.config import ExtractConfig
from semtrack.records import Clip
from semtrack.trackfile import TrackFileError, load_tracks

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


def _cheapest_batch(window: list[Clip], size: int) -> list[int]:
    """Positions in `window` of the `size` clips whose frame counts are closest: of the runs of `size`
    consecutive clips in frame-count order, the one with the fewest padded frames (decode failures
    cost nothing); ties -> the run holding the oldest clip."""
    order = sorted(range(len(window)), key=lambda i: (window[i].num_frames, i))
    best, best_key = None, None
    for start in range(len(window) - size + 1):
        run = order[start:start + size]
        longest = max(window[i].num_frames for i in run)
        padding = sum(longest - window[i].num_frames for i in run if window[i].frames is not None)
        key = (padding, min(run))
        if best_key is None or key < best_key:
            best, best_key = run, key
    return best


def length_batches(clips: Iterable[Clip], batch_size: int, window: int, max_bytes: float) -> Iterator[list[Clip]]:
    """Batches of `batch_size` clips of similar length from `clips` (any order kept within a batch).

    Holds up to `window` decoded clips (fewer once they hold more than `max_bytes` of frames) and
    emits the `batch_size` of them with the least frame padding (`_cheapest_batch`), so the tracker
    pads little when it runs a batch in one call. Every batch but the last holds exactly
    `batch_size` clips: len(clips) / batch_size batches, rounded up. `window <= batch_size`: CSV order.
    """
    held: list[Clip] = []
    for clip in clips:
        held.append(clip)
        while len(held) >= batch_size and (len(held) >= window or sum(map(_frame_bytes, held)) > max_bytes):
            take = _cheapest_batch(held, batch_size)
            yield [held[i] for i in sorted(take)]
            held = [c for i, c in enumerate(held) if i not in take]
    while held:
        take = _cheapest_batch(held, min(batch_size, len(held)))
        yield [held[i] for i in sorted(take)]
        held = [c for i, c in enumerate(held) if i not in take]


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
    """The CSV rows this run still has to do, decoded by `VideoCSVDataset` in DataLoader workers.

    Rows whose pickle already loads with `semtrack.trackfile.load_tracks` are skipped (counted in
    `num_skipped`) unless `config.rerun`; a corrupt pickle is redone. Global rank 0 decides and
    broadcasts the list; each rank takes every `world_size`-th pending row, so every row goes to
    exactly one rank. Debug mode keeps only the first CSV row.
    """

    def __init__(self, config: ExtractConfig | None = None):
        super().__init__()
        self.config = config if config is not None else ExtractConfig()
        self.dataset: VideoCSVDataset | None = None
        self.pending: list[int] = []
        self.num_rows = 0
        self.num_skipped = 0

    def make_dataset(self) -> VideoCSVDataset:
        """The full dataset (validates the CSV: ValueError naming the file and the culprit)."""
        cfg = self.config
        kwargs = {"native_fps_datasets": cfg.native_fps_datasets} if cfg.native_fps_datasets is not None else {}
        return VideoCSVDataset(
            cfg.csv_path, fps=cfg.fps, num_frames_clustering=cfg.num_frames_clustering, fps_rule=cfg.fps_rule,
            max_frames=cfg.max_frames, decoder=cfg.decoder, video_id_rule=cfg.video_id_rule, **kwargs,
        )

    def pending_rows(self, dataset: VideoCSVDataset) -> tuple[list[int], int]:
        """-> (row indices to process, number skipped because a valid pickle exists)."""
        rows = dataset.rows[:1] if self.config.debug_mode else dataset.rows
        layout = self.config.layout
        pending, skipped = [], 0
        for row in rows:
            path = layout.pickle(row.dataset, row.video_id)
            if not self.config.rerun and path.is_file():
                try:
                    load_tracks(path)
                    skipped += 1
                    continue
                except TrackFileError:
                    pass  # corrupt or truncated: redo it
            pending.append(row.index)
        return pending, skipped

    def setup(self, stage: str | None = None) -> None:
        if self.dataset is not None:
            return
        dataset = self.make_dataset()
        trainer = self.trainer
        decision = self.pending_rows(dataset) if trainer is None or trainer.is_global_zero else None
        if trainer is not None:
            decision = trainer.strategy.broadcast(decision, src=0)
        self.pending, self.num_skipped = decision
        self.num_rows = len(dataset.rows[:1] if self.config.debug_mode else dataset.rows)
        self.dataset = dataset

    def transfer_batch_to_device(self, batch: list[Clip], device, dataloader_idx: int) -> list[Clip]:
        """Clips stay on the CPU (pinned on CUDA): the pipeline moves what each stage needs, and the
        writer draws GIFs from the CPU frames."""
        return batch

    def predict_dataloader(self) -> ClipBatches:
        """This rank's share of the pending rows (every `world_size`-th, from its rank), decoded in
        `num_workers` processes and grouped into batches of similar length."""
        self.setup("predict")
        cfg, trainer = self.config, self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        accelerated = trainer is not None and trainer.strategy.root_device.type == "cuda"
        loader = DataLoader(PendingRows(self.dataset, self.pending[rank::world]), batch_size=None, shuffle=False,
                            num_workers=cfg.num_workers, pin_memory=accelerated)
        return ClipBatches(loader, cfg.batch_size, cfg.batch_size * cfg.bucket_batches, BUCKET_MAX_BYTES)
