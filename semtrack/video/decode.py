"""Decoding one video file into its selected frames, inside DataLoader workers (`decode_video`).

With `decoder="auto"` (the default) or `"pyav"` PyAV opens the file once and decodes only what the
selected frames need (`decode_pyav`); under `"auto"`, a file PyAV cannot open or decode goes to
decord. With `decoder="decord"` one PyAV open reads the stream's header and the display matrix of its
first decodable frame (`semtrack.video.stream.probe`), then decord decodes the selected frames
(`decode_decord`). The result names the decoder that served. PyAV comes first because it is the
cheaper of the two per selected frame (`benchmarks/NOTES.md`, "Host budget: decode") and the two give
bit-identical frames wherever both serve.

Any per-video failure is an error (one line giving the reason): unusable path (not found, permission
denied, name too long, symlink loop, broken link, a path component that is not a folder, a folder, a
FIFO/socket/device, an empty file), not a video, audio only, truncated, no decodable frames, unusable
frame rate or timestamps, an unsupported display matrix, or more frames than fit in memory.
`decode_video` never raises.

Frames are returned as a player shows them: the stream's display matrix (rotation by a multiple of
90 degrees, mirroring) is applied by both decoders, so a 90-degree clip coded W x H comes out H x W.

Frames an mp4 lists past the end of its edit list never decode (decord still indexes them and hands
back a stale image); they are not frames here. An mp4 whose header lists more samples than the file
holds is truncated: an error.
"""
from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path
from typing import NamedTuple

from semtrack.config import DECODERS
from semtrack.util import clip_line
from semtrack.video.decode_decord import decode_decord
from semtrack.video.decode_pyav import decode_pyav
from semtrack.video.frames import FramePlan, ItemError
from semtrack.video.stream import Decoded, probe


def _one_line(exc: BaseException, path: str) -> str:
    """First non-empty line of an exception message, without decord's "[hh:mm:ss] file.cc:N: " or an
    "[Errno N] " prefix, the (already recorded) path shortened to its file name."""
    text = str(exc) or type(exc).__name__
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = re.sub(r"^(\[[0-9:]+\] \S+:\d+: |\[Errno -?\d+\] )", "", lines[0] if lines else type(exc).__name__)
    return clip_line(line.replace(path, Path(path).name) if path else line)


_OS_REASONS = {
    errno.ENOENT: "file not found",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.ENAMETOOLONG: "file name too long",
    errno.ELOOP: "symlink loop (too many levels of symbolic links)",
    errno.ENOTDIR: "a component of the path is not a directory",
}


def _os_reason(exc: OSError | ValueError, path: str) -> str:
    """A few words for why `os.stat`/`open` failed on `path`."""
    if isinstance(exc, ValueError):  # e.g. an embedded NUL byte
        return f"invalid path ({exc})"
    if exc.errno == errno.ENOENT and os.path.islink(path):
        return "broken symbolic link (its target does not exist)"
    return _OS_REASONS.get(exc.errno, exc.strerror or type(exc).__name__)


def _file_problem(path: str) -> str | None:
    """Why `path` cannot be read as a non-empty regular file (one line naming the true reason and the
    path), or None. Only stats and opens the file (never blocks: FIFOs and devices are refused)."""
    try:
        info = os.stat(path)
        if stat.S_ISDIR(info.st_mode):
            return clip_line(f"is a directory, not a video file: {path}")
        if not stat.S_ISREG(info.st_mode):
            return clip_line(f"not a regular file (a FIFO, socket or device): {path}")
        if info.st_size == 0:
            return clip_line(f"empty file (0 bytes): {path}")
        with open(path, "rb"):
            pass
    except (OSError, ValueError) as exc:
        return clip_line(f"{_os_reason(exc, path)}: {path}")
    return None


def decode_video(path: str, plan: FramePlan, decoder: str = "auto") -> tuple[Decoded | None, str, str | None]:
    """-> (decoded or None, decoder name, one-line error or None). Never raises: a bad path, file or
    stream, and any unexpected failure, is an error. `decoder`: one of `DECODERS`; the name returned
    is the one that served (for failures the last one tried; the first one for a file rejected
    before decoding)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    first = "decord" if decoder == "decord" else "pyav"
    try:
        return _decode(path, plan, decoder, first)
    except Exception as exc:  # a failure nobody foresaw is still one video's failure, not the run's
        return None, first, clip_line(f"unexpected {type(exc).__name__}: {_one_line(exc, str(path))}")


def _decode(path: str, plan: FramePlan, decoder: str, first: str) -> tuple[Decoded | None, str, str | None]:
    """`decode_video` for a valid `decoder`; `first`: the decoder named for files rejected before decoding."""
    problem = _file_problem(path)
    if problem is not None:
        return None, first, problem
    if decoder == "decord":
        return _try_decord(path, plan, pyav_failure=None)
    decoded, error, failure = _try_pyav(path, plan)
    if decoded is not None or error is not None or decoder == "pyav":
        return decoded, "pyav", error or (failure and failure.line())
    return _try_decord(path, plan, failure)


class _Failure(NamedTuple):
    """PyAV could not open (`opened` False) or decode a file: why (one line); decord may still serve it."""

    opened: bool
    reason: str

    def line(self, decord_reason: str | None = None) -> str:
        what = "cannot decode" if self.opened else "cannot open as video"
        also = "" if decord_reason is None else f"; decord: {decord_reason}"
        return clip_line(f"{what}: pyav: {self.reason}{also}")


def _try_pyav(path: str, plan: FramePlan) -> tuple[Decoded | None, str | None, _Failure | None]:
    """PyAV's decode (one open of the file) -> (decoded, the clip's own error, PyAV's failure): the
    clip's own problems (`ItemError`: truncated, no frames, too large ...) are final; a file PyAV
    cannot open or decode is a `_Failure`."""
    import av

    try:
        container = av.open(path)
    except Exception as exc:
        return None, None, _Failure(False, _one_line(exc, path))
    try:
        with container:
            return decode_pyav(container, path, plan), None, None
    except ItemError as exc:
        return None, clip_line(str(exc)), None
    except Exception as exc:
        return None, None, _Failure(True, _one_line(exc, path))


def _try_decord(path: str, plan: FramePlan, pyav_failure: _Failure | None) -> tuple[Decoded | None, str, str | None]:
    """decord's decode, after a PyAV probe of the header and display matrix (skipped when PyAV could
    not open the file); errors joined with PyAV's failure (under `auto`) if there was one."""
    probed = None
    if pyav_failure is None or pyav_failure.opened:
        try:
            probed = probe(path)
        except ItemError as exc:
            return None, "decord", str(exc)
        except Exception:  # PyAV cannot open it; decord may still
            probed = None
    try:
        return decode_decord(path, probed, plan), "decord", None
    except ItemError as exc:
        also = "" if pyav_failure is None else f" (pyav: {pyav_failure.reason})"
        return None, "decord", clip_line(f"{exc}{also}")
    except Exception as exc:
        decord_error = _one_line(exc, path)
    if pyav_failure is not None:
        return None, "decord", pyav_failure.line(decord_error)
    rotated = probed is not None and not probed.orientation.is_identity
    hint = " (decord mis-sizes some rotated frames; try decoder='pyav')" if rotated else ""
    return None, "decord", clip_line(f"cannot decode: decord: {decord_error}{hint}")
