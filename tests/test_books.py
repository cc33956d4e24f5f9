"""Run bookkeeping end to end on the shared clips (stand-in weights, grid mode, 4 frames at 64x96):
the folder's report survives partial, shard and debug runs; failed starts leave nothing behind; a
full or read-only folder keeps every record and exits 1; SIGTERM stops at a video boundary and a
resume does each video once; shards plus `semtrack-report` equal one run; WebDataset output reads
like the pickles; names the folder cannot hold are refused before any decoding."""
from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from _shared import REPO_ROOT
from datamodules.tracks import PointTrackDataset
from semtrack.cli import main
from semtrack.layout import OutputLayout
from semtrack.ledger import latest_videos, read_records
from semtrack.report import main as report_main
from semtrack.shards import FolderLock, Shard
from semtrack.trackfile import load_tracks, loads_tracks
from semtrack.util import host_tag
from semtrack.webdataset import read_manifest, read_member

pytestmark = pytest.mark.slow

SCRIPT = REPO_ROOT / "scripts" / "extract.py"
TINY = ["--weights", "random", "--max_frames", "4", "--tracker_resolution", "64", "96", "--num_workers", "0",
        "--accelerator", "cpu"]
GRID = [*TINY, "--use_grid", "--cotracker_grid_size", "2"]
SEMANTIC = [*TINY, "--dinov2_model", "vits14", "--num_frames_clustering", "4", "--num_points_per_entity", "2"]
QUIET = ["--trainer.enable_progress_bar=false"]
DUMP = "cotracker3_bip_fr_32_fps_10"


def write_csv(path: Path, rows: list[tuple]) -> Path:
    """rows: (video_path, dataset, video_id)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows([("video_path", "dataset", "video_id"), *rows])
    return path


def pickles(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/feat_dump/*.pkl"))}


def contents(data: bytes) -> dict:
    """A pickle's tensors and metadata as comparable values (the bytes of equal pickles written by
    another process may differ in how pickle shares equal strings)."""
    f = loads_tracks(data, "pickle")
    meta = {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in f.meta.items()}
    return {"tracks": f.tracks.tolist(), "vis": f.visibility.tolist(), "ids": f.obj_ids.tolist(),
            "queries": f.query_frames.tolist(), "meta": meta}


def report_of(out: Path) -> dict:
    return json.loads((out / "run_report.json").read_text(encoding="utf-8"))


def failures_of(report: dict) -> list[tuple]:
    return [(f["row"], f["video_id"], f["stage"]) for f in report["failures"]]


def spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


@contextlib.contextmanager
def tmpfs(path: Path, size: str = "2m"):
    """A small tmpfs at `path` (skips the test where mounting is not allowed)."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture(scope="module")
def clips(tmp_path_factory, videos_dir):
    """Three rows: two clips and a broken file."""
    tmp = tmp_path_factory.mktemp("books")
    return write_csv(tmp / "three.csv", [(videos_dir / "tiny_ssv2.webm", "a", "x"),
                                         (videos_dir / "not_a_video.mp4", "a", "broken"),
                                         (videos_dir / "tiny_25fps.mp4", "b", "y.v2")])


@pytest.fixture(scope="module")
def single(clips):
    """One uninterrupted run of the three rows."""
    base = clips.parent / "single"
    assert main(["--csv_path", str(clips), "--base_feat_path", str(base), *GRID, *QUIET]) == 1
    return base / DUMP


# ------------------------------------------------------------------------------ shards
def test_two_shards_and_semtrack_report_equal_one_run(single, clips, monkeypatch, capsys):
    base = clips.parent / "shards"
    out = base / DUMP
    args = ["--csv_path", str(clips), "--base_feat_path", str(base), *GRID, *QUIET]
    assert main([*args, "--num_shards", "2", "--shard_index", "0"]) == 0  # rows 0 and 2
    partial = report_of(out)
    assert partial["counts"] == {"rows": 3, "done": 2, "failed": 0, "pending": 1}
    assert partial["last_run"]["counts"] == {"rows": 2, "done": 2, "failed": 0, "skipped": 0, "pending": 0}
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")  # an array task: the shard comes from SLURM
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    assert main(args) == 1  # row 1, the broken file
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID")
    monkeypatch.delenv("SLURM_ARRAY_TASK_COUNT")
    second = report_of(out)["last_run"]
    assert second["shard"] == [1, 2] and second["counts"]["failed"] == 1
    assert second["videos_per_s"] == 0.0 and second["attempts_per_s"] > 0  # done videos only
    capsys.readouterr()
    assert report_main([str(out)]) == 1
    printed = capsys.readouterr().out
    assert "3 rows: 2 done, 1 failed, 0 pending" in printed and "FAILED row 1 broken [decode]" in printed
    assert report_main([str(base)]) == 1  # the base folder: each job folder in it
    assert capsys.readouterr().out == printed
    merged, reference = report_of(out), report_of(single)
    assert merged["counts"] == reference["counts"] == {"rows": 3, "done": 2, "failed": 1, "pending": 0}
    assert failures_of(merged) == failures_of(reference) == [(1, "broken", "decode")]
    assert pickles(out) == pickles(single)
    assert (out / "failures.csv").read_text() == (single / "failures.csv").read_text()
    # a later shard run that has nothing to do keeps the other shard's failure in the folder's report
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / "a" / "feat_dump" / f"x.pkl.tmp-{host_tag()}-{int(dead.stdout)}"
    stale.write_bytes(b"half a pickle")  # left by a killed run on this host
    assert main([*args, "--num_shards", "2", "--shard_index", "0"]) == 0
    again = report_of(out)
    assert again["last_run"]["counts"]["skipped"] == 2 and failures_of(again) == [(1, "broken", "decode")]
    assert not stale.exists()
    assert len(again["runs"]) == 3


def test_a_second_run_of_a_shard_or_the_folder_is_refused(single, clips, capsys):
    args = ["--csv_path", str(clips), "--base_feat_path", str(single.parent), *GRID, *QUIET]
    lock = FolderLock(OutputLayout(single), Shard(0, 2))
    lock.acquire()  # as a running job of shard 0 would
    try:
        assert main([*args, "--num_shards", "2", "--shard_index", "0"]) == 2
        (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert "shard 0 of 2" in err and "already being written" in err
        assert main(args) == 2
        assert "another semtrack run is writing" in capsys.readouterr().err
    finally:
        lock.release()
    assert len(report_of(single)["runs"]) == 1  # refused runs leave no trace


# ------------------------------------------------------------------------------ webdataset
def test_webdataset_output_reads_like_the_pickles(single, clips):
    base = clips.parent / "wds"
    out = base / DUMP
    plain = ["--csv_path", str(clips), "--base_feat_path", str(base), *GRID, *QUIET]
    args = [*plain, "--output_format", "webdataset"]
    assert main([*args, "--make_vis"]) == 1
    (tar,) = (out / "shards").iterdir()
    assert tar.suffix == ".tar" and not list(out.glob("*/feat_dump"))
    manifest = read_manifest(out / "manifest.csv")
    assert set(manifest) == {("a", "x"), ("b", "y.v2")}
    assert "broken,a,,,,,,,failed" in (out / "manifest.csv").read_text()
    for (dataset, video_id), entry in manifest.items():
        assert read_member(out, entry) == (single / dataset / "feat_dump" / f"{video_id}.pkl").read_bytes()
        assert (entry["T"], entry["N"]) == ("4", "4")
    with pytest.warns(UserWarning, match="1 of 3 rows"):  # the broken row
        ours = PointTrackDataset(clips, out, num_frames=2, num_points=3, mode="eval")
    with pytest.warns(UserWarning, match="1 of 3 rows"):
        theirs = PointTrackDataset(clips, single, num_frames=2, num_points=3, mode="eval")
    assert len(ours) == len(theirs) == 2
    for a, b in zip(map(ours.__getitem__, range(2)), map(theirs.__getitem__, range(2))):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)
    assert main([*args, "--make_vis", "--retry_failed", "always"]) == 1  # both done, the broken row retried
    assert report_of(out)["last_run"]["counts"] == {"rows": 3, "done": 0, "failed": 1, "skipped": 2, "pending": 0}
    assert main(plain) == 2  # a pickle run into a WebDataset folder is refused
    assert main(["--csv_path", str(clips), "--base_feat_path", str(single.parent), *GRID, *QUIET,
                 "--output_format", "webdataset"]) == 2


# ------------------------------------------------------------------------------ start, debug
def test_a_failed_start_leaves_nothing_and_debug_mode_keeps_the_folder(tmp_path, videos_dir, capsys):
    csv_path = write_csv(tmp_path / "one.csv", [(videos_dir / "tiny_ssv2.webm", "a", "x")])
    base = tmp_path / "out"
    out = base / "cotracker3_bip_fr_4_fps_10"
    args = ["--csv_path", str(csv_path), "--base_feat_path", str(base), *SEMANTIC, *QUIET]
    assert main([*args, "--cotracker_checkpoint", str(tmp_path / "nowhere.pth")]) == 2
    assert main([*args, "--num_points_per_entity", "3", "--precision", "64-true"]) == 2
    err = capsys.readouterr().err
    assert "nowhere.pth" in err and "precision '64-true' is not supported" in err
    assert not (out / "semtrack_config.json").exists() and not list(out.rglob("*.jsonl"))
    assert main(args) == 0  # the corrected command runs in the same folder
    folder_files = {p: p.read_bytes() for p in (out / "ledger").glob("*.jsonl")}
    folder_report = (out / "run_report.json").read_bytes()
    assert main([*args, "--debug_mode"]) == 0  # its one row is done: debug mode still processes it
    debug = out / "debug"
    assert load_tracks(debug / "a" / "feat_dump" / "x.pkl").num_frames == 4
    assert (debug / "a" / "gif_dump" / "x.gif").is_file() and list((debug / "a" / "debug_vis" / "x").glob("*.png"))
    timings = report_of(debug)["last_run"]["stage_mean_s"]
    assert set(timings) >= {"features", "clustering", "points", "tracking", "write"}
    assert {p: p.read_bytes() for p in (out / "ledger").glob("*.jsonl")} == folder_files
    assert (out / "run_report.json").read_bytes() == folder_report
    assert (out / "a" / "feat_dump" / "x.pkl").read_bytes() == (debug / "a" / "feat_dump" / "x.pkl").read_bytes()


def test_names_the_folder_cannot_hold_are_refused_before_decoding(tmp_path, videos_dir, capsys):
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    csv_path = write_csv(tmp_path / "hostile.csv", [
        (videos_dir / "tiny_ssv2.webm", "ok", "v" * (limit - 8)),  # fits the file system, not with '.pkl.tmp-...'
        (videos_dir / "tiny_ssv2.webm", "run_report.json", "x"),
        (videos_dir / "tiny_ssv2.webm", "ok", "fine"),
    ])
    assert main(["--csv_path", str(csv_path), "--base_feat_path", str(tmp_path / "out"), *GRID, *QUIET]) == 2
    (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert err.startswith("error: 2 row(s) have names the output folder")
    assert "row 0 video_id" in err and "row 1 dataset 'run_report.json'" in err and "row 2" not in err
    assert not list(tmp_path.glob("out/*/*/feat_dump")) and not list(tmp_path.rglob("*.jsonl"))


# ------------------------------------------------------------------------------ signals
def test_sigterm_stops_at_a_video_boundary_and_a_resume_does_each_video_once(single, clips, videos_dir):
    csv_path = write_csv(clips.parent / "four.csv", [
        (videos_dir / "tiny_ssv2.webm", "a", "x"), (videos_dir / "tiny_25fps.mp4", "b", "y.v2"),
        (videos_dir / "tiny_ssv2.webm", "c", "z"), (videos_dir / "tiny_25fps.mp4", "c", "w"),
    ])
    base = clips.parent / "sigterm"
    out = base / DUMP
    args = ["--csv_path", str(csv_path), "--base_feat_path", str(base), *GRID, *QUIET, "--bucket_batches", "1"]
    proc = spawn(*args)
    wait_for(lambda: list(out.glob("*/feat_dump/*.pkl")), proc)
    signalled = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    stopped_after = time.time() - signalled
    assert proc.returncode == 143, err[-3000:]
    assert stopped_after < 120  # the batch being tracked, then the report
    assert "loading models" in err and "decoding the first videos" in err and "stopped by SIGTERM" in err
    report = report_of(out)
    run = report["last_run"]
    assert run["status"] == "stopped" and run["reason"] == "stopped by SIGTERM"
    first = run["counts"]["done"]
    assert 1 <= first < 4 and run["counts"]["pending"] == 4 - first
    assert report["counts"] == {"rows": 4, "done": first, "failed": 0, "pending": 4 - first}
    resumed = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    videos = [r for r in read_records(OutputLayout(out)) if r["kind"] == "video"]
    assert sorted((r["dataset"], r["video_id"]) for r in videos) == [("a", "x"), ("b", "y.v2"), ("c", "w"),
                                                                     ("c", "z")]  # each video once
    assert report_of(out)["last_run"]["counts"] == {"rows": 4, "done": 4 - first, "failed": 0, "skipped": first,
                                                    "pending": 0}
    ours = {k: contents(v) for k, v in pickles(out).items() if not k.startswith("c/")}
    assert ours == {k: contents(v) for k, v in pickles(single).items()}


# ------------------------------------------------------------------------------ a folder that cannot be written
def test_a_full_disk_keeps_every_record_and_exits_1(tmp_path, clips, capsys):
    with tmpfs(tmp_path / "disk") as disk:
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        filler = disk / "filler"
        filler.write_bytes(b"\0" * (free - 40 * 1024))  # room for one video's pickle and GIF, not two
        base = disk / "base"
        out = base / DUMP
        args = ["--csv_path", str(clips), "--base_feat_path", str(base), *GRID, *QUIET, "--make_vis"]
        assert main(args) == 1
        err = capsys.readouterr().err
        assert "No space left on device" in err and "Traceback" not in err
        latest = latest_videos(read_records(OutputLayout(out)))
        full = [r for r in latest.values() if r.get("stage") == "write"]
        assert len(full) == 1 and "No space left" in full[0]["reason"]
        run = [r for r in read_records(OutputLayout(out)) if r["kind"] == "end"][0]
        assert run["status"] == "stopped" and "No space left" in run["reason"]
        failed = (full[0]["dataset"], full[0]["video_id"])
        assert not (out / failed[0] / "feat_dump" / f"{failed[1]}.pkl").exists()  # no half-done row
        filler.unlink()
        assert main([*args, "--retry_failed", "always"]) == 1  # the broken file still fails; the rest is done now
        final = report_of(out)
        assert final["counts"] == {"rows": 3, "done": 2, "failed": 1, "pending": 0}
        assert len(list(out.glob("*/gif_dump/*.gif"))) == 2


def test_a_folder_turned_read_only_keeps_every_record_and_exits_1(tmp_path, clips, videos_dir, capsys):
    csv_path = write_csv(tmp_path / "three.csv", [(videos_dir / "tiny_ssv2.webm", "a", "x"),
                                                  (videos_dir / "tiny_25fps.mp4", "b", "y"),
                                                  (videos_dir / "tiny_ssv2.webm", "b", "z")])
    with tmpfs(tmp_path / "disk", size="64m") as disk:
        base = disk / "base"
        out = base / DUMP
        proc = spawn("--csv_path", str(csv_path), "--base_feat_path", str(base), *GRID, *QUIET,
                     "--bucket_batches", "1")
        wait_for(lambda: any('"kind":"video"' in p.read_text() for p in out.glob("ledger/*.jsonl")), proc)
        deadline = time.time() + 30
        while subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True).returncode:
            assert time.time() < deadline, "could not remount read-only"
            time.sleep(0.05)
        _, err = proc.communicate(timeout=300)
        subprocess.run(["mount", "-o", "remount,rw", str(disk)], check=True)
        assert proc.returncode == 1, err[-3000:]
        assert "Read-only file system" in err and "Traceback" not in err
        saved = Path(err.split("ledger record(s) were saved to ")[1].split(":")[0])
        shutil.copy(saved, out / "ledger")
        saved.unlink()
        assert report_main([str(out)]) == 1
        latest = latest_videos(read_records(OutputLayout(out)))
        assert ("a", "x") in latest and latest[("a", "x")]["status"] == "done"
        failed = [r for r in latest.values() if r["status"] == "failed"]
        assert len(failed) == 1 and "Read-only" in failed[0]["reason"]
        report = report_of(out)
        assert report["counts"]["done"] + report["counts"]["failed"] + report["counts"]["pending"] == 3
        assert report["runs"][0]["status"] == "stopped"
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        capsys.readouterr()
        assert main(["--csv_path", str(csv_path), "--base_feat_path", str(base), *GRID, *QUIET]) == 2
        (err,) = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert err.startswith(f"error: cannot write the output folder {out}") and "Read-only" in err
