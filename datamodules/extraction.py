"""The extraction job's DataModule: the CSV rows still to do, decoded into `Clip`s in DataLoader workers."""
from __future__ import annotations

import lightning as L
from torch.utils.data import DataLoader, Dataset

from datamodules.video import VideoCSVDataset
from semtrack.config import ExtractConfig
from semtrack.records import Clip
from semtrack.trackfile import TrackFileError, load_tracks


class PendingRows(Dataset):
    """The CSV rows to process, padded with no-op entries (None items) to at least `min_len`.

    Lightning skips the whole predict loop, hooks included, on a rank whose shard is empty; the
    padding gives every rank at least one batch, so every rank reaches the writer's end-of-run
    merge. `collate_pending` drops the no-ops.
    """

    def __init__(self, dataset: VideoCSVDataset, rows: list[int], min_len: int = 1):
        self.dataset = dataset
        self.rows = list(rows) + [-1] * max(0, min_len - len(rows))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Clip | None:
        row = self.rows[i]
        return None if row < 0 else self.dataset[row]


def collate_pending(items: list[Clip | None]) -> list[Clip]:
    """The batch's clips without the no-op padding entries (a batch may become empty)."""
    return [item for item in items if item is not None]


class ExtractionDataModule(L.LightningDataModule):
    """The CSV rows this run still has to do, decoded by `VideoCSVDataset` in DataLoader workers.

    Rows whose pickle already loads with `semtrack.trackfile.load_tracks` are skipped (counted in
    `num_skipped`) unless `config.rerun`; a corrupt pickle is redone. Global rank 0 decides and
    broadcasts the list, so every rank sees the same rows; Lightning's predict sampler then gives
    each row to exactly one rank. Debug mode keeps only the first CSV row.
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

    def predict_dataloader(self) -> DataLoader:
        self.setup("predict")
        cfg = self.config
        accelerated = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        world = self.trainer.world_size if self.trainer is not None else 1
        return DataLoader(
            PendingRows(self.dataset, self.pending, min_len=world),
            batch_size=cfg.batch_size,
            shuffle=False,
            num_workers=cfg.num_workers,
            collate_fn=collate_pending,
            pin_memory=accelerated,
        )
