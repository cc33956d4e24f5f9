"""One process's share of an extraction run, without Lightning: the folder lock, the config sidecar,
the sweep of dead runs' temporary files, the ledger's records, the background writer, the counts and
the report.

    run = Run(job, rank, world_size)       # job: a semtrack.job.Job whose plan is settled
    run.lock()                             # global rank 0: the folder (or shard) lock, else FolderBusy
    run.begin(run_id, precision, weights, sidecar=rank == 0, sweep=local_rank == 0)
    for each batch:
        run.check()                        # Stopped once a stop was requested
        run.submit(results, timings)       # returns at once (see below)
    run.finish()                           # or run.finish(failure=reason) after an error
    report = run.rebuild()                 # global rank 0, once every rank has finished
    run.release()

The background writer. `submit` puts a batch's results on a queue of at most `QUEUE_BATCHES` batches
and returns; it waits only while the queue is full, so at most `QUEUE_BATCHES` + 1 batches of results
(frames included) are held besides the one being computed, and memory stays flat. One writer thread
takes the batches in order. For each batch it sends the GIFs to worker processes
(`semtrack.renders.GifRenderer`, with `--make_vis`), serialises each pickle, hands each video's
members to the output sink (`semtrack.sinks`: files renamed into place, or a tar shard), then appends
the batch's ledger records (each done video's with its track statistics, `semtrack.trackstats`) and
fsyncs them once. So a record is appended only after its outputs are
in place, records reach disk batch by batch in the order the batches were computed, and the main
thread never waits for a pickle, a GIF or an fsync. A video whose outputs cannot be written is
recorded failed (stage `write`) and keeps none of them; an error that says the folder is the problem
(full, read-only, over quota, no permission) requests a stop, and the batches handed over after it
are not written: they stay pending, without a record, for the next run. `finish` waits until every
batch handed over is written (also after SIGTERM / SIGINT), closes the sink and appends the `end`
record; records the folder cannot take are saved to `semtrack.ledger.fallback_path`.
"""
from __future__ import annotations

import os
import queue
import socket
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from typing import Sequence

import semtrack
from semtrack.gif import save_cluster_overlay
from semtrack.hygiene import is_folder_error, sweep
from semtrack.job import Job
from semtrack.ledger import DONE, FAILED, LedgerPart, LedgerTail, done_record, failed_record, fallback_path
from semtrack.records import VideoResult
from semtrack.renders import GifRenderer, gif_processes
from semtrack.report import format_report, rebuild
from semtrack.safeio import real_folder, shown
from semtrack.shards import FolderLock
from semtrack.sidecar import run_options, write_sidecar
from semtrack.sinks import OutputSink, open_sink
from semtrack.stopping import StopRequest
from semtrack.trackfile import dumps_tracks, tracks_dict
from semtrack.trackstats import DIGITS, track_stats
from semtrack.util import one_line

QUEUE_BATCHES = 2  # batches waiting for the writer thread, at most (one more is being written)
DECODE_WAIT_SHARE = 0.10  # warn when the loop waits longer than this share of its compute for decoded videos
DECODE_WAIT_STEPS = 5  # steps after the first before that share is judged


class Run:
    """One process (global `rank` of `world_size`) of a run of `job`; see the module docstring.

    Counts for the progress bar, updated as the writer thread records videos: `done`, `failed`,
    `elapsed` (seconds since `begin`). `stop` is the run's `StopRequest` (given, or its own); `errors`
    one line per thing the run could not write; `report` the folder's report after `rebuild`.
    """

    def __init__(self, job: Job, rank: int = 0, world_size: int = 1, stop: StopRequest | None = None):
        self.job, self.rank, self.world_size = job, rank, world_size
        self.stop = stop if stop is not None else StopRequest()
        self.run_id: str | None = None
        self.started = self.finished = False
        self.done = self.failed = self.points_dropped = 0
        self.stage_totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
        self.data_wait = 0.0
        self.startup_s: float | None = None
        self.errors: list[str] = []
        self.report: dict | None = None
        self._created = self._begun = time.perf_counter()
        self._steps, self._step_wait, self._step_compute, self._warned = 0, 0.0, 0.0, False
        self._unrecorded: list[dict] = []
        self._lock: FolderLock | None = None
        self._ledger: LedgerPart | None = None
        self._sink: OutputSink | None = None
        self._gifs: GifRenderer | None = None
        self._queue: queue.Queue = queue.Queue(QUEUE_BATCHES)
        self._thread: threading.Thread | None = None
        self._options: dict = {}
        self._weights: dict = {}
        self._seq = 0  # the last ledger `seq` this process wrote
        self._tails: list[LedgerTail] | None = None  # the other ranks' ledger files (`all_ranks_counts`)
        self._others = [0, 0]  # done, failed read from them

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._begun

    # ------------------------------------------------------------------ start
    def lock(self) -> None:
        """Take the folder's lock for this job's shard (`semtrack.shards.FolderLock`; FolderBusy)."""
        lock = FolderLock(self.job.layout, self.job.shard)
        lock.acquire()
        self._lock = lock

    def begin(self, run_id: str, precision: str, weights: dict, sidecar: bool = True, sweep_folder: bool = True
              ) -> None:
        """Start recording run `run_id`: the config sidecar (if `sidecar`, never in debug mode), the sweep
        of dead runs' temporaries (if `sweep_folder`: once per host), the ledger's `start` record and
        the adopted ones, the GIF workers and the writer thread. `weights`: {"tracker", "dinov2"} ids
        the models loaded (each pickle's metadata). Raises OSError if the ledger cannot be written."""
        cfg, plan, layout = self.job.config, self.job.plan, self.job.layout
        self.run_id, self._weights = run_id, dict(weights)
        self._seq = plan.last_seq
        self._options = run_options(cfg, precision)
        self._ledger = LedgerPart(layout.ledger_part(run_id, self.rank))
        real_folder(layout.root, layout.ledger_dir)  # UnsafeFile if a link was planted there
        if sidecar and not cfg.debug_mode:
            write_sidecar(cfg, precision)
        if sweep_folder:
            sweep(layout, plan.datasets)
        output_format = "pickle" if cfg.debug_mode else cfg.output_format
        self._sink = open_sink(layout, output_format, run_id, self.rank, cfg.videos_per_tar)
        start = {"kind": "start", "world_size": self.world_size, "shard": [self.job.shard.index, self.job.shard.count],
                 "host": socket.gethostname(), "pid": os.getpid(), "csv_path": cfg.source,
                 "output_format": self._sink.format, "make_vis": cfg.make_vis, "debug": cfg.debug_mode,
                 "semtrack_version": semtrack.__version__, "csv_rows": plan.csv_rows, "csv_keys": plan.csv_keys,
                 "rows": plan.rows, "assigned": plan.assigned, "skipped": plan.skipped,
                 "not_retried": plan.not_retried}
        try:
            self._ledger.append([self._stamp(start), *(self._stamp(r) for r in plan.adopted)])
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write the ledger {self._ledger.path}: {one_line(exc)}") from None
        if cfg.make_vis or cfg.debug_mode:
            # forks its workers before this run starts a thread of its own
            self._gifs = GifRenderer(gif_processes(self.job.cpus_per_device))
        self._thread = threading.Thread(target=self._write_batches, name="semtrack-writer", daemon=True)
        self._thread.start()
        self._begun = time.perf_counter()
        self.started = self.stop.started = True

    def all_ranks_counts(self) -> tuple[int, int]:
        """(done, failed) of every rank of this run so far: this process's counts and what the other
        ranks' ledger files hold (read incrementally; they lag by at most a batch)."""
        if self._tails is None:
            layout = self.job.layout
            self._tails = [LedgerTail(layout.ledger_part(self.run_id, r)) for r in range(self.world_size)
                           if r != self.rank]
        for tail in self._tails:
            for record in tail.read():
                if record.get("kind") == "video" and not record.get("adopted"):
                    self._others[0] += record.get("status") == DONE
                    self._others[1] += record.get("status") == FAILED
        return self.done + self._others[0], self.failed + self._others[1]

    def _stamp(self, record: dict) -> dict:
        """`record` with the run, rank, time and the next Lamport `seq` (`semtrack.ledger`); a video
        record also with its row's target frame rate `fps`, when the plan knows it."""
        self._seq += 1
        stamped = {**record, "run": self.run_id, "rank": self.rank, "time": time.time(), "seq": self._seq}
        if record.get("kind") == "video" and record["row"] in self.job.plan.row_fps:
            stamped.setdefault("fps", self.job.plan.row_fps[record["row"]])
        return stamped

    # ------------------------------------------------------------------ batches (main thread)
    def check(self) -> None:
        """Raise `semtrack.stopping.Stopped` if a stop was requested (a signal, or the folder failed)."""
        self.stop.check()

    def submit(self, results: Sequence[VideoResult], timings: dict[str, tuple[float, int]], wait_s: float = 0.0
               ) -> None:
        """Hand a batch's results, its stage clocks {stage: (seconds, videos)} and the seconds the step
        waited for its decoded videos to the writer thread; waits only while `QUEUE_BATCHES` batches are
        already waiting."""
        self._queue.put((list(results), dict(timings), wait_s))
        if self.startup_s is None:
            self.startup_s = time.perf_counter() - self._created

    def timed(self, wait_s: float, step_s: float) -> None:
        """A step's seconds waiting for decoded videos and computing. Warns once (stderr) when, over the
        steps after the first (at least `DECODE_WAIT_STEPS`), the wait exceeds `DECODE_WAIT_SHARE` of
        the compute: decoding cannot keep up."""
        self.data_wait += wait_s
        self._steps += 1
        if self._steps == 1:
            return  # the first wait is the workers' start-up
        self._step_wait += wait_s
        self._step_compute += step_s
        slow = self._step_wait > DECODE_WAIT_SHARE * self._step_compute
        if self._warned or self._steps <= DECODE_WAIT_STEPS or not slow:
            return
        self._warned = True
        where = f"rank {self.rank}: " if self.world_size > 1 else ""
        print(f"semtrack: {where}warning: decoding cannot keep up: the loop waited {self._step_wait:.1f} s for "
              f"decoded videos over {self._steps - 1} steps that computed {self._step_compute:.1f} s "
              f"({self._step_wait / max(self._step_compute, 1e-9):.0%}); more --num_workers (now "
              f"{self.job.num_workers}) would keep the device busy", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ the writer thread
    def _write_batches(self) -> None:
        while (batch := self._queue.get()) is not None:
            try:
                self._write_batch(*batch)
            except BaseException as exc:  # noqa: BLE001 - an unforeseen error stops the run instead of hanging it
                self.stop.fail(f"the writer failed: {one_line(exc)}")

    def _write_batch(self, results: list[VideoResult], timings: dict, wait_s: float) -> None:
        if self.stop.reason is not None:
            return  # the folder cannot be written: this batch is left for the next run
        for stage, (seconds, videos) in timings.items():
            self.stage_totals[stage][0] += seconds
            self.stage_totals[stage][1] += videos
        clocks = {"step_s": round(sum(s / v for s, v in timings.values() if v), DIGITS),
                  "wait_s": round(wait_s / max(len(results), 1), DIGITS)}  # each video's share of the batch's
        max_width, encoder = self.job.config.vis_max_width, self.job.config.gif_encoder
        gifs = {i: self._gifs.submit(r, max_width, encoder) for i, r in enumerate(results)
                if r.ok and self._gifs is not None}
        records = []
        for i, result in enumerate(results):
            clip = result.clip
            if result.ok:
                records += self._write(result, gifs.get(i), clocks)
            else:
                records.append(failed_record(clip.row, clip.dataset, clip.video_id, result.failure.stage,
                                             result.failure.reason, clip.video_path))
        self._commit(records)

    def _write(self, result: VideoResult, gif: Future | None, clocks: dict) -> list[dict]:
        """Write a tracked video's outputs -> the ledger records now durable, with the video's track
        statistics and `clocks` {"step_s", "wait_s"} (a failure record if writing failed; a
        folder-level error also requests a stop)."""
        start = time.perf_counter()
        clip, tracks = result.clip, result.tracks
        try:
            if self.job.config.debug_mode and result.clusters is not None:
                self._write_overlays(result)
            members = {"pickle": dumps_tracks(tracks_dict(result, self._weights, self._options))}
            if gif is not None:
                members["gif"] = gif.result()
            stats = {**track_stats(tracks.tracks, tracks.visibility, tracks.obj_ids, tracks.query_frames, clip.size),
                     **clocks}
            record = done_record(clip.row, clip.dataset, clip.video_id, int(tracks.tracks.shape[0]),
                                 int(tracks.tracks.shape[1]), stats=stats)
            records = self._sink.add(record, members)
            self.points_dropped += tracks.num_dropped
        except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
            if is_folder_error(exc):
                self.stop.fail(f"cannot write into {self.job.layout.root}: {one_line(exc)}")
            records = [failed_record(clip.row, clip.dataset, clip.video_id, "write", one_line(exc), clip.video_path)]
        self.stage_totals["write"][0] += time.perf_counter() - start
        self.stage_totals["write"][1] += 1
        return records

    def _write_overlays(self, result: VideoResult) -> None:
        """Debug mode: one PNG per clustering frame that points were sampled in, its labels and points."""
        clip, tr, view = result.clip, result.tracks, result.clusters
        frames = clip.frames.permute(0, 2, 3, 1).numpy()  # (T, H, W, 3) uint8
        cluster_frames = clip.cluster_frames.tolist()
        real_folder(self.job.layout.root, self.job.layout.debug_png(clip.dataset, clip.video_id, 0).parent)
        for k in sorted(set(view.source_frames.tolist())):
            idx = (view.source_frames == k).nonzero()[:, 0]
            points = tr.tracks[tr.query_frames[idx], idx]  # (M, 2) the query pixels (x, y)
            save_cluster_overlay(self.job.layout.debug_png(clip.dataset, clip.video_id, cluster_frames[k]),
                                 frames[cluster_frames[k]], view.labels[k].numpy(), points.numpy(),
                                 tr.obj_ids[idx].numpy(), self.job.config.vis_max_width)

    def _commit(self, records: list[dict]) -> None:
        """Append `records` to the ledger (fsynced); if the folder cannot take them they are kept for
        the fallback file and the run stops at the next boundary."""
        records = [self._stamp(r) for r in records]
        self.done += sum(r.get("status") == DONE for r in records)
        self.failed += sum(r.get("status") == FAILED for r in records)
        try:
            self._ledger.append(records)
        except OSError as exc:
            self._unrecorded += records
            self.stop.fail(f"cannot write the ledger {self._ledger.path}: {one_line(exc)}")

    # ------------------------------------------------------------------ end of run
    def _stop_writer(self) -> None:
        """Let the writer thread write every batch handed over, then end it and the GIF workers."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None
        if self._gifs is not None:
            self._gifs.close()
            self._gifs = None

    def finish(self, failure: str | None = None) -> None:
        """Write every batch handed over, close the sink, append the `end` record and save what the
        folder could not take. Status: `failed` with the reason `failure`; else `stopped` when a stop
        was requested (by a signal or by the folder); else `complete`."""
        if self.finished or not self.started:
            return
        self.finished = True
        self._stop_writer()
        try:
            self._commit(self._sink.close())
        except OSError as exc:
            lost = f"the tar shard being written was lost: {one_line(exc)}"
            self._commit([failed_record(r["row"], r["dataset"], r["video_id"], "write", lost, "")
                          for r in self._sink.abandon()])
        if failure is not None:
            status, reason = "failed", failure
        elif self.stop.requested:
            status, reason = "stopped", self.stop.stopped().args[0]
        else:
            status, reason = "complete", None
        end = {"kind": "end", "status": status, "reason": reason, "done": self.done, "failed": self.failed,
               "stage_totals": {k: list(v) for k, v in self.stage_totals.items()}, "wall_s": self.elapsed,
               "data_wait_s": self.data_wait, "points_dropped": self.points_dropped, "startup_s": self.startup_s}
        self._commit([end])
        if self._unrecorded:
            self._save_fallback()

    def _save_fallback(self) -> None:
        path = fallback_path(self.run_id, self.rank)
        try:
            LedgerPart(path).append(self._unrecorded)
            where = (f"{len(self._unrecorded)} ledger record(s) were saved to {path}: copy that file into "
                     f"{self.job.layout.ledger_dir}/ once the folder can be written, then run semtrack-report "
                     f"{self.job.layout.root}")
        except OSError as exc:
            where = f"{len(self._unrecorded)} ledger record(s) could not be saved anywhere ({one_line(exc)})"
        self.errors.append(f"{self.stop.reason or 'the ledger could not be written'}; {where}")

    def rebuild(self) -> dict:
        """The folder's report from the ledger, written to its files and printed (stderr) -> the report."""
        report = rebuild(self.job.layout, self.run_id, self.errors)
        if report["last_run"] is not None:
            self.errors = report["last_run"]["errors"]
        print(format_report(report), file=sys.stderr, flush=True)
        for line in self.errors:
            print(f"error: {shown(line)}", file=sys.stderr, flush=True)
        self.report = report
        return report

    def release(self) -> None:
        """End the writer thread and the GIF workers (if `finish` did not) and drop the folder lock."""
        self._stop_writer()
        if self._lock is not None:
            self._lock.release()
            self._lock = None
