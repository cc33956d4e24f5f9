"""Stopping a run at a video boundary: on SIGTERM / SIGINT / SIGHUP, or when the output folder cannot be
written.

`StopRequest.install()` makes SIGTERM (kill, docker stop, SLURM pre-emption, scancel), SIGINT
(Ctrl+C) and SIGHUP (the SSH session closing) request a stop instead of killing the process. Worker
processes (decoding, GIFs) call `detach_worker`: they ignore those signals, so a signal sent to the
whole process group (what SLURM and a terminal do) leaves them to finish the batch in hand, and the
main process alone decides when to stop; they end with it however it ends.

Before videos are processed (`started` False) the signal interrupts at once (there is nothing to
save); afterwards the writer calls `check()` at each video boundary, which raises `Stopped`, and the
run saves its ledger and report on the way out. A second signal of any of these kinds ends the
process at once, as if no handler were installed. `resume_command` is the command line to resume.
"""
from __future__ import annotations

import ctypes
import os
import shlex
import signal
import sys
import threading

from semtrack.safeio import shown

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
PR_SET_PDEATHSIG = 1  # prctl(2): the signal a process gets when its parent ends
RERUN_FLAGS = ("--rerun", "--extract.rerun")  # the flags that redo done rows (not repeated to resume)


def detach_worker(parent: int) -> None:
    """In a worker process forked by process `parent`: ignore the stop signals (the parent decides),
    and end with the parent (a forked worker shares its open files, the folder lock's among them, and
    must not keep them after a `kill -9` of the run)."""
    for signum in SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def resume_command(argv: list[str], program: str = "semtrack-extract") -> str:
    """The command line that resumes a run started with the arguments `argv`: the same, less the flags
    that redo done rows (`--rerun`, `--rerun=...`, `--extract.rerun[=]...`), shell-quoted, control
    characters escaped (a name can hold terminal escapes)."""
    kept, skip_value = [], False
    for arg in argv:
        if skip_value:
            skip_value = False
            if arg.lower() in ("true", "false", "1", "0", "yes", "no"):
                continue
        name, eq, _ = arg.partition("=")
        if name in RERUN_FLAGS:
            skip_value = not eq and name != "--rerun"
            continue
        kept.append(arg)
    return shown(shlex.join([program, *kept]))


class Stopped(Exception):
    """The run stopped before its end: `signum` (a signal number) or `reason` (a folder write error)."""

    def __init__(self, signum: int | None = None, reason: str | None = None):
        self.signum, self.reason = signum, reason
        super().__init__(reason or f"stopped by {signal.Signals(signum).name}")


class StopRequest:
    """Why the run should stop (`signum`, `reason`), and the signal handlers that request it."""

    def __init__(self):
        self.signum: int | None = None
        self.reason: str | None = None
        self.started = False
        self._previous: dict[int, object] = {}
        self._pid: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.reason is not None

    def fail(self, reason: str) -> None:
        """Stop at the next boundary because the folder cannot be written (`reason`, one line)."""
        if self.reason is None:
            self.reason = reason

    def check(self) -> None:
        """Raise `Stopped` if a stop was requested."""
        if self.requested:
            raise Stopped(self.signum, self.reason)

    def stopped(self) -> Stopped:
        return Stopped(self.signum, self.reason)

    # ------------------------------------------------------------------ signals
    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:  # the second signal: end now
            self.restore()
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.signum = signum
        if not self.started:
            raise Stopped(signum)

    def install(self) -> None:
        """Handle `SIGNALS` in this process (main thread only; elsewhere a no-op). Idempotent. A signal
        the process was started ignoring stays ignored (`nohup` ignores SIGHUP, a shell's background
        job SIGINT)."""
        if self._pid == os.getpid() or threading.current_thread() is not threading.main_thread():
            return
        self._pid = os.getpid()
        for signum in SIGNALS:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN:
                continue
            self._previous[signum] = previous
            signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Put back the handlers `install` replaced."""
        if self._pid != os.getpid() or threading.current_thread() is not threading.main_thread():
            return
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        self._previous, self._pid = {}, None
