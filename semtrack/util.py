"""Three helpers every stage shares: one-line error reasons, atomic file writes (temporary names that
say which host and process wrote them), stable seeds."""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import socket
from pathlib import Path
from typing import Iterator

MAX_REASON_CHARS = 300
TMP_MARK = ".tmp-"  # temporary files are `<name>.tmp-<host>-<pid>` beside their target
HOST_TAG_CHARS = 32  # the host part of a temporary name: the short host name, at most this long
PID_DIGITS = 7  # Linux process ids stay below 2**22
TMP_SUFFIX_MAX = len(TMP_MARK) + HOST_TAG_CHARS + 1 + PID_DIGITS  # the longest suffix a temporary name adds
TEMPORARY_NAME = re.compile(r"^(?P<target>.+)\.tmp-(?P<host>[A-Za-z0-9_-]{1,%d})-(?P<pid>[0-9]{1,%d})$"
                            % (HOST_TAG_CHARS, PID_DIGITS))


def host_tag(hostname: str | None = None) -> str:
    """This machine's name as temporary names hold it: the short host name (before the first '.'),
    characters other than letters, digits, '_' and '-' replaced by '_', at most `HOST_TAG_CHARS`."""
    short = (hostname if hostname is not None else socket.gethostname()).split(".")[0]
    return re.sub(r"[^A-Za-z0-9_-]", "_", short)[:HOST_TAG_CHARS] or "host"


def clip_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """`text` on one line (runs of whitespace made one space), at most `limit` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def one_line(exc: BaseException, limit: int = MAX_REASON_CHARS) -> str:
    """`TypeName: first non-empty line of the message`, at most `limit` characters."""
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return clip_line(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, limit)


def temporary_path(path: Path) -> Path:
    """Where `atomic_write` writes `path` before renaming it: same folder, `<name>.tmp-<host>-<pid>`
    (`host_tag`), so a later run can tell whether the process that wrote it is gone."""
    return path.with_name(f"{path.name}{TMP_MARK}{host_tag()}-{os.getpid()}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable where the filesystem allows it (some refuse a folder fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_write(p) as tmp: <write tmp>` -> `p` appears complete or not at all.

    The body writes the temporary path (same folder, created if needed); on success it is fsynced,
    renamed onto `path` and the rename made durable; on any error it is removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_path(path)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` with `atomic_write`."""
    with atomic_write(path) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="")


def stable_seed(*parts) -> int:
    """A 63-bit seed from the SHA-256 of `parts` joined by U+001F: the same on every machine, process
    and Python run (`stable_seed(video_id)` seeds a video's k-means)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1
