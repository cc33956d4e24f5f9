"""Decoding one video file into its selected frames, inside DataLoader workers (`decode_video`).

With `decoder="auto"` (or `"decord"`) one PyAV open reads the stream's header and the display matrix
of its first decodable frame (`semtrack.video.stream.probe`), then decord decodes the selected frames
(`decode_decord`); if decord cannot open or decode a file, PyAV is tried once (`"auto"` only).
`decoder="pyav"` opens the file once and decodes only what the selected frames need
(`decode_pyav`). The result names the decoder that served.

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
    is the one that served (for failures the last one tried; "decord" under "auto" if the file was
    rejected before decoding)."""
    if decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
    first = "pyav" if decoder == "pyav" else "decord"
    try:
        return _decode(path, plan, decoder, first)
    except Exception as exc:  # a failure nobody foresaw is still one video's failure, not the run's
        return None, first, clip_line(f"unexpected {type(exc).__name__}: {_one_line(exc, str(path))}")


def _decode(path: str, plan: FramePlan, decoder: str, first: str) -> tuple[Decoded | None, str, str | None]:
    """`decode_video` for a valid `decoder`; `first`: the decoder named for files rejected before decoding."""
    problem = _file_problem(path)
    if problem is not None:
        return None, first, problem
    if decoder == "pyav":
        return _try_pyav(path, plan, decord_error=None)
    probed, open_error = None, None
    try:
        probed = probe(path)
    except ItemError as exc:
        return None, "decord" if decoder == "decord" else "pyav", str(exc)
    except Exception as exc:  # PyAV cannot open it; decord may still
        open_error = _one_line(exc, path)
    try:
        return decode_decord(path, probed, plan), "decord", None
    except ItemError as exc:
        return None, "decord", str(exc)
    except Exception as exc:
        decord_error = _one_line(exc, path)
    if decoder == "decord":
        rotated = probed is not None and not probed.orientation.is_identity
        hint = " (decord mis-sizes some rotated frames; try decoder='pyav')" if rotated else ""
        return None, "decord", clip_line(f"cannot decode: decord: {decord_error}{hint}")
    return _try_pyav(path, plan, decord_error, open_error)


def _try_pyav(
    path: str, plan: FramePlan, decord_error: str | None, open_error: str | None = None
) -> tuple[Decoded | None, str, str | None]:
    """PyAV's decode (one open of the file), its errors joined with decord's (if decord was tried);
    `open_error`: why PyAV could not open the file already."""
    import av

    tried = "" if decord_error is None else f"decord: {decord_error}; "
    if open_error is None:
        try:
            container = av.open(path)
        except Exception as exc:
            open_error = _one_line(exc, path)
    if open_error is not None:
        return None, "pyav", clip_line(f"cannot open as video: {tried}pyav: {open_error}")
    try:
        with container:
            return decode_pyav(container, path, plan), "pyav", None
    except ItemError as exc:
        return None, "pyav", clip_line(str(exc) if decord_error is None else f"{exc} (decord: {decord_error})")
    except Exception as exc:
        return None, "pyav", clip_line(f"cannot decode: {tried}pyav: {_one_line(exc, path)}")
