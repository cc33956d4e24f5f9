"""End-to-end runs of the extraction job (`scripts/extract.py`) on the tiny shared clips.

Stand-in weights and small settings keep the runs short on CPU: 4 frames per clip
(`--max_frames 4`), a 96x128 tracker resolution, ViT-S/14 with 4 clustering frames and 2 points
per entity; the machinery tests (DDP, kill/resume, hostile CSVs) use grid mode (no DINOv2).
"""
from __future__ import annotations

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from test_report_stats import check_page

import semtrack
from _shared import REPO_ROOT
from datamodules.video import VideoCSVDataset
from semtrack.cli import main
from semtrack.clustering import bipartite_clusters
from semtrack.features import DinoV2Extractor
from semtrack.layout import OutputLayout
from semtrack.ledger import read_records
from semtrack.points import select_query_points
from semtrack.report import main as report_main
from semtrack.trackfile import load_tracks
from semtrack.trackstats import file_stats

pytestmark = pytest.mark.slow

SCRIPT = REPO_ROOT / "scripts" / "extract.py"
FAST = ["--weights", "random", "--max_frames", "4", "--tracker_resolution", "96", "128", "--num_workers", "0"]
SEMANTIC = FAST + ["--dinov2_model", "vits14", "--num_frames_clustering", "4", "--num_points_per_entity", "2"]
GRID = FAST + ["--use_grid", "--cotracker_grid_size", "2"]
BROKEN = ("not_a_video", "corrupt_truncated")


def write_csv(path: Path, rows: list[tuple]) -> Path:
    """rows: (video_path, dataset[, video_id])."""
    header = "video_path,dataset" + (",video_id" if any(len(r) == 3 for r in rows) else "")
    path.write_text("\n".join([header, *(",".join(map(str, r)) for r in rows)]) + "\n", encoding="utf-8")
    return path


def run_script(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)


def contents(path: Path) -> dict:
    """Everything a pickle holds, as comparable Python values."""
    f = load_tracks(path)
    meta = {k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in f.meta.items()}
    return {"tracks": f.tracks.tolist(), "vis": f.visibility.tolist(), "ids": f.obj_ids.tolist(),
            "queries": f.query_frames.tolist(), "meta": meta}


def pickles(root: Path) -> dict[str, bytes]:
    """Every pickle under root, as bytes (writes are byte-deterministic), after checking it loads."""
    out = {}
    for path in sorted(root.rglob("*.pkl")):
        load_tracks(path)  # complete and valid
        out[str(path.relative_to(root))] = path.read_bytes()
    return out


# ------------------------------------------------------------------------------ semantic mode
@pytest.fixture(scope="module")
def semantic(tmp_path_factory, videos_dir):
    tmp = tmp_path_factory.mktemp("semantic")
    csv = write_csv(tmp / "clips.csv", [
        (videos_dir / "tiny_ssv2.webm", "ssv2"),
        (videos_dir / "tiny_25fps.mp4", "synthetic"),
        (videos_dir / "not_a_video.mp4", "synthetic"),
        (videos_dir / "corrupt_truncated.mp4", "synthetic"),
    ])
    args = ["--clustering_method", "bipartite", "--csv_path", str(csv), "--base_feat_path", str(tmp / "out"),
            *SEMANTIC, "--make_vis", "--num_threads", "1"]
    proc = run_script(*args)
    return {"proc": proc, "csv": csv, "args": args, "out": tmp / "out" / "cotracker3_bip_fr_4_fps_10"}


def test_semantic_run_writes_research_format(semantic):
    proc, out = semantic["proc"], semantic["out"]
    assert proc.returncode == 1, proc.stderr[-3000:]  # two broken files -> non-zero exit
    for rel in ("ssv2/feat_dump/tiny_ssv2.pkl", "synthetic/feat_dump/tiny_25fps.pkl"):
        with open(out / rel, "rb") as f:
            raw = pickle.load(f)  # the research reader: plain pickle + torch
        assert set(raw) == {"pred_tracks", "pred_visibility", "obj_ids", "point_queries", "semtrack"}
        tracks, vis, ids, queries = raw["pred_tracks"], raw["pred_visibility"], raw["obj_ids"], raw["point_queries"]
        t, n = vis.shape
        assert tracks.dtype == torch.float16 and tracks.shape == (t, n, 2) and n > 0
        assert vis.dtype == torch.bool and ids.dtype == torch.int64 and queries.dtype == torch.int64
        assert ids.shape == queries.shape == (n,) and t == 4
        assert bool(((queries >= 0) & (queries < t)).all())
        meta = raw["semtrack"]
        assert meta["frame_times"].dtype == torch.float64 and meta["frame_times"].shape == (t,)
        assert meta["tracker_weights"] == "random:recipe-seed0" and meta["dinov2_weights"] == "random:recipe-seed0"
        assert meta["config"]["tracker_weights"] == "random" and meta["config"]["num_points_per_entity"] == 2
        h, w = meta["clip_size"]
        at_query = tracks[queries, torch.arange(n)].float()  # (N, 2) each point at its query frame
        assert bool(vis[queries, torch.arange(n)].all())
        assert torch.equal(at_query, at_query.round())  # sampled pixels are integer (x, y)
        assert bool((at_query[:, 0] < w).all() and (at_query[:, 1] < h).all() and (at_query >= 0).all())


def test_query_points_are_the_semantic_points(semantic, videos_dir):
    """Recompute the tiny_25fps query points with the library stages: the pickle's track at each
    point's query frame is that point, in the same order, with the same entity id."""
    ds = VideoCSVDataset(semantic["csv"], fps=None, num_frames_clustering=4, max_frames=4)
    item = ds[1]
    tokens = DinoV2Extractor("vits14", checkpoint="random")(item.frames[item.cluster_frames])
    labels = bipartite_clusters(tokens)
    qp = select_query_points(labels, item.cluster_frames, tuple(item.frames.shape[-2:]), num_points_per_entity=2)
    f = load_tracks(semantic["out"] / "synthetic/feat_dump/tiny_25fps.pkl")
    n = len(qp)
    assert f.num_points == n
    assert torch.equal(f.query_frames, qp.queries[:, 0].long())
    assert torch.equal(f.obj_ids, qp.obj_ids)
    at_query = f.tracks[f.query_frames, torch.arange(n)]
    assert torch.allclose(at_query, qp.queries[:, 1:], atol=0.25)  # float16 step below 512 px


def test_dinov3_backbone_runs_the_job(tmp_path, videos_dir):
    csv = write_csv(tmp_path / "one.csv", [(videos_dir / "tiny_ssv2.webm", "ssv2")])
    flags = [f for f in SEMANTIC if f not in ("--dinov2_model", "vits14")]
    assert main(["--csv_path", str(csv), "--base_feat_path", str(tmp_path / "out"), *flags,
                 "--dinov2_model", "dinov3_vits16", "--trainer.enable_progress_bar=false"]) == 0
    tf = load_tracks(tmp_path / "out" / "cotracker3_bip_fr_4_fps_10" / "ssv2" / "feat_dump" / "tiny_ssv2.pkl")
    assert tf.num_points > 0 and tf.num_frames == 4
    assert tf.meta["dinov2_weights"] == "random:timm-init-seed0"
    assert tf.meta["config"]["dinov2_model"] == "dinov3_vits16"


def test_semantic_run_gifs_failures_report_sidecar(semantic):
    out = semantic["out"]
    f = load_tracks(out / "synthetic/feat_dump/tiny_25fps.pkl")
    with Image.open(out / "synthetic/gif_dump/tiny_25fps.gif") as gif:
        assert gif.n_frames == f.num_frames
        assert abs(gif.info["duration"] - 1000 * float(f.meta["frame_times"][1] - f.meta["frame_times"][0])) <= 10
    assert (out / "ssv2/gif_dump/tiny_ssv2.gif").is_file()
    lines = (out / "failures.csv").read_text().splitlines()
    assert lines[0] == "row,video_id,dataset,video_path,stage,reason"
    assert sorted(line.split(",")[1] for line in lines[1:]) == sorted(BROKEN)
    assert all(line.split(",")[4] == "decode" for line in lines[1:])
    report = json.loads((out / "run_report.json").read_text())
    assert report["counts"] == {"rows": 4, "done": 2, "failed": 2, "pending": 0}
    assert set(report["last_run"]["stage_mean_s"]) >= {"features", "clustering", "points", "tracking", "write"}
    assert {x["video_id"] for x in report["failures"]} == set(BROKEN)
    assert "2 done, 2 failed" in semantic["proc"].stderr
    sidecar = json.loads((out / "semtrack_config.json").read_text())["options"]
    assert f.meta["config"] == sidecar and sidecar["tracker_resolution"] == [96, 128]


def test_semantic_outputs_are_the_same_bytes_with_two_ranks(semantic):
    """The same thread count per process (`--num_threads`), 1 or 2 CPU ranks: the same pickles (the
    tracker's float16 tracks can differ by one ulp between thread counts)."""
    out = semantic["out"]
    base = out.parent.parent / "ddp"
    args = [a if a != str(out.parent) else str(base) for a in semantic["args"]]
    proc = run_script(*args, "--devices", "2", "--accelerator", "cpu")
    assert proc.returncode == 1, proc.stderr[-3000:]  # the two broken files
    assert "1 torch thread(s) per process (--num_threads)" in proc.stderr
    assert pickles(base / out.name) == pickles(out) and len(pickles(out)) == 2


def test_report_statistics_json_where_and_html_of_a_real_run(semantic, tmp_path, capsys):
    """Each done record holds its video's statistics as the writer computed them; --json, --where and --html."""
    out = semantic["out"]
    done = [r for r in read_records(OutputLayout(out)) if r.get("status") == "done"]
    assert len(done) == 2
    for record in done:
        stats = record["stats"]
        from_file = file_stats(load_tracks(out / record["dataset"] / "feat_dump" / f"{record['video_id']}.pkl"))
        assert {k: stats[k] for k in ("frames", "points", "entities", "visible", "visible_half")} == \
            {k: from_file[k] for k in ("frames", "points", "entities", "visible", "visible_half")}
        assert stats["displacement_p95_px"] == pytest.approx(from_file["displacement_p95_px"], abs=0.1)  # float16
        assert stats["step_s"] > 0 and stats["wait_s"] >= 0 and stats["frames"] == 4
    assert report_main([str(out), "--json"]) == 0
    survey = json.loads(capsys.readouterr().out)
    assert survey["counts"]["with_statistics"] == 2 and survey["failures_by_stage"]["decode"]
    assert survey["statistics"]["frames"]["median"] == 4 and len(survey["gallery"]) == 2
    assert report_main([str(out), "--where", "frames==4 and visible>0"]) == 0
    assert capsys.readouterr().out == "dataset,video_id\nssv2,tiny_ssv2\nsynthetic,tiny_25fps\n"
    assert report_main([str(out), "--html", str(tmp_path / "report.html")]) == 1  # the folder has failures
    links = check_page(tmp_path / "report.html")
    assert {link.rsplit("/", 1)[-1] for link in links if link.endswith(".gif")} == {"tiny_ssv2.gif", "tiny_25fps.gif"}


def test_sidecar_mismatch_is_refused(semantic, capsys):
    args = [a if a != "2" else "3" for a in semantic["args"]]  # --num_points_per_entity 3
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "refusing to write" in err and "num_points_per_entity" in err


def test_resume_skips_valid_and_redoes_corrupt(semantic):
    """A resume redoes the truncated pickle and, by default (--retry_failed transient), not the files
    that failed to decode: it exits 0 and says so."""
    out = semantic["out"]
    good, corrupt = out / "ssv2/feat_dump/tiny_ssv2.pkl", out / "synthetic/feat_dump/tiny_25fps.pkl"
    before = contents(corrupt)
    good_mtime = good.stat().st_mtime_ns
    corrupt.write_bytes(corrupt.read_bytes()[:100])  # a truncated pickle must not count as done
    proc = run_script(*semantic["args"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rows failed earlier and were not retried" in proc.stderr
    report = json.loads((out / "run_report.json").read_text())
    assert report["counts"] == {"rows": 4, "done": 2, "failed": 2, "pending": 0}  # the whole folder
    assert report["last_run"]["counts"] == {"rows": 4, "done": 1, "failed": 0, "skipped": 3, "pending": 0}
    assert report["last_run"]["not_retried"] == 2
    assert good.stat().st_mtime_ns == good_mtime
    assert contents(corrupt) == before  # redone, identical (deterministic)


# ------------------------------------------------------------------------------ grid mode machinery
@pytest.fixture(scope="module")
def grid_csv(tmp_path_factory, videos_dir):
    tmp = tmp_path_factory.mktemp("grid")
    return write_csv(tmp / "four.csv", [
        (videos_dir / "tiny_ssv2.webm", "ssv2", "a"),
        (videos_dir / "tiny_25fps.mp4", "synthetic", "b"),
        (videos_dir / "tiny_ssv2.webm", "synthetic", "c"),
        (videos_dir / "tiny_25fps.mp4", "k400", "d"),
    ])


@pytest.fixture(scope="module")
def reference(grid_csv):
    """Uninterrupted single-process run, through the LightningCLI form with a YAML config."""
    base = grid_csv.parent / "reference"
    config = grid_csv.parent / "run.yaml"
    config.write_text(
        "trainer:\n  accelerator: cpu\n  devices: 1\n"
        f"extract:\n  csv_path: {grid_csv}\n  base_feat_path: {base}\n  weights: random\n  use_grid: true\n"
        "  cotracker_grid_size: 2\n  max_frames: 4\n  tracker_resolution: [96, 128]\n  num_workers: 0\n",
        encoding="utf-8",
    )
    proc = run_script("predict", "--config", str(config))
    return proc, base / "cotracker3_bip_fr_32_fps_10"


def test_yaml_config_run_succeeds(reference):
    proc, out = reference
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "" and not [line for line in proc.stderr.splitlines()  # no banner, no warnings
                                      if not line.startswith(("semtrack: ", "  "))], proc.stderr
    assert len(pickles(out)) == 4
    counts = json.loads((out / "run_report.json").read_text())["counts"]
    assert counts == {"rows": 4, "done": 4, "failed": 0, "pending": 0}
    assert (out / "failures.csv").read_text().splitlines() == ["row,video_id,dataset,video_path,stage,reason"]
    f = load_tracks(out / "ssv2/feat_dump/a.pkl")  # grid mode: ids and query frames match the tracks
    assert f.num_points == 4 and f.obj_ids.tolist() == [0] * 4 and f.query_frames.tolist() == [0] * 4


def test_two_ranks_give_identical_pickles_and_one_report(reference, grid_csv):
    """2 gloo ranks, 2 videos per step (equal shapes share one tracker call): the same bytes."""
    base = grid_csv.parent / "ddp"
    proc = run_script("--csv_path", str(grid_csv), "--base_feat_path", str(base), *GRID,
                      "--devices", "2", "--accelerator", "cpu", "--batch_size", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout == "" and "semtrack: 4/4 videos: 4 done, 0 failed, 0 skipped" in proc.stderr  # both ranks
    assert not [line for line in proc.stderr.splitlines() if not line.startswith(("semtrack: ", "  "))]
    out = base / "cotracker3_bip_fr_32_fps_10"
    assert pickles(out) == pickles(reference[1])
    report = json.loads((out / "run_report.json").read_text())
    assert report["last_run"]["world_size"] == 2
    assert report["counts"] == {"rows": 4, "done": 4, "failed": 0, "pending": 0}
    assert len(list((out / "ledger").glob("*.jsonl"))) == 2  # one ledger file per rank
    assert not list(out.glob("run_report.*.json"))


def test_kill_mid_run_then_resume(reference, grid_csv):
    base = grid_csv.parent / "killed"
    out = base / "cotracker3_bip_fr_32_fps_10"
    args = [sys.executable, str(SCRIPT), "--csv_path", str(grid_csv), "--base_feat_path", str(base), *GRID]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(out.rglob("*.pkl")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = [p for p in out.rglob("*.pkl")]
    assert 1 <= len(done_before) < 4
    for p in done_before:
        load_tracks(p)  # complete, never partial
    resumed = run_script("--csv_path", str(grid_csv), "--base_feat_path", str(base), *GRID)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    counts = json.loads((out / "run_report.json").read_text())["last_run"]["counts"]
    assert counts == {"rows": 4, "done": 4 - len(done_before), "failed": 0, "skipped": len(done_before), "pending": 0}
    assert pickles(out) == pickles(reference[1])


# ------------------------------------------------------------------------------ hostile input
def test_hostile_csvs_give_clear_errors(tmp_path, videos_dir, capsys):
    base = ["--base_feat_path", str(tmp_path / "out"), *GRID]
    cases = {
        "missing column": ("video_path\nx.mp4\n", "missing required column"),
        "empty": ("", "empty"),
        "duplicate ids": (f"video_path,dataset\n{videos_dir}/cat.mp4,d\n{videos_dir}/cat.mp4,d\n", "duplicate"),
    }
    for name, (text, message) in cases.items():
        csv = tmp_path / f"{name}.csv"
        csv.write_text(text)
        assert main(["--csv_path", str(csv), *base]) == 2, name
        err = capsys.readouterr().err
        assert err.startswith("error:") and message in err and "Traceback" not in err, (name, err)
    assert main(["--csv_path", str(tmp_path / "absent.csv"), *base]) == 2


def test_unicode_paths_and_a_directory_row_through_the_python_api(tmp_path, videos_dir):
    folder = tmp_path / "clips with spaces ü"
    folder.mkdir()
    clip = folder / "mön clip.webm"
    shutil.copy(videos_dir / "tiny_ssv2.webm", clip)
    csv = write_csv(tmp_path / "odd.csv", [(clip, "my set"), (folder, "my set")])
    report = semtrack.extract(
        csv, tmp_path / "out", weights="random", use_grid=True, cotracker_grid_size=2, max_frames=4,
        tracker_resolution=(96, 128), num_workers=0, accelerator="cpu", enable_progress_bar=False,
    )
    out = tmp_path / "out" / "cotracker3_bip_fr_32_fps_10"
    assert load_tracks(out / "my set" / "feat_dump" / "mön clip.pkl").num_points == 4
    assert report == json.loads((out / "run_report.json").read_text(encoding="utf-8"))
    assert report["counts"] == {"rows": 2, "done": 1, "failed": 1, "pending": 0}
    assert report["failures"][0]["video_id"] == folder.name and "directory" in report["failures"][0]["reason"]


def test_missing_weights_fail_up_front(tmp_path, videos_dir, capsys):
    csv = write_csv(tmp_path / "one.csv", [(videos_dir / "tiny_ssv2.webm", "ssv2")])
    code = main(["--csv_path", str(csv), "--base_feat_path", str(tmp_path / "out"), *GRID,
                 "--cotracker_checkpoint", str(tmp_path / "nowhere.pth")])
    assert code == 2
    assert "nowhere.pth" in capsys.readouterr().err
    assert not list((tmp_path / "out").rglob("*.pkl"))


def test_print_config_shows_translated_research_flags():
    proc = run_script("--clustering_method", "kmeans", "--n_clusters", "8", "--csv_path", "v.csv", "--print_config")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "extract:" in proc.stdout and "clustering_method: kmeans" in proc.stdout
    assert "n_clusters: 8" in proc.stdout and "csv_path: v.csv" in proc.stdout
