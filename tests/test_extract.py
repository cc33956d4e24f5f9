"""Unit tests of the extraction job's pieces: config naming and layout, flag translation, config
sidecar, skip/redo decisions, report merging, the tracking memory guard in a job and the writer's place
among callbacks. Models run only in two small grid-mode jobs (stand-in weights); the rest of the
end-to-end runs live in test_extract_e2e."""
from __future__ import annotations

import csv as csv_module
import json

import pytest
import torch

from datamodules.extraction import ExtractionDataModule
from semtrack.cli import main, translate
from semtrack.config import ExtractConfig
from semtrack.layout import OutputLayout
from semtrack.report import build_report, failures_csv
from semtrack.sidecar import check_sidecar, write_sidecar
from semtrack.tracker import estimate_tracking_bytes
from semtrack.trackfile import save_tracks


# ------------------------------------------------------------------------------ config
@pytest.mark.parametrize(
    "options, name",
    [
        ({}, "cotracker3_bip_fr_32_fps_10"),  # the default: 10 fps
        ({"fps": None}, "cotracker3_bip_fr_32"),  # every decoded frame, as the research default
        ({"clustering_method": "kmeans", "n_clusters": 16, "use_connected_components": True},
         "cotracker3_kmeans_n16_fr_32_concomp_fps_10"),
        ({"merge_ratio": 40, "num_iters": 5, "fps": None}, "cotracker3_bip_fr_32_m40_i5"),
        ({"clustering_method": "kmeans", "num_iters": 5, "fps": None}, "cotracker3_kmeans_n32_fr_32_m25_i5"),
        ({"num_frames_clustering": 8, "fps": 12.5}, "cotracker3_bip_fr_8_fps_12.5"),
        # not part of the name (REFERENCE.md 2.2)
        ({"num_points_per_entity": 4, "use_grid": True, "cotracker_grid_size": 8}, "cotracker3_bip_fr_32_fps_10"),
    ],
)
def test_dump_name_matches_research_rule(options, name):
    assert ExtractConfig(**options).dump_name() == name


def test_config_rejects_bad_options_by_name():
    with pytest.raises(ValueError, match="clustering_method"):
        ExtractConfig(clustering_method="agglomerative")
    with pytest.raises(ValueError, match="merge_ratio"):
        ExtractConfig(merge_ratio=60)
    with pytest.raises(ValueError, match="tracker_resolution"):
        ExtractConfig(tracker_resolution=(100, 128))
    with pytest.raises(ValueError, match="unknown extraction option"):
        ExtractConfig.from_dict({"clusters": 3})


def test_output_paths_follow_layout(tmp_path):
    layout = ExtractConfig(base_feat_path=str(tmp_path), fps=10).layout
    root = tmp_path / "cotracker3_bip_fr_32_fps_10"
    assert layout.root == root
    assert layout.pickle("ssv2", "123") == root / "ssv2" / "feat_dump" / "123.pkl"
    assert layout.gif("ssv2", "123") == root / "ssv2" / "gif_dump" / "123.gif"
    assert layout.debug_png("ssv2", "123", 7) == root / "ssv2" / "debug_vis" / "123" / "debug_cluster_pts_7.png"
    assert (layout.sidecar.name, layout.failures.name, layout.report.name) == (
        "semtrack_config.json", "failures.csv", "run_report.json")


# ------------------------------------------------------------------------------ command line
def test_translate_research_flags():
    argv = ["--clustering_method", "kmeans", "--csv_path", "v.csv", "--rerun", "--fps=10",
            "--tracker_resolution", "96", "128", "--devices", "2", "--accelerator", "cpu", "--make_vis"]
    assert translate(argv) == [
        "predict", "--extract.clustering_method", "kmeans", "--extract.csv_path", "v.csv",
        "--extract.rerun=true", "--extract.fps=10", "--extract.tracker_resolution=[96, 128]",
        "--trainer.devices", "2", "--trainer.accelerator", "cpu", "--extract.make_vis=true",
    ]


def test_translate_keeps_lightning_form_and_is_idempotent():
    argv = ["predict", "--config", "run.yaml", "--trainer.devices=8", "--extract.csv_path", "v.csv"]
    assert translate(argv) == argv
    flat = ["--use_grid", "--csv_path", "x.csv"]
    assert translate(translate(flat)) == translate(flat)


# ------------------------------------------------------------------------------ sidecar
def test_sidecar_written_then_refuses_a_different_configuration_once_there_are_outputs(tmp_path):
    cfg = ExtractConfig(base_feat_path=str(tmp_path), weights="random")
    assert not check_sidecar(cfg, "32-true").exists()  # checking writes nothing
    path = write_sidecar(cfg, "32-true")
    recorded = json.loads(path.read_text())
    assert recorded["options"]["num_points_per_entity"] == 16 and recorded["options"]["tracker_weights"] == "random"
    assert recorded["output_format"] == "pickle"
    other = ExtractConfig(base_feat_path=str(tmp_path), weights="random", num_points_per_entity=8)
    check_sidecar(other, "32-true")  # a folder without outputs: its sidecar is replaced, not obeyed
    save_tracks(cfg.layout.pickle("d", "v"), _tracks())
    # run-only options may change between runs of one folder
    check_sidecar(ExtractConfig(base_feat_path=str(tmp_path), weights="random", batch_size=4, rerun=True,
                                num_shards=2, shard_index=1, verify_outputs=True), "32-true")
    with pytest.raises(ValueError, match="refusing.*num_points_per_entity"):
        check_sidecar(other, "32-true")
    with pytest.raises(ValueError, match="refusing.*num_points_per_entity"):
        write_sidecar(other, "32-true")
    with pytest.raises(ValueError, match="precision"):
        check_sidecar(cfg, "bf16-mixed")
    with pytest.raises(ValueError, match="output_format"):
        check_sidecar(ExtractConfig(base_feat_path=str(tmp_path), weights="random", output_format="webdataset"),
                      "32-true")


# ------------------------------------------------------------------------------ skip / redo
def _tracks(t=3, n=2):
    return {
        "pred_tracks": torch.zeros(t, n, 2, dtype=torch.float16),
        "pred_visibility": torch.ones(t, n, dtype=torch.bool),
        "obj_ids": torch.zeros(n, dtype=torch.int64),
        "point_queries": torch.zeros(n, dtype=torch.int64),
    }


def test_pending_rows_skip_valid_redo_corrupt_and_rerun(tmp_path, videos_dir):
    csv = tmp_path / "v.csv"
    names = ["tiny_ssv2.webm", "tiny_25fps.mp4", "cat.mp4"]
    csv.write_text("video_path,dataset\n" + "".join(f"{videos_dir / n},clips\n" for n in names))
    cfg = ExtractConfig(csv_path=str(csv), base_feat_path=str(tmp_path / "out"))
    save_tracks(cfg.layout.pickle("clips", "tiny_ssv2"), _tracks())  # valid: skipped
    corrupt = cfg.layout.pickle("clips", "tiny_25fps")
    save_tracks(corrupt, _tracks())
    corrupt.write_bytes(corrupt.read_bytes()[:50])  # truncated: redone
    dm = ExtractionDataModule(cfg)
    plan = dm.row_plan(dm.make_dataset())
    assert (plan.pending, plan.skipped) == ([1, 2], 1)  # no ledger record: the valid pickle is adopted
    assert [(r["video_id"], r["status"], r["adopted"]) for r in plan.adopted] == [("tiny_ssv2", "done", True)]
    rerun = ExtractionDataModule(ExtractConfig(csv_path=str(csv), base_feat_path=str(tmp_path / "out"), rerun=True))
    plan = rerun.row_plan(rerun.make_dataset())
    assert (plan.pending, plan.skipped) == ([0, 1, 2], 0)
    debug = ExtractionDataModule(
        ExtractConfig(csv_path=str(csv), base_feat_path=str(tmp_path / "out"), debug_mode=True)
    )
    plan = debug.row_plan(debug.make_dataset())
    assert (plan.pending, plan.skipped) == ([0], 0)  # the first row only, done or not
    vis = ExtractionDataModule(ExtractConfig(csv_path=str(csv), base_feat_path=str(tmp_path / "out"), make_vis=True))
    assert vis.row_plan(vis.make_dataset()).pending == [0, 1, 2]  # no GIF: the first row is not done


# ------------------------------------------------------------------------------ report
def _video(run, rank, row, status, t, **extra):
    return {"kind": "video", "run": run, "rank": rank, "row": row, "dataset": "d", "video_id": f"v{row}",
            "status": status, "time": t, **extra}


def test_report_sums_ranks_orders_failures_and_keeps_the_folder_over_runs(tmp_path):
    fail = {"stage": "decode", "reason": 'bad, "quoted"'}
    start = {"kind": "start", "world_size": 2, "shard": [0, 1], "csv_rows": 9, "csv_keys": "k", "rows": 9}
    records = [
        {**start, "run": "A", "rank": 0, "time": 1.0, "skipped": 1, "assigned": 5},
        {**start, "run": "A", "rank": 1, "time": 1.0, "skipped": 1, "assigned": 4},
        *(_video("A", 0, row, "done", 2.0) for row in (0, 2, 4)),
        _video("A", 0, 6, "failed", 2.0, video_path="/x/v6.mp4", **fail),
        *(_video("A", 1, row, "done", 2.0) for row in (3, 5)),
        _video("A", 1, 1, "failed", 2.0, video_path="/x/v1.mp4", **fail),
        {"kind": "end", "run": "A", "rank": 0, "time": 3.0, "status": "complete", "wall_s": 10.0,
         "stage_totals": {"tracking": [6.0, 3]}, "data_wait_s": 1.0, "points_dropped": 2},
        {"kind": "end", "run": "A", "rank": 1, "time": 3.0, "status": "complete", "wall_s": 8.0,
         "stage_totals": {"tracking": [2.0, 2], "write": [1.0, 2]}, "data_wait_s": 0.5, "points_dropped": 0},
    ]
    report = build_report(OutputLayout(tmp_path), records)
    assert report["counts"] == {"rows": 9, "done": 5, "failed": 2, "pending": 2}
    run = report["last_run"]
    assert run["counts"] == {"rows": 9, "done": 5, "failed": 2, "skipped": 2, "pending": 0}
    assert [f["row"] for f in report["failures"]] == [1, 6] == [f["row"] for f in run["failures"]]
    assert run["stage_mean_s"] == {"tracking": 8.0 / 5, "write": 0.5}
    assert run["videos_per_s"] == 5 / 10.0 and run["attempts_per_s"] == 7 / 10.0 and run["world_size"] == 2
    assert run["status"] == "complete"
    text = failures_csv(report["failures"])
    assert text.splitlines()[0] == "row,video_id,dataset,video_path,stage,reason"
    assert text.splitlines()[1] == '1,v1,d,/x/v1.mp4,decode,"bad, ""quoted"""'
    # a later partial run (one rank, killed: no end record) redoes row 1: the folder keeps row 6's failure
    later = [{**start, "run": "B", "rank": 0, "time": 5.0, "world_size": 1, "rows": 1, "skipped": 0},
             _video("B", 0, 1, "done", 6.0)]
    report = build_report(OutputLayout(tmp_path), records + later)
    assert report["counts"] == {"rows": 9, "done": 6, "failed": 1, "pending": 2}
    assert [f["row"] for f in report["failures"]] == [6]
    assert report["last_run"]["run_id"] == "B" and report["last_run"]["status"] == "interrupted"
    assert report["last_run"]["counts"] == {"rows": 1, "done": 1, "failed": 0, "skipped": 0, "pending": 0}
    assert [r["run_id"] for r in report["runs"]] == ["A", "B"]


# ------------------------------------------------------------------------------ tracking memory guard
def test_over_budget_video_is_a_recorded_tracking_failure(tmp_path, videos_dir):
    """Grid mode, stand-in weights, 4 frames at 96x128: the larger clip is refused, the other is done
    (exit 1); the option stays out of the sidecar and the pickles, and a run without it resumes."""
    csv = tmp_path / "v.csv"
    csv.write_text(
        f"video_path,dataset\n{videos_dir / 'tiny_ssv2.webm'},clips\n{videos_dir / 'tiny_25fps.mp4'},clips\n"
    )
    small, large = (estimate_tracking_bytes(4, 4, size, (96, 128), backward=False) for size in ((192, 256), (240, 320)))
    args = ["--csv_path", str(csv), "--base_feat_path", str(tmp_path / "out"), "--weights", "random", "--use_grid",
            "--cotracker_grid_size", "2", "--max_frames", "4", "--tracker_resolution", "96", "128",
            "--num_workers", "0", "--accelerator", "cpu", "--trainer.enable_progress_bar=false"]
    assert main([*args, "--max_tracking_memory_gb", str((small + large) / 2e9)]) == 1
    out = tmp_path / "out" / "cotracker3_bip_fr_32_fps_10"
    rows = list(csv_module.DictReader((out / "failures.csv").open(encoding="utf-8")))
    assert [(r["video_id"], r["stage"]) for r in rows] == [("tiny_25fps", "tracking")]
    assert rows[0]["reason"].startswith("needs ≈") and "to track 4 frames x 4 points at 96x128" in rows[0]["reason"]
    assert "--max_tracking_memory_gb" in rows[0]["reason"]
    done = out / "clips" / "feat_dump" / "tiny_ssv2.pkl"
    first = done.read_bytes()
    assert "max_tracking_memory_gb" not in json.loads((out / "semtrack_config.json").read_text())["options"]
    assert main([*args, "--rerun"]) == 0  # no budget given: the sidecar agrees, both are done
    assert done.read_bytes() == first  # the budget never changes a pickle
    assert (out / "clips" / "feat_dump" / "tiny_25fps.pkl").is_file()


def test_api_run_calls_extra_callbacks_after_the_writer(tmp_path, videos_dir):
    from lightning.pytorch.callbacks import Callback

    from semtrack.api import run

    csv = tmp_path / "v.csv"
    csv.write_text(f"video_path,dataset\n{videos_dir / 'tiny_ssv2.webm'},clips\n")
    config = ExtractConfig(csv_path=str(csv), base_feat_path=str(tmp_path / "out"), weights="random", use_grid=True,
                           cotracker_grid_size=2, max_frames=4, tracker_resolution=(96, 128), num_workers=0)
    pickle_path = config.layout.pickle("clips", "tiny_ssv2")
    seen = []

    class Probe(Callback):
        def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
            before = [type(c).__name__ for c in trainer.callbacks[:trainer.callbacks.index(self)]]
            seen.append(("TrackWriter" in before, [r.clip.video_id for r in outputs.results]))

    report = run(config, callbacks=[Probe()], accelerator="cpu", enable_progress_bar=False)
    assert seen == [(True, ["tiny_ssv2"])]  # the writer took the batch first (it writes it in the background)
    assert pickle_path.is_file() and report["counts"]["done"] == 1
