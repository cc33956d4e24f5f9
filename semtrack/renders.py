"""Trail GIFs rendered in worker processes, so drawing never holds the main process's interpreter.

`GifRenderer(processes)` starts its processes at once (forked on Linux, from the thread that makes
it: the run makes it before any other thread of its own); `submit(result, max_width)` returns a
future of the GIF's bytes (`semtrack.gif.gif_bytes`, drawn in memory: the output sink writes them).
Workers ignore SIGINT, SIGTERM and SIGHUP (`semtrack.stopping.detach_worker`): a stop request is the
main process's to handle, and it waits for the GIFs it asked for. On Linux they are killed when the
main process ends, however it ends (they share its open files, the folder lock's among them). Should
a worker die (e.g. killed for memory), the pool is broken and later GIFs are drawn in the calling
thread instead.
"""
from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from semtrack.gif import gif_bytes
from semtrack.stopping import detach_worker

GIF_PROCESSES = 2  # worker processes drawing GIFs, at least (a 30-frame GIF costs 50-100 ms of CPU)
CPUS_PER_GIF_PROCESS = 4  # one GIF worker per this many CPUs per device, beyond that
MAX_GIF_PROCESSES = 8  # at most (memory: each is a fork of the main process)


def gif_processes(cpus_per_device: int | None) -> int:
    """GIF workers for a device with `cpus_per_device` CPUs (None: unknown): one per
    `CPUS_PER_GIF_PROCESS`, at least `GIF_PROCESSES`, at most `MAX_GIF_PROCESSES` (at 25 videos/s and
    ≈ 90 ms of CPU per GIF a device keeps 2.3 workers busy: 4 on a 16-CPU share)."""
    return min(MAX_GIF_PROCESSES, max(GIF_PROCESSES, (cpus_per_device or 0) // CPUS_PER_GIF_PROCESS))


def gif_arrays(result) -> tuple:
    """`gif_bytes`'s arrays of a tracked `VideoResult`: frames (T, H, W, 3) uint8, tracks (T, N, 2)
    float32, visibility (T, N) bool, obj_ids (N,) int64, frame_times (T,) float64 seconds."""
    clip, tr = result.clip, result.tracks
    return (clip.frames.permute(0, 2, 3, 1).numpy(), tr.tracks.float().numpy(), tr.visibility.numpy(),
            tr.obj_ids.numpy(), clip.frame_times.numpy())


class GifRenderer:
    """`processes` workers drawing GIFs (see the module docstring); `close` waits for them to end."""

    def __init__(self, processes: int = GIF_PROCESSES):
        fork = "fork" in multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if fork else None)
        self._pool = ProcessPoolExecutor(processes, mp_context=context, initializer=detach_worker,
                                         initargs=(os.getpid(),))
        self._pool.submit(int).result()  # forks every worker now, from this thread
        self._broken = False

    def submit(self, result, max_width: int | None) -> Future:
        """A future of the GIF's bytes of tracked `result` (a `VideoResult`), `max_width` px wide at most."""
        args = (*gif_arrays(result), max_width)
        if not self._broken:
            try:
                return self._pool.submit(gif_bytes, *args)
            except BrokenProcessPool:
                self._broken = True
        done: Future = Future()
        try:
            done.set_result(gif_bytes(*args))
        except Exception as exc:  # noqa: BLE001 - the caller records it against the video
            done.set_exception(exc)
        return done

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
