"""Where the extraction job's files live: the research folder name and every path under it.

    <base_feat_path>/<dump_name>/                  OutputLayout.root
        semtrack_config.json                       the options that decided the outputs (sidecar)
        failures.csv, run_report.json              the run report
        <dataset>/feat_dump/<video_id>.pkl         one pickle per video (research format)
        <dataset>/gif_dump/<video_id>.gif          trail GIF
        <dataset>/debug_vis/<video_id>/debug_cluster_pts_<frame>.png   debug overlays
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

SIDECAR = "semtrack_config.json"
FAILURES = "failures.csv"
REPORT = "run_report.json"


def dump_name(clustering_method: str, n_clusters: int, num_frames_clustering: int, merge_ratio: float,
              num_iters: int, use_connected_components: bool, fps: float | None) -> str:
    """The research output folder name (REFERENCE.md 2.2), e.g. `cotracker3_bip_fr_32_fps_10`."""
    method = "bip" if clustering_method == "bipartite" else f"kmeans_n{n_clusters}"
    name = f"cotracker3_{method}_fr_{num_frames_clustering}"
    if merge_ratio != 25 or num_iters != 11:  # the research defaults, fixed in the name rule
        name += f"_m{merge_ratio}_i{num_iters}"
    if use_connected_components:
        name += "_concomp"
    if fps is not None:
        fps = float(fps)
        name += f"_fps_{int(fps) if fps.is_integer() else fps}"
    return name


@dataclass(frozen=True)
class OutputLayout:
    """Paths under one output folder `root` (`<base_feat_path>/<dump_name>`)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    @property
    def sidecar(self) -> Path:
        return self.root / SIDECAR

    @property
    def failures(self) -> Path:
        return self.root / FAILURES

    @property
    def report(self) -> Path:
        return self.root / REPORT

    def report_part(self, run_id: str, rank: int) -> Path:
        """One rank's share of a run's report, merged by rank 0 at the end of the run."""
        return self.root / f"run_report.{run_id}.rank{rank}.json"

    def dataset_dir(self, dataset: str) -> Path:
        """`<root>/<dataset>` (the dataset column verbatim, as the research script)."""
        return self.root / dataset

    def pickle(self, dataset: str, video_id: str) -> Path:
        return self.root / dataset / "feat_dump" / f"{video_id}.pkl"

    def gif(self, dataset: str, video_id: str) -> Path:
        return self.root / dataset / "gif_dump" / f"{video_id}.gif"

    def debug_png(self, dataset: str, video_id: str, frame: int) -> Path:
        """Debug overlay of clustering frame `frame` (an index into the clip's T frames)."""
        return self.root / dataset / "debug_vis" / video_id / f"debug_cluster_pts_{frame}.png"
