"""The weights resolver (semtrack.weights) for CoTracker3 and DINOv2: official / random / path / URL.

No network, ever: HF_HUB_OFFLINE=1 and HF_HOME / TORCH_HOME point into tmp_path. "Official" weights
come from hub cache folders the tests build themselves (stand-in weights in the hub cache layout).
"""
from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_features import _timm_format_sd

from _shared import shared_path
from semtrack.features import MODELS, DinoV2Extractor, recipe_state_dict
from semtrack.tracker import load_tracker, random_state_dict
from semtrack.tracker.weights import COTRACKER3_REVISION
from semtrack.weights import WeightsError

NOT_A_VIDEO = shared_path("videos", "not_a_video.mp4")  # a text file
A_VIDEO = shared_path("videos", "tiny_25fps.mp4")


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """HF_HUB_OFFLINE=1, HF_HOME and TORCH_HOME in tmp_path (huggingface_hub re-reads its environment).
    -> (Hugging Face hub cache folder, torch hub checkpoints folder)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    importlib.reload(huggingface_hub.constants)
    yield tmp_path / "hf" / "hub", tmp_path / "torch" / "hub" / "checkpoints"
    monkeypatch.undo()
    importlib.reload(huggingface_hub.constants)


def put_in_hub_cache(hub_cache: Path, repo: str, filename: str, revision: str, save) -> Path:
    """The hub cache layout huggingface_hub reads: models--<org>--<name>/snapshots/<revision>/<file>
    (written by save(path)) and refs/main naming that revision."""
    folder = hub_cache / ("models--" + repo.replace("/", "--"))
    path = folder / "snapshots" / revision / filename
    path.parent.mkdir(parents=True)
    save(path)
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text(revision)
    return path


def assert_one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def same_weights(module: torch.nn.Module, state: dict) -> bool:
    loaded = module.state_dict()
    return all(torch.equal(loaded[k], v) for k, v in state.items())


# ----------------------------------------------------------------------------- CoTracker3

@pytest.fixture(scope="module")
def stand_in():
    return random_state_dict(0)


def test_official_tracker_from_a_prepared_offline_hub_cache(offline_hub, stand_in):
    hub_cache, _ = offline_hub
    put_in_hub_cache(hub_cache, "facebook/cotracker3", "scaled_offline.pth", COTRACKER3_REVISION,
                     lambda p: torch.save(stand_in, p))
    tracker = load_tracker("official")
    assert tracker.weights_id == f"hub:facebook/cotracker3@{COTRACKER3_REVISION}"
    assert same_weights(tracker.model, stand_in) and not tracker.training


def test_official_tracker_takes_the_torch_hub_cache_file_first(offline_hub, stand_in):
    hub_cache, checkpoints = offline_hub
    other = random_state_dict(1)
    put_in_hub_cache(hub_cache, "facebook/cotracker3", "scaled_offline.pth", COTRACKER3_REVISION,
                     lambda p: torch.save(other, p))
    checkpoints.mkdir(parents=True)
    torch.save(stand_in, checkpoints / "scaled_offline.pth")
    tracker = load_tracker("official")
    assert tracker.weights_id == f"torch-hub-cache:{checkpoints / 'scaled_offline.pth'}"
    assert same_weights(tracker.model, stand_in)


def test_tracker_from_file_url_is_cached_in_torch_hub_and_from_a_path(offline_hub, tmp_path, stand_in):
    _, checkpoints = offline_hub
    checkpoint = tmp_path / "stand_in.pth"
    torch.save(stand_in, checkpoint)
    tracker = load_tracker(checkpoint.as_uri())
    assert tracker.weights_id == f"url:{checkpoint.as_uri()}"
    assert (checkpoints / "stand_in.pth").is_file() and same_weights(tracker.model, stand_in)
    from_path = load_tracker(str(checkpoint))
    assert from_path.weights_id == f"file:{checkpoint}" and same_weights(from_path.model, stand_in)
    checkpoint.unlink()  # downloaded once: the cached copy serves the URL from now on
    assert same_weights(load_tracker(checkpoint.as_uri()).model, stand_in)


def test_tracker_with_nothing_anywhere_says_how_to_provide_the_weights(offline_hub):
    hub_cache, checkpoints = offline_hub
    with pytest.raises(WeightsError) as err:
        load_tracker("official")
    message = assert_one_line(err)
    assert "no CoTracker3 weights: facebook/cotracker3 scaled_offline.pth" in message
    assert "the hub is off (HF_HUB_OFFLINE=1)" in message
    assert "`--cotracker_checkpoint PATH|URL`" in message and "`--weights random`" in message
    assert f"`hf download facebook/cotracker3 scaled_offline.pth --revision {COTRACKER3_REVISION}`" in message
    assert str(hub_cache) in message and str(checkpoints / "scaled_offline.pth") in message


def test_tracker_missing_file_and_failed_download(offline_hub, tmp_path):
    _, checkpoints = offline_hub
    with pytest.raises(WeightsError, match="weights file not found") as err:
        load_tracker(str(tmp_path / "absent.pth"))
    assert "--cotracker_checkpoint" in assert_one_line(err)
    missing = (tmp_path / "nowhere" / "ckpt.pth").as_uri()
    with pytest.raises(WeightsError, match="could not download") as err:
        load_tracker(missing)
    message = assert_one_line(err)
    assert missing in message and str(checkpoints / "ckpt.pth") in message
    assert not checkpoints.exists() or not list(checkpoints.iterdir())  # no partial file left behind


def test_tracker_rejects_files_that_are_not_checkpoints(offline_hub, tmp_path, stand_in):
    listing = tmp_path / "list.pth"
    torch.save([1, 2, 3], listing)
    for path in (NOT_A_VIDEO, A_VIDEO, listing):
        with pytest.raises(WeightsError, match="is not a CoTracker3 checkpoint") as err:
            load_tracker(str(path))
        assert str(path) in assert_one_line(err)
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in stand_in.items() if not k.startswith("corr_mlp")}, partial)
    with pytest.raises(WeightsError, match="does not fit CoTracker3: missing corr_mlp.fc1.weight") as err:
        load_tracker(str(partial))
    assert_one_line(err)


# ----------------------------------------------------------------------------- DINOv2

def test_official_dinov2_from_a_prepared_offline_hub_cache(offline_hub):
    from safetensors.torch import save_file

    hub_cache, _ = offline_hub
    spec = MODELS["vits14"]
    timm_sd = _timm_format_sd("vits14", recipe_state_dict("vits14"))  # what timm's hub file holds
    put_in_hub_cache(hub_cache, "timm/" + spec.timm_name, "model.safetensors", spec.revision,
                     lambda p: save_file(timm_sd, str(p)))
    ext = DinoV2Extractor("vits14")  # checkpoint=None: the official weights
    assert ext.weights_id == f"hub:timm/{spec.timm_name}@{spec.revision}"
    assert same_weights(ext.backbone, DinoV2Extractor("vits14", checkpoint="random").backbone.state_dict())


def test_dinov2_from_file_url(offline_hub, tmp_path):
    _, checkpoints = offline_hub
    path = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save({k: torch.from_numpy(v) for k, v in recipe_state_dict("vits14").items()}, path)
    ext = DinoV2Extractor("vits14", checkpoint=path.as_uri())
    assert ext.weights_id == f"url:{path.as_uri()}" and (checkpoints / path.name).is_file()
    assert same_weights(ext.backbone, DinoV2Extractor("vits14", checkpoint="random").backbone.state_dict())


def test_dinov2_with_nothing_anywhere_says_how_to_provide_the_weights(offline_hub):
    hub_cache, _ = offline_hub
    spec = MODELS["vits14"]
    with pytest.raises(WeightsError) as err:
        DinoV2Extractor("vits14")
    message = assert_one_line(err)
    assert f"timm/{spec.timm_name}" in message and str(hub_cache) in message
    assert "`--dinov2_checkpoint PATH|URL`" in message and "`--weights random`" in message
    assert f"`hf download timm/{spec.timm_name} model.safetensors --revision {spec.revision}`" in message


def test_dinov2_rejects_files_that_are_not_checkpoints(offline_hub, tmp_path):
    from safetensors.torch import save_file

    garbage = tmp_path / "model.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    for path in (NOT_A_VIDEO, A_VIDEO, garbage):
        with pytest.raises(WeightsError, match="is not a DINOv2 'vits14' checkpoint") as err:
            DinoV2Extractor("vits14", checkpoint=path)
        assert str(path) in assert_one_line(err)
    unrelated = tmp_path / "unrelated.safetensors"
    save_file({"weight": torch.zeros(3)}, str(unrelated))
    with pytest.raises(WeightsError, match="not a DINOv2 'vits14' checkpoint .no 'pos_embed' key"):
        DinoV2Extractor("vits14", checkpoint=unrelated)
    with pytest.raises(WeightsError, match="weights file not found"):
        DinoV2Extractor("vits14", checkpoint=tmp_path / "absent.safetensors")


def test_environment_offline_from_process_start_gives_one_error_line(tmp_path):
    """The variables as a user sets them (read when huggingface_hub is imported): the program's last
    stderr line is the WeightsError, for either model."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), TORCH_HOME=str(tmp_path / "torch"))
    for call in ("from semtrack.features import DinoV2Extractor; DinoV2Extractor('vits14')",
                 "from semtrack.tracker import load_tracker; load_tracker('official')"):
        run = subprocess.run([sys.executable, "-c", call], capture_output=True, text=True, env=env, timeout=300)
        last = run.stderr.strip().splitlines()[-1]
        assert run.returncode != 0 and last.startswith("semtrack.weights.WeightsError: no ")
        assert str(tmp_path / "hf" / "hub") in last and "hf download" in last

