"""--research_compat: the job's own code path reproduces the research inputs, labels and points."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

import semtrack.pipeline as pipeline_module
from _shared import shared_path
from semtrack.cli import main, parse_flat
from semtrack.config import RESEARCH_PRESET, ExtractConfig
from semtrack.pipeline import Pipeline
from semtrack.records import Clip
from semtrack.trackfile import load_tracks
from semtrack.tracking_memory import TrackingMemory


def test_the_switch_sets_every_research_behaviour_unless_given():
    config, _ = parse_flat(["--research_compat"])
    assert config.research_compat and all(getattr(config, k) == v for k, v in RESEARCH_PRESET.items())
    config, _ = parse_flat(["--research_compat", "--fps", "10", "--sampler", "fast"])
    assert (config.fps, config.sampler, config.fps_rule) == (10.0, "fast", "interval")  # given options win
    assert ExtractConfig.from_dict({"research_compat": True}).fps is None  # the Python API, too
    assert ExtractConfig().fps == 10.0 and not ExtractConfig().legacy_query_frames


def test_dinov2_inputs_are_the_research_inputs():
    """The extractor the job builds under --research_compat turns the official fixture frames into
    exactly the official model's inputs (PIL bilinear resize, ImageNet normalisation)."""
    fixture = np.load(shared_path("dinov2", "features_vitb14.npz"))
    config = parse_flat(["--research_compat", "--weights", "random", "--tracker_resolution", "64", "96"])[0]
    pipeline = Pipeline.build(config, torch.device("cpu"))
    frames = torch.from_numpy(fixture["frames"]).permute(0, 3, 1, 2)  # (4, 3, 480, 854) uint8
    assert torch.equal(pipeline.features.preprocess_frames(frames), torch.from_numpy(fixture["inputs"]))


class PlantedFeatures:
    """Stand-in DINOv2: the planted tokens (K, 16, 16, D) for the one clip's K clustering frames."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens = tokens

    def forward_clips(self, clips, batch_size=None):
        assert len(clips) == 1 and len(clips[0]) == len(self.tokens)
        return self.tokens


class EchoTracker:
    """Stand-in tracker: every point stays at its query pixel, so the tracks give the queries back."""

    def padded_shape(self, clips, frames, points):  # an eager tracker's calls run as given
        return clips, frames, points

    def track_many(self, videos, queries, backward_tracking, return_probs, encoder_chunk, chunk_bytes):
        out = []
        for video, q in zip(videos, queries):
            tracks = q[None, :, 1:].expand(len(video), -1, 2).clone()  # (T, N, 2)
            out.append((tracks, torch.ones(tracks.shape[:2], dtype=torch.bool)))
        return out


@pytest.mark.parametrize("merge_ratio, num_iters", [(25, 11), (40, 5)])
def test_pipeline_reproduces_the_research_labels_and_points(merge_ratio, num_iters):
    """The pipeline's stages on the planted fixture tokens (standing in for DINOv2; `EchoTracker` for
    the tracker): bipartite labels equal the research labels for both settings; with the default
    setting the query points are the research points (exact sampler, the research query frames;
    exact-tie points within 1 px)."""
    tokens = torch.from_numpy(np.load(shared_path("spec", "fixtures", "bipartite.npz"))["tokens"])
    labels = np.load(shared_path("spec", "fixtures", "bipartite.npz"))[f"labels_m{merge_ratio}_i{num_iters}"]
    fx = np.load(shared_path("spec", "fixtures", "sampling.npz"))
    config = parse_flat(["--research_compat", "--merge_ratio", str(merge_ratio), "--num_iters", str(num_iters),
                         "--tracker_resolution", "64", "96", "--debug_mode"])[0]
    h, w = fx["image_hw_nocc"]
    clip = Clip(0, "v", "d", "/v.mp4", frames=torch.zeros(60, 3, h, w, dtype=torch.uint8),
                cluster_frames=torch.from_numpy(fx["frames_id_dict"]))
    memory = TrackingMemory(None, config.tracker_resolution)
    pipeline = Pipeline(config, PlantedFeatures(tokens), EchoTracker(), torch.device("cpu"), memory)
    result = pipeline([clip]).results[0]
    assert result.ok, result.failure
    np.testing.assert_array_equal(result.clusters.labels.numpy(), labels)
    if (merge_ratio, num_iters) != (25, 11):
        return  # the sampling fixture is for the default setting
    tr = result.tracks
    np.testing.assert_array_equal(tr.obj_ids.numpy(), fx["obj_ids_nocc"])
    np.testing.assert_array_equal(tr.query_frames.numpy(), fx["point_queries_nocc"])  # the research rank rule
    at_query = tr.tracks[tr.query_frames, torch.arange(len(tr.obj_ids))].numpy()  # (N, 2) the query pixels
    err = np.abs(at_query - fx["points_xy_nocc"])
    tie = fx["point_tie_nocc"]
    assert err[~tie].max() == 0 and err[tie].max(initial=0) <= 1


@pytest.mark.slow
def test_the_switch_is_recorded_in_the_sidecar_and_the_pickles(tmp_path, videos_dir):
    clip = shutil.copy(videos_dir / "tiny_ssv2.webm", tmp_path / "clip.v2.webm")
    csv = tmp_path / "v.csv"
    csv.write_text(f"video_path,dataset\n{clip},ssv2\n")
    status = main(["--csv_path", str(csv), "--base_feat_path", str(tmp_path / "out"), "--research_compat",
                   "--weights", "random", "--dinov2_model", "vits14", "--num_frames_clustering", "4",
                   "--num_points_per_entity", "2", "--tracker_resolution", "64", "96", "--num_workers", "0",
                   "--trainer.enable_progress_bar=false"])
    assert status == 0
    root = tmp_path / "out" / "cotracker3_bip_fr_4"  # no fps suffix: every decoded frame, as the research default
    options = json.loads((root / "semtrack_config.json").read_text())["options"]
    assert options["research_compat"] is True and options["fps"] is None and options["sampler"] == "exact"
    tf = load_tracks(root / "ssv2" / "feat_dump" / "clip.pkl")  # the research id rule: cut at the first '.'
    assert tf.meta["config"]["research_compat"] is True and tf.meta["fps_rule"] == "interval"
    assert tf.num_frames == 12  # tiny_ssv2 has 12 frames at 12 fps: all kept


def test_the_tie_rule_reaches_the_sampler_and_is_recorded_only_when_changed(monkeypatch):
    """--tie_rule (set by --research_compat) is what the pipeline's sampler uses; the options record
    it only when it is not the default, so folders written before the option existed keep matching."""
    assert "tie_rule" not in ExtractConfig().output_options()
    research = ExtractConfig.from_dict({"research_compat": True})
    assert research.tie_rule == "research" and research.output_options()["tie_rule"] == "research"
    seen, sample = [], pipeline_module.select_query_points_batch

    def spy(*args, **kwargs):
        seen.append(kwargs["tie_rule"])
        return sample(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "select_query_points_batch", spy)
    tokens = torch.from_numpy(np.load(shared_path("spec", "fixtures", "bipartite.npz"))["tokens"])
    fx = np.load(shared_path("spec", "fixtures", "sampling.npz"))
    h, w = fx["image_hw_nocc"]
    points = {}
    for rule in ("first", "research"):
        config = ExtractConfig.from_dict({"sampler": "exact", "legacy_query_frames": True, "tie_rule": rule,
                                          "tracker_resolution": (64, 96), "debug_mode": True})
        clip = Clip(0, "v", "d", "/v.mp4", frames=torch.zeros(60, 3, h, w, dtype=torch.uint8),
                    cluster_frames=torch.from_numpy(fx["frames_id_dict"]))
        pipeline = Pipeline(config, PlantedFeatures(tokens), EchoTracker(), torch.device("cpu"),
                            TrackingMemory(None, config.tracker_resolution))
        tr = pipeline([clip]).results[0].tracks
        points[rule] = tr.tracks[tr.query_frames, torch.arange(len(tr.obj_ids))].numpy()  # (N, 2)
    assert seen == ["first", "research"]
    tie = fx["point_tie_nocc"]
    assert np.array_equal(points["first"][~tie], points["research"][~tie])  # the rules differ at ties only
