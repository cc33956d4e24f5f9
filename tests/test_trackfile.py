"""semtrack.trackfile: atomic save, restricted and validated load (ours and research pickles)."""
import collections
import os
import pickle

import pytest
import torch

import semtrack
from semtrack import trackfile
from semtrack.trackfile import TrackFile, TrackFileError, dumps_tracks, load_tracks, loads_tracks, save_tracks

T, N = 6, 5


def _tracks(t=T, n=N):
    g = torch.Generator().manual_seed(0)
    return {
        "pred_tracks": (torch.rand(t, n, 2, generator=g) * 200).to(torch.float16),  # (T, N, 2)
        "pred_visibility": torch.rand(t, n, generator=g) > 0.3,  # (T, N)
        "obj_ids": torch.tensor([0, 0, 3, 3, 7][:n], dtype=torch.int64),
        "point_queries": torch.tensor([0, 1, 2, 5, 4][:n], dtype=torch.int64),
    }


def _meta(t=T):
    return {
        "frame_times": torch.arange(t, dtype=torch.float64) / 10,
        "source_fps": 29.97,
        "fps": 10.0,
        "fps_rule": "timestamp",
        "clip_size": [240, 320],
        "video_id": "cat",
        "config": {"merge_ratio": 25, "use_grid": False, "weights": None, "sizes": (1, 2)},
    }


def test_round_trip(tmp_path):
    data = {**_tracks(), "semtrack": _meta()}
    path = tmp_path / "sub" / "cat.pkl"
    save_tracks(path, data)
    assert sorted(os.listdir(path.parent)) == ["cat.pkl"]  # no temporary file left
    tf = load_tracks(path)
    assert isinstance(tf, TrackFile) and (tf.num_frames, tf.num_points) == (T, N)
    assert tf.tracks.dtype == torch.float32 and torch.equal(tf.tracks, data["pred_tracks"].float())
    assert torch.equal(tf.visibility, data["pred_visibility"])
    assert torch.equal(tf.obj_ids, data["obj_ids"]) and torch.equal(tf.query_frames, data["point_queries"])
    assert torch.equal(tf.meta["frame_times"], data["semtrack"]["frame_times"])
    assert tf.meta["config"] == data["semtrack"]["config"] and tf.meta["clip_size"] == [240, 320]
    assert tf.extra == {}
    # research training code reads it with plain pickle: same keys, same tensors
    with open(path, "rb") as f:
        raw = pickle.load(f)
    assert set(raw) == {"pred_tracks", "pred_visibility", "obj_ids", "point_queries", "semtrack"}
    assert raw["pred_tracks"].dtype == torch.float16 and torch.equal(raw["pred_tracks"], data["pred_tracks"])
    assert semtrack.load_tracks is load_tracks


def test_save_writes_views_compactly(tmp_path):
    big = torch.zeros(4, 100, N, 2, dtype=torch.float16)
    data = {**_tracks(), "pred_tracks": big[1, :T]}  # a view into a 4x larger storage
    save_tracks(tmp_path / "a.pkl", data)
    save_tracks(tmp_path / "b.pkl", {**_tracks(), "pred_tracks": big[1, :T].clone()})
    assert (tmp_path / "a.pkl").stat().st_size == (tmp_path / "b.pkl").stat().st_size


def test_save_is_byte_deterministic(tmp_path):
    """torch's own tensor pickling embeds the storage's memory address; save_tracks does not."""
    first, second = {**_tracks(), "semtrack": _meta()}, {**_tracks(), "semtrack": _meta()}
    assert first["obj_ids"].data_ptr() != second["obj_ids"].data_ptr()
    assert pickle.dumps(first["obj_ids"]) != pickle.dumps(second["obj_ids"])  # torch's reduce differs
    save_tracks(tmp_path / "a.pkl", first)
    save_tracks(tmp_path / "b.pkl", second)
    assert (tmp_path / "a.pkl").read_bytes() == (tmp_path / "b.pkl").read_bytes()
    with open(tmp_path / "a.pkl", "rb") as f:
        raw = pickle.load(f)  # torch's own loader reads it
    assert all(torch.equal(raw[k], first[k]) for k in ("pred_tracks", "pred_visibility", "obj_ids", "point_queries"))


def test_save_never_writes_per_point_queries(tmp_path):
    data = {**_tracks(), "per_point_queries": torch.zeros(N, dtype=torch.int64)}
    with pytest.raises(ValueError, match="per_point_queries"):
        save_tracks(tmp_path / "x.pkl", data)
    assert not (tmp_path / "x.pkl").exists()


@pytest.mark.parametrize(
    "change, message",
    [
        ({"pred_tracks": torch.zeros(T, N, 3, dtype=torch.float16)}, "pred_tracks"),
        ({"pred_tracks": torch.zeros(1, T, N, 2, dtype=torch.float16)}, "pred_tracks"),
        ({"pred_visibility": torch.ones(T, N)}, "pred_visibility"),
        ({"obj_ids": torch.zeros(N + 1, dtype=torch.int64)}, "obj_ids"),
        ({"point_queries": torch.zeros(N, dtype=torch.int32)}, "point_queries"),
        ({"point_queries": torch.full((N,), T, dtype=torch.int64)}, "point_queries"),
        ({"semtrack": {"frame_times": torch.zeros(T + 1, dtype=torch.float64)}}, "frame_times"),
        ({"semtrack": {"path": object()}}, "not allowed"),
        ({"surprise": 1}, "unexpected keys"),
    ],
)
def test_save_validates_first(tmp_path, change, message):
    path = tmp_path / "x.pkl"
    with pytest.raises(ValueError, match=message) as err:
        save_tracks(path, {**_tracks(), **change})
    assert str(path) in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    path = tmp_path / "cat.pkl"
    save_tracks(path, _tracks())
    before = path.read_bytes()

    written = []

    def failing_fsync(fd):  # the new data is in the temporary file when the disk fails
        written.extend(p.name for p in tmp_path.iterdir())
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_tracks(path, {**_tracks(), "semtrack": _meta()})
    assert len(written) == 2 and sorted(written)[0] == "cat.pkl" and sorted(written)[1].startswith("cat.pkl.tmp-")
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["cat.pkl"]


def test_dumps_is_the_file_and_loads_names_its_source(tmp_path):
    """The in-memory forms: the bytes `save_tracks` writes, and a loader whose errors name any source."""
    data = {**_tracks(), "semtrack": _meta()}
    save_tracks(tmp_path / "cat.pkl", data)
    blob = dumps_tracks(data)
    assert blob == (tmp_path / "cat.pkl").read_bytes()
    tf = loads_tracks(blob, "shard-0001.tar:cat.pkl")
    assert torch.equal(tf.tracks, data["pred_tracks"].float()) and tf.meta["video_id"] == "cat"
    with pytest.raises(TrackFileError, match=r"^shard-0001\.tar:cat\.pkl: not a valid track pickle"):
        loads_tracks(blob[:-10], "shard-0001.tar:cat.pkl")
    with pytest.raises(ValueError, match="pred_visibility"):
        dumps_tracks({**_tracks(), "pred_visibility": torch.ones(T, N)})


def test_as_dict_gives_back_the_research_dict(tmp_path):
    data = {**_tracks(), "semtrack": _meta()}
    save_tracks(tmp_path / "cat.pkl", data)
    as_dict = load_tracks(tmp_path / "cat.pkl").as_dict()
    assert list(as_dict) == ["pred_tracks", "pred_visibility", "obj_ids", "point_queries", "semtrack"]
    assert as_dict["pred_tracks"].dtype == torch.float16 and torch.equal(as_dict["pred_tracks"], data["pred_tracks"])
    assert all(torch.equal(as_dict[k], data[k]) for k in ("pred_visibility", "obj_ids", "point_queries"))
    assert dumps_tracks(as_dict) == (tmp_path / "cat.pkl").read_bytes()  # the same file again
    research = {**_tracks(), "obj_ids_kmeans_4": torch.zeros(N, dtype=torch.int64)}
    research["pred_tracks"] = research["pred_tracks"].float()[None]  # (1, T, N, 2) float32
    with open(tmp_path / "research.pkl", "wb") as f:
        pickle.dump(research, f)
    as_dict = load_tracks(tmp_path / "research.pkl").as_dict()
    assert set(as_dict) == {"pred_tracks", "pred_visibility", "obj_ids", "point_queries", "obj_ids_kmeans_4"}
    assert as_dict["pred_tracks"].dtype == torch.float32 and as_dict["pred_tracks"].shape == (T, N, 2)


def test_confidence_is_an_optional_float_t_by_n(tmp_path):
    confidence = torch.rand(T, N, generator=torch.Generator().manual_seed(1)).to(torch.float16)
    save_tracks(tmp_path / "c.pkl", {**_tracks(), "semtrack": {**_meta(), "confidence": confidence}})
    assert torch.equal(load_tracks(tmp_path / "c.pkl").meta["confidence"], confidence)
    for bad in (torch.rand(N, T), torch.ones(T, N, dtype=torch.bool), [0.5] * N):
        with pytest.raises(ValueError, match="confidence' must be a float"):
            save_tracks(tmp_path / "bad.pkl", {**_tracks(), "semtrack": {"confidence": bad}})


def test_save_refuses_what_load_would_refuse(tmp_path):
    """No points, bad frame times, and metadata beyond the bounds are refused before writing."""
    deep = []
    for _ in range(trackfile.MAX_DEPTH + 1):
        deep = [deep]
    cyclic = []
    cyclic.append(cyclic)
    cases = [
        ({"pred_tracks": torch.zeros(T, 0, 2), "pred_visibility": torch.zeros(T, 0, dtype=torch.bool),
          "obj_ids": torch.zeros(0, dtype=torch.int64), "point_queries": torch.zeros(0, dtype=torch.int64)}, "N = 0"),
        ({"semtrack": {"frame_times": torch.tensor([0.0, 0.1, float("nan"), 0.3, 0.4, 0.5])}}, "NaN"),
        ({"semtrack": {"frame_times": torch.tensor([0.0, 0.2, 0.1, 0.3, 0.4, 0.5])}}, "non-decreasing"),
        ({"semtrack": {"deep": deep}}, "nested more than"),
        ({"semtrack": {"cycle": cyclic}}, "nested more than"),  # a cycle never ends: too deep
    ]
    for change, message in cases:
        with pytest.raises(ValueError, match=message):
            save_tracks(tmp_path / "x.pkl", {**_tracks(), **change})
    assert list(tmp_path.iterdir()) == []


def test_research_pickle_with_batch_dim(tmp_path):
    data = _tracks()
    research = {
        "pred_tracks": data["pred_tracks"][None],  # (1, T, N, 2) as some research files keep it
        "pred_visibility": data["pred_visibility"][None],
        "obj_ids": data["obj_ids"],
        "point_queries": data["point_queries"],
        "obj_ids_aggo_2": torch.zeros(N, dtype=torch.int64),
    }
    path = tmp_path / "research.pkl"
    with open(path, "wb") as f:
        pickle.dump(research, f)  # exactly how the research script writes
    tf = load_tracks(path)
    assert tf.tracks.shape == (T, N, 2) and tf.visibility.shape == (T, N)
    assert torch.equal(tf.tracks, data["pred_tracks"].float())
    assert tf.meta == {} and set(tf.extra) == {"obj_ids_aggo_2"}


def test_missing_empty_truncated_and_not_a_pickle(tmp_path, videos_dir):
    with pytest.raises(TrackFileError, match="cannot read"):
        load_tracks(tmp_path / "nope.pkl")
    (tmp_path / "empty.pkl").write_bytes(b"")
    with pytest.raises(TrackFileError, match="empty"):
        load_tracks(tmp_path / "empty.pkl")
    good = tmp_path / "good.pkl"
    save_tracks(good, {**_tracks(), "semtrack": _meta()})
    blob = good.read_bytes()
    for cut in (len(blob) // 3, len(blob) - 1):
        (tmp_path / "cut.pkl").write_bytes(blob[:cut])
        with pytest.raises(TrackFileError, match="not a valid track pickle") as err:
            load_tracks(tmp_path / "cut.pkl")
        assert "cut.pkl" in str(err.value)
    (tmp_path / "trailing.pkl").write_bytes(blob + b"junk")
    with pytest.raises(TrackFileError, match="trailing"):
        load_tracks(tmp_path / "trailing.pkl")
    with pytest.raises(TrackFileError, match="not a valid track pickle"):
        load_tracks(videos_dir / "cat.mp4")
    (tmp_path / "text.pkl").write_text("pred_tracks, pred_visibility\n")
    with pytest.raises(TrackFileError):
        load_tracks(tmp_path / "text.pkl")
    assert issubclass(TrackFileError, ValueError)


@pytest.mark.parametrize(
    "obj, message",
    [
        ([1, 2], "expected a dict"),
        ({k: v for k, v in _tracks().items() if k != "obj_ids"}, "missing keys"),
        ({**_tracks(), "obj_ids": [0, 0, 3, 3, 7]}, "must be a torch tensor"),
        ({**_tracks(), "pred_visibility": torch.ones(T, N + 1, dtype=torch.bool)}, "pred_visibility"),
        ({**_tracks(), "pred_tracks": torch.full((T, N, 2), float("nan"))}, "NaN"),
        ({**_tracks(), "obj_ids": torch.zeros(N, dtype=torch.float32)}, "obj_ids"),
    ],
)
def test_schema_errors_on_load(tmp_path, obj, message):
    path = tmp_path / "bad.pkl"
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    with pytest.raises(TrackFileError, match=message) as err:
        load_tracks(path)
    assert str(path) in str(err.value)


# ------------------------------------------------------------------ crafted pickles


class _Call:
    """Pickles as `func(*args)`."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _crafted(tmp_path, payload) -> "os.PathLike":
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({**_tracks(), "semtrack": {"note": payload}}, f)
    return path


def _touch(marker) -> str:
    return f"touch '{marker}'"


def test_crafted_os_system_does_not_run(tmp_path):
    marker = tmp_path / "pwned_system"
    path = _crafted(tmp_path, _Call(os.system, _touch(marker)))
    with pytest.raises(TrackFileError, match="forbidden global"):
        load_tracks(path)
    assert not marker.exists()
    with open(path, "rb") as f:  # control: the payload is live under plain pickle
        pickle.load(f)
    assert marker.exists()


def test_crafted_eval_does_not_run(tmp_path):
    marker = tmp_path / "pwned_eval"
    path = _crafted(tmp_path, _Call(eval, f"__import__('os').system({_touch(marker)!r})"))
    with pytest.raises(TrackFileError, match="forbidden global builtins.eval"):
        load_tracks(path)
    assert not marker.exists()


def test_crafted_payload_inside_tensor_storage_bytes_does_not_run(tmp_path):
    """torch pickles a tensor as `_rebuild_tensor_v2(_load_from_bytes(b), ...)` and torch's own
    `_load_from_bytes` unpickles `b` with weights_only=False; put the payload there."""
    marker = tmp_path / "pwned_storage"
    evil_bytes = pickle.dumps(_Call(os.system, _touch(marker)), protocol=2)
    storage = _Call(torch.storage._load_from_bytes, evil_bytes)
    tensor = _Call(torch._utils._rebuild_tensor_v2, storage, 0, (N,), (1,), False, collections.OrderedDict())
    path = tmp_path / "evil.pkl"
    with open(path, "wb") as f:
        pickle.dump({**_tracks(), "obj_ids": tensor}, f)
    with pytest.raises(TrackFileError, match="storage refused .*system"):
        load_tracks(path)
    assert not marker.exists()
    with open(path, "rb") as f:  # control: torch's own loader runs it
        try:
            pickle.load(f)
        except Exception:
            pass  # it fails after running the command
    assert marker.exists()


def test_crafted_build_opcode_is_refused(tmp_path):
    """BUILD calls `__setstate__` on whatever is on the stack; a dict of tensors never needs it."""
    data = pickle.dumps(_tracks(), protocol=4)
    path = tmp_path / "build.pkl"
    path.write_bytes(data[:-1] + b"}b.")  # ... EMPTY_DICT BUILD STOP
    with pytest.raises(TrackFileError, match="forbidden pickle opcode BUILD"):
        load_tracks(path)


def test_crafted_tensor_view_outside_its_storage_is_refused(tmp_path):
    """torch's rebuild does not bound-check the view: it would read memory past the storage."""
    storage = torch.storage.TypedStorage(
        wrap_storage=torch.zeros(N, dtype=torch.int64).untyped_storage(), dtype=torch.int64, _internal=True
    )
    tensor = _Call(torch._utils._rebuild_tensor_v2, storage, 0, (N,), (1000,), False, collections.OrderedDict())
    path = tmp_path / "oob.pkl"
    with open(path, "wb") as f:
        pickle.dump({**_tracks(), "obj_ids": tensor}, f)
    with pytest.raises(TrackFileError, match="outside its storage"):
        load_tracks(path)
