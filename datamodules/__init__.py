"""Datasets and LightningDataModules: video decoding for extraction, tracks for training."""
from datamodules.tracks import PointTrackDataModule, PointTrackDataset, collate_tracks
from datamodules.video import VideoCSVDataset, collate_videos

__all__ = [
    "VideoCSVDataset", "collate_videos",
    "PointTrackDataset", "PointTrackDataModule", "collate_tracks",
]
