"""semtrack.trackfile against crafted and broken track pickles: every one is a TrackFileError naming the
file, nothing in it runs, and reading it costs bounded time and memory.

The hostile files are built here (a custom reducer, or raw opcodes spliced into a pickle the standard
pickler wrote); none is ever read with plain `pickle.load`. The ones that would exhaust memory or time
without the checks are read in a child process with a capped address space, so a regression fails the
test instead of the machine.
"""
import codecs
import collections
import io
import json
import os
import pickle
import random
import struct
import subprocess
import sys

import pytest
import torch

from semtrack import trackfile
from semtrack.trackfile import MAX_DEPTH, MAX_ELEMENTS, MAX_VALUES, TrackFileError, load_tracks, loads_tracks

T, N = 6, 5
HOLE = "@@HOLE@@"  # a meta value whose opcodes get replaced by crafted ones


def _tracks(t=T, n=N):
    g = torch.Generator().manual_seed(0)
    return {
        "pred_tracks": (torch.rand(t, n, 2, generator=g) * 200).to(torch.float16),  # (T, N, 2)
        "pred_visibility": torch.rand(t, n, generator=g) > 0.3,  # (T, N)
        "obj_ids": torch.arange(n, dtype=torch.int64),
        "point_queries": torch.arange(n, dtype=torch.int64) % t,
    }


class _Call:
    """Pickles as `func(*args)`."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _storage(numel: int, dtype=torch.float16):
    return torch.storage.TypedStorage(
        wrap_storage=torch.zeros(numel, dtype=dtype).untyped_storage(), dtype=dtype, _internal=True
    )


def _view(storage, size, stride, offset=0):
    """Pickles as torch's tensor reduce does, with any size and stride."""
    return _Call(torch._utils._rebuild_tensor_v2, storage, offset, size, stride, False, collections.OrderedDict())


def _spliced(ops: bytes) -> bytes:
    """A track pickle whose `semtrack.note` is whatever the opcodes `ops` push (exactly one value).
    Protocol 3: no frames whose lengths the splice would break; memo indices >= 100000 are free."""
    data = pickle.dumps({**_tracks(), "semtrack": {"note": HOLE}}, protocol=3)
    hole = b"X" + struct.pack("<I", len(HOLE)) + HOLE.encode()
    assert data.count(hole) == 1
    return data.replace(hole, ops)


def _put(i: int) -> bytes:
    return b"r" + struct.pack("<I", 100_000 + i)  # LONG_BINPUT


def _get(i: int) -> bytes:
    return b"j" + struct.pack("<I", 100_000 + i)  # LONG_BINGET


# _codecs.encode("a", "latin1"): an admitted call, giving a value that is not a container
_LATIN1_BYTES = b"c_codecs\nencode\n" + b"\x8c\x01a" + b"\x8c\x06latin1" + b"\x86R"


def _nested_lists(depth: int) -> bytes:
    """[[[...]]] `depth` deep: push `depth` empty lists, then APPEND each into the one below."""
    return b"]" * depth + b"a" * (depth - 1)


def _nested_tuples(depth: int) -> bytes:
    """((((),),),) `depth` deep: EMPTY_TUPLE, then TUPLE1 around it `depth` - 1 times."""
    return b")" + b"\x85" * (depth - 1)


def _laughing_tuple_key(levels: int = 9, width: int = 10) -> bytes:
    """{t: 1} where t is `levels` nested tuples of `width` references to the level below: hashing t
    (what the unpickler's SETITEM does) visits width**levels strings."""
    ops = b"\x8c\x03lol" + _put(0) + b"0"
    for level in range(1, levels + 1):
        ops += b"(" + _get(level - 1) * width + b"t" + _put(level) + b"0"
    return ops + b"}" + _get(levels) + b"K\x01" + b"s"


def _laughing_list(levels: int = 9, width: int = 10) -> list:
    lol = ["lol"]
    for _ in range(levels):
        lol = [lol] * width  # shared references: pickled once each, width**levels when walked
    return lol


def _dump(obj, protocol=4) -> bytes:
    return pickle.dumps(obj, protocol=protocol)


def _stride0(t, n):
    """pred_tracks and pred_visibility as stride-0 views repeating one frame T times (N = n)."""
    return {
        **_tracks(),
        "pred_tracks": _view(_storage(2 * n), (t, n, 2), (0, 2, 1)),
        "pred_visibility": _view(_storage(n, torch.bool), (t, n), (0, 1)),
        "obj_ids": torch.zeros(n, dtype=torch.int64),
        "point_queries": torch.zeros(n, dtype=torch.int64),
    }


# Files that would take minutes to hours or gigabytes to terabytes without the checks:
# name -> (bytes, expected message).
def _hazards() -> dict:
    shared = _storage(2**20, torch.bool)
    num_views = MAX_ELEMENTS // 2**20 + 1
    return {
        "stride0_8tb": (_dump(_stride0(2**30, 2**10)), "stride 0"),  # float32 tracks: 8 TiB
        "stride0_6gb": (_dump(_stride0(26_000, 32_768)), "stride 0"),  # 6.8 GB
        "element_cap": (
            _dump({**_tracks(), "semtrack": {"views": [_view(shared, (2**20,), (1,)) for _ in range(num_views)]}}),
            f"more than {MAX_ELEMENTS} elements",
        ),
        "deep_100000": (_spliced(_nested_tuples(100_000)), f"nested more than {MAX_DEPTH} deep"),
        "billion_laughs": (_dump({**_tracks(), "semtrack": {"note": _laughing_list()}}), f"more than {MAX_VALUES}"),
        "laughing_tuple_key": (_spliced(_laughing_tuple_key()), "tuple as dict key"),
        "memo_index": (_spliced(b"N" + b"r" + struct.pack("<I", 2**26)), "memo index"),
    }


_CHILD = r"""
import json, resource, sys, time
from semtrack.trackfile import TrackFileError, load_tracks

def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

load_tracks(sys.argv[1])  # a valid file first: torch fully imported and warm
if sys.platform.startswith("linux"):  # a regression fails here instead of exhausting the machine
    vm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:"))
    resource.setrlimit(resource.RLIMIT_AS, (vm_kb * 1024 + 2**31, resource.RLIM_INFINITY))
out = {}
for path in sys.argv[2:]:
    before, start = peak_mb(), time.perf_counter()
    try:
        load_tracks(path)
        outcome, message = "loaded", ""
    except TrackFileError as exc:
        outcome, message = "TrackFileError", str(exc)
    except BaseException as exc:
        outcome, message = type(exc).__name__, str(exc)[:300]
    out[path] = {"outcome": outcome, "message": message, "seconds": time.perf_counter() - start,
                 "peak_growth_mb": peak_mb() - before}
print(json.dumps(out))
"""


def test_hazardous_files_are_refused_fast_and_small(tmp_path):
    """Each is refused with its reason before anything big exists: well under the 2 GiB of address
    space the child may add, and without a hang (the bounds are generous: the checks take milliseconds,
    the unchecked loads take gigabytes or hours)."""
    good = tmp_path / "good.pkl"
    trackfile.save_tracks(good, _tracks())
    hazards = _hazards()
    paths = {}
    for name, (data, _) in hazards.items():
        paths[name] = tmp_path / f"{name}.pkl"
        paths[name].write_bytes(data)
        assert len(data) < 2**21  # small files: the damage would come from what they describe
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(good), *map(str, paths.values())],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (_, expected) in hazards.items():
        result = results[str(paths[name])]
        assert result["outcome"] == "TrackFileError", (name, result)
        assert result["message"].startswith(str(paths[name])) and expected in result["message"], (name, result)
        assert result["seconds"] < 20, (name, result)
        assert result["peak_growth_mb"] < 200, (name, result)


@pytest.mark.parametrize(
    "case, message",
    [
        ("overlapping_strides", "overlapping"),
        ("outside_storage", "outside its storage"),
        ("cycle", "contains itself"),
        ("deep_lists", f"nested more than {MAX_DEPTH} deep"),
        ("frozenset_of_tuples", "tuple as dict key or set element"),
        ("reduce_of_a_result", "REDUCE needs an admitted global and an argument tuple, got object"),
        ("setitem_on_a_result", "SETITEM on object, not on a dict"),
        ("rot13", "admitted only as (str, 'latin1')"),
        ("ordered_dict_with_items", "admitted only empty"),
        ("backward_hooks", "hooks"),
        ("storage_with_tuple_key", "storage refused before torch.load: SETITEMS: a tuple"),
        ("storage_bytes_decoded_again", "bytes decoded while unpickling exceed the file's own size"),
        ("latin1_text_encoded_again", "bytes made while unpickling exceed the file's own size"),
        ("no_points", "no points (N = 0)"),
        ("nan_frame_times", "frame_times' contains NaN"),
        ("inf_frame_times", "frame_times' contains NaN or infinite"),
        ("decreasing_frame_times", "non-decreasing"),
        ("confidence_shape", "confidence' must be a float (6, 5)"),
    ],
)
def test_crafted_file_is_refused_with_its_reason(tmp_path, case, message):
    storage = _storage(T * N * 2)
    hooks = collections.OrderedDict(hook=1)
    big_storage_bytes = _legacy_storage_bytes(_storage(2**16))  # one bytes object, memoized, decoded 3 times
    big_text = "x" * 2**17  # one str, memoized, encoded 3 times
    ops = {
        "cycle": b"]" + _put(0) + _get(0) + b"a",  # a list that contains itself
        "deep_lists": _nested_lists(1000),
        "frozenset_of_tuples": b"(" + b"(K\x01K\x02t" + b"\x91",  # frozenset({(1, 2)})
        "reduce_of_a_result": _LATIN1_BYTES + b")R",  # calling what a call gave
        "setitem_on_a_result": _LATIN1_BYTES + b"K\x00K\x00s",
    }
    builders = {
        "overlapping_strides": lambda: _dump({**_tracks(), "pred_tracks": _view(storage, (T, N, 2), (2 * N, 1, 1))}),
        "outside_storage": lambda: _dump({**_tracks(), "pred_tracks": _view(storage, (T, N, 2), (2 * N, 2, 1), 1)}),
        "rot13": lambda: _dump({**_tracks(), "semtrack": {"note": _Call(codecs.encode, "abc", "rot13")}}, protocol=2),
        "ordered_dict_with_items": lambda: _dump({**_tracks(), "semtrack": {"o": _Call(
            collections.OrderedDict, [("a", 1)])}}),
        "backward_hooks": lambda: _dump({**_tracks(), "obj_ids": _Call(
            torch._utils._rebuild_tensor_v2, _storage(N, torch.int64), 0, (N,), (1,), False, hooks)}),
        "storage_with_tuple_key": lambda: _dump({**_tracks(), "obj_ids": _Call(
            torch._utils._rebuild_tensor_v2, _Call(torch.storage._load_from_bytes, _storage_bytes_with_tuple_key()),
            0, (N,), (1,), False, collections.OrderedDict())}),
        "storage_bytes_decoded_again": lambda: _dump({**_tracks(), "semtrack": {"copies": [_view(
            _Call(torch.storage._load_from_bytes, big_storage_bytes), (2**16,), (1,)) for _ in range(3)]}}),
        "latin1_text_encoded_again": lambda: _dump({**_tracks(), "semtrack": {"copies": [
            _Call(codecs.encode, big_text, "latin1") for _ in range(3)]}}),
        "no_points": lambda: _dump({
            "pred_tracks": torch.zeros(T, 0, 2, dtype=torch.float16), "pred_visibility": torch.zeros(T, 0, dtype=bool),
            "obj_ids": torch.zeros(0, dtype=torch.int64), "point_queries": torch.zeros(0, dtype=torch.int64)}),
        "nan_frame_times": lambda: _dump({**_tracks(), "semtrack": {"frame_times": _times(2, float("nan"))}}),
        "inf_frame_times": lambda: _dump({**_tracks(), "semtrack": {"frame_times": _times(T - 1, float("inf"))}}),
        "decreasing_frame_times": lambda: _dump({**_tracks(), "semtrack": {"frame_times": _times(3, 0.0)}}),
        "confidence_shape": lambda: _dump({**_tracks(), "semtrack": {"confidence": torch.ones(T, N + 1)}}),
    }
    data = _spliced(ops[case]) if case in ops else builders[case]()
    path = tmp_path / f"{case}.pkl"
    path.write_bytes(data)
    with pytest.raises(TrackFileError) as err:
        load_tracks(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)


def _times(at: int, value: float) -> torch.Tensor:
    """Frame times 0.0, 0.1, ... (T,) float64 with `value` at index `at`."""
    times = torch.arange(T, dtype=torch.float64) / 10
    times[at] = value
    return times


def _legacy_storage_bytes(storage) -> bytes:
    """The bytes torch embeds for a storage (`torch.storage._load_from_bytes`' argument)."""
    buf = io.BytesIO()
    torch.save(storage, buf, _use_new_zipfile_serialization=False)
    return buf.getvalue()


def _storage_bytes_with_tuple_key() -> bytes:
    """Legacy torch.save bytes of an (N,) int64 storage whose system-info dict gains a tuple key."""
    raw = _legacy_storage_bytes(_storage(N, torch.int64))
    marker = b"X\x05\x00\x00\x00short"  # a key of the type_sizes dict
    assert raw.count(marker) == 1
    return raw.replace(marker, b"K\x01K\x02\x86", 1)  # (1, 2) instead of "short"


def test_protocol_2_research_pickle_loads(tmp_path):
    """Protocol 2 pickles bytes as `_codecs.encode(str, 'latin1')`: admitted in exactly that form."""
    data = {**_tracks(), "obj_ids_aggo_2": torch.zeros(N, dtype=torch.int64)}
    path = tmp_path / "research_p2.pkl"
    with open(path, "wb") as f:
        pickle.dump(data, f, protocol=2)
    assert b"_codecs" in path.read_bytes()
    tf = load_tracks(path)
    assert torch.equal(tf.tracks, data["pred_tracks"].float()) and torch.equal(tf.visibility, data["pred_visibility"])
    assert set(tf.extra) == {"obj_ids_aggo_2"} and tf.tracks_dtype == torch.float16


@pytest.mark.parametrize("legacy", [False, True])
def test_torch_save_archive_gets_a_clear_message(tmp_path, legacy):
    path = tmp_path / "tracks.pt"
    torch.save(_tracks(), path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(TrackFileError, match="a torch.save archive .*, not a track pickle") as err:
        load_tracks(path)
    assert str(err.value).startswith(str(path))
    assert ("legacy" in str(err.value)) == legacy


def test_random_bytes_and_truncations(tmp_path):
    rng = random.Random(0)
    good = _dump({**_tracks(), "semtrack": {"frame_times": _times(0, 0.0)}})
    blobs = [rng.randbytes(4096), b"\x80\x04" + rng.randbytes(4096), b"\x80\x02" + rng.randbytes(300)]
    blobs += [good[:cut] for cut in range(1, len(good), max(1, len(good) // 40))]
    for i, blob in enumerate(blobs):
        path = tmp_path / f"junk{i}.pkl"
        path.write_bytes(blob)
        with pytest.raises(TrackFileError) as err:
            load_tracks(path)
        assert str(err.value).startswith(str(path))


@pytest.mark.parametrize("protocol", [2, 4])
def test_mutated_files_load_or_raise_track_file_error(protocol):
    """Random byte changes anywhere in a valid file: a TrackFile or a TrackFileError, never anything else."""
    rng = random.Random(protocol)
    good = bytearray(_dump({**_tracks(), "semtrack": {"frame_times": _times(0, 0.0), "c": {"k": [1, 2.5]}}},
                           protocol=protocol))
    outcomes = collections.Counter()
    for _ in range(300):
        blob = bytearray(good)
        for _ in range(rng.choice((1, 1, 2, 4))):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        try:
            loads_tracks(bytes(blob), "mutated.pkl")
            outcomes["loaded"] += 1
        except TrackFileError as exc:
            assert str(exc).startswith("mutated.pkl: ")
            outcomes["refused"] += 1
    assert outcomes["refused"] > 0 and outcomes["loaded"] > 0  # both kinds of mutation occurred


@pytest.mark.parametrize(
    "error",
    [MemoryError(), RecursionError("deep"), RuntimeError("alloc"), OverflowError("big"), EOFError(),
     UnicodeDecodeError("utf-8", b"\xff", 0, 1, "bad"), struct.error("unpack"), IndexError("x")],
)
@pytest.mark.parametrize("where", ["torch.load", "_validate"])
def test_any_failure_inside_is_a_track_file_error(tmp_path, monkeypatch, error, where):
    path = tmp_path / "x.pkl"
    path.write_bytes(_dump(_tracks()))

    def fail(*args, **kwargs):
        raise error

    if where == "torch.load":
        monkeypatch.setattr(trackfile.torch, "load", fail)
    else:
        monkeypatch.setattr(trackfile, "_validate", fail)
    with pytest.raises(TrackFileError) as err:
        load_tracks(path)
    assert str(err.value).startswith(str(path))


def test_oversized_or_endless_file_is_refused_without_reading_it_all(tmp_path, monkeypatch):
    monkeypatch.setattr(trackfile, "MAX_FILE_BYTES", 1000)
    path = tmp_path / "big.pkl"
    path.write_bytes(_dump(_tracks()) + b"\x00" * 1000)
    with pytest.raises(TrackFileError, match="more than a track file holds"):
        load_tracks(path)
    if os.path.exists("/dev/zero"):
        with pytest.raises(TrackFileError, match="^/dev/zero: is a character device, not a regular file"):
            load_tracks("/dev/zero")
    fifo = tmp_path / "fifo.pkl"
    os.mkfifo(fifo)  # no writer: refused at once, never waited on
    with pytest.raises(TrackFileError, match="fifo.pkl: is a FIFO, not a regular file"):
        load_tracks(fifo)
