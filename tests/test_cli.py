"""The command line: grouped help, one-line errors, flat flags, and the job's default frame rate."""
from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import av
import pytest
import torch

import semtrack
from _shared import REPO_ROOT
from semtrack.cli import main, parse_flat
from semtrack.config import GROUPS, ExtractConfig
from semtrack.trackfile import load_tracks

SCRIPT = REPO_ROOT / "scripts" / "extract.py"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                          env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"})


def test_help_lists_every_option_by_group_with_its_default():
    proc = run_script("--help")
    assert proc.returncode == 0
    text = proc.stdout
    assert len(text.splitlines()) < 3 * len(dataclasses.fields(ExtractConfig)) + 30  # about two lines per option
    headers = [line[:-1] for line in text.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert headers == ["options", *GROUPS, "trainer"]
    for f in dataclasses.fields(ExtractConfig):
        assert f"--{f.name}" in text, f.name
    for flag in ("--devices", "--num_nodes", "--accelerator", "--strategy", "--precision"):
        assert flag in text
    flat = " ".join(text.split())  # help lines wrap
    assert "(default: 10.0)" in flat and "(default: 25)" in flat and "(default: 384 512)" in flat
    assert "max_epochs" not in text and "gradient_clip_val" not in text and "lacks type" not in text
    assert "predict --help" in text and "--print_config" in flat and "--version" in text
    assert "(default: 32-true)" in flat and "(default: auto)" in flat  # the trainer flags' defaults too


def test_full_lightning_help_stays_reachable():
    proc = run_script("predict", "--help")
    assert proc.returncode == 0 and "--extract.merge_ratio" in proc.stdout and "--trainer.max_epochs" in proc.stdout


@pytest.mark.parametrize("argv, expected", [
    (["--clustring_method", "kmeans"], "error: unknown option --clustring_method; did you mean --clustering_method?"),
    (["--fps", "fast"], "error: argument --fps: invalid number value: 'fast'"),
    (["--sampler", "slow"], "error: argument --sampler: invalid choice: 'slow' (choose from fast, exact)"),
])
def test_a_bad_command_line_is_one_line(argv, expected, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].replace("'fast', 'exact'", "fast, exact") == expected


def test_flat_flags_parse_into_the_config_and_trainer_options():
    config, trainer = parse_flat(["--fps", "none", "--tracker_resolution", "96", "128", "--use_grid",
                                  "--max_frames", "none", "--native_fps_datasets", "--devices", "2",
                                  "--precision", "bf16-mixed", "--trainer.enable_progress_bar=false",
                                  "--trainer.limit_predict_batches", "3"])
    assert config.fps is None and config.tracker_resolution == (96, 128) and config.use_grid
    assert config.max_frames is None and config.native_fps_datasets == []
    assert trainer == {"devices": 2, "precision": "bf16-mixed", "enable_progress_bar": False,
                       "limit_predict_batches": 3}
    assert parse_flat([])[0] == ExtractConfig()  # the flags' defaults are the config's


def test_the_default_job_resamples_a_25fps_clip_to_10fps(tmp_path, videos_dir):
    clip = videos_dir / "tiny_25fps.mp4"
    with av.open(str(clip)) as container:
        stream = container.streams.video[0]
        pts = sorted(p.pts for p in container.demux(stream) if p.pts is not None)
        t_last = float((pts[-1] - pts[0]) * stream.time_base)
    csv = tmp_path / "v.csv"
    csv.write_text(f"video_path,dataset\n{clip},ucf101\n")
    status = main(["--csv_path", str(csv), "--base_feat_path", str(tmp_path), "--weights", "random", "--use_grid",
                   "--cotracker_grid_size", "2", "--tracker_resolution", "64", "96", "--num_workers", "0",
                   "--trainer.enable_progress_bar=false"])
    assert status == 0
    tf = load_tracks(tmp_path / "cotracker3_bip_fr_32_fps_10" / "ucf101" / "feat_dump" / "tiny_25fps.pkl")
    assert tf.num_frames == math.floor(t_last * 10 + 0.5) + 1
    assert tf.meta["fps"] == 10.0 and tf.meta["source_fps"] == 25.0


@pytest.mark.parametrize("flag", ["--cotracker_checkpoint", "--dinov2_checkpoint"])
def test_a_video_passed_as_a_checkpoint_is_one_line_and_exit_2(flag, tmp_path, videos_dir, capsys):
    csv = tmp_path / "v.csv"
    csv.write_text(f"video_path,dataset\n{videos_dir / 'tiny_ssv2.webm'},ssv2\n")
    status = main(["--csv_path", str(csv), "--base_feat_path", str(tmp_path / "out"), "--weights", "random",
                   "--dinov2_model", "vits14", "--tracker_resolution", "64", "96", "--num_workers", "0",
                   flag, str(videos_dir / "tiny_25fps.mp4"), "--trainer.enable_progress_bar=false"])
    assert status == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "tiny_25fps.mp4 is not a" in err[0] and "checkpoint" in err[0]
    assert "Traceback" not in err[0] and not list((tmp_path / "out").rglob("*.pkl"))


@pytest.mark.parametrize("hub", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable"])
def test_missing_weights_of_both_models_are_one_line_before_anything_is_written(hub, tmp_path, videos_dir):
    """Official weights, nothing cached, the hub off or not answering: exit 2, one line naming both
    models, no retries, no output folder (the check runs before the folder is touched)."""
    csv = tmp_path / "v.csv"
    csv.write_text(f"video_path,dataset\n{videos_dir / 'tiny_ssv2.webm'},ssv2\n")
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"), **hub}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--csv_path", str(csv), "--base_feat_path",
                           str(tmp_path / "out"), "--accelerator", "cpu"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: 2 models have no weights: "), proc.stderr
    assert "no CoTracker3 weights" in lines[0] and "no DINOv2 'vitb14' weights" in lines[0]
    assert "Retry" not in proc.stderr and not (tmp_path / "out").exists()


@pytest.mark.parametrize("argv, expected", [
    (["--accelerator", "gpu"], "error: invalid Trainer option: No supported gpu backend found!"),
    (["--devices", "abc"], "error: invalid Trainer option: `devices` selected with `CPUAccelerator` should be an "
                           "int > 0."),
    (["--devices", "0"], "error: invalid Trainer option: `Trainer(devices=0)` value is not a valid input using cpu "
                         "accelerator."),
    (["--trainer.nonexistent", "3"], "error: invalid Trainer option: unknown Trainer argument --trainer.nonexistent"),
    (["--precision", "bogus"], "error: invalid Trainer option: Precision 'bogus' is invalid."),
    (["predict", "--trainer.nonexistent", "3"], "error: unrecognized arguments: --trainer.nonexistent 3; see predict"),
    (["predict", "--trainer.devices", "abc", "--extract.weights", "random"],
     "error: invalid Trainer option: `devices` selected with `CPUAccelerator`"),
])
def test_a_bad_trainer_option_is_one_line_and_exit_2(argv, expected, tmp_path, capsys):
    if argv[:2] == ["--accelerator", "gpu"] and torch.cuda.is_available():
        pytest.skip("a GPU is there")
    form = argv[:1] if argv[0] == "predict" else []  # the LightningCLI form: options after the subcommand
    status = main([*form, "--csv_path", str(tmp_path / "v.csv"), "--base_feat_path", str(tmp_path / "out"),
                   *argv[len(form):]])
    err = capsys.readouterr().err.strip().splitlines()
    assert status == 2 and len(err) == 1 and err[0].startswith(expected), err
    assert not (tmp_path / "out").exists()


def test_no_arguments_print_the_usage_and_version_prints_the_version():
    bare = run_script()
    assert bare.returncode == 2 and bare.stderr.startswith("usage: extract.py (--csv_path CSV | --video_path")
    assert "sample.csv" not in bare.stderr and len(bare.stderr.splitlines()) == 2
    version = run_script("--version")
    assert version.returncode == 0 and version.stdout.strip() == f"extract.py {semtrack.__version__}"


def test_a_folder_of_videos_without_a_csv_and_a_limit(tmp_path, videos_dir, capsys):
    folder = tmp_path / "clips"
    folder.mkdir()
    for name in ("tiny_25fps.mp4", "tiny_ssv2.webm", "not_a_video.mp4"):
        (folder / name).symlink_to(videos_dir / name)
    status = main(["--video_path", str(folder), "--limit", "2", "--base_feat_path", str(tmp_path / "out"),
                   "--weights", "random", "--use_grid", "--cotracker_grid_size", "2", "--max_frames", "4",
                   "--tracker_resolution", "64", "96", "--num_workers", "0", "--accelerator", "cpu",
                   "--trainer.enable_progress_bar=false"])
    assert status == 1, capsys.readouterr().err  # not_a_video.mp4 is the first in sorted order
    out = tmp_path / "out" / "cotracker3_bip_fr_32_fps_10"
    assert sorted(p.name for p in out.rglob("*.pkl")) == ["tiny_25fps.pkl"]
    assert load_tracks(out / "clips" / "feat_dump" / "tiny_25fps.pkl").num_points == 4
    assert f"2 rows in {folder}" in capsys.readouterr().err
    assert main(["--video_path", str(folder), "--csv_path", "v.csv"]) == 2
    assert capsys.readouterr().err.strip() == "error: give --csv_path or --video_path, not both"
