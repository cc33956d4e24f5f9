"""The run bookkeeping's pieces, without models: the ledger and its done rule, tar shards and the
manifest, the sweep of dead runs' temporary files, name limits, shards, locks and stop requests."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from types import SimpleNamespace

import pytest
import torch

from _shared import REPO_ROOT
from semtrack.hygiene import is_folder_error, stale_temporaries
from semtrack.layout import OutputLayout
from semtrack.ledger import DoneRule, LedgerPart, failed_record, latest_videos, read_records
from semtrack.ledger_schema import parse_record
from semtrack.safeio import TEMPORARY_NAME, TMP_SUFFIX_MAX, temporary_path
from semtrack.shards import FolderBusy, FolderLock, Shard, resolve_shard
from semtrack.stopping import Stopped, StopRequest
from semtrack.trackfile import dumps_tracks, loads_tracks
from semtrack.util import host_tag
from semtrack.webdataset import TarShards, manifest_csv, read_manifest, read_member


def tracks(t: int = 3, n: int = 2) -> dict:
    return {"pred_tracks": torch.zeros(t, n, 2, dtype=torch.float16),
            "pred_visibility": torch.ones(t, n, dtype=torch.bool),
            "obj_ids": torch.zeros(n, dtype=torch.int64), "point_queries": torch.zeros(n, dtype=torch.int64)}


def row(index: int, video_id: str, dataset: str = "d") -> SimpleNamespace:
    return SimpleNamespace(index=index, dataset=dataset, video_id=video_id)


def done_record(layout: OutputLayout, r, data: bytes, gif: int | None = None, t: float = 1.0) -> dict:
    outputs = {"pickle": {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    if gif is not None:
        outputs["gif"] = {"bytes": gif}
    return {"kind": "video", "run": "R", "rank": 0, "row": r.index, "dataset": r.dataset, "video_id": r.video_id,
            "status": "done", "time": t, "outputs": outputs}


# ------------------------------------------------------------------------------ ledger
def test_ledger_appends_whole_lines_and_readers_skip_a_torn_last_line(tmp_path):
    layout = OutputLayout(tmp_path)
    part = LedgerPart(layout.ledger_part("R", 0))
    part.append([{"kind": "start", "run": "R", "time": 0.0}, {"kind": "video", "run": "R", "row": 0, "dataset": "d",
                                                              "video_id": "a", "status": "failed", "time": 1.0}])
    with open(part.path, "ab") as f:
        f.write(b'{"kind": "video", "run": "R", "row": 1, "data')  # a process killed mid-line
    records = read_records(layout)
    assert [r["kind"] for r in records] == ["start", "video"]
    later = {"kind": "video", "run": "S", "row": 0, "dataset": "d", "video_id": "a", "status": "done", "time": 2.0}
    LedgerPart(layout.ledger_part("S", 0)).append([later])
    assert latest_videos(read_records(layout))[("d", "a")]["status"] == "done"  # the latest record wins


def test_a_failed_append_is_cut_back_to_whole_lines(tmp_path):
    """Over the file-size limit (EFBIG, as a full disk would refuse), the file keeps its old length."""
    code = textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(REPO_ROOT)!r})
        from semtrack.ledger import LedgerPart
        part = LedgerPart({str(tmp_path / "l.jsonl")!r})
        part.append([{{"kind": "start", "run": "R", "time": 0}}])
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100, resource.RLIM_INFINITY))
        try:
            part.append([{{"kind": "video", "run": "R", "reason": "x" * 500}}])
        except OSError as exc:
            print("refused", exc.errno)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.stdout.startswith("refused"), proc.stderr
    assert (tmp_path / "l.jsonl").read_text() == '{"kind":"start","run":"R","time":0}\n'


def test_done_rule_trusts_a_record_and_a_stat_and_verifies_when_asked(tmp_path):
    layout = OutputLayout(tmp_path)
    rows = [row(0, "ok"), row(1, "resized"), row(2, "failed"), row(3, "flipped"), row(4, "old"), row(5, "broken")]
    data = dumps_tracks(tracks())
    latest = {}
    for r in rows:
        layout.pickle("d", r.video_id).parent.mkdir(parents=True, exist_ok=True)
        layout.pickle("d", r.video_id).write_bytes(data)
        latest[("d", r.video_id)] = done_record(layout, r, data)
    latest[("d", "failed")]["status"] = "failed"
    layout.pickle("d", "resized").write_bytes(data + b"x")
    flipped = bytearray(data)
    flipped[-20] ^= 0xFF
    layout.pickle("d", "flipped").write_bytes(bytes(flipped))  # same size, other bytes
    del latest[("d", "old")], latest[("d", "broken")]  # pickles without a record (an older semtrack)
    layout.pickle("d", "broken").write_bytes(data[:40])
    plan = DoneRule(layout, latest, want_gif=False, verify=False).plan(rows)
    assert (plan.pending, plan.skipped) == ([1, 2, 5], 3)
    assert [(r["video_id"], r["adopted"], r["frames"], r["points"]) for r in plan.adopted] == [("old", True, 3, 2)]
    assert plan.adopted[0]["outputs"]["pickle"] == latest[("d", "ok")]["outputs"]["pickle"]
    verified = DoneRule(layout, latest, want_gif=False, verify=True).plan(rows)
    assert verified.pending == [1, 2, 3, 5]
    assert DoneRule(layout, latest, want_gif=True, verify=False).plan(rows).pending == [0, 1, 2, 3, 4, 5]  # no GIFs
    assert DoneRule(layout, latest, want_gif=False, verify=False).plan(rows, rerun=True).pending == list(range(6))


# ------------------------------------------------------------------------------ tar shards
def test_tar_shards_are_renamed_when_closed_and_hold_the_pickle_bytes(tmp_path):
    layout = OutputLayout(tmp_path)
    shards = TarShards(layout, "R", 0, videos_per_tar=2)
    data = [dumps_tracks(tracks(t=2 + i)) for i in range(3)]
    record = lambda i: {"kind": "video", "row": i, "dataset": "d", "video_id": f"v.{i}", "status": "done",  # noqa: E731
                        "frames": 2 + i, "points": 2}
    assert shards.add(record(0), {"pickle": data[0], "json": b"{}", "gif": b"GIF89a"}) == []
    assert not list(layout.shards_dir.glob("*.tar")) and len(list(layout.shards_dir.iterdir())) == 1  # temporary
    closed = shards.add(record(1), {"pickle": data[1], "json": b"{}"})
    assert [r["row"] for r in closed] == [0, 1] and shards.pending == 0
    (tar_path,) = layout.shards_dir.glob("*.tar")
    assert sorted(p.name for p in layout.shards_dir.iterdir()) == [tar_path.name]
    for i, r in enumerate(closed):
        entry = r["outputs"]["pickle"]
        assert entry["shard_bytes"] == tar_path.stat().st_size and entry["shard"] == f"shards/{tar_path.name}"
        assert read_member(tmp_path, entry) == data[i]
        assert loads_tracks(read_member(tmp_path, entry), "m").num_frames == 2 + i
    assert read_member(tmp_path, closed[0]["outputs"]["gif"]) == b"GIF89a"
    with tarfile.open(tar_path) as tar:  # a plain tar: any reader sees the members
        names = tar.getnames()
        assert tar.extractfile(closed[1]["outputs"]["pickle"]["member"]).read() == data[1]
    assert len(names) == 5 and all(n.count(".") == 1 for n in names)  # WebDataset keys hold no dots
    shards.add(record(2), {"pickle": data[2], "json": b"{}"})
    assert [r["row"] for r in shards.abandon()] == [2]  # a shard given up leaves nothing behind
    assert sorted(p.name for p in layout.shards_dir.iterdir()) == [tar_path.name]
    failed = {"kind": "video", "row": 9, "dataset": "d", "video_id": "bad", "status": "failed", "time": 1}
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(manifest_csv([*({**r, "time": 1} for r in closed), failed]))
    entries = read_manifest(manifest)
    assert set(entries) == {("d", "v.0"), ("d", "v.1")} and entries[("d", "v.1")]["T"] == "3"
    assert "bad,d,,,,,,,failed" in manifest.read_text()


# ------------------------------------------------------------------------------ hygiene
def test_sweep_takes_only_this_hosts_dead_processes_temporaries(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    host = host_tag()
    names = {f"a.pkl.tmp-{host}-{dead_pid}": True, f"b.pkl.tmp-{host}-{os.getpid()}": False,
             f"c.pkl.tmp-otherhost-{dead_pid}": False, "d.pkl": False, f"e.gif.tmp-{host}-1x": False}
    for name in names:
        (tmp_path / name).write_text("x")
    (tmp_path / f"f.tmp-{host}-{dead_pid}").mkdir()  # a folder is never swept
    assert [p.name for p in stale_temporaries([tmp_path])] == [n for n, stale in names.items() if stale]
    name = temporary_path(tmp_path / "x.pkl").name
    assert name.startswith(f"x.pkl.tmp-{host}-{os.getpid()}-r")
    assert TEMPORARY_NAME.fullmatch(name)["pid"] == str(os.getpid())
    assert name != temporary_path(tmp_path / "x.pkl").name  # unpredictable
    assert is_folder_error(OSError(28, "No space left on device")) and not is_folder_error(ValueError("x"))


def test_names_the_folder_cannot_hold_are_refused_naming_the_rows(tmp_path):
    layout = OutputLayout(tmp_path / "out")
    limit = os.pathconf(tmp_path, "PC_NAME_MAX")
    fits = "v" * (limit - len(".pkl") - TMP_SUFFIX_MAX)
    layout.check_names([row(0, fits), row(1, "x", dataset="ok")])
    with pytest.raises(ValueError) as info:
        layout.check_names([row(0, "a"), row(3, fits + "v"), row(4, "b", dataset="Failures.CSV"),
                            row(5, "c", dataset="ledger")])
    message = str(info.value)
    assert message.startswith("3 row(s) have names the output folder") and "row 0 " not in message
    assert "row 3 video_id" in message and "temporary suffix" in message
    assert "row 4 dataset 'Failures.CSV'" in message and "row 5 dataset 'ledger'" in message


# ------------------------------------------------------------------------------ shards and locks
def test_shards_come_from_flags_or_the_slurm_array():
    assert resolve_shard(None, None, {}) == Shard(0, 1)
    assert resolve_shard(4, 3, {}) == Shard(3, 4)
    array = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
             "SLURM_ARRAY_TASK_STEP": "2"}  # --array=1-7:2 -> tasks 1, 3, 5, 7
    assert resolve_shard(None, None, array) == Shard(3, 4)
    assert resolve_shard(8, None, array) == Shard(3, 8)  # a flag overrides its variable
    with pytest.raises(ValueError, match="go together"):
        resolve_shard(4, None, {})
    with pytest.raises(ValueError, match="outside 0..3"):
        resolve_shard(4, 4, {})
    rows = [row(i, f"v{i}") for i in range(7)]
    assert [r.index for r in Shard(1, 3).rows(rows)] == [1, 4]
    assert sorted(r.index for s in range(3) for r in Shard(s, 3).rows(rows)) == list(range(7))


def test_locks_refuse_a_second_run_of_a_shard_or_of_the_folder(tmp_path):
    layout = OutputLayout(tmp_path)
    first = FolderLock(layout, Shard(0, 2))
    first.acquire()
    other = FolderLock(layout, Shard(1, 2))
    other.acquire()  # other shards run side by side
    busy = rf"shard 0 of 2 of {tmp_path} is already being written \(host .*pid {os.getpid()}"
    with pytest.raises(FolderBusy, match=busy):
        FolderLock(layout, Shard(0, 2)).acquire()
    with pytest.raises(FolderBusy, match=r"another semtrack run is writing .* \(shard runs hold it\)"):
        FolderLock(layout, Shard()).acquire()
    first.release()
    other.release()
    whole = FolderLock(layout, Shard())
    whole.acquire()
    with pytest.raises(FolderBusy, match=rf"a run of every row is writing .*pid {os.getpid()}"):
        FolderLock(layout, Shard(1, 2)).acquire()
    whole.release()
    FolderLock(layout, Shard(1, 2)).acquire()


def test_a_signal_interrupts_before_start_and_stops_at_the_boundary_after():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    request = StopRequest()
    request.install()
    try:
        with pytest.raises(Stopped) as info:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler runs as the call returns
        assert info.value.signum == signal.SIGTERM
    finally:
        request.restore()
    started = StopRequest()
    started.install()
    try:
        started.started = True
        os.kill(os.getpid(), signal.SIGINT)
        assert started.signum == signal.SIGINT and started.requested  # noted, not raised
        with pytest.raises(Stopped, match="SIGINT"):
            started.check()
    finally:
        started.restore()
    assert {s: signal.getsignal(s) for s in before} == before


def test_retry_failed_redoes_transient_failures_and_decode_failures_only_when_asked(tmp_path, videos_dir):
    """A decode failure of an unchanged file is permanent; a model stage's failure, a decoder that broke
    unexpectedly, a missing file, or a file changed after the failure are transient: also when the
    failure was recorded by a host whose clock runs a day ahead (the file's identity is compared, not
    times), and for records of older semtrack without one (then its times are)."""
    layout = OutputLayout(tmp_path / "out")
    changed, skewed, old_changed = (tmp_path / f"{name}.mp4" for name in ("changed", "skewed", "old_changed"))
    for path in (changed, skewed, old_changed):
        path.write_bytes((videos_dir / "not_a_video.mp4").read_bytes())
    day = 86400
    cases = [("not_a_video", "decode", "cannot decode: ...", videos_dir / "not_a_video.mp4", 0),  # permanent
             ("truncated", "decode", "cannot decode: ...", videos_dir / "corrupt_truncated.mp4", day),  # permanent
             ("oom", "tracking", "CUDA out of memory", videos_dir / "cat.mp4", 0),
             ("odd", "decode", "unexpected KeyError: 'x'", videos_dir / "cat.mp4", 0),
             ("gone", "decode", "no such file", tmp_path / "gone.mp4", 0),
             ("changed", "decode", "cannot decode: ...", changed, 0),
             ("skewed", "decode", "cannot decode: ...", skewed, day),  # recorded a day ahead, replaced since
             ("old", "decode", "cannot decode: ...", videos_dir / "not_a_video.mp4", 0),  # older semtrack: permanent
             ("old_changed", "decode", "cannot decode: ...", old_changed, -3600)]  # failed an hour before it changed
    latest, rows = {}, []
    for i, (video_id, stage, reason, path, ahead) in enumerate(cases):
        record = failed_record(i, "d", video_id, stage, reason, str(path))
        assert ("file" in record) == (stage == "decode" and path.exists())
        if video_id.startswith("old"):
            del record["file"]
        latest[("d", video_id)] = {**record, "run": "r", "time": time.time() + ahead}
        assert parse_record(json.dumps(latest[("d", video_id)]).encode()) is not None
        rows.append(row(i, video_id))
    changed.write_bytes(b"now a different file")
    replacement = tmp_path / "replacement.mp4"
    replacement.write_bytes((videos_dir / "not_a_video.mp4").read_bytes())
    replacement.replace(skewed)  # same bytes, a new file
    plans = {mode: DoneRule(layout, latest, want_gif=False, verify=False, retry_failed=mode).plan(rows)
             for mode in ("transient", "always", "never")}
    transient = plans["transient"]
    assert (transient.pending, transient.skipped, transient.not_retried) == ([2, 3, 4, 5, 6, 8], 3, 3)
    assert (plans["always"].pending, plans["always"].not_retried) == (list(range(9)), 0)
    assert (plans["never"].pending, plans["never"].skipped, plans["never"].not_retried) == ([], 9, 9)
