"""Datasets and LightningDataModules: video decoding for extraction, tracks for training."""
