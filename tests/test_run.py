"""The run without Lightning (`semtrack.run.Run`): its records, its background writer's promises, a
failing video, a folder that fails, GIFs from the worker processes; the default number of decoding
workers. Synthetic results, no models."""
from __future__ import annotations

import errno
import io
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from _shared import REPO_ROOT
from semtrack.config import ExtractConfig
from semtrack.defaults import GIF_ENCODERS
from semtrack.gif import gif_bytes, save_trail_gif
from semtrack.job import MAX_DEFAULT_WORKERS, Job, cpus_per_device, default_num_threads, default_num_workers
from semtrack.layout import OutputLayout
from semtrack.ledger import LedgerPart, read_records
from semtrack.records import Clip, Failure, Tracks, VideoResult
from semtrack.renders import GifRenderer, gif_arrays, gif_processes
from semtrack.run import QUEUE_BATCHES, Run
from semtrack.shards import FolderBusy, FolderLock, Shard
from semtrack.sidecar import run_options
from semtrack.sinks import PickleFiles
from semtrack.stopping import Stopped
from semtrack.trackfile import load_tracks

WEIGHTS = {"tracker": "random:test", "dinov2": None}


def result(row: int, t: int = 3, n: int = 4, ok: bool = True) -> VideoResult:
    """A tracked (or, `ok=False`, undecodable) video of t frames at 24x32 with n points."""
    frames = torch.arange(t * 3 * 24 * 32, dtype=torch.int64).remainder(251).to(torch.uint8).reshape(t, 3, 24, 32)
    clip = Clip(row, f"v{row}", "d", f"/videos/v{row}.mp4", frames=frames if ok else None,
                frame_times=torch.arange(t, dtype=torch.float64) / 10, source_fps=10.0, fps=10.0,
                cluster_frames=torch.arange(t), decoder="pyav", error=None if ok else "broken")
    if not ok:
        return VideoResult(clip, failure=Failure("decode", "broken"))
    tracks = Tracks(torch.rand(t, n, 2, generator=torch.Generator().manual_seed(row)) * 20,
                    torch.ones(t, n, dtype=torch.bool), torch.arange(n) % 2, torch.zeros(n, dtype=torch.int64))
    return VideoResult(clip, tracks)


def make_run(tmp_path, rows: int, **options) -> Run:
    config = ExtractConfig(csv_path=str(tmp_path / "v.csv"), base_feat_path=str(tmp_path / "out"), weights="random",
                           use_grid=True, **options)
    job = Job.of(config)
    job.settle([SimpleNamespace(index=i, dataset="d", video_id=f"v{i}") for i in range(rows)], 0, 1, 1)
    return Run(job)


def videos(run: Run) -> list[dict]:
    return [r for r in read_records(run.job.layout) if r["kind"] == "video"]


def test_a_run_without_a_trainer_records_writes_and_reports(tmp_path, capsys):
    run = make_run(tmp_path, rows=3)
    run.lock()
    run.begin("R1", "32-true", WEIGHTS)
    run.check()
    run.submit([result(0), result(1, ok=False)], {"tracking": (2.0, 1)})
    run.submit([result(2, t=5)], {"tracking": (1.0, 1)})
    run.finish()
    report = run.rebuild()
    run.release()
    layout = run.job.layout
    assert [r["kind"] for r in read_records(layout)] == ["start", "video", "video", "video", "end"]
    assert report["counts"] == {"rows": 3, "done": 2, "failed": 1, "pending": 0}
    assert report["last_run"]["status"] == "complete" and report["last_run"]["stage_mean_s"]["tracking"] == 1.5
    assert [(f["row"], f["stage"]) for f in report["failures"]] == [(1, "decode")]
    tf = load_tracks(layout.pickle("d", "v2"))
    assert tf.num_frames == 5 and tf.meta["mode"] == "grid" and tf.meta["tracker_weights"] == "random:test"
    assert tf.meta["config"] == run_options(run.job.config, "32-true") and layout.sidecar.is_file()
    assert "3 rows: 2 done, 1 failed, 0 pending" in capsys.readouterr().err
    assert (run.done, run.failed) == (2, 1)


def test_a_video_that_cannot_be_written_fails_alone(tmp_path):
    run = make_run(tmp_path, rows=3)
    run.job.layout.pickle("d", "v1").mkdir(parents=True)  # a folder where the pickle goes: EISDIR on rename
    run.begin("R1", "32-true", WEIGHTS)
    run.submit([result(0), result(1), result(2)], {})
    run.finish()
    status = {r["video_id"]: (r["status"], r.get("stage")) for r in videos(run)}
    assert status == {"v0": ("done", None), "v1": ("failed", "write"), "v2": ("done", None)}
    assert [r["status"] for r in read_records(run.job.layout) if r["kind"] == "end"] == ["complete"]
    assert not run.stop.requested  # one video's problem, not the folder's


class GatedSink(PickleFiles):
    """PickleFiles whose `add` waits for `gate` (`entered` once it does)."""

    def __init__(self, layout, gate: threading.Event):
        super().__init__(layout)
        self.gate, self.entered = gate, threading.Event()

    def add(self, record, members):
        self.entered.set()
        assert self.gate.wait(60)
        return super().add(record, members)


def test_the_writer_runs_behind_the_step_in_order_and_a_stop_writes_what_it_was_handed(tmp_path, monkeypatch):
    run = make_run(tmp_path, rows=8)
    appended: list[tuple[str, bool]] = []
    real_append = LedgerPart.append

    def append(part, records):  # each done record: were its outputs in place when it was appended?
        appended.extend((r["video_id"], run.job.layout.pickle("d", r["video_id"]).is_file()) for r in records
                        if r.get("status") == "done")
        real_append(part, records)

    monkeypatch.setattr(LedgerPart, "append", append)
    sink = GatedSink(run.job.layout, threading.Event())
    monkeypatch.setattr("semtrack.run.open_sink", lambda *args: sink)
    run.begin("R1", "32-true", WEIGHTS)
    run.submit([result(0)], {})  # returns while the writer waits at the gate
    assert sink.entered.wait(60) and videos(run) == []
    for row in range(1, 1 + QUEUE_BATCHES):
        run.submit([result(row)], {})  # fills the queue
    late = threading.Thread(target=run.submit, args=([result(7)], {}))
    late.start()
    late.join(0.5)
    assert late.is_alive()  # the queue is full: the step would wait, memory stays bounded
    run.stop.signum = signal.SIGTERM  # as the SIGTERM handler does
    with pytest.raises(Stopped):
        run.check()
    sink.gate.set()
    late.join(60)
    run.finish()
    assert appended == [(f"v{i}", True) for i in [*range(1 + QUEUE_BATCHES), 7]]  # in order, outputs first
    end = [r for r in read_records(run.job.layout) if r["kind"] == "end"][0]
    assert (end["status"], end["reason"], end["done"]) == ("stopped", "stopped by SIGTERM", 2 + QUEUE_BATCHES)


def test_a_folder_error_stops_the_run_and_leaves_later_batches_pending(tmp_path, monkeypatch):
    run = make_run(tmp_path, rows=4)
    real_add = PickleFiles.add

    def add(sink, record, members):
        if record["video_id"] == "v1":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_add(sink, record, members)

    monkeypatch.setattr(PickleFiles, "add", add)
    run.begin("R1", "32-true", WEIGHTS)
    run.submit([result(0), result(1)], {})
    run.submit([result(2)], {})
    run.submit([result(3)], {})
    run.finish()
    status = {r["video_id"]: r["status"] for r in videos(run)}
    assert status == {"v0": "done", "v1": "failed"}  # v2 and v3 were handed over after the error: not written
    assert not run.job.layout.pickle("d", "v2").exists()
    assert "No space left" in run.stop.reason
    with pytest.raises(Stopped, match="No space left"):
        run.check()
    end = [r for r in read_records(run.job.layout) if r["kind"] == "end"][0]
    assert end["status"] == "stopped" and "No space left" in end["reason"]


@pytest.mark.parametrize("encoder", GIF_ENCODERS)
def test_gifs_drawn_by_the_worker_processes_equal_the_renderer_s(tmp_path, encoder):
    run = make_run(tmp_path, rows=2, make_vis=True, vis_max_width=16, gif_encoder=encoder)
    run.begin("R1", "32-true", WEIGHTS)
    video = result(0, t=4, n=6)
    run.submit([video, result(1)], {})
    run.finish()
    layout = run.job.layout
    expected = tmp_path / "expected.gif"
    clip, tr = video.clip, video.tracks
    save_trail_gif(expected, clip.frames.permute(0, 2, 3, 1).numpy(), tr.tracks.numpy(), tr.visibility.numpy(),
                   tr.obj_ids.numpy(), clip.frame_times.numpy(), 16, encoder)
    assert layout.gif("d", "v0").read_bytes() == expected.read_bytes()
    assert {r["video_id"]: r["outputs"]["gif"]["bytes"] for r in videos(run)} == {
        "v0": expected.stat().st_size, "v1": layout.gif("d", "v1").stat().st_size}
    assert not [p for p in layout.root.iterdir() if ".tmp-" in p.name]  # the scratch files are gone


def test_gif_frames_pass_through_reused_shared_memory_slots_that_close_unlinks():
    """Each GIF's frames go to a worker through a shared-memory slot, freed when the GIF is back and
    reused by the next clip that fits; the worker's GIF equals one drawn here; `close` unlinks every slot."""
    renderer = GifRenderer(processes=2)
    try:
        clips = [result(i, t=4 + i % 3, n=6) for i in range(12)]
        gifs = []
        for wave in range(0, len(clips), 3):  # 3 GIFs in flight at a time
            gifs += [f.result() for f in [renderer.submit(video, 16) for video in clips[wave: wave + 3]]]
            deadline = time.time() + 10
            while len(renderer._slots._free) < len(renderer._slots._slots):  # given back just after the result
                assert time.time() < deadline
                time.sleep(0.01)
        slots = dict(renderer._slots._slots)
        assert 1 <= len(slots) <= 3  # reused: as many as GIFs were in flight together, not one per clip
        for name in slots:
            assert Path("/dev/shm", name.lstrip("/")).exists()
        for video, data in zip(clips, gifs):
            assert data == gif_bytes(*gif_arrays(video), max_width=16)
    finally:
        renderer.close()
    assert not [name for name in slots if Path("/dev/shm", name.lstrip("/")).exists()]


def test_a_killed_run_s_gif_workers_do_not_keep_the_folder_locked(tmp_path):
    """The GIF workers are forked with the lock's file open; a kill -9 of the run must end them too."""
    code = (f"import sys, time; sys.path.insert(0, {str(REPO_ROOT)!r})\n"
            "from semtrack.layout import OutputLayout\nfrom semtrack.shards import FolderLock, Shard\n"
            "from semtrack.renders import GifRenderer\n"
            f"FolderLock(OutputLayout({str(tmp_path)!r}), Shard()).acquire()\n"
            "gifs = GifRenderer()\nprint('ready', flush=True)\ntime.sleep(300)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()
    lock, deadline = FolderLock(OutputLayout(tmp_path), Shard()), time.time() + 60
    while True:
        try:
            lock.acquire()
            break
        except FolderBusy:
            assert time.time() < deadline, "the killed run's GIF workers still hold the folder lock"
            time.sleep(0.1)
    lock.release()


def test_decode_wait_is_warned_about_once(tmp_path, capsys):
    run = make_run(tmp_path, rows=1)
    run.timed(30.0, 1.0)  # the first step waits for the workers to start: not judged
    for _ in range(5):
        run.timed(0.05, 1.0)
    assert "warning" not in capsys.readouterr().err
    for _ in range(3):
        run.timed(0.5, 1.0)
    err = capsys.readouterr().err
    assert err.count("warning: decoding cannot keep up") == 1 and "--num_workers" in err
    assert run.data_wait == pytest.approx(30.0 + 0.25 + 1.5)


def test_the_default_number_of_decoding_workers_follows_the_cpus_per_device(tmp_path):
    assert default_num_workers(1, {}, cpus=2)[0] == 1  # one CPU left to the main process
    assert default_num_workers(2, {}, cpus=16)[0] == 7  # two devices share 16 CPUs
    assert default_num_workers(1, {}, cpus=64)[0] == MAX_DEFAULT_WORKERS
    assert default_num_workers(8, {}, cpus=8)[0] == 1
    assert default_num_workers(8, {"SLURM_CPUS_PER_TASK": "6"}, cpus=6)[0] == 5  # SLURM bound this task to 6
    assert default_num_workers(8, {"SLURM_CPUS_PER_TASK": "6"}, cpus=48)[0] == 5  # 48 shared by 8 tasks
    count, note = default_num_workers(1, {}, cpus=4)
    assert count == 3 and "4 CPU(s) per device" in note
    given = make_run(tmp_path, rows=1, num_workers=0).job
    assert (given.num_workers, given.workers_note) == (0, "--num_workers")
    assert make_run(tmp_path, rows=1).job.num_workers == default_num_workers(1)[0] >= 1


def test_gif_workers_follow_the_cpus_per_device(tmp_path):
    assert [gif_processes(c) for c in (None, 1, 8, 16, 20, 64)] == [2, 2, 2, 4, 5, 8]
    assert cpus_per_device(2, {}, cpus=16) == 8 and cpus_per_device(8, {"SLURM_CPUS_PER_TASK": "6"}, cpus=6) == 6
    run = make_run(tmp_path, rows=1, make_vis=True)
    assert run.job.cpus_per_device == cpus_per_device(1)
    run.begin("R1", "32-true", WEIGHTS)
    try:
        assert run._gifs._pool._max_workers == gif_processes(cpus_per_device(1))
    finally:
        run.finish()


def test_the_default_number_of_threads_leaves_the_decoding_workers_their_cpus(tmp_path):
    assert default_num_threads(1, 0, ceiling=8, environ={}, cpus=2)[0] == 2  # no workers: every CPU
    assert default_num_threads(1, 1, ceiling=8, environ={}, cpus=2)[0] == 1  # the default worker takes one
    assert default_num_threads(2, 0, ceiling=8, environ={}, cpus=2)[0] == 1  # two ranks share two CPUs
    assert default_num_threads(2, 7, ceiling=64, environ={}, cpus=32)[0] == 9  # 16 per device less 7 workers
    assert default_num_threads(1, 0, ceiling=4, environ={}, cpus=16)[0] == 4  # never above torch's own count
    assert default_num_threads(8, 1, ceiling=8, environ={}, cpus=8)[0] == 1  # at least one
    assert default_num_threads(8, 2, ceiling=8, environ={"SLURM_CPUS_PER_TASK": "6"}, cpus=6)[0] == 4
    count, note = default_num_threads(1, 3, ceiling=64, environ={}, cpus=16)
    assert count == 13 and "16 CPU(s) per device less 3 decoding worker(s)" == note
    given = make_run(tmp_path, rows=1, num_threads=3).job
    assert (given.num_threads, given.threads_note) == (3, "--num_threads")


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def test_progress_is_a_line_in_a_log_and_a_bar_on_a_terminal_with_every_ranks_counts():
    from semtrack.writer import ExtractionProgressBar

    run = SimpleNamespace(all_ranks_counts=lambda: (5, 1), elapsed=10.0)
    for tty in (False, True):
        writer = SimpleNamespace(run=run, pending_total=8, skipped_total=2, progress=None)
        stream = _Stream(tty)
        bar = ExtractionProgressBar(writer, stream)
        assert writer.progress is bar
        bar.on_predict_start(SimpleNamespace(is_global_zero=True), None)
        bar.on_predict_batch_end(None, None, None, None, 0)  # within 30 s of the start: no line in a log
        bar.final()
        text = stream.getvalue()
        if tty:
            assert "\r" in text and "6/8" in text and "done=5" in text and "failed=1" in text
        else:
            assert text == "semtrack: 6/8 videos: 5 done, 1 failed, 2 skipped, 0.50 done/s, 10 s\n"
    quiet = ExtractionProgressBar(SimpleNamespace(run=run, pending_total=8, skipped_total=0), _Stream(False))
    quiet.on_predict_start(SimpleNamespace(is_global_zero=False), None)  # other ranks show nothing
    quiet.final()
    assert quiet.stream.getvalue() == ""


def test_debug_mode_counts_only_the_first_row_in_its_folder(tmp_path):
    """The debug folder only ever holds the CSV's first row: its report must not call the rest pending."""
    plan = make_run(tmp_path, rows=14, debug_mode=True).job.plan
    assert (plan.rows, plan.csv_rows, plan.pending) == (1, 1, [0])
    assert make_run(tmp_path, rows=14).job.plan.csv_rows == 14
