"""`PointTrackDataModule`: train/val(/test) loaders of `PointTrackDataset` batches for training on the tracks."""
from __future__ import annotations

import os
from typing import Callable

import lightning as L
import numpy as np
from torch.utils.data import DataLoader

from datamodules.tracks import SPLIT_NAMES, PointTrackDataset, collate_tracks, read_split_column
from semtrack.video import read_video_csv


class PointTrackDataModule(L.LightningDataModule):
    """Train/val(/test) loaders of `PointTrackDataset` batches (`collate_tracks`).

    Splits: if the CSV has a `split_column` column, its values pick the rows ("train"; "val",
    "valid" or "validation"; "test"). Otherwise a fixed-seed random `val_fraction` of the rows is
    the validation set (same rows on every run and every rank), the rest is training.
    The train set uses `mode="train"` and `train_transform`, val/test `mode="eval"` and `val_transform`.
    `dataset_kwargs` go to every `PointTrackDataset` (num_frames, num_points, normalize_coords, ...).
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        tracks_root: str | os.PathLike,
        batch_size: int = 8,
        num_workers: int = 4,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        split_column: str = "split",
        train_transform: Callable | None = None,
        val_transform: Callable | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = False,
        **dataset_kwargs,
    ):
        super().__init__()
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.csv_path, self.tracks_root = csv_path, tracks_root
        self.batch_size, self.num_workers = batch_size, num_workers
        self.val_fraction, self.split_seed, self.split_column = val_fraction, split_seed, split_column
        self.train_transform, self.val_transform = train_transform, val_transform
        self.pin_memory, self.persistent_workers = pin_memory, persistent_workers
        self.dataset_kwargs = dataset_kwargs
        self.datasets: dict[str, PointTrackDataset] = {}

    def _split_rows(self) -> dict[str, dict]:
        """-> {split: PointTrackDataset selection kwargs}."""
        if read_split_column(self.csv_path, self.split_column) is not None:
            values = set(read_split_column(self.csv_path, self.split_column))
            return {
                name: {"split": name, "split_column": self.split_column}
                for name, aliases in SPLIT_NAMES.items()
                if values & set(aliases)
            }
        n = len(read_video_csv(self.csv_path))
        order = np.random.default_rng(self.split_seed).permutation(n)
        n_val = int(round(self.val_fraction * n))
        out = {"train": {"row_indices": order[n_val:].tolist()}}
        if n_val:
            out["val"] = {"row_indices": order[:n_val].tolist()}
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        for name, selection in self._split_rows().items():
            train = name == "train"
            self.datasets[name] = PointTrackDataset(
                self.csv_path, self.tracks_root,
                mode="train" if train else "eval",
                transform=self.train_transform if train else self.val_transform,
                **selection, **self.dataset_kwargs,
            )

    def _loader(self, name: str, shuffle: bool) -> DataLoader:
        if name not in self.datasets:
            raise ValueError(f"{self.csv_path}: no {name!r} rows (split column {self.split_column!r} or val_fraction)")
        return DataLoader(
            self.datasets[name], batch_size=self.batch_size, shuffle=shuffle, num_workers=self.num_workers,
            collate_fn=collate_tracks, pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
