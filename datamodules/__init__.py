"""Datasets and LightningDataModules: video decoding for extraction, tracks for training.

The names below load on first use, so that a DataLoader worker that unpickles a `VideoCSVDataset`
imports neither Lightning nor the training datasets.
"""
from __future__ import annotations

_LAZY = {
    "VideoCSVDataset": "datamodules.video",
    "collate_videos": "datamodules.video",
    "PointTrackDataset": "datamodules.tracks",
    "PointTrackDataModule": "datamodules.training",
    "collate_tracks": "datamodules.tracks",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'datamodules' has no attribute {name!r}")
