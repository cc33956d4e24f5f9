"""Trail GIFs rendered in worker processes, so drawing never holds the main process's interpreter.

`GifRenderer(processes)` starts its processes at once (forked on Linux, from the thread that makes
it: the run makes it before any other thread of its own); `submit(result, max_width, encoder)` returns a
future of the GIF's bytes (`semtrack.gif.gif_bytes`, drawn in memory: the output sink writes them).
Workers ignore SIGINT, SIGTERM and SIGHUP (`semtrack.stopping.detach_worker`): a stop request is the
main process's to handle, and it waits for the GIFs it asked for. On Linux they are killed when the
main process ends, however it ends (they share its open files, the folder lock's among them). Should
a worker die (e.g. killed for memory), the pool is broken and later GIFs are drawn in the calling
thread instead.

A clip's frames (≈ 9 MB for an SSV2-like clip) reach a worker through a shared-memory slot
(`FrameSlots`): copied into a free slot (≈ 1 ms), the worker maps it by name, and the slot is free
again once the GIF is back. Pickled through the pool's pipe instead they cost ≈ 4 ms of the
interpreter lock (which the main thread needs to launch kernels) and ≈ 10 ms of pipe writes in the
calling process per clip. Slots are unlinked by `close`; after a `kill -9` the interpreter's resource
tracker unlinks them.
"""
from __future__ import annotations

import multiprocessing
import os
import threading
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

import numpy as np

from semtrack.defaults import GIF_ENCODERS
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


def _gif_from_slot(name: str, shape: tuple[int, ...], *rest) -> bytes:
    """`gif_bytes` in a worker, its frames (T, H, W, 3) uint8 read from the shared-memory slot `name`."""
    slot = SharedMemory(name=name)
    try:
        return gif_bytes(np.ndarray(shape, dtype=np.uint8, buffer=slot.buf), *rest)
    finally:
        try:
            slot.close()
        except BufferError:  # a failure's traceback still views the frames: unmapped when it is collected
            pass


class FrameSlots:
    """Shared-memory segments that hold the frames of clips on their way to a GIF worker.

    `take(frames)` copies frames (T, H, W, 3) uint8 into a free slot at least that large (a new one,
    sized to them, when none is free) -> (slot name, shape); `give_back(name)` frees it for the next
    clip. Slots live until `close`: as many as GIFs were once in flight together (the writer's
    bounded queue bounds that), each as large as the largest clip it held; reusing them spares a new
    segment's page faults (≈ 7 ms per 9 MB) per clip.
    """

    def __init__(self):
        self._slots: dict[str, SharedMemory] = {}
        self._free: list[str] = []
        self._lock = threading.Lock()

    def take(self, frames: np.ndarray) -> tuple[str, tuple[int, ...]]:
        with self._lock:
            fits = [name for name in self._free if self._slots[name].size >= frames.nbytes]
            name = min(fits, key=lambda n: self._slots[n].size) if fits else None
            if name is not None:
                self._free.remove(name)
        if name is None:
            slot = SharedMemory(create=True, size=max(frames.nbytes, 1))
            name = slot.name
            with self._lock:
                self._slots[name] = slot
        np.ndarray(frames.shape, dtype=np.uint8, buffer=self._slots[name].buf)[...] = frames
        return name, frames.shape

    def give_back(self, name: str) -> None:
        with self._lock:
            self._free.append(name)

    def close(self) -> None:
        """Unlink every slot (none may be in use)."""
        with self._lock:
            for slot in self._slots.values():
                slot.close()
                try:
                    slot.unlink()
                except FileNotFoundError:  # already gone (someone cleaned /dev/shm)
                    pass
            self._slots.clear()
            self._free.clear()


class GifRenderer:
    """`processes` workers drawing GIFs (see the module docstring); `close` waits for them to end."""

    def __init__(self, processes: int = GIF_PROCESSES):
        resource_tracker.ensure_running()  # before the fork: the workers report the slots they map to this one
        fork = "fork" in multiprocessing.get_all_start_methods()
        context = multiprocessing.get_context("fork" if fork else None)
        self._pool = ProcessPoolExecutor(processes, mp_context=context, initializer=detach_worker,
                                         initargs=(os.getpid(),))
        self._pool.submit(int).result()  # forks every worker now, from this thread
        self._broken = False
        self._slots = FrameSlots()

    def submit(self, result, max_width: int | None, encoder: str = GIF_ENCODERS[0]) -> Future:
        """A future of the GIF's bytes of tracked `result` (a `VideoResult`), `max_width` px wide at
        most, written by `encoder` (one of `GIF_ENCODERS`)."""
        args = (*gif_arrays(result), max_width, encoder)
        if not self._broken:
            name, shape = self._slots.take(args[0])
            try:
                future = self._pool.submit(_gif_from_slot, name, shape, *args[1:])
            except BrokenProcessPool:
                self._slots.give_back(name)
                self._broken = True
            else:
                future.add_done_callback(lambda _: self._slots.give_back(name))
                return future
        done: Future = Future()
        try:
            done.set_result(gif_bytes(*args))
        except Exception as exc:  # noqa: BLE001 - the caller records it against the video
            done.set_exception(exc)
        return done

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._slots.close()
