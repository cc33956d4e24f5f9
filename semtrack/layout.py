"""Where the extraction job's files live: the research folder name and every path under it.

    <base_feat_path>/<dump_name>/                  OutputLayout.root
        semtrack_config.json                       the options that decided the outputs (sidecar)
        failures.csv, run_report.json              the folder's report, rebuilt from the ledger
        report.html                                `semtrack-report --html`: the page of its statistics
        manifest.csv                               webdataset output: where each video's members are
        ledger/<run_id>.r<rank>.jsonl              one JSON line per finished video (semtrack.ledger)
        ledger/.lock, ledger/.lock-shard-<i>-of-<n>   advisory locks of the runs writing the folder
        shards/<run_id>.r<rank>.<seq>.tar          webdataset output: tar shards
        <dataset>/feat_dump/<video_id>.pkl         one pickle per video (research format)
        <dataset>/gif_dump/<video_id>.gif          trail GIF
        debug/                                     --debug_mode: a folder of this same layout
            <dataset>/debug_vis/<video_id>/debug_cluster_pts_<frame>.png   debug overlays

The names of the folder's own files and folders (`RESERVED_NAMES`) cannot be datasets.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from semtrack.safeio import TMP_SUFFIX_MAX

SIDECAR = "semtrack_config.json"
FAILURES = "failures.csv"
REPORT = "run_report.json"
MANIFEST = "manifest.csv"
REPORT_HTML = "report.html"
LEDGER_DIR = "ledger"
SHARDS_DIR = "shards"
DEBUG_DIR = "debug"
RESERVED_NAMES = (SIDECAR, FAILURES, REPORT, MANIFEST, REPORT_HTML, LEDGER_DIR, SHARDS_DIR, DEBUG_DIR)
OUTPUT_SUFFIXES = (".pkl", ".gif")  # what the job appends to a video id (equally long)
_MAX_LISTED = 5  # culprit rows named in an error
_LONGEST_FRAME = 10**6  # debug overlay names hold a frame index; this bounds its digits


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

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST

    @property
    def ledger_dir(self) -> Path:
        return self.root / LEDGER_DIR

    def ledger_part(self, run_id: str, rank: int) -> Path:
        """The ledger file one process (global `rank`) of run `run_id` appends to."""
        return self.ledger_dir / f"{run_id}.r{rank}.jsonl"

    def lock_file(self, name: str) -> Path:
        """An advisory lock file (`semtrack.shards.FolderLock`)."""
        return self.ledger_dir / f".lock{name}"

    @property
    def shards_dir(self) -> Path:
        return self.root / SHARDS_DIR

    @property
    def debug(self) -> OutputLayout:
        """The layout `--debug_mode` writes: `<root>/debug/`."""
        return OutputLayout(self.root / DEBUG_DIR)

    def pickle(self, dataset: str, video_id: str) -> Path:
        return self.root / dataset / "feat_dump" / f"{video_id}.pkl"

    def gif(self, dataset: str, video_id: str) -> Path:
        return self.root / dataset / "gif_dump" / f"{video_id}.gif"

    def debug_png(self, dataset: str, video_id: str, frame: int) -> Path:
        """Debug overlay of clustering frame `frame` (an index into the clip's T frames)."""
        return self.root / dataset / "debug_vis" / video_id / f"debug_cluster_pts_{frame}.png"

    def relative(self, path: Path) -> str:
        """`path` relative to the root, with '/' separators (as the ledger and manifest record it)."""
        return Path(os.path.relpath(path, self.root)).as_posix()

    # ------------------------------------------------------------------ names the folder can hold
    def check_names(self, rows: Iterable, debug: bool = False) -> None:
        """Refuse (ValueError naming the rows) datasets and video ids this folder cannot hold: a
        dataset named like one of the folder's own files (`RESERVED_NAMES`, compared case-blind), a
        name that with its suffix and the longest temporary suffix (`TMP_SUFFIX_MAX` bytes) exceeds
        the file-name limit of the filesystem (`PC_NAME_MAX`), or a path that then exceeds
        `PC_PATH_MAX`. `rows`: objects with `index`, `dataset`, `video_id`; `debug`: also the debug
        overlays' paths."""
        name_max, path_max = _limits(self.root)
        reserved = {name.casefold() for name in RESERVED_NAMES}
        root_bytes = len(os.fsencode(os.path.abspath(self.root)))
        problems = []
        for row in rows:
            problem = _name_problem(row, reserved, name_max, path_max, root_bytes, debug)
            if problem:
                problems.append(f"row {row.index} {problem}")
        if problems:
            shown = "; ".join(problems[:_MAX_LISTED]) + (f"; and {len(problems) - _MAX_LISTED} more"
                                                         if len(problems) > _MAX_LISTED else "")
            raise ValueError(f"{len(problems)} row(s) have names the output folder {self.root} cannot hold: {shown}")


def _limits(root: Path) -> tuple[int, int]:
    """(file-name bytes, path bytes) the filesystem of `root` (or of its nearest existing parent) allows."""
    probe = Path(os.path.abspath(root))
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        return os.pathconf(probe, "PC_NAME_MAX"), os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError):
        return 255, 4096  # POSIX systems' usual limits where pathconf cannot tell


def _name_problem(row, reserved: set[str], name_max: int, path_max: int, root_bytes: int, debug: bool) -> str | None:
    """Why `row`'s outputs cannot be written under a root of `root_bytes` bytes, or None."""
    dataset, video_id = row.dataset, row.video_id
    if dataset.casefold() in reserved:
        return f"dataset {dataset!r} is the name of one of the output folder's own files ({', '.join(RESERVED_NAMES)})"
    dataset_bytes, id_bytes = len(os.fsencode(dataset)), len(os.fsencode(video_id))
    if dataset_bytes > name_max:
        return f"dataset {dataset[:40]!r}... is {dataset_bytes} bytes long; file names may have {name_max}"
    needed = id_bytes + len(OUTPUT_SUFFIXES[0]) + TMP_SUFFIX_MAX
    if needed > name_max:
        return (f"video_id {video_id[:40]!r}... is {id_bytes} bytes long: with its '.pkl' and the temporary "
                f"suffix ({TMP_SUFFIX_MAX} bytes) it needs {needed} of the {name_max} a file name may have")
    longest = root_bytes + dataset_bytes + id_bytes + len("/feat_dump/") + 1 + len(OUTPUT_SUFFIXES[0])
    if debug:
        longest = max(longest, root_bytes + dataset_bytes + id_bytes
                      + len(f"//debug_vis//debug_cluster_pts_{_LONGEST_FRAME}.png"))
    if longest + TMP_SUFFIX_MAX >= path_max:
        return (f"dataset {dataset[:40]!r}, video_id {video_id[:40]!r}: its output path with the temporary "
                f"suffix needs {longest + TMP_SUFFIX_MAX} bytes; paths may have {path_max - 1}")
    return None
