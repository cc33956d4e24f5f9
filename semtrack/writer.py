"""The job's Lightning side: `TrackWriter` turns the predict loop's hooks into calls on the run
(`semtrack.run.Run`, which does the bookkeeping and the writing), adds the DDP broadcasts and the
barrier, and `ExtractionProgressBar` shows the counts of every rank on stderr.

Order of a run, per process: `setup` (signal handlers, the folder lock on global rank 0, torch's
thread count from the job, the plan line, "loading models"), the models load, `on_predict_start`
(the run id from rank 0, `Run.begin`, "decoding the first videos"), each batch (`Run.submit`
hands the results to the background writer; a stop request is honoured at each batch boundary),
then `on_predict_end` (`Run.finish`, a barrier, rank 0 rebuilds the report and broadcasts it) or,
when the run stops or fails, `on_exception` (the same, without waiting for the other ranks).
"""
from __future__ import annotations

import sys
import time

import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.callbacks.progress import ProgressBar
from tqdm import tqdm

from semtrack.config import ExtractConfig
from semtrack.ledger import new_run_id
from semtrack.run import Run
from semtrack.safeio import shown
from semtrack.shards import FolderBusy
from semtrack.stopping import Stopped, StopRequest
from semtrack.util import one_line

MAX_NOTES = 5  # start-up warnings shown (skipped ledger lines, pickles not adopted), at most
LINE_INTERVAL_S = 30.0  # s between progress lines when stderr is not a terminal


def say(trainer, text: str) -> None:
    """One line on stderr from global rank 0: what the run is doing while the bar has nothing to show."""
    if trainer.is_global_zero:
        print(f"semtrack: {shown(text)}", file=sys.stderr, flush=True)  # names' control characters escaped


class TrackWriter(BasePredictionWriter):
    """Hands each batch's results to the run as the step returns (`write_interval="batch"`).

    Publishes `run` (this process's `Run`, from `setup`), `stop` (its `StopRequest`, installed before
    the preflight checks), `started`, `last_write_s` (seconds the main thread spent handing the last
    batch over) and, after the run, `report` (the folder's report, on every rank). Needs the
    DataModule's `job` (`semtrack.job.Job`, its plan settled in the DataModule's `setup`).
    """

    def __init__(self, config: ExtractConfig):
        super().__init__(write_interval="batch")
        self.config = config
        self.stop = StopRequest()
        self.run: Run | None = None
        self.report: dict | None = None
        self.last_write_s = 0.0
        self._setup_time = self._batch_start = self._batch_end = self._wait = 0.0
        self._threads_before: int | None = None
        self.progress: ExtractionProgressBar | None = None  # the bar, which registers itself
        self.pending_total = self.skipped_total = 0  # over every rank, from `setup`

    @property
    def started(self) -> bool:
        """Whether videos are being processed (the run has begun)."""
        return self.run is not None and self.run.started

    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._setup_time = time.perf_counter()
        self.stop.install()
        self.report = None
        self.run = Run(trainer.datamodule.job, trainer.global_rank, trainer.world_size, self.stop)
        refusal = None
        if trainer.is_global_zero:
            try:
                self.run.lock()
            except FolderBusy as exc:
                refusal = str(exc)
        refusal = trainer.strategy.broadcast(refusal, src=0)
        if refusal:
            raise FolderBusy(refusal)
        job, plan = self.run.job, self.run.job.plan
        self._threads_before = torch.get_num_threads()
        torch.set_num_threads(job.num_threads)  # the models load and run with it
        counts = torch.tensor([len(plan.pending), plan.skipped, plan.not_retried],
                              device=trainer.strategy.root_device)
        pending, skipped, not_retried = (int(v) for v in trainer.strategy.reduce(counts, reduce_op="sum"))
        self.pending_total, self.skipped_total = pending, skipped
        where = "" if job.shard.count == 1 else f"{job.shard.describe()}: "
        earlier = f", {not_retried} failed earlier (not retried)" if not_retried else ""
        say(trainer, f"{where}{plan.rows} rows, {pending} to do, {skipped - not_retried} done already{earlier}; "
                     f"{job.num_workers} decoding "
                     f"worker(s) per device ({job.workers_note}), {job.num_threads} torch thread(s) per process "
                     f"({job.threads_note}); loading models")
        for note in plan.notes[:MAX_NOTES]:
            say(trainer, f"warning: {note}")
        if len(plan.notes) > MAX_NOTES:
            say(trainer, f"warning: ... and {len(plan.notes) - MAX_NOTES} more")

    def on_predict_start(self, trainer, pl_module) -> None:
        run_id = trainer.strategy.broadcast(new_run_id() if trainer.is_global_zero else None, src=0)
        self.run.begin(run_id, trainer.precision, pl_module.weights_ids(), sidecar=trainer.is_global_zero,
                       sweep_folder=trainer.local_rank == 0)
        say(trainer, f"models loaded in {time.perf_counter() - self._setup_time:.1f} s; decoding the first videos")
        self._batch_end = time.perf_counter()
        self.stop.check()

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._batch_start = time.perf_counter()
        self._wait = self._batch_start - self._batch_end  # waiting for the DataLoader
        self.stop.check()  # a batch decoded after a stop request is abandoned

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx,
                           dataloader_idx) -> None:
        """`prediction`: the step's `semtrack.pipeline.BatchResult`."""
        start = time.perf_counter()
        self.run.submit(prediction.results, prediction.timings, self._wait)
        self._batch_end = time.perf_counter()
        self.last_write_s = self._batch_end - start
        self.run.timed(self._wait, start - self._batch_start)
        self.stop.check()

    def on_predict_end(self, trainer, pl_module) -> None:
        self.run.finish()
        trainer.strategy.barrier("semtrack_report")
        if self.progress is not None:
            self.progress.final()
        report = self.run.rebuild() if trainer.is_global_zero else None
        self.report = trainer.strategy.broadcast(report, src=0)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        """A stopped or failed run: save what it did, without waiting for other ranks."""
        if not self.started or self.run.finished:
            return
        stopped = isinstance(exception, Stopped) or self.stop.requested
        self.run.finish(None if stopped else one_line(exception))
        if trainer.is_global_zero:
            self.report = self.run.rebuild()

    def release(self) -> None:
        """Drop the signal handlers, the writer thread and the folder lock and restore torch's thread
        count (after the run, whatever its outcome)."""
        self.stop.restore()
        if self._threads_before is not None:
            torch.set_num_threads(self._threads_before)
            self._threads_before = None
        if self.run is not None:
            self.run.release()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.release()


class ExtractionProgressBar(ProgressBar):
    """The run's progress on stderr, shown by global rank 0 for every rank: videos handled of those
    to do, done, failed, skipped, done videos per second. On a terminal a tqdm bar; otherwise (a log
    file, a pipe) one line at most every `LINE_INTERVAL_S` and one when the last video is written."""

    def __init__(self, writer: TrackWriter, stream=None):
        super().__init__()
        self.writer, self.stream = writer, stream  # stream None: sys.stderr at the time of the run
        self._enabled, self._active = True, False
        self._bar = None
        self._last_line = 0.0
        writer.progress = self

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def on_predict_start(self, trainer, pl_module) -> None:
        self._active = self._enabled and trainer.is_global_zero
        if not self._active:
            return
        stream = self.stream or sys.stderr
        if stream.isatty():
            self._bar = tqdm(total=self.writer.pending_total, desc="semtrack", unit="video", file=stream,
                             dynamic_ncols=True)
        self._last_line = time.perf_counter()

    def _show(self, final: bool = False) -> None:
        run = self.writer.run
        done, failed = run.all_ranks_counts()
        rate = f"{done / max(run.elapsed, 1e-9):.2f}"  # done videos only
        skipped = self.writer.skipped_total
        if self._bar is not None:
            self._bar.n = done + failed
            self._bar.set_postfix({"done": done, "failed": failed, "skipped": skipped, "done/s": rate}, refresh=False)
            self._bar.refresh()
            if final:
                self._bar.close()
                self._bar = None
        elif final or time.perf_counter() - self._last_line >= LINE_INTERVAL_S:
            self._last_line = time.perf_counter()
            print(f"semtrack: {done + failed}/{self.writer.pending_total} videos: {done} done, {failed} failed, "
                  f"{skipped} skipped, {rate} done/s, {run.elapsed:.0f} s", file=self.stream or sys.stderr,
                  flush=True)

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._active:
            self._show()

    def final(self) -> None:
        """The counts once every rank has written its videos (called by the writer before its report)."""
        if self._active:
            self._show(final=True)
            self._active = False

    def teardown(self, trainer, pl_module, stage: str) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
