"""Every option of the extraction job in one typed dataclass, and the research output naming.

`ExtractConfig` is what the command line (`semtrack.cli`), the Python API (`semtrack.api`), the
LightningModule (`semtrack.pipeline`) and the writer (`semtrack.writer`) share. Trainer settings
(devices, accelerator, strategy, precision, num_nodes) belong to the Lightning `Trainer`, not here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

CLUSTERING_METHODS = ("bipartite", "kmeans")

# Options that never change what a pickle contains (where/how the job runs, what else it writes).
# The memory budget only decides whether a video is tracked (and with which others), never how.
RUN_ONLY_OPTIONS = frozenset(
    {"csv_path", "base_feat_path", "batch_size", "num_workers", "make_vis", "debug_mode", "rerun",
     "max_tracking_memory_gb"}
)


@dataclass
class ExtractConfig:
    """All extraction options; names and defaults of the research script where it had them.

    Research flags (REFERENCE.md 2.1): csv_path, base_feat_path, fps, num_frames_clustering,
    clustering_method, n_clusters, merge_ratio, num_iters, num_points_per_entity,
    use_connected_components, use_grid, cotracker_grid_size, make_vis, debug_mode, rerun.
    `fps=None` keeps every decoded frame of every video (the research default).
    """

    # input and output
    csv_path: str = "sample.csv"
    base_feat_path: str = "./semtrack_out"
    # decoding and temporal resampling (datamodules.VideoCSVDataset)
    fps: Optional[float] = None
    fps_rule: Literal["timestamp", "interval"] = "timestamp"
    native_fps_datasets: Optional[list[str]] = None  # None: the Dataset's default (SSV2 names)
    max_frames: Optional[int] = None
    num_frames_clustering: int = 32
    # DINOv2 features
    dinov2_model: str = "vitb14"
    dinov2_checkpoint: Optional[str] = None  # None: as `weights` says
    # clustering
    clustering_method: str = "bipartite"
    n_clusters: int = 32
    merge_ratio: int = 25
    num_iters: int = 11
    kmeans_init: Literal["random", "kmeans++"] = "random"
    # query points
    num_points_per_entity: int = 16
    use_connected_components: bool = False
    sampler: Literal["fast", "exact"] = "fast"
    legacy_query_frames: bool = False
    min_point_distance: float = 0.0
    use_grid: bool = False
    cotracker_grid_size: int = 16
    # tracker
    weights: Literal["official", "random"] = "official"
    cotracker_checkpoint: Optional[str] = None  # path or URL; overrides `weights` for the tracker
    tracker_resolution: tuple[int, int] = (384, 512)  # (H, W) frames are resized to for tracking
    # Estimated tracking memory above which a video is a recorded failure (and batched groups are
    # split). None: on CUDA 10 GB per rank minus what the models hold; elsewhere half the memory
    # still available to the process (cgroup-aware). GB = 1e9 bytes.
    max_tracking_memory_gb: Optional[float] = None
    # job
    batch_size: int = 1
    num_workers: int = 4
    make_vis: bool = False
    debug_mode: bool = False
    rerun: bool = False

    def __post_init__(self) -> None:
        if self.clustering_method not in CLUSTERING_METHODS:
            raise ValueError(
                f"clustering_method must be one of {CLUSTERING_METHODS}, got {self.clustering_method!r}"
            )
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"fps must be positive or None (native rate), got {self.fps!r}")
        positive = ("num_frames_clustering", "n_clusters", "num_points_per_entity", "cotracker_grid_size",
                    "num_iters", "batch_size")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < self.merge_ratio <= 50:
            raise ValueError(f"merge_ratio must lie in (0, 50] percent, got {self.merge_ratio!r}")
        if self.num_workers < 0 or self.min_point_distance < 0:
            raise ValueError("num_workers and min_point_distance must be >= 0")
        if self.max_frames is not None and self.max_frames < 1:
            raise ValueError(f"max_frames must be a positive integer or None, got {self.max_frames!r}")
        budget = self.max_tracking_memory_gb
        if budget is not None and (isinstance(budget, bool) or not isinstance(budget, (int, float)) or not budget > 0):
            raise ValueError(f"max_tracking_memory_gb must be a positive number of GB or None, got {budget!r}")
        h_w = tuple(int(v) for v in self.tracker_resolution)
        if len(h_w) != 2 or min(h_w) < 32 or h_w[0] % 32 or h_w[1] % 32:
            raise ValueError(
                f"tracker_resolution must be (H, W), positive multiples of 32, got {self.tracker_resolution!r}"
            )
        self.tracker_resolution = h_w
        if self.native_fps_datasets is not None:
            self.native_fps_datasets = [str(d) for d in self.native_fps_datasets]

    # ------------------------------------------------------------------ naming and paths
    def dump_name(self) -> str:
        """The research output folder name (REFERENCE.md 2.2), e.g. `cotracker3_bip_fr_32_fps_10`."""
        method = "bip" if self.clustering_method == "bipartite" else f"kmeans_n{self.n_clusters}"
        name = f"cotracker3_{method}_fr_{self.num_frames_clustering}"
        if self.merge_ratio != 25 or self.num_iters != 11:
            name += f"_m{self.merge_ratio}_i{self.num_iters}"
        if self.use_connected_components:
            name += "_concomp"
        if self.fps is not None:
            fps = float(self.fps)
            name += f"_fps_{int(fps) if fps.is_integer() else fps}"
        return name

    @property
    def output_dir(self) -> Path:
        """`<base_feat_path>/<dump_name>`: sidecar, failures.csv, run_report.json live here."""
        return Path(self.base_feat_path) / self.dump_name()

    def video_dir(self, dataset: str) -> Path:
        """`<output_dir>/<dataset>` (the dataset column verbatim, as the research script)."""
        return self.output_dir / dataset

    def pickle_path(self, dataset: str, video_id: str) -> Path:
        return self.video_dir(dataset) / "feat_dump" / f"{video_id}.pkl"

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """Plain JSON-able dict of every option."""
        out = dataclasses.asdict(self)
        out["tracker_resolution"] = list(self.tracker_resolution)
        return out

    def output_options(self) -> dict:
        """The options that decide a pickle's content (what the config sidecar compares)."""
        return {k: v for k, v in self.to_dict().items() if k not in RUN_ONLY_OPTIONS}

    @classmethod
    def from_dict(cls, options: dict) -> "ExtractConfig":
        """Build from a dict, naming unknown keys in the error."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown extraction option(s) {unknown}; known: {sorted(names)}")
        return cls(**options)
