"""Video input, Lightning-free: the input CSV or paths (`csv`), which frames a clip keeps (`frames`), the
display matrix (`orientation`), the decoders (`decode`) and the frames an existing track file covers
(`tracked`). The Dataset built on them is `datamodules.video.VideoCSVDataset`."""
from semtrack.video.csv import REQUIRED_COLUMNS, VideoRow, read_video_csv, read_video_paths, video_id_from_path
from semtrack.video.decode import Decoded, decode_video
from semtrack.video.frames import (
    FramePlan,
    ItemError,
    cluster_frame_indices,
    select_by_interval,
    select_by_timestamp,
    timestamp_frame_count,
)
from semtrack.video.tracked import TrackedFramePlan

__all__ = [
    "REQUIRED_COLUMNS", "VideoRow", "read_video_csv", "read_video_paths", "video_id_from_path",
    "Decoded", "decode_video",
    "FramePlan", "ItemError", "cluster_frame_indices", "select_by_interval", "select_by_timestamp",
    "timestamp_frame_count", "TrackedFramePlan",
]
