"""A shared output folder turned against its users: links planted at the names semtrack writes, pipes,
devices and huge files where it reads, and the sweep of what is left behind (semtrack.safeio and its
users: the lock, the ledger, the sidecar, the report)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from semtrack import safeio
from semtrack.hygiene import stale_temporaries
from semtrack.layout import OutputLayout
from semtrack.ledger import LedgerPart
from semtrack.report import main as report_main
from semtrack.report import rebuild
from semtrack.safeio import UnsafeFile, write_text_atomic
from semtrack.shards import FolderBusy, FolderLock, Shard
from semtrack.util import host_tag


@pytest.fixture
def victim(tmp_path):
    """A file of the user's that a planted link points at: it must never change."""
    path = tmp_path / "victim.txt"
    path.write_text("precious\n")
    return path


def start_record(run: str = "r1") -> dict:
    return {"kind": "start", "run": run, "rank": 0, "time": 1.0, "seq": 1, "world_size": 1, "shard": [0, 1],
            "semtrack_version": "0", "csv_rows": 1, "rows": 1, "assigned": 1, "skipped": 0}


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


# ------------------------------------------------------------------------------ writes
def test_a_link_planted_at_the_lock_is_refused_and_its_target_untouched(tmp_path, victim):
    layout = OutputLayout(tmp_path / "out")
    layout.ledger_dir.mkdir(parents=True)
    layout.lock_file("").symlink_to(victim)
    with pytest.raises(FolderBusy, match="symbolic link"):
        FolderLock(layout, Shard()).acquire()
    assert victim.read_text() == "precious\n"
    layout.lock_file("").unlink()
    os.mkfifo(layout.lock_file(""))  # a FIFO neither blocks nor is locked
    with pytest.raises(FolderBusy, match="FIFO"):
        FolderLock(layout, Shard()).acquire()


def test_a_link_planted_at_the_temporary_or_the_target_name_is_never_followed(tmp_path, victim, monkeypatch):
    target = tmp_path / "failures.csv"
    real = safeio.temporary_path
    planted = [real(target)]
    planted[0].symlink_to(victim)  # the name a writer would pick first, taken by a link
    names = iter([planted[0]])
    monkeypatch.setattr(safeio, "temporary_path", lambda path: next(names, None) or real(path))
    write_text_atomic(target, "row\n")
    assert target.read_text() == "row\n" and not target.is_symlink() and victim.read_text() == "precious\n"
    target.unlink()
    target.symlink_to(victim)  # a link at the target itself is replaced, not written through
    write_text_atomic(target, "again\n")
    assert target.read_text() == "again\n" and not target.is_symlink() and victim.read_text() == "precious\n"
    # the predictable name older versions used does not matter either
    (tmp_path / f"x.csv.tmp-{host_tag()}-{os.getpid()}").symlink_to(victim)
    write_text_atomic(tmp_path / "x.csv", "x\n")
    assert victim.read_text() == "precious\n"


def test_report_files_and_the_ledger_never_write_through_links(tmp_path, victim):
    layout = OutputLayout(tmp_path / "out")
    LedgerPart(layout.ledger_part("r1", 0)).append([start_record()])
    layout.failures.symlink_to(victim)
    rebuild(layout)
    assert not layout.failures.is_symlink() and victim.read_text() == "precious\n"
    layout.ledger_part("r2", 0).symlink_to(victim)
    with pytest.raises(UnsafeFile, match="symbolic link"):
        LedgerPart(layout.ledger_part("r2", 0)).append([start_record("r2")])
    assert victim.read_text() == "precious\n"


def test_the_sweep_takes_planted_links_and_odd_names(tmp_path, victim):
    host, pid = host_tag(), dead_pid()
    (tmp_path / f"a.pkl.tmp-{host}-{os.getpid()}-r0123abcd").symlink_to(victim)  # a link, even "ours"
    (tmp_path / f"b.pkl.tmp-otherhost-{pid}").symlink_to(victim)  # a link, another host
    (tmp_path / f"c\nd.pkl.tmp-{host}-{pid}-r0123abcd").write_text("x")  # a newline in the name
    (tmp_path / f"e.pkl.tmp-otherhost-{pid}").write_text("x")  # a file of another host: kept
    stale = sorted(p.name for p in stale_temporaries([tmp_path]))
    assert stale == sorted([f"a.pkl.tmp-{host}-{os.getpid()}-r0123abcd", f"b.pkl.tmp-otherhost-{pid}",
                            f"c\nd.pkl.tmp-{host}-{pid}-r0123abcd"])


def test_semtrack_report_refuses_a_folder_that_is_not_its_own(tmp_path, capsys):
    foreign = tmp_path / "foreign"
    (foreign / "ledger").mkdir(parents=True)
    (foreign / "ledger" / "app.jsonl").write_text(json.dumps({"run": "x", "kind": "video"}) + "\n")
    (foreign / "failures.csv").write_text("theirs\n")
    assert report_main([str(foreign)]) == 2
    assert "not a semtrack output folder" in capsys.readouterr().err
    assert (foreign / "failures.csv").read_text() == "theirs\n" and not (foreign / "run_report.json").exists()
    (foreign / "semtrack_config.json").write_text("{}")  # not a semtrack sidecar either
    assert report_main([str(foreign)]) == 2
    own = OutputLayout(tmp_path / "own")
    LedgerPart(own.ledger_part("r1", 0)).append([start_record()])
    assert report_main([str(own.root)]) == 0 and own.failures.is_file()


# ------------------------------------------------------------------------------ reads
@pytest.fixture
def hostile(tmp_path):
    """make(path, kind): put a FIFO, a link to /dev/zero or a 5 GB sparse file at `path`."""
    def make(path, kind: str):
        path.parent.mkdir(parents=True, exist_ok=True)
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "zero":
            path.symlink_to("/dev/zero")
        else:
            with open(path, "wb") as f:
                f.truncate(5 * 10**9)
    return make


@pytest.mark.timeout(5)
@pytest.mark.parametrize("kind", ["fifo", "zero", "sparse"])
def test_hostile_ledger_lock_sidecar_and_pickle_give_a_clear_line_at_once(tmp_path, hostile, kind):
    from semtrack.config import ExtractConfig
    from semtrack.ledger import DoneRule, read_records
    from semtrack.sidecar import check_sidecar

    config = ExtractConfig(csv_path=str(tmp_path / "v.csv"), base_feat_path=str(tmp_path / "out"), weights="random",
                           use_grid=True)
    layout = config.layout
    LedgerPart(layout.ledger_part("r1", 0)).append([start_record()])
    hostile(layout.ledger_dir / "planted.jsonl", kind)
    problems = []
    assert [r["run"] for r in read_records(layout, problems)] == ["r1"]
    assert len(problems) == 1 and "planted.jsonl" in problems[0]
    if kind != "sparse":  # the lock is never read for its size
        hostile(layout.lock_file(""), kind)
        with pytest.raises(FolderBusy, match="ledger/.lock"):
            FolderLock(layout, Shard()).acquire()
    hostile(layout.sidecar, kind)
    with pytest.raises(ValueError, match="semtrack_config.json"):
        check_sidecar(config, "32-true")
    pickle = layout.pickle("d", "v")
    hostile(pickle, kind)
    rule = DoneRule(layout, {}, want_gif=False, verify=False)
    assert rule.plan([SimpleNamespace(index=0, dataset="d", video_id="v")]).pending == [0]
    assert len(rule.refused) == 1 and "v.pkl" in rule.refused[0]


BAD_RECORDS = {
    "a list where a string belongs": {"kind": "video", "run": ["r"], "time": 1.0, "row": 0, "dataset": "d",
                                      "video_id": "v", "status": "failed", "stage": "s", "reason": "x"},
    "a string row": {"kind": "video", "run": "r", "time": 1.0, "row": "0", "dataset": "d", "video_id": "v",
                     "status": "failed", "stage": "s", "reason": "x"},
    "done without bytes": {"kind": "video", "run": "r", "time": 1.0, "row": 0, "dataset": "d", "video_id": "v",
                           "status": "done", "frames": 2, "points": 1, "outputs": {"pickle": {"sha256": "x"}}},
    "a shard outside shards/": {"kind": "video", "run": "r", "time": 1.0, "row": 0, "dataset": "d", "video_id": "v",
                                "status": "done", "outputs": {"pickle": {"bytes": 1, "shard": "../../etc/x.tar",
                                                                         "member": "m", "offset": 0,
                                                                         "shard_bytes": 9}}},
    "an unknown status": {"kind": "video", "run": "r", "time": 1.0, "row": 0, "dataset": "d", "video_id": "v",
                          "status": "maybe"},
    "a boolean time": {"kind": "start", "run": "r", "time": True},
    "stats of the wrong type": {"kind": "video", "run": "r", "time": 1.0, "row": 0, "dataset": "d", "video_id": "v",
                                "status": "done", "stats": {"s": "fast"}},
    "a negative sequence": {"kind": "end", "run": "r", "time": 1.0, "status": "complete", "seq": -1},
}
BAD_LINES = [b'{"kind": "start", "run": "\\ud800", "time": 1}', b'{"kind": "start", "run": "r", "time": NaN}',
             b"[" * 200_000 + b"]" * 200_000, b"\xff\xfe not utf-8", b"[1, 2]", b'"a string"']
TOO_LONG = b'{"kind": "start", "run": "r", "time": 1, "pad": "' + b"x" * 2**21 + b'"}'  # ends its file


def test_each_bad_ledger_record_is_skipped_and_counted(tmp_path, capsys):
    from semtrack.ledger import read_records

    layout = OutputLayout(tmp_path / "out")
    good = {"kind": "video", "run": "r1", "time": 2.0, "row": 0, "dataset": "d", "video_id": "v", "status": "done",
            "frames": 2, "points": 1, "outputs": {"pickle": {"bytes": 5}}, "stats": {"seconds": 0.5, "none": None}}
    lines = [json.dumps(start_record()).encode(), *(json.dumps(r).encode() for r in BAD_RECORDS.values()),
             *BAD_LINES, json.dumps(good).encode()]
    layout.ledger_dir.mkdir(parents=True)
    (layout.ledger_dir / "r1.r0.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (layout.ledger_dir / "r1.r1.jsonl").write_bytes(TOO_LONG + b"\n" + json.dumps(good).encode() + b"\n")
    problems = []
    assert [r["kind"] for r in read_records(layout, problems)] == ["start", "video"]
    bad = len(BAD_RECORDS) + len(BAD_LINES)
    assert problems == [f"{bad} unreadable ledger lines in {layout.ledger_dir}/r1.r0.jsonl",
                        f"1 unreadable ledger line in {layout.ledger_dir}/r1.r1.jsonl"]
    assert report_main([str(layout.root)]) == 0  # no traceback, the report is rebuilt
    assert "unreadable ledger lines" in capsys.readouterr().out


@pytest.mark.timeout(10)
def test_a_deep_sidecar_names_its_file(tmp_path):
    from semtrack.config import ExtractConfig
    from semtrack.sidecar import check_sidecar

    config = ExtractConfig(csv_path=str(tmp_path / "v.csv"), base_feat_path=str(tmp_path / "out"), weights="random",
                           use_grid=True)
    config.layout.root.mkdir(parents=True)
    config.layout.sidecar.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(ValueError, match=r"semtrack_config.json: unreadable config sidecar \(JSON nested too deeply"):
        check_sidecar(config, "32-true")


def test_manifest_rows_are_bounded_and_typed_and_errors_name_the_file(tmp_path):
    from semtrack.webdataset import MANIFEST_COLUMNS, read_manifest, read_member

    manifest = tmp_path / "manifest.csv"
    head = ",".join(MANIFEST_COLUMNS) + "\n"
    for cells, message in [("v,d,shards/a.tar,m,1000000000000000000000000000000,10,2,1,done", "offset"),
                           ("v,d,shards/a.tar,m,0,1000000000000,2,1,done", "bytes"),
                           ("v,d,../a.tar,m,0,10,2,1,done", "shard"),
                           ("v,d,shards/a.tar,m,x,10,2,1,done", "offset"),
                           ('v,d,"shards/a.tar', "malformed|fields")]:
        manifest.write_text(head + cells + "\n")
        with pytest.raises(ValueError, match=f"manifest.csv: .*({message})"):
            read_manifest(manifest)
    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "a.tar").write_bytes(b"x" * 100)
    manifest.write_text(head + "v,d,shards/a.tar,m,90,20,2,1,done\n")
    entry = read_manifest(manifest)[("d", "v")]
    with pytest.raises(ValueError, match="too short"):
        read_member(tmp_path, entry)


@pytest.mark.timeout(10)
def test_the_input_csv_must_be_a_regular_file_and_many_columns_are_linear(tmp_path, hostile):
    from semtrack.video import read_video_csv

    for kind in ("fifo", "zero"):
        path = tmp_path / f"{kind}.csv"
        hostile(path, kind)
        with pytest.raises(ValueError, match=f"{kind}.csv: is a"):
            read_video_csv(path)
    with pytest.raises(ValueError, match="/dev/zero: is a character device"):
        read_video_csv("/dev/zero")
    wide = tmp_path / "wide.csv"
    columns = ["video_path", "dataset", *(f"c{i}" for i in range(100_000))]
    wide.write_text(",".join(columns) + "\n" + ",".join(["a.mp4", "d", *("x" * 100_000)]) + "\n")
    assert [r.video_id for r in read_video_csv(wide)] == ["a"]


# ------------------------------------------------------------------------------ records that lie
def _run(tmp_path, rows: int = 2, fps_of=lambda row: 10.0, **options):
    """A `Run` (semtrack.run) of `rows` rows v0, v1, ... of dataset d, each at the frame rate `fps_of(row)`."""
    from semtrack.config import ExtractConfig
    from semtrack.job import Job
    from semtrack.run import Run

    config = ExtractConfig(csv_path=str(tmp_path / "v.csv"), base_feat_path=str(tmp_path / "out"), weights="random",
                           use_grid=True, **options)
    job = Job.of(config)
    job.settle([SimpleNamespace(index=i, dataset="d", video_id=f"v{i}") for i in range(rows)], 0, 1, 1, fps_of)
    return Run(job)


def _finish(run, results) -> None:
    from test_run import WEIGHTS

    from semtrack.ledger import new_run_id

    run.begin(new_run_id(), "32-true", WEIGHTS)
    run.submit(results, {})
    run.finish()
    run.rebuild()


def test_a_future_dated_failed_record_does_not_win_over_a_later_run(tmp_path):
    from test_run import result

    from semtrack.ledger import iter_records, latest_videos

    layout = _run(tmp_path).job.layout
    future = {"kind": "video", "run": "ahead", "rank": 0, "time": 4e9, "seq": 7, "row": 0, "dataset": "d",
              "video_id": "v0", "status": "failed", "stage": "decode", "reason": "x", "video_path": "/v0"}
    LedgerPart(layout.ledger_part("ahead", 0)).append([{**start_record("ahead"), "time": 4e9, "seq": 6}, future])
    run = _run(tmp_path)
    assert run.job.plan.pending == [0, 1] and run.job.plan.last_seq == 7
    _finish(run, [result(0), result(1)])
    assert latest_videos(iter_records(layout))[("d", "v0")]["status"] == "done"
    assert run.report["counts"]["failed"] == 0 and run.report["last_run"]["run_id"] == run.run_id
    assert _run(tmp_path).job.plan.pending == []  # not redone on every later run


def test_a_copied_ledger_file_adds_nothing(tmp_path):
    import shutil

    from test_run import result

    from semtrack.ledger import read_records
    from semtrack.report import build_report

    run = _run(tmp_path)
    _finish(run, [result(0), result(1, ok=False)])
    layout = run.job.layout
    before = build_report(layout, read_records(layout), run.run_id)
    part = next(layout.ledger_dir.glob("*.jsonl"))
    shutil.copy(part, layout.ledger_dir / "backup copy.jsonl")
    after = build_report(layout, read_records(layout))
    assert after["last_run"] == before["last_run"] and after["counts"] == before["counts"]
    assert after["last_run"]["counts"]["done"] == 1 and len(after["runs"]) == 1


def test_adoption_refuses_pickles_made_for_another_video_or_with_other_options(tmp_path):
    from test_run import WEIGHTS, result

    from semtrack.ledger import DoneRule
    from semtrack.sidecar import run_options
    from semtrack.trackfile import save_tracks, tracks_dict

    run = _run(tmp_path, rows=3)
    config, layout = run.job.config, run.job.layout
    options = run_options(config, "32-true")
    other = run_options(_run(tmp_path / "other", n_clusters=config.n_clusters + 3).job.config, "32-true")
    save_tracks(layout.pickle("d", "v0"), tracks_dict(result(0), WEIGHTS, options))  # agrees: adopted
    save_tracks(layout.pickle("d", "v1"), tracks_dict(result(2), WEIGHTS, options))  # another video's
    save_tracks(layout.pickle("d", "v2"), tracks_dict(result(2), WEIGHTS, other))  # other options
    rows = [SimpleNamespace(index=i, dataset="d", video_id=f"v{i}") for i in range(3)]
    rule = DoneRule(layout, {}, want_gif=False, verify=False, options=config.output_options(),
                    row_fps={i: 10.0 for i in range(3)})
    plan = rule.plan(rows)
    assert plan.pending == [1, 2] and [r["video_id"] for r in plan.adopted] == ["v0"]
    assert "video_id 'v2', the row 'v1'" in rule.refused[0] and "other options (n_clusters" in rule.refused[1]
    at_5 = DoneRule(layout, {}, want_gif=False, verify=False, options=config.output_options(), row_fps={0: 5.0})
    assert at_5.plan(rows[:1]).pending == [0]  # made at fps 10, the row now asks for 5


def test_a_changed_row_fps_redoes_the_row(tmp_path):
    from test_run import result

    from semtrack.job import Job
    from semtrack.ledger import read_records

    run = _run(tmp_path)
    _finish(run, [result(0), result(1)])
    assert all(r.get("fps") == 10.0 for r in read_records(run.job.layout) if r["kind"] == "video")
    rows = [SimpleNamespace(index=i, dataset="d", video_id=f"v{i}") for i in range(2)]
    job = Job.of(run.job.config)
    assert job.plan_rows(rows, fps_of=lambda r: 10.0).pending == []
    assert job.plan_rows(rows, fps_of=lambda r: 10.0 if r.index else 5.0).pending == [0]
    assert job.plan_rows(rows, fps_of=lambda r: 10.0 if r.index else None).pending == [0]  # now native


def test_the_two_frame_minimum_applies_per_row(tmp_path, videos_dir):
    from datamodules.video import VideoCSVDataset

    csv = tmp_path / "v.csv"
    csv.write_text(f"video_path,dataset,fps\n{videos_dir / 'cat.mp4'},d,1e-300\n{videos_dir / 'cat.mp4'},e,\n")
    dataset = VideoCSVDataset(csv, fps=10.0)
    assert dataset[0].frames is None and "a track needs at least 2" in dataset[0].error
    assert dataset[1].error is None and dataset[1].frames.shape[0] >= 2


def test_a_link_planted_at_a_folder_of_the_output_folder_is_not_written_through(tmp_path):
    from semtrack.sinks import PickleFiles

    layout = OutputLayout(tmp_path / "out")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "v.pkl").write_text("precious\n")
    (layout.root / "d").mkdir(parents=True)
    (layout.root / "d" / "feat_dump").symlink_to(elsewhere)
    record = {"kind": "video", "row": 0, "dataset": "d", "video_id": "v", "status": "done"}
    with pytest.raises(UnsafeFile, match="feat_dump: is a symbolic link"):
        PickleFiles(layout).add(record, {"pickle": b"data"})
    assert (elsewhere / "v.pkl").read_text() == "precious\n"
    layout.ledger_dir.symlink_to(elsewhere)
    with pytest.raises(FolderBusy, match="ledger: is a symbolic link"):
        FolderLock(layout, Shard()).acquire()
    assert sorted(p.name for p in elsewhere.iterdir()) == ["v.pkl"]
