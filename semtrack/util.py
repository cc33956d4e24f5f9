"""Three helpers every stage shares: one-line error reasons, atomic file writes, stable seeds."""
from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Iterator

MAX_REASON_CHARS = 300
TMP_MARK = ".tmp-"  # temporary files are `<name>.tmp-<pid>` beside their target


def clip_line(text: str, limit: int = MAX_REASON_CHARS) -> str:
    """`text` on one line (runs of whitespace made one space), at most `limit` characters."""
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def one_line(exc: BaseException, limit: int = MAX_REASON_CHARS) -> str:
    """`TypeName: first non-empty line of the message`, at most `limit` characters."""
    text = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
    return clip_line(f"{type(exc).__name__}: {text}" if text else type(exc).__name__, limit)


def temporary_path(path: Path) -> Path:
    """Where `atomic_write` writes `path` before renaming it: same folder, `TMP_MARK` + this pid."""
    return path.with_name(f"{path.name}{TMP_MARK}{os.getpid()}")


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
