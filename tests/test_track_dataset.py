"""datamodules.tracks: frame-aligned clips + tracks for training.

Pickles are built from real decoded tiny clips; the synthetic tracks encode their own track-frame
index (x = t) and point index (y = n), so frame/track alignment is checkable pixel for pixel against
the extraction decode.
"""
import pickle
import warnings

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

from datamodules.sampling import sample_points, uniform_frame_indices
from datamodules.tracks import PointTrackDataset, collate_tracks
from datamodules.training import PointTrackDataModule
from datamodules.transforms import CenterCrop, Compose, HorizontalFlip, RandomResizedCropFlip, Resize
from datamodules.video import VideoCSVDataset
from semtrack.layout import OutputLayout
from semtrack.trackfile import save_tracks

SIZES = (1, 4, 10)  # points per entity
OBJ_IDS = torch.tensor([7] * SIZES[0] + [2] * SIZES[1] + [5] * SIZES[2], dtype=torch.int64)  # (15,)
N = len(OBJ_IDS)
CLIPS = [("tiny_25fps.mp4", "ucf101", "tiny25", "train"), ("tiny_ssv2.webm", "ssv2", "tinyssv2", "val")]


def _synthetic_tracks(num_frames: int) -> dict:
    t = torch.arange(num_frames, dtype=torch.float32)[:, None].expand(num_frames, N)
    n = torch.arange(N, dtype=torch.float32)[None].expand(num_frames, N)
    return {
        "pred_tracks": torch.stack([t, n], -1).to(torch.float16),  # (T, N, 2): x = t, y = n
        "pred_visibility": torch.ones(num_frames, N, dtype=torch.bool),
        "obj_ids": OBJ_IDS.clone(),
        "point_queries": torch.arange(N, dtype=torch.int64) % num_frames,
    }


@pytest.fixture(scope="module")
def extracted(tmp_path_factory, videos_dir):
    """CSV of two tiny clips + pickles written as the writer does (10 fps timestamp rule; SSV2 native).
    -> (csv_path, tracks_root, {video_id: extraction item})."""
    root = tmp_path_factory.mktemp("tracks")
    csv = root / "videos.csv"
    pd.DataFrame(
        {
            "video_path": [str(videos_dir / c[0]) for c in CLIPS],
            "dataset": [c[1] for c in CLIPS],
            "video_id": [c[2] for c in CLIPS],
            "split": [c[3] for c in CLIPS],
        }
    ).to_csv(csv, index=False)
    tracks_root = root / "cotracker3_bip_fr_32_fps_10"
    decoded = {}
    for item in VideoCSVDataset(csv, fps=10.0):
        assert item.error is None
        video = item.frames
        meta = {
            "frame_times": item.frame_times,
            "source_fps": item.source_fps,
            "fps": item.fps,
            "fps_rule": "timestamp",
            "clip_size": [int(video.shape[-2]), int(video.shape[-1])],
            "video_id": item.video_id,
            "dataset": item.dataset,
        }
        data = {**_synthetic_tracks(len(video)), "semtrack": meta}
        save_tracks(OutputLayout(tracks_root).pickle(item.dataset, item.video_id), data)
        decoded[item.video_id] = item
    return csv, tracks_root, decoded


def _check_alignment(item, extraction):
    """Served frame f is the extraction frame t = frame_indices[f], and so is the track (x = t)."""
    t_idx = item["frame_indices"]  # (F,)
    assert torch.equal(item["frames"], extraction.frames[t_idx].contiguous())
    assert torch.equal(item["frame_times"], extraction.frame_times[t_idx])
    real = item["point_mask"]
    x = item["tracks"][:, real, 0]  # (F, P_real)
    assert torch.equal(x, t_idx[:, None].float().expand_as(x))
    y = item["tracks"][0, real, 1]
    assert torch.equal(y, item["point_indices"][real].float())


def test_frames_and_tracks_are_aligned(extracted):
    csv, root, decoded = extracted
    ds = PointTrackDataset(csv, root, num_frames=5, num_points=8, mode="eval")
    assert len(ds) == 2 and ds.num_missing == 0
    for i in range(2):
        item = ds[i]
        extraction = decoded[item["video_id"]]
        T = len(extraction.frame_times)
        assert item["num_track_frames"] == T
        assert torch.equal(item["frame_indices"], uniform_frame_indices(T, 5))
        _check_alignment(item, extraction)
    # the 25 fps clip at 10 fps has uneven source times (0, .08, .2, .28, ...): the research
    # linspace rule over the 40 native frames would pick other frames than the tracked ones
    item = ds[0]
    assert item["video_id"] == "tiny25"
    native_linspace = torch.linspace(0, 39, decoded["tiny25"].frame_times.numel()).long()[item["frame_indices"]]
    assert not torch.allclose(item["frame_times"], native_linspace.double() / 25)


def test_item_shapes_masks_and_padding(extracted):
    csv, root, _ = extracted
    ds = PointTrackDataset(csv, root, num_frames=4, num_points=20, mode="eval")
    item = ds[1]  # 192x256 ssv2 clip, 12 tracked frames, 15 points -> 5 padded
    assert item["frames"].shape == (4, 3, 192, 256) and item["frames"].dtype == torch.uint8
    assert item["tracks"].shape == (4, 20, 2) and item["tracks"].dtype == torch.float32
    assert item["visibility"].shape == (4, 20) and item["visibility"].dtype == torch.bool
    mask = item["point_mask"]
    assert mask.tolist() == [True] * N + [False] * 5
    assert (item["obj_ids"][~mask] == -1).all() and (item["query_frames"][~mask] == -1).all()
    assert not item["visibility"][:, ~mask].any() and (item["tracks"][:, ~mask] == 0).all()
    assert torch.equal(item["obj_ids"][mask], OBJ_IDS)
    assert torch.equal(item["query_frames"][mask], torch.arange(N) % 12)


def test_sample_points_cluster_proportional():
    g = torch.Generator().manual_seed(0)
    idx, mask = sample_points(OBJ_IDS, 8, g)
    assert mask.all() and len(set(idx.tolist())) == 8 and torch.equal(idx, idx.sort().values)
    counts = {e: int((OBJ_IDS[idx] == e).sum()) for e in (7, 2, 5)}
    # 1 each, the other 5 shared 4:10 by size -> {7: 1, 2: 2, 5: 5} (largest remainders)
    assert counts == {7: 1, 2: 2, 5: 5}
    many = torch.arange(30) // 2  # 15 entities of 2 points, only 6 points: one each from 6 entities
    idx, _ = sample_points(many, 6, g)
    assert len(set(many[idx].tolist())) == 6
    idx, mask = sample_points(OBJ_IDS[:3], 5, g)
    assert idx.tolist() == [0, 1, 2, -1, -1] and mask.tolist() == [True, True, True, False, False]
    idx, mask = sample_points(torch.zeros(0, dtype=torch.int64), 2, g)
    assert not mask.any()


def test_eval_is_deterministic_train_is_random(extracted):
    csv, root, _ = extracted
    a = PointTrackDataset(csv, root, num_frames=3, num_points=6, mode="eval", seed=0)
    b = PointTrackDataset(csv, root, num_frames=3, num_points=6, mode="eval", seed=0)
    c = PointTrackDataset(csv, root, num_frames=3, num_points=6, mode="eval", seed=1)
    assert torch.equal(a[0]["point_indices"], b[0]["point_indices"])
    assert torch.equal(a[0]["point_indices"], a[0]["point_indices"])
    assert not torch.equal(a[0]["point_indices"], c[0]["point_indices"])
    train = PointTrackDataset(csv, root, num_frames=3, num_points=6, mode="train")
    torch.manual_seed(3)
    draws = {tuple(train[0]["point_indices"].tolist()) for _ in range(4)}
    assert len(draws) > 1


def test_dataloader_two_workers_matches_in_process(extracted):
    csv, root, decoded = extracted
    ds = PointTrackDataset(csv, root, num_frames=4, num_points=16, mode="eval")
    serial = list(DataLoader(ds, batch_size=2, num_workers=0, collate_fn=collate_tracks))
    parallel = list(DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_tracks))
    assert len(parallel) == 1
    batch = parallel[0]
    assert batch["frames"].shape == (2, 4, 3, 240, 320)  # padded to the larger clip
    assert batch["frame_sizes"].tolist() == [[240, 320], [192, 256]]
    assert batch["tracks"].shape == (2, 4, 16, 2) and batch["point_mask"].shape == (2, 16)
    assert batch["point_mask"].sum(1).tolist() == [15, 15]
    assert (batch["frames"][1, :, :, 192:] == 0).all() and (batch["frames"][1, :, :, :, 256:] == 0).all()
    for key, value in batch.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, serial[0][key]), key
        else:
            assert value == serial[0][key]
    for b, vid in enumerate(batch["video_id"]):
        item = {k: (v[b] if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        h, w = batch["frame_sizes"][b].tolist()
        item["frames"] = item["frames"][..., :h, :w]
        _check_alignment(item, decoded[vid])


def test_all_points_and_collate_pads_points(extracted):
    csv, root, _ = extracted
    ds = PointTrackDataset(csv, root, num_frames=2, num_points=None, mode="eval")
    a, b = ds[0], ds[1]
    b = {**b, **{k: b[k][:10] for k in ("point_mask", "obj_ids", "query_frames", "point_indices")},
         "tracks": b["tracks"][:, :10], "visibility": b["visibility"][:, :10]}
    batch = collate_tracks([a, b])
    assert batch["point_mask"].sum(1).tolist() == [N, 10]
    assert (batch["obj_ids"][1, 10:] == -1).all() and not batch["visibility"][1, :, 10:].any()


def test_normalized_coordinates(extracted):
    csv, root, _ = extracted
    raw = PointTrackDataset(csv, root, num_frames=3, num_points=8, mode="eval")[1]
    norm = PointTrackDataset(csv, root, num_frames=3, num_points=8, mode="eval", normalize_coords=True)[1]
    h, w = raw["frames"].shape[-2:]
    expected = raw["tracks"] / torch.tensor([w, h]) * 2 - 1
    assert torch.allclose(norm["tracks"], expected) and norm["tracks"].abs().max() <= 1


def _frames_tracks():
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (2, 3, 24, 32), dtype=torch.uint8, generator=g)
    tracks = torch.tensor([[[3.0, 4.0], [30.0, 1.0], [16.0, 12.0]]]).expand(2, 3, 2).clone()
    return frames, tracks, torch.ones(2, 3, dtype=torch.bool)


def test_transforms_keep_frames_and_tracks_consistent():
    frames, tracks, vis = _frames_tracks()
    f, t, v = HorizontalFlip(p=1.0)(frames, tracks, vis)
    for p in range(3):  # the pixel under each point is unchanged by the flip
        x, y = t[0, p].long().tolist()
        x0, y0 = tracks[0, p].long().tolist()
        assert torch.equal(f[:, :, y, x], frames[:, :, y0, x0])
    f, t, v = CenterCrop((12, 16))(frames, tracks, vis)  # window rows 6..17, cols 8..23
    assert f.shape[-2:] == (12, 16) and v[0].tolist() == [False, False, True]
    x, y = t[0, 2].long().tolist()
    assert (x, y) == (8, 6) and torch.equal(f[:, :, y, x], frames[:, :, 12, 16])
    f, t, v = Resize((48, 64))(frames, tracks, vis)  # pixel (x, y) -> (2x + 0.5, 2y + 0.5)
    assert f.shape[-2:] == (48, 64) and torch.allclose(t[0, 0], torch.tensor([6.5, 8.5]))
    f, t, v = Resize(12)(frames, tracks, vis)
    assert f.shape[-2:] == (12, 16)
    composed = Compose([CenterCrop((12, 16)), Resize((24, 32))])(frames, tracks, vis)
    one_by_one = Resize((24, 32))(*CenterCrop((12, 16))(frames, tracks, vis))
    assert all(torch.equal(a, b) for a, b in zip(composed, one_by_one))
    torch.manual_seed(0)
    f, t, v = RandomResizedCropFlip((16, 16), scale=(0.3, 0.6))(frames, tracks, vis)
    assert f.shape == (2, 3, 16, 16)
    inside = (t[..., 0] >= -0.5) & (t[..., 0] < 15.5) & (t[..., 1] >= -0.5) & (t[..., 1] < 15.5)
    assert torch.equal(v, inside)


def test_transform_hook_in_dataset(extracted):
    csv, root, decoded = extracted
    ds = PointTrackDataset(csv, root, num_frames=3, num_points=8, mode="eval", transform=HorizontalFlip(p=1.0))
    item = ds[1]
    plain = PointTrackDataset(csv, root, num_frames=3, num_points=8, mode="eval")[1]
    assert torch.equal(item["frames"], plain["frames"].flip(-1))
    assert torch.equal(item["tracks"][..., 0], 255 - plain["tracks"][..., 0])


def _broken_copy(tmp_path, extracted):
    """CSV with the two good rows plus one row whose pickle is missing and one truncated."""
    csv, root, _ = extracted
    table = pd.read_csv(csv)
    extra = pd.DataFrame(
        {"video_path": [table.video_path[0]] * 2, "dataset": ["ucf101"] * 2,
         "video_id": ["no_pickle", "truncated"], "split": ["train"] * 2}
    )
    bad_csv = tmp_path / "with_broken.csv"
    pd.concat([table, extra]).to_csv(bad_csv, index=False)
    good = OutputLayout(root).pickle("ucf101", "tiny25").read_bytes()
    bad = OutputLayout(root).pickle("ucf101", "truncated")
    bad.write_bytes(good[: len(good) // 2])
    return bad_csv, root, bad


def test_missing_and_corrupt_pickles(tmp_path, extracted):
    csv, root, bad = _broken_copy(tmp_path, extracted)
    try:
        with pytest.warns(UserWarning, match="2 of 4 rows have a missing or invalid track pickle"):
            ds = PointTrackDataset(csv, root, num_frames=2, num_points=4)
        assert len(ds) == 2 and ds.num_missing == 2
        assert [vid for vid, _ in ds.skipped] == ["no_pickle", "truncated"]
        with pytest.raises(ValueError, match="2 of 4 rows"):
            PointTrackDataset(csv, root, on_missing="error")
        # verify="exists" only stats the files: the truncated one fails when served
        with pytest.warns(UserWarning, match="1 of 4 rows"):
            lazy = PointTrackDataset(csv, root, num_frames=2, num_points=4, verify="exists", mode="eval")
        assert len(lazy) == 3 and lazy.num_missing == 1
        with pytest.warns(UserWarning, match="truncated.*not a valid track pickle.*serving row 0"):
            item = lazy[2]
        assert item["video_id"] == "tiny25"
        strict = PointTrackDataset(csv, root, verify="exists", on_missing="error", row_indices=[0, 1, 3])
        with pytest.raises(ValueError, match="row 3 .*truncated.*not a valid track pickle"):
            strict[2]
    finally:
        bad.unlink()


def test_research_pickle_uses_linspace_rule_with_warning(tmp_path, videos_dir, extracted):
    """No metadata: frames `linspace(0, n - 1, T)`; with T = every native frame that is exact."""
    _, _, decoded = extracted
    csv = tmp_path / "r.csv"
    pd.DataFrame({"video_path": [str(videos_dir / "tiny_ssv2.webm")], "dataset": ["ssv2"]}).to_csv(csv, index=False)
    data = _synthetic_tracks(12)
    research = {**data, "pred_tracks": data["pred_tracks"][None], "pred_visibility": data["pred_visibility"][None]}
    path = OutputLayout(tmp_path / "dump").pickle("ssv2", "tiny_ssv2")
    path.parent.mkdir(parents=True)
    with open(path, "wb") as f:
        pickle.dump(research, f)
    ds = PointTrackDataset(csv, tmp_path / "dump", num_frames=4, num_points=8, mode="eval")
    with pytest.warns(UserWarning, match="research pickle without frame times"):
        item = ds[0]
    _check_alignment(item, decoded["tinyssv2"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds[0]  # reported once per process


def test_datamodule_splits(tmp_path, extracted):
    csv, root, _ = extracted
    dm = PointTrackDataModule(csv, root, batch_size=2, num_workers=0, pin_memory=False, num_frames=2, num_points=4)
    dm.setup("fit")
    assert [r.video_id for r in dm.datasets["train"].rows] == ["tiny25"]
    assert [r.video_id for r in dm.datasets["val"].rows] == ["tinyssv2"]
    assert dm.datasets["train"].mode == "train" and dm.datasets["val"].mode == "eval"
    batch = next(iter(dm.train_dataloader()))
    assert batch["frames"].shape == (1, 2, 3, 240, 320)
    with pytest.raises(ValueError, match="no 'test' rows"):
        dm.test_dataloader()
    # no split column: a fixed-seed fraction
    table = pd.read_csv(csv).drop(columns=["split"])
    no_split = tmp_path / "nosplit.csv"
    table.to_csv(no_split, index=False)
    picks = []
    for _ in range(2):
        dm = PointTrackDataModule(no_split, root, num_workers=0, val_fraction=0.5, split_seed=1, num_frames=2)
        dm.setup("fit")
        picks.append(([r.index for r in dm.datasets["train"].rows], [r.index for r in dm.datasets["val"].rows]))
    assert picks[0] == picks[1] and sorted(picks[0][0] + picks[0][1]) == [0, 1] and len(picks[0][1]) == 1


# ------------------------------------------------------------------ end to end with semtrack.extract


@pytest.fixture(scope="module")
def real_tracks(tmp_path_factory, videos_dir):
    """Tracks extracted by `semtrack.extract` (stand-in weights, small settings) for two tiny clips.
    -> (csv_path, tracks_root, options)."""
    import semtrack

    root = tmp_path_factory.mktemp("extract")
    csv = root / "videos.csv"
    pd.DataFrame(
        {"video_path": [str(videos_dir / c[0]) for c in CLIPS], "dataset": [c[1] for c in CLIPS],
         "video_id": [c[2] for c in CLIPS]}
    ).to_csv(csv, index=False)
    options = dict(fps=2.0, native_fps_datasets=[], num_frames_clustering=4, num_points_per_entity=2,
                   dinov2_model="vits14")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # far faster than 2 contending threads on a shared 2-core machine
    try:
        report = semtrack.extract(
            csv, root / "out", weights="random", tracker_resolution=(96, 128), num_workers=0,
            accelerator="cpu", enable_progress_bar=False, **options,
        )
    finally:
        torch.set_num_threads(threads)
    assert report["counts"]["done"] == 2 and report["counts"]["failed"] == 0
    return csv, report["output_dir"], options


def _independent_queries(csv, options):
    """Query points recomputed from the public stages (decode, features, clusters, points):
    {video_id: (queries (N, 3) (t, x, y), obj_ids (N,), extraction item)}."""
    from semtrack.clustering import bipartite_clusters
    from semtrack.features import DinoV2Extractor
    from semtrack.points import select_query_points

    extractor = DinoV2Extractor(options["dinov2_model"], checkpoint="random")
    videos = VideoCSVDataset(csv, fps=options["fps"], native_fps_datasets=(),
                             num_frames_clustering=options["num_frames_clustering"])
    out = {}
    for item in videos:
        with torch.no_grad():
            tokens = extractor(item.frames[item.cluster_frames])
        labels = bipartite_clusters(tokens)
        qp = select_query_points(labels, item.cluster_frames, tuple(item.frames.shape[-2:]),
                                 num_points_per_entity=options["num_points_per_entity"])
        out[item.video_id] = (qp.queries, qp.obj_ids, item)
    return out


def test_end_to_end_extracted_tracks(real_tracks):
    csv, root, options = real_tracks
    ds = PointTrackDataset(csv, root, num_frames=4, num_points=20, mode="eval")
    assert len(ds) == 2 and ds.num_missing == 0
    loader = DataLoader(ds, batch_size=2, num_workers=2, collate_fn=collate_tracks)
    batch, again = next(iter(loader)), next(iter(loader))
    for key, value in batch.items():  # eval mode: identical every time
        assert torch.equal(value, again[key]) if isinstance(value, torch.Tensor) else value == again[key]
    assert batch["frames"].shape == (2, 4, 3, 240, 320) and batch["tracks"].shape == (2, 4, 20, 2)
    assert batch["frame_sizes"].tolist() == [[240, 320], [192, 256]]
    expected = _independent_queries(csv, options)
    for b, vid in enumerate(batch["video_id"]):
        queries, obj_ids, extraction = expected[vid]
        n = len(queries)
        mask = batch["point_mask"][b]
        assert int(mask.sum()) == min(n, 20) and (batch["obj_ids"][b][~mask] == -1).all()
        t_idx = batch["frame_indices"][b]  # (F,) into T
        h, w = batch["frame_sizes"][b].tolist()
        assert torch.equal(batch["frames"][b, :, :, :h, :w], extraction.frames[t_idx])  # frame alignment
        on_query_frame = 0
        for p in torch.nonzero(mask).flatten().tolist():
            k = int(batch["point_indices"][b, p])
            t, x, y = queries[k].tolist()
            assert int(batch["query_frames"][b, p]) == t and int(batch["obj_ids"][b, p]) == int(obj_ids[k])
            for f in torch.nonzero(t_idx == int(t)).flatten().tolist():
                # the track at its query frame is the query pixel, and visible there
                assert batch["tracks"][b, f, p].tolist() == [x, y] and bool(batch["visibility"][b, f, p])
                on_query_frame += 1
        assert on_query_frame > 0
