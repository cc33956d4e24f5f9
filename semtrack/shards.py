"""Which CSV rows a job runs, and the locks that keep two jobs from writing the same rows.

A job runs shard `index` of `count`: the CSV rows whose index (0-based, after the header) is
`index` modulo `count`. Shards need no communication: each job is its own run with its own ledger
files, and `semtrack-report` merges them. Inside a job, DDP ranks split the shard's rows in turn
(rank r takes every `world_size`-th from the r-th).

Locks (`fcntl.flock`, advisory, in `<root>/ledger/`): a run of the whole folder holds `.lock`
exclusively; a shard run holds `.lock` shared and `.lock-shard-<i>-of-<n>` exclusively. So two
runs of one shard, two whole-folder runs, or a whole-folder run and a shard run refuse each other,
while different shards run side by side. Locks go with the process that holds them (also on kill -9).
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
import warnings
from dataclasses import dataclass
from typing import Mapping, Sequence

from semtrack.layout import OutputLayout
from semtrack.safeio import UnsafeFile, open_regular, real_folder, shown

SLURM_COUNT, SLURM_ID = "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_ID"
SLURM_MIN, SLURM_STEP = "SLURM_ARRAY_TASK_MIN", "SLURM_ARRAY_TASK_STEP"
_NO_LOCKS = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)  # filesystems without flock


@dataclass(frozen=True)
class Shard:
    """Shard `index` of `count` (0 <= index < count)."""

    index: int = 0
    count: int = 1

    def rows(self, rows: Sequence) -> list:
        """The rows of this shard (objects with `index`), in CSV order."""
        return list(rows) if self.count == 1 else [r for r in rows if r.index % self.count == self.index]

    def describe(self) -> str:
        return "all rows" if self.count == 1 else f"shard {self.index} of {self.count}"


def _slurm_int(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise ValueError(f"${name}={environ[name]!r} is not an integer") from None


def slurm_shard(environ: Mapping[str, str]) -> tuple[int | None, int | None]:
    """(index, count) of a SLURM array task: (ID - MIN) / STEP and COUNT; (None, None) outside arrays."""
    if SLURM_ID not in environ or SLURM_COUNT not in environ:
        return None, None
    task, count = _slurm_int(environ, SLURM_ID), _slurm_int(environ, SLURM_COUNT)
    first = _slurm_int(environ, SLURM_MIN) if SLURM_MIN in environ else 0
    step = _slurm_int(environ, SLURM_STEP) if SLURM_STEP in environ else 1
    return (task - first) // max(step, 1), count


def resolve_shard(num_shards: int | None, shard_index: int | None, environ: Mapping[str, str] = os.environ) -> Shard:
    """The job's shard: the flags, each one missing taken from the SLURM array variables; no flag and
    no array: every row. Raises ValueError for a shard outside 0..count-1 or a count without index."""
    env_index, env_count = slurm_shard(environ)
    count = num_shards if num_shards is not None else env_count
    index = shard_index if shard_index is not None else env_index
    if count is None and index is None:
        return Shard()
    if count is None or index is None:
        raise ValueError("--num_shards and --shard_index go together (outside a SLURM array give both)")
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard index {index} is outside 0..{count - 1} (--num_shards {count})")
    return Shard(index, count)


# ---------------------------------------------------------------------------------------------
# Locks
# ---------------------------------------------------------------------------------------------


class FolderBusy(ValueError):
    """Another run holds the lock this run needs; the message says which and what to do."""


def _owner_line() -> str:
    return f"host {socket.gethostname()}, pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"


def _write_owner(path, locked: int) -> None:
    """Write `_owner_line` into the lock file `path` held through descriptor `locked`, through a second
    descriptor opened without following links and checked to be the same file."""
    try:
        fd = open_regular(path, None, os.O_WRONLY)
    except (OSError, UnsafeFile):
        return  # replaced since it was locked: the holder stays unnamed
    try:
        mine, theirs = os.fstat(fd), os.fstat(locked)
        if (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino):
            os.ftruncate(fd, 0)
            os.write(fd, (_owner_line() + "\n").encode("utf-8", "replace"))
    except OSError:
        pass
    finally:
        os.close(fd)


class FolderLock:
    """The advisory locks of one run (see the module docstring); `acquire` raises `FolderBusy`.
    On a filesystem without `flock` (some Lustre mounts) the run goes on unlocked, with a warning."""

    def __init__(self, layout: OutputLayout, shard: Shard):
        self.layout, self.shard = layout, shard
        self._fds: list[int] = []

    def acquire(self) -> None:
        root = self.layout.root
        try:
            if self.shard.count == 1:
                self._take("", fcntl.LOCK_EX, lambda holder: f"another semtrack run is writing {root} ({holder})")
            else:
                self._take("", fcntl.LOCK_SH, lambda holder: f"a run of every row is writing {root} ({holder})")
                name = f"-shard-{self.shard.index}-of-{self.shard.count}"
                self._take(name, fcntl.LOCK_EX, lambda holder: f"{self.shard.describe()} of {root} is already "
                                                                f"being written ({holder})")
        except FolderBusy:
            self.release()
            raise

    def _take(self, name: str, mode: int, message) -> None:
        path = self.layout.lock_file(name)
        try:
            real_folder(self.layout.root, path.parent)
        except UnsafeFile as exc:
            raise FolderBusy(f"cannot lock {self.layout.root}: {exc}") from None
        # Read-only (a held lock keeps no file open for writing); never a link, a FIFO or a device.
        try:
            fd = open_regular(path, None, os.O_CREAT)
        except UnsafeFile as exc:
            raise FolderBusy(f"cannot lock {self.layout.root}: {exc}") from None
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd, mode)
            os.close(fd)
            raise FolderBusy(message(holder) + "; wait for it to end, or run other shards (--num_shards N "
                             "--shard_index I) or into another --base_feat_path") from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LOCKS:
                raise
            warnings.warn(f"{path}: this filesystem does not lock files ({exc.strerror}); make sure no other "
                          "run writes the same rows", stacklevel=3)
            return
        self._fds.append(fd)
        if mode == fcntl.LOCK_EX:
            _write_owner(path, fd)

    @staticmethod
    def _holder(fd: int, wanted: int) -> str:
        """Who holds the lock: an exclusive holder wrote its host and pid into the file; shared
        holders (shard runs) did not."""
        if wanted == fcntl.LOCK_EX:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                return "shard runs hold it"
        with contextlib.suppress(OSError):
            text = shown(os.pread(fd, 200, 0).decode("utf-8", "replace").strip())
            if text:
                return text
        return "holder unknown"

    def release(self) -> None:
        for fd in self._fds:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the file drops its lock
        self._fds = []
