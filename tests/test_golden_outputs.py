"""The job's outputs on the shared clips equal the outputs recorded at a fixed commit.

`tests/data/golden_outputs.npz` holds every tensor and metadata value of the pickles three small
runs wrote (semantic bipartite with GIFs, k-means with the exact sampler and connected components,
grid mode), recorded with the code at the commit named in the file. Structural changes must leave
them bit-identical; a change that is meant to alter outputs records them again, with the reason in
its commit message:

    python tests/test_golden_outputs.py --record

Float results of the same code differ between CPUs (MKL and oneDNN pick other kernels by vendor and
instruction set, and a bipartite label can follow a last-bit change), so a recording is only
comparable on the kind of CPU that made it: `golden_outputs.<vendor>-<capability>.npz` (e.g.
`AuthenticAMD-AVX2`) when there is one for this CPU, else `golden_outputs.npz` (recorded at 09e1f7a
on the machine type CI runs on). `--record` writes this CPU's file.

One edit without a recording: `meta.decoder` reads "pyav" (was "decord") since `auto` decodes with
PyAV first; the frames of both decoders are bit-identical on these clips, and every other value held.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _shared import REPO_ROOT, shared_path  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))
from semtrack.cli import main  # noqa: E402
from semtrack.trackfile import load_tracks  # noqa: E402

pytestmark = pytest.mark.slow

DATA = Path(__file__).resolve().parent / "data"
CLIPS = ("tiny_ssv2.webm", "tiny_25fps.mp4", "bear_ssv2.webm", "not_a_video.mp4")
COMMON = ["--weights", "random", "--fps", "10", "--max_frames", "6", "--tracker_resolution", "64", "96",
          "--num_workers", "0", "--trainer.enable_progress_bar=false"]
RUNS = {
    "bipartite": ["--dinov2_model", "vits14", "--num_frames_clustering", "4", "--num_points_per_entity", "2",
                  "--make_vis"],
    "kmeans": ["--dinov2_model", "vits14", "--num_frames_clustering", "3", "--clustering_method", "kmeans",
               "--n_clusters", "3", "--sampler", "exact", "--use_connected_components", "--num_points_per_entity",
               "1"],
    "grid": ["--use_grid", "--cotracker_grid_size", "3"],
}
PATH_KEYS = ("video_path", "version")  # differ between checkouts and releases, not outputs


def _flatten(prefix: str, value, out: dict) -> None:
    """Metadata -> {dotted key: np.ndarray}; scalars and strings as 0-d arrays."""
    if isinstance(value, dict):
        for k in sorted(value):
            _flatten(f"{prefix}.{k}", value[k], out)
    elif isinstance(value, torch.Tensor):
        out[prefix] = value.numpy()
    else:
        out[prefix] = np.asarray(json.dumps(value))


def outputs(base: Path) -> dict[str, np.ndarray]:
    """Every pickle under `base`: tensors and metadata (paths left out), keyed by run-relative path."""
    out: dict[str, np.ndarray] = {}
    for path in sorted(base.rglob("*.pkl")):
        tf = load_tracks(path)
        key = "/".join(path.relative_to(base).parts[-3:])  # <dataset>/feat_dump/<video_id>.pkl
        out[f"{key}:tracks"] = tf.tracks.numpy()
        out[f"{key}:visibility"] = tf.visibility.numpy()
        out[f"{key}:obj_ids"] = tf.obj_ids.numpy()
        out[f"{key}:query_frames"] = tf.query_frames.numpy()
        _flatten(f"{key}:meta", {k: v for k, v in tf.meta.items() if k not in PATH_KEYS}, out)
    return out


def cpu_signature() -> str:
    """'<vendor>-<torch CPU capability>' of this machine, e.g. 'GenuineIntel-AVX512'."""
    try:
        with open("/proc/cpuinfo") as info:
            vendor = next((ln.split(":", 1)[1].strip() for ln in info if ln.startswith("vendor_id")), "unknown")
    except OSError:
        vendor = "unknown"
    return f"{vendor}-{torch.backends.cpu.get_cpu_capability()}"


def golden_file(own: bool = False) -> Path:
    """This CPU's recording if there is one (or `own`: where it goes), else the default recording."""
    path = DATA / f"golden_outputs.{cpu_signature()}.npz"
    return path if own or path.exists() else DATA / "golden_outputs.npz"


def run_all(tmp: Path) -> dict[str, np.ndarray]:
    """The three runs into `tmp`; -> {run/key: array}."""
    csv = tmp / "clips.csv"
    csv.write_text("video_path,dataset\n" + "".join(f"{shared_path('videos', c)},clips\n" for c in CLIPS))
    result: dict[str, np.ndarray] = {}
    for name, flags in RUNS.items():
        base = tmp / name
        status = main(["--csv_path", str(csv), "--base_feat_path", str(base), *COMMON, *flags])
        assert status == 1, f"{name}: exit {status} (not_a_video.mp4 must be the one failure)"
        result.update({f"{name}/{k}": v for k, v in outputs(base).items()})
        if name == "bipartite":
            gifs = sorted(p.stem for p in base.rglob("*.gif"))
            result[f"{name}/gifs"] = np.asarray(json.dumps(gifs))
    return result


def test_outputs_equal_the_recorded_ones(tmp_path):
    golden = np.load(golden_file())
    now = run_all(tmp_path)
    recorded = {k: golden[k] for k in golden.files if not k.startswith("_")}
    assert sorted(now) == sorted(recorded)
    differing = [k for k in recorded if now[k].dtype != recorded[k].dtype or not np.array_equal(now[k], recorded[k])]
    assert not differing, f"outputs differ from those recorded at {golden['_commit']}: {differing[:10]}"


if __name__ == "__main__" and sys.argv[1:] == ["--record"]:
    import tempfile

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                            text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as tmp:
        arrays = run_all(Path(tmp))
    target = golden_file(own=True)
    np.savez_compressed(target, _commit=np.asarray(commit), _torch=np.asarray(torch.__version__), **arrays)
    print(f"recorded {len(arrays)} arrays at {commit} into {target}")
