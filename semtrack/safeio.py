"""File operations in a shared output folder that a planted link, pipe, device or huge file cannot
turn against the run.

Writes: a new file is first a temporary beside its target, `<name>.tmp-<host>-<pid>-r<8 hex>`, created
with `O_CREAT|O_EXCL|O_NOFOLLOW` (nothing already at that name, link or not, is ever opened), written
through the descriptor, fsynced, checked to still be the file created, then renamed onto the target
(a link at the target is replaced, never followed). Other files opened for writing (the ledger, the
locks) are opened with `O_NOFOLLOW|O_NONBLOCK` and refused unless regular.

Reads: opened with `O_NOFOLLOW|O_NONBLOCK` (a FIFO does not block the open), `fstat` first, refused
unless a regular file no larger than the cap of its kind, then read at most that many bytes. Every
refusal is an `UnsafeFile` (a ValueError) whose one-line message starts with the path.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from pathlib import Path
from typing import BinaryIO, Iterator

from semtrack.util import HOST_TAG_CHARS, host_tag

# Caps in bytes, per kind of file the folder holds (a track pickle's: `semtrack.trackfile.MAX_FILE_BYTES`).
SIDECAR_MAX = 2**20  # semtrack_config.json: a few hundred bytes of options
LOCK_MAX = 2**12  # ledger/.lock: one line naming the holder
LEDGER_LINE_MAX = 2**20  # one ledger record (a done record with its stats is under 2 KiB)
LEDGER_FILE_MAX = 2**34  # one ledger file: 16 GiB, tens of millions of records
MANIFEST_MAX = 2**31  # manifest.csv of a training folder: millions of rows

TMP_MARK = ".tmp-"
PID_DIGITS = 7  # Linux process ids stay below 2**22
RANDOM_HEX = 8  # the random part of a temporary name
TMP_SUFFIX_MAX = len(TMP_MARK) + HOST_TAG_CHARS + 1 + PID_DIGITS + 2 + RANDOM_HEX  # the longest suffix added
# `<target>.tmp-<host>-<pid>[-r<hex>]` (older semtrack wrote no random part); any character in the target.
TEMPORARY_NAME = re.compile(r"(?P<target>.+)\.tmp-(?P<host>[A-Za-z0-9_-]{1,%d})-(?P<pid>[0-9]{1,%d})(?:-r[0-9a-f]{%d})?"
                            % (HOST_TAG_CHARS, PID_DIGITS, RANDOM_HEX), re.DOTALL)

_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a folder", stat.S_IFLNK: "a symbolic link"}


class UnsafeFile(ValueError):
    """A file of the output folder that semtrack refuses to open: a link, not a regular file, too large."""


def shown(path: str | os.PathLike) -> str:
    """`path` for a message: control characters (and non-UTF-8 bytes) escaped, never printed raw."""
    text = os.fspath(path)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def temporary_path(path: Path) -> Path:
    """A fresh temporary name for `path`: same folder, `<name>.tmp-<host>-<pid>-r<8 random hex>`, so a
    later run can tell whether the process that wrote it is gone and no one can predict it."""
    return path.with_name(f"{path.name}{TMP_MARK}{host_tag()}-{os.getpid()}-r{secrets.token_hex(RANDOM_HEX // 2)}")


def _refusal(path, exc: OSError) -> UnsafeFile | OSError:
    if exc.errno in (errno.ELOOP, errno.EMLINK):
        return UnsafeFile(f"{shown(path)}: is a symbolic link; semtrack does not follow links in its output folder "
                          "(remove it)")
    return exc


def check_regular(fd: int, path, limit: int | None) -> os.stat_result:
    """`fstat(fd)`, or UnsafeFile when it is not a regular file or holds more than `limit` bytes."""
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise UnsafeFile(f"{shown(path)}: is {kind}, not a regular file (remove it)")
    if limit is not None and info.st_size > limit:
        raise UnsafeFile(f"{shown(path)}: {info.st_size} bytes, more than such a file holds ({limit})")
    return info


def open_regular(path: str | os.PathLike, limit: int | None, flags: int = 0, mode: int = 0o644) -> int:
    """A descriptor of the regular file `path` (read-only unless `flags` say otherwise), opened without
    following a link or blocking on a FIFO; UnsafeFile if it is none or larger than `limit` bytes;
    OSError (e.g. FileNotFoundError) as `os.open` raises it."""
    try:
        fd = os.open(path, _READ_FLAGS | flags, mode)
    except OSError as exc:
        raise _refusal(path, exc) from None
    try:
        check_regular(fd, path, limit)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_bytes(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of the regular file `path` (see `open_regular`), at most `limit`."""
    fd = open_regular(path, limit)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise UnsafeFile(f"{shown(path)}: more than {limit} bytes, more than such a file holds")
    return data


def read_text(path: str | os.PathLike, limit: int) -> str:
    """`read_bytes` decoded as UTF-8 (UnsafeFile naming the file if it is not)."""
    try:
        return read_bytes(path, limit).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UnsafeFile(f"{shown(path)}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def iter_lines(path: str | os.PathLike, line_max: int, file_max: int) -> Iterator[bytes | None]:
    """The lines of the regular file `path` (at most `file_max` bytes), each with its newline. A line
    longer than `line_max` bytes ends the file: None is yielded for it and nothing more is read (no
    writer makes one; a planted file of zeros is left at once)."""
    fd = open_regular(path, file_max)
    with os.fdopen(fd, "rb") as f:
        while line := f.readline(line_max + 1):
            if len(line) > line_max and not line.endswith(b"\n"):
                yield None
                return
            yield line


def _same_file(path: Path, info: os.stat_result) -> bool:
    try:
        now = os.lstat(path)
    except OSError:
        return False
    return (now.st_dev, now.st_ino) == (info.st_dev, info.st_ino)


def create_temporary(path: Path) -> tuple[BinaryIO, Path]:
    """(a binary file, its name): a new temporary for `path` (`temporary_path`), created with
    `O_CREAT|O_EXCL|O_NOFOLLOW`, so nothing already at that name is opened."""
    for _ in range(8):
        tmp = temporary_path(path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except FileExistsError:
            continue
        return os.fdopen(fd, "wb"), tmp
    raise FileExistsError(errno.EEXIST, f"cannot create a temporary file beside {shown(path)}")


def commit_temporary(file: BinaryIO, tmp: Path, path: Path) -> None:
    """fsync `file` (the temporary `tmp` of `create_temporary`), rename it onto `path` if `tmp` still
    names that file (else OSError: someone replaced it), close it and make the rename durable."""
    try:
        file.flush()
        os.fsync(file.fileno())
        if not _same_file(tmp, os.fstat(file.fileno())):
            raise OSError(errno.EEXIST, f"{shown(tmp)}: the temporary file was replaced while being written")
        os.replace(tmp, path)
    finally:
        file.close()
    fsync_dir(path.parent)


def discard_temporary(file: BinaryIO, tmp: Path) -> None:
    """Close and remove a temporary that will not be committed."""
    with contextlib.suppress(OSError):
        file.close()
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def real_folder(root: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """`folder` (under the output folder `root`), created if missing, after checking that no folder
    between `root` and it is a link or anything but a folder (a planted link to another user's folder
    would send the writes there): UnsafeFile naming the first that is. `root` itself may be a link."""
    root, folder = Path(root), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    current = root
    for part in folder.relative_to(root).parts:
        current = current / part
        info = os.lstat(current)
        if not stat.S_ISDIR(info.st_mode):
            kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a folder")
            raise UnsafeFile(f"{shown(current)}: is {kind}, not a folder; semtrack does not write through links in "
                             "its output folder (remove it)")
    return folder


def fsync_dir(path: Path) -> None:
    """Make a rename in `path` durable where the filesystem allows it (some refuse a folder fsync)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """`with atomic_write(p) as f: f.write(...)` -> `p` appears complete or not at all.

    The body writes a binary file, a new temporary beside `p` (`create_temporary`; the folder is
    created if needed); on success it is committed (`commit_temporary`), on any error removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    file, tmp = create_temporary(path)
    try:
        yield file
        commit_temporary(file, tmp, path)
    except BaseException:
        discard_temporary(file, tmp)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` with `atomic_write`."""
    with atomic_write(path) as f:
        f.write(data)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 `text` to `path` with `atomic_write`."""
    write_atomic(path, text.encode("utf-8"))


def open_append(path: str | os.PathLike) -> int:
    """A descriptor appending to the regular file `path` (created if missing), opened without following a
    link or blocking on a FIFO (UnsafeFile otherwise)."""
    return open_regular(path, None, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
