"""Training data: clips with their semantic point tracks, frame-aligned.

`PointTrackDataset` serves, for each CSV row whose track pickle exists, `num_frames` frames spread
uniformly over the tracked frames (`linspace(0, T-1, num_frames)` truncated, as the research training
did) together with the tracks, visibility, entity ids and query frames of a fixed number of points.

Frame alignment: a semtrack pickle records `meta["frame_times"]`, the source timestamps (seconds from
the first decoded frame) of its T tracked frames. The clip is decoded with `semtrack.video`'s
decoder and, for each wanted track frame, the source frame with that timestamp is taken, so track
frame t is exactly the video frame that was tracked, whatever resampling rule the extraction used.
Research pickles carry no timestamps: the research training rule is used instead (source frames
`linspace(0, n_decoded - 1, T)` truncated), which can be off by a few frames (REFERENCE 13.2); a
warning says so.

Coordinates are pixels of the decoded frame, pixel centres at integers (pixel i spans [i-0.5, i+0.5]);
transforms keep that convention. `normalize_coords=True` maps them to [-1, 1] as the research
training did: `x / W * 2 - 1`, `y / H * 2 - 1` with the size of the frames served.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from datamodules.sampling import PAD, sample_points, uniform_frame_indices
from datamodules.transforms import resize_tracks
from semtrack.layout import OutputLayout
from semtrack.trackfile import TrackFile, load_tracks, loads_tracks
from semtrack.util import stable_seed
from semtrack.video import TrackedFramePlan, VideoRow, decode_video, read_video_csv
from semtrack.webdataset import read_manifest, read_member

MODES = ("train", "eval")
ON_MISSING = ("warn", "error")
VERIFY = ("load", "exists")
SPLIT_NAMES = {"train": ("train",), "val": ("val", "valid", "validation"), "test": ("test",)}


class _ItemFailure(Exception):
    """A row that cannot be served (its pickle or its video)."""


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------


def read_split_column(csv_path, column: str) -> list[str] | None:
    """The CSV's `column`, one stripped, lower-cased value per row; None if the CSV has no such column."""
    table = pd.read_csv(csv_path, dtype=str, keep_default_na=False, skipinitialspace=True)
    table.columns = [str(c).strip() for c in table.columns]
    return None if column not in table.columns else [v.strip().lower() for v in table[column]]


class PointTrackDataset(Dataset):
    """Clips with their semantic point tracks, for training.

    Args:
        csv_path: the extraction CSV (`video_path`, `dataset`, optional `video_id`, `split`, ...).
        tracks_root: `<base_feat_path>/<dump_name>`; pickles where `semtrack.layout.OutputLayout` puts them,
            or, when the folder has a `manifest.csv` (`--output_format webdataset`), the tar shard
            members it lists (the same pickle bytes; a row the manifest lacks is looked up as a pickle).
        num_frames: F frames per item, `linspace(0, T-1, F)` over the T tracked frames.
        num_points: P points per item (cluster-proportional sample, or all points then padding);
            None = every point (items then differ in P; `collate_tracks` pads).
        normalize_coords: map coordinates to [-1, 1] (`x / W * 2 - 1`, W of the frames served).
        mode: "train" (points drawn from torch's global RNG, new each epoch) or "eval" (points seeded
            per video from a stable hash of `seed`, dataset and video id: identical every time).
        seed: see `mode`.
        transform: callable (frames, tracks, visibility) -> same, e.g. `datamodules.transforms.RandomResizedCropFlip`.
        on_missing: "warn" (skip rows whose pickle is missing or invalid, with one warning giving
            the count; a row that fails later, e.g. its video cannot be decoded, is replaced by the
            next row, with a warning) or "error" (raise ValueError).
        verify: "load" (validate every pickle at construction, exact `len`) or "exists" (only check
            the files (or tar shards) exist: fast start for very large datasets; invalid pickles
            surface per item).
        split, split_column: keep only rows whose `split_column` is `split` ("train", "val", "test").
        row_indices: keep only these CSV rows (0-based, after the header).

    Attributes: `rows` (served `VideoRow`s), `skipped` [(video_id, reason)], `num_missing`
    (= len(skipped): missing or invalid pickles).

    Item (dict): `frames` (F,3,H,W) uint8; `tracks` (F,P,2) float32 (x, y); `visibility` (F,P) bool;
    `obj_ids` (P,) int64; `query_frames` (P,) int64, each point's query frame as an index into the T
    tracked frames; `point_mask` (P,) bool (False = padding; padded ids/query frames are -1, tracks
    0, visibility False); `point_indices` (P,) int64 into the file's N points (-1 = padding);
    `frame_indices` (F,) int64 into T; `frame_times` (F,) float64 seconds (source timestamps);
    `num_track_frames` T; `video_id`, `dataset` str; `index` int (CSV row).
    """

    def __init__(
        self,
        csv_path: str | os.PathLike,
        tracks_root: str | os.PathLike,
        num_frames: int = 8,
        num_points: int | None = 256,
        normalize_coords: bool = False,
        mode: str = "train",
        seed: int = 0,
        transform: Callable | None = None,
        on_missing: str = "warn",
        verify: str = "load",
        split: str | None = None,
        split_column: str = "split",
        row_indices: Iterable[int] | None = None,
    ):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if on_missing not in ON_MISSING:
            raise ValueError(f"on_missing must be one of {ON_MISSING}, got {on_missing!r}")
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        if not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be an int >= 1, got {num_frames!r}")
        if num_points is not None and (not isinstance(num_points, int) or num_points < 1):
            raise ValueError(f"num_points must be None or an int >= 1, got {num_points!r}")
        self.csv_path, self.layout = str(csv_path), OutputLayout(tracks_root)
        self.num_frames, self.num_points = num_frames, num_points
        self.normalize_coords, self.mode, self.seed = normalize_coords, mode, seed
        self.transform, self.on_missing = transform, on_missing
        self._warned_research = False
        rows = read_video_csv(csv_path)
        if split is not None:
            values = read_split_column(csv_path, split_column)
            if values is None:
                raise ValueError(f"{csv_path}: split={split!r} needs a {split_column!r} column")
            names = SPLIT_NAMES.get(split, (split.lower(),))
            rows = [r for r in rows if values[r.index] in names]
        if row_indices is not None:
            keep = set(row_indices)
            rows = [r for r in rows if r.index in keep]
        manifest = self.layout.manifest
        self.members: dict[tuple[str, str], dict] = read_manifest(manifest) if os.path.lexists(manifest) else {}
        self.rows: list[VideoRow] = []
        self.skipped: list[tuple[str, str]] = []
        for row in rows:
            reason = self._check(row, verify)
            if reason is None:
                self.rows.append(row)
            else:
                self.skipped.append((row.video_id, reason))
        if self.skipped:
            shown = "; ".join(r for _, r in self.skipped[:3])
            message = (
                f"{csv_path}: {len(self.skipped)} of {len(rows)} rows have a missing or invalid track "
                f"pickle under {self.layout.root} (e.g. {shown})"
            )
            if on_missing == "error":
                raise ValueError(message)
            warnings.warn(message + "; they are skipped", stacklevel=2)
        if not self.rows:
            raise ValueError(f"{csv_path}: no row has a valid track pickle under {self.layout.root}")

    def _check(self, row: VideoRow, verify: str) -> str | None:
        """Why `row` cannot be served (missing or, with verify="load", invalid tracks), or None."""
        member = self.members.get((row.dataset, row.video_id))
        path = self.layout.root / member["shard"] if member else self.layout.pickle(row.dataset, row.video_id)
        if not path.is_file():
            return f"missing {'tar shard' if member else 'pickle'} {path}"
        if verify == "load":
            try:
                self._load(row)
            except _ItemFailure as exc:
                return str(exc)
        return None

    @property
    def num_missing(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        for attempt in range(len(self.rows)):
            row = self.rows[(index + attempt) % len(self.rows)]
            try:
                return self._item(row)
            except _ItemFailure as exc:
                if self.on_missing == "error":
                    raise ValueError(f"row {row.index} ({row.dataset}/{row.video_id}): {exc}") from None
                nxt = self.rows[(index + attempt + 1) % len(self.rows)]
                warnings.warn(
                    f"row {row.index} ({row.dataset}/{row.video_id}) skipped: {exc}; serving row {nxt.index}",
                    stacklevel=2,
                )
        raise RuntimeError(f"{self.csv_path}: no row could be served")

    def _load(self, row: VideoRow) -> TrackFile:
        member = self.members.get((row.dataset, row.video_id))
        try:
            if member is None:
                return load_tracks(self.layout.pickle(row.dataset, row.video_id))
            return loads_tracks(read_member(self.layout.root, member), f"{member['shard']}:{member['member']}")
        except ValueError as exc:  # TrackFileError; a shard that is no regular file or too short
            raise _ItemFailure(str(exc)) from None
        except OSError as exc:
            raise _ItemFailure(f"{member['shard']}: cannot read member {member['member']} ({exc})") from None

    def _decode(self, row: VideoRow, tf: TrackFile, frame_indices: torch.Tensor):
        """-> (frames (F,3,H,W) uint8, frame times (F,) float64 seconds)."""
        times = tf.meta.get("frame_times")
        if times is None and not self._warned_research:
            self._warned_research = True  # once per process
            warnings.warn(
                f"{row.dataset}/{row.video_id}: research pickle without frame times; frames are chosen with "
                "the research rule linspace(0, n_decoded - 1, T), which can be off by a few frames (further "
                "research pickles are not reported)", stacklevel=2
            )
        plan = TrackedFramePlan.of(times, tf.num_frames, frame_indices.tolist())
        decoded, decoder, error = decode_video(row.video_path, plan)
        if decoded is None:
            raise _ItemFailure(f"cannot decode {row.video_path} ({decoder}): {error}")
        frames = torch.from_numpy(decoded.frames).permute(0, 3, 1, 2).contiguous()  # (F, 3, H, W) uint8
        return frames, torch.from_numpy(np.asarray(decoded.times, dtype=np.float64))

    def _item(self, row: VideoRow) -> dict:
        tf = self._load(row)
        frame_indices = uniform_frame_indices(tf.num_frames, self.num_frames)  # (F,)
        frames, frame_times = self._decode(row, tf, frame_indices)
        if self.num_points is None:
            point_idx = torch.arange(tf.num_points)
            mask = torch.ones(tf.num_points, dtype=torch.bool)
        else:
            gen = None
            if self.mode == "eval":
                gen = torch.Generator().manual_seed(stable_seed(self.seed, row.dataset, row.video_id))
            point_idx, mask = sample_points(tf.obj_ids, self.num_points, gen)
        safe = point_idx.clamp(min=0)  # (P,) padded rows read point 0, then get blanked
        tracks = tf.tracks[frame_indices][:, safe] * mask[None, :, None]  # (F, P, 2)
        visibility = tf.visibility[frame_indices][:, safe] & mask[None]  # (F, P)
        clip_size = tf.meta.get("clip_size")
        height, width = frames.shape[-2:]
        if clip_size is not None and tuple(clip_size) != (height, width):
            tracks = resize_tracks(tracks, tuple(clip_size), (height, width)) * mask[None, :, None]
        if self.transform is not None:
            frames, tracks, visibility = self.transform(frames, tracks, visibility)
            visibility = visibility & mask[None]
        if self.normalize_coords:
            height, width = frames.shape[-2:]
            tracks = tracks / tracks.new_tensor([width, height]) * 2 - 1
            tracks = tracks * mask[None, :, None]
        return {
            "frames": frames,
            "tracks": tracks.float(),
            "visibility": visibility,
            "obj_ids": torch.where(mask, tf.obj_ids[safe], PAD),
            "query_frames": torch.where(mask, tf.query_frames[safe], PAD),
            "point_mask": mask,
            "point_indices": point_idx,
            "frame_indices": frame_indices,
            "frame_times": frame_times,
            "num_track_frames": tf.num_frames,
            "video_id": row.video_id,
            "dataset": row.dataset,
            "index": row.index,
        }


# ---------------------------------------------------------------------------------------------
# Collate
# ---------------------------------------------------------------------------------------------


def collate_tracks(items: Sequence[dict]) -> dict:
    """Batch items of `PointTrackDataset` (same `num_frames`).

    Points are padded to the largest P in the batch (`point_mask` False, ids/query frames -1), frames
    to the largest (H, W) at the bottom/right with zeros (`frame_sizes` (B, 2) holds each item's
    (H, W)). -> dict: `frames` (B,F,3,H,W) uint8, `tracks` (B,F,P,2), `visibility` (B,F,P),
    `obj_ids`, `query_frames`, `point_mask`, `point_indices` (B,P), `frame_indices` (B,F),
    `frame_times` (B,F), `frame_sizes` (B,2), `num_track_frames`, `index` (B,), `video_id`,
    `dataset` lists.
    """
    if not items:
        raise ValueError("collate_tracks got an empty batch")
    counts = {it["frames"].shape[0] for it in items}
    if len(counts) != 1:
        raise ValueError(f"collate_tracks: items have different frame counts {sorted(counts)}")
    b, p = len(items), max(it["point_mask"].numel() for it in items)
    h = max(it["frames"].shape[-2] for it in items)
    w = max(it["frames"].shape[-1] for it in items)
    f = counts.pop()
    frames = torch.zeros(b, f, 3, h, w, dtype=torch.uint8)
    tracks = torch.zeros(b, f, p, 2, dtype=torch.float32)
    visibility = torch.zeros(b, f, p, dtype=torch.bool)
    per_point = {k: torch.full((b, p), PAD, dtype=torch.int64) for k in ("obj_ids", "query_frames", "point_indices")}
    point_mask = torch.zeros(b, p, dtype=torch.bool)
    for i, it in enumerate(items):
        n = it["point_mask"].numel()
        ih, iw = it["frames"].shape[-2:]
        frames[i, :, :, :ih, :iw] = it["frames"]
        tracks[i, :, :n] = it["tracks"]
        visibility[i, :, :n] = it["visibility"]
        point_mask[i, :n] = it["point_mask"]
        for k, v in per_point.items():
            v[i, :n] = it[k]
    return {
        "frames": frames,
        "tracks": tracks,
        "visibility": visibility,
        **per_point,
        "point_mask": point_mask,
        "frame_indices": torch.stack([it["frame_indices"] for it in items]),
        "frame_times": torch.stack([it["frame_times"] for it in items]),
        "frame_sizes": torch.tensor([list(it["frames"].shape[-2:]) for it in items], dtype=torch.int64),
        "num_track_frames": torch.tensor([it["num_track_frames"] for it in items], dtype=torch.int64),
        "index": torch.tensor([it["index"] for it in items], dtype=torch.int64),
        "video_id": [it["video_id"] for it in items],
        "dataset": [it["dataset"] for it in items],
    }
