"""Every option of the extraction job, in one typed dataclass.

`ExtractConfig` is what the command line, the Python API, the pipeline and the writer share. Each
field carries its group and a one-line description (`field_help`), which the command line shows.
Defaults that belong to a stage (merge ratio, points per entity, ...) are in `semtrack.defaults`,
which imports no stage, so neither this module nor a DataLoader worker imports the models; the
frame-rate defaults are stated here and used by the video Dataset too. Trainer settings
(devices, accelerator, strategy, precision, num_nodes) belong to the Lightning `Trainer`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Literal, Optional

from semtrack import defaults
from semtrack.defaults import DEFAULT_MAX_WIDTH, GIF_ENCODERS, MODEL_RESOLUTION
from semtrack.layout import OutputLayout, dump_name

# Frames: defaults shared with datamodules.video.VideoCSVDataset.
FPS = 10.0  # target frame rate (the research script's default was every decoded frame: fps=None)
NATIVE_FPS_DATASETS = ("somethingv2", "something-something-v2", "ssv2", "smth-smth-v2", "sthsthv2")
FPS_RULES = ("timestamp", "interval")
DECODERS = ("auto", "decord", "pyav")
VIDEO_ID_RULES = ("stem", "research")
NUM_FRAMES_CLUSTERING = 32  # research default
MIN_FRAMES = 2  # the smallest `max_frames`: a track needs two frames
MAX_NUM_ITERS = defaults.TOKENS_PER_FRAME  # merge iterations, at most: one per token of a clustering frame
MAX_POINTS_PER_ENTITY = 4096  # points per entity, at most (a 64 x 64 pixel patch each)

GROUPS = ("input/output", "research compatibility", "frames", "features", "clustering", "points", "tracker", "job")
# What --research_compat sets, unless the option is given too: every behaviour of the research script
# that semtrack changed by default (README "Research compatibility").
RESEARCH_PRESET = {
    "fps": None,  # every decoded frame, the research default
    "fps_rule": "interval",
    "legacy_query_frames": True,
    "sampler": "exact",
    "tie_rule": "research",
    "kmeans_init": "random",
    "dinov2_preprocess": "pil",
    "video_id_rule": "research",
}


def _option(default, group: str, help: str, shown: str | None = None):
    """A field with its command-line group, description and (if the value says little) how its default reads."""
    return dataclasses.field(default=default, metadata={"group": group, "help": help, "shown": shown})


# Options that never change what a pickle contains (where/how the job runs, what else it writes).
# The memory budget only decides whether a video is tracked (and with which others), never how.
RUN_ONLY_OPTIONS = frozenset(
    {"csv_path", "base_feat_path", "batch_size", "bucket_batches", "num_workers", "make_vis", "vis_max_width",
     "gif_encoder",
     "debug_mode", "rerun", "max_tracking_memory_gb", "output_format", "videos_per_tar", "num_shards", "shard_index",
     "verify_outputs", "num_threads", "retry_failed", "video_path", "dataset", "limit"}
)
# Output options added after output folders were written: recorded (sidecar, pickle metadata) only when
# they differ from this value, the behaviour before they existed, so those folders keep their options.
RECORDED_WHEN_CHANGED = {"tie_rule": "first", "compile": False}
OUTPUT_FORMATS = ("pickle", "webdataset")
CSV_PATH = "sample.csv"  # the research script's default input
RETRY_FAILED = ("transient", "always", "never")  # which failed rows a run redoes; the first is the default


@dataclass
class ExtractConfig:
    """All extraction options; names and defaults of the research script where it had them
    (REFERENCE.md 2.1)."""

    csv_path: str = _option(
        CSV_PATH, "input/output", "CSV of videos: columns video_path, dataset [, video_id, fps]")
    base_feat_path: str = _option("./semtrack_out", "input/output", "output root; outputs go to <base>/<dump_name>/")
    video_path: Optional[str] = _option(
        None, "input/output", "instead of a CSV: a video file, a folder of videos, or a glob such as 'clips/*.mp4'")
    dataset: Optional[str] = _option(
        None, "input/output", "dataset name of --video_path's videos", shown="the videos' folder name")
    limit: Optional[int] = _option(None, "input/output", "only the first N rows (a quick look)", shown="all rows")
    research_compat: bool = _option(
        False, "research compatibility",
        "the research script's behaviour: " + ", ".join(f"--{k} {'none' if v is None else v}".replace(" True", "")
                                                        for k, v in RESEARCH_PRESET.items()) + " unless given")
    output_format: Literal["pickle", "webdataset"] = _option(
        "pickle", "input/output", "one pickle per video, or webdataset: tar shards")
    videos_per_tar: int = _option(1000, "input/output", "webdataset: videos per tar shard")
    fps: Optional[float] = _option(
        FPS, "frames", "target frame rate; none keeps every decoded frame (the research default)")
    fps_rule: Literal["timestamp", "interval"] = _option(
        "timestamp", "frames", "timestamp: nearest frame to k/fps; interval: the research script's integer stride")
    native_fps_datasets: Optional[list[str]] = _option(
        None, "frames", "datasets kept at their native rate", shown=" ".join(NATIVE_FPS_DATASETS))
    max_frames: Optional[int] = _option(
        None, "frames", f"at most this many frames (>= {MIN_FRAMES}), spread evenly over the whole clip")
    num_frames_clustering: int = _option(NUM_FRAMES_CLUSTERING, "frames", "frames used for DINOv2 and clustering")
    decoder: Literal["auto", "decord", "pyav"] = _option(
        "auto", "frames", "auto: PyAV, decord if PyAV cannot open or decode the file; decord or pyav: that one only")
    video_id_rule: Literal["stem", "research"] = _option(
        "stem", "frames", "video id without a video_id column: file stem, or cut at the first '.' (research)")
    dinov2_model: str = _option(
        "vitb14", "features", "vits14, vitb14, vitl14, vitg14 (+ _reg), or DINOv3 dinov3_vits16, _vitb16, _vitl16")
    dinov2_checkpoint: Optional[str] = _option(
        None, "features", "DINOv2 weights file or URL", shown="as --weights says")
    dinov2_preprocess: Literal["pil", "tensor"] = _option(
        "pil", "features", "resize to the model input: pil (PIL-identical on every device) or tensor (faster)")
    features_precision: Literal["fp32", "bf16"] = _option(
        "fp32", "features", "DINOv2's precision; fp32 keeps --precision bf16-mixed to the tracker")
    clustering_method: Literal["bipartite", "kmeans"] = _option(
        "bipartite", "clustering", "bipartite token merging or k-means")
    n_clusters: int = _option(defaults.N_CLUSTERS, "clustering", "k of k-means")
    merge_ratio: int = _option(
        defaults.MERGE_RATIO, "clustering",
        f"bipartite: percent of tokens merged per iteration, in (0, {defaults.MAX_MERGE_RATIO}]")
    num_iters: int = _option(defaults.NUM_ITERS, "clustering", "bipartite merge iterations")
    kmeans_init: Literal["random", "kmeans++"] = _option(
        "random", "clustering", "k-means start: random (research) or kmeans++")
    num_points_per_entity: int = _option(
        defaults.NUM_POINTS_PER_ENTITY, "points", "query points per entity (per component with components)")
    use_connected_components: bool = _option(False, "points", "sample every 4-connected component of an entity")
    sampler: Literal["fast", "exact"] = _option(
        "fast", "points", "fast: batched on the device; exact: the research scikit-learn sampler")
    legacy_query_frames: bool = _option(False, "points", "the research script's (wrong) query frames")
    sklearn_n_init: int = _option(1, "points", "exact sampler: scikit-learn KMeans n_init (10 = scikit-learn <= 1.3)")
    tie_rule: Literal["first", "research"] = _option(
        "first", "points", "exact sampler's closest-pixel ties: first (row-major) or research (its float64 argmin)")
    min_point_distance: float = _option(
        0.0, "points", "drop points closer than this (px) to an earlier point of the same frame; 0 keeps all")
    use_grid: bool = _option(False, "points", "track a regular grid instead of semantic points")
    cotracker_grid_size: int = _option(defaults.GRID_SIZE, "points", "grid side for --use_grid")
    weights: Literal["official", "random"] = _option(
        "official", "tracker", "official: the published weights; random: stand-ins for tests only")
    cotracker_checkpoint: Optional[str] = _option(
        None, "tracker", "CoTracker3 weights file or URL", shown="as --weights says")
    tracker_resolution: tuple[int, int] = _option(
        MODEL_RESOLUTION, "tracker", "H W frames are resized to for tracking (multiples of 32)")
    matmul_precision: Literal["highest", "high"] = _option(
        "highest", "tracker", "fp32 matmuls/convolutions on GPUs: highest (strict fp32) or high (TF32, faster)")
    compile: bool = _option(
        False, "tracker", "torch.compile the tracker's iterations, calls padded to length buckets: one graph per "
        "bucket (CUDA graphs on GPUs); off until a GPU measures it")
    save_confidence: bool = _option(
        False, "tracker", "keep the visibility probabilities (float16 (T, N), metadata key 'confidence')")
    max_tracking_memory_gb: Optional[float] = _option(
        None, "tracker", "estimated tracking memory above which a video is a recorded failure",
        shown="10 per GPU minus the models; half the free memory on CPU")
    batch_size: int = _option(1, "job", "videos per step")
    bucket_batches: int = _option(
        8, "job", "decoded videos held to group similar lengths, in batches (1: CSV order)")
    num_workers: Optional[int] = _option(
        None, "job", "decoding processes per device", shown="from the CPUs per device")
    make_vis: bool = _option(False, "job", "also write a trail GIF per video")
    vis_max_width: Optional[int] = _option(
        DEFAULT_MAX_WIDTH, "job", "GIFs and overlays at most this wide (px); none: full size")
    gif_encoder: Literal["pil", "literal"] = _option(
        "pil", "job", "pil: PIL's LZW (smaller files); literal: one code per pixel (encoding ~13x cheaper, files ~2x)")
    debug_mode: bool = _option(False, "job", "first row only, even if done, into debug/, with timings, overlays")
    rerun: bool = _option(False, "job", "redo videos whose outputs exist")
    retry_failed: Literal["transient", "always", "never"] = _option(
        "transient", "job", "failed rows to redo: transient (not those that failed to decode), always, never")
    num_threads: Optional[int] = _option(
        None, "job", "torch threads per process", shown="the CPUs per device less the decoding workers")
    verify_outputs: bool = _option(False, "job", "re-read and validate done videos' pickles before skipping them")
    num_shards: Optional[int] = _option(
        None, "job", "shards of the rows, one per job", shown="$SLURM_ARRAY_TASK_COUNT")
    shard_index: Optional[int] = _option(
        None, "job", "this job's shard: the rows i with i mod num_shards = it", shown="$SLURM_ARRAY_TASK_ID")

    def __post_init__(self) -> None:
        if self.clustering_method not in defaults.CLUSTERING_METHODS:
            raise ValueError(
                f"clustering_method must be one of {defaults.CLUSTERING_METHODS}, got {self.clustering_method!r}"
            )
        fps = self.fps
        if fps is not None and not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
            raise ValueError(f"fps must be positive or None (native rate), got {self.fps!r}")
        positive = ("num_frames_clustering", "n_clusters", "num_points_per_entity", "cotracker_grid_size",
                    "num_iters", "batch_size", "bucket_batches", "sklearn_n_init", "videos_per_tar")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        defaults.merge_schedule(defaults.TOKENS_PER_FRAME, self.merge_ratio, self.num_iters)  # ValueError naming it
        for name, most in (("num_iters", MAX_NUM_ITERS), ("num_points_per_entity", MAX_POINTS_PER_ENTITY)):
            if getattr(self, name) > most:
                raise ValueError(f"{name} must be at most {most}, got {getattr(self, name)!r}")
        if self.sampler == "fast" and self.num_points_per_entity > defaults.FAST_SAMPLES:
            raise ValueError(f"num_points_per_entity must be at most {defaults.FAST_SAMPLES} with sampler 'fast' "
                             f"(its samples per entity), got {self.num_points_per_entity}; sampler 'exact' takes more")
        if self.vis_max_width is not None and (isinstance(self.vis_max_width, bool) or self.vis_max_width < 1):
            raise ValueError(f"vis_max_width must be a positive number of pixels or None, got {self.vis_max_width!r}")
        for name in ("num_threads", "limit"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.video_path is not None and self.csv_path != CSV_PATH:
            raise ValueError("give --csv_path or --video_path, not both")
        if self.gif_encoder not in GIF_ENCODERS:
            raise ValueError(f"gif_encoder must be one of {GIF_ENCODERS}, got {self.gif_encoder!r}")
        if self.retry_failed not in RETRY_FAILED:
            raise ValueError(f"retry_failed must be one of {RETRY_FAILED}, got {self.retry_failed!r}")
        if (self.num_workers is not None and self.num_workers < 0) or self.min_point_distance < 0:
            raise ValueError("num_workers and min_point_distance must be >= 0")
        if self.max_frames is not None and (isinstance(self.max_frames, bool) or self.max_frames < MIN_FRAMES):
            raise ValueError(f"max_frames must be an integer >= {MIN_FRAMES} or None, got {self.max_frames!r}")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format must be one of {OUTPUT_FORMATS}, got {self.output_format!r}")
        if self.num_shards is not None and (isinstance(self.num_shards, bool) or self.num_shards < 1):
            raise ValueError(f"num_shards must be a positive integer or None, got {self.num_shards!r}")
        if self.shard_index is not None and (self.shard_index < 0 or (
                self.num_shards is not None and self.shard_index >= self.num_shards)):
            raise ValueError(f"shard_index must be in 0..num_shards-1, got {self.shard_index!r}")
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

    # ------------------------------------------------------------------ naming and provenance
    def dump_name(self) -> str:
        """The research output folder name (REFERENCE.md 2.2), e.g. `cotracker3_bip_fr_32_fps_10`."""
        return dump_name(self.clustering_method, self.n_clusters, self.num_frames_clustering, self.merge_ratio,
                         self.num_iters, self.use_connected_components, self.fps)

    @property
    def layout(self) -> OutputLayout:
        """The paths under `<base_feat_path>/<dump_name>`."""
        return OutputLayout(f"{self.base_feat_path}/{self.dump_name()}")

    @property
    def source(self) -> str:
        """Where the rows come from, for messages and the ledger: `video_path`, else the CSV's absolute path."""
        return self.video_path if self.video_path is not None else os.path.abspath(self.csv_path)

    @property
    def tracker_weights(self) -> str:
        """What the tracker loads: the `cotracker_checkpoint` path/URL, else `weights`."""
        return self.cotracker_checkpoint or self.weights

    @property
    def dinov2_weights(self) -> str:
        """What DINOv2 loads (grid mode loads none): the `dinov2_checkpoint` path, else `weights`."""
        return self.dinov2_checkpoint or self.weights

    # ------------------------------------------------------------------ serialisation
    def to_dict(self) -> dict:
        """Plain JSON-able dict of every option."""
        out = dataclasses.asdict(self)
        out["tracker_resolution"] = list(self.tracker_resolution)
        return out

    def output_options(self) -> dict:
        """The options that decide a pickle's content (what the config sidecar compares)."""
        return {k: v for k, v in self.to_dict().items()
                if k not in RUN_ONLY_OPTIONS and (k not in RECORDED_WHEN_CHANGED or v != RECORDED_WHEN_CHANGED[k])}

    @classmethod
    def from_dict(cls, options: dict) -> ExtractConfig:
        """Build from the options a user gave (with `research_options` applied), naming unknown keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - names)
        if unknown:
            raise ValueError(f"unknown extraction option(s) {unknown}; known: {sorted(names)}")
        return cls(**research_options(options))


def research_options(options: dict) -> dict:
    """`options` with `RESEARCH_PRESET` filled in for the ones not given, when they ask for research_compat."""
    return {**RESEARCH_PRESET, **options} if options.get("research_compat") else dict(options)


def field_help(name: str) -> tuple[str, str, str | None]:
    """(group, one-line description, how the default reads or None) of an `ExtractConfig` field."""
    meta = {f.name: f.metadata for f in dataclasses.fields(ExtractConfig)}[name]
    return meta["group"], meta["help"], meta["shown"]
