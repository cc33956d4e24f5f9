"""Datasets and LightningDataModules: video decoding for extraction, tracks for training."""
from datamodules.video import VideoCSVDataset, VideoDataModule, collate_videos

__all__ = ["VideoCSVDataset", "VideoDataModule", "collate_videos"]
