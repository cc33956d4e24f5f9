"""Start-up checks and clean-up of an output folder: it can be written, and the temporary files
of dead runs are gone.

Temporary files are named `<name>.tmp-<host>-<pid>-r<hex>` (`semtrack.safeio.temporary_path`; any
characters in `<name>`, a newline too). `sweep` removes those written on this host by a process that
no longer exists, and any link or other non-regular entry with a temporary name (semtrack never makes
one: it was planted); it never touches another host's files (it cannot tell whether their writer is
alive) or a live process's.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterable

from semtrack.layout import OutputLayout
from semtrack.safeio import TEMPORARY_NAME, create_temporary, discard_temporary, shown
from semtrack.util import host_tag, one_line

# Write errors that say the folder, not one video, is the problem: later writes would fail alike.
FOLDER_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM})


def is_folder_error(exc: BaseException) -> bool:
    """Whether `exc` (or what caused it) is a write error no later write to the folder would escape."""
    while exc is not None:
        if isinstance(exc, OSError) and exc.errno in FOLDER_ERRNOS:
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def check_writable(layout: OutputLayout) -> None:
    """Create the output folder (and its ledger folder) and write, fsync and remove a probe file in
    each; raises OSError naming the folder and the fix when that fails."""
    for folder in (layout.root, layout.ledger_dir):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            file, probe = create_temporary(folder / ".write-probe")
            try:
                file.write(b"probe\n")
                file.flush()
                os.fsync(file.fileno())
            finally:
                discard_temporary(file, probe)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot write the output folder {shown(folder)} ({one_line(exc)}); "
                                     "free space, fix its permissions or choose another --base_feat_path") from None


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OSError):
        return False  # exists (another user's) or cannot tell: keep the file
    return False


def stale_temporaries(folders: Iterable[Path], host: str | None = None) -> list[Path]:
    """Temporary names in `folders` (not recursive): files written on `host` (default this one) by a
    process that is gone, and links or other non-regular entries (not folders) of any host or process."""
    host = host_tag() if host is None else host
    stale = []
    for folder in folders:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            continue
        for entry in entries:
            match = TEMPORARY_NAME.fullmatch(entry.name)
            if not match or entry.is_dir(follow_symlinks=False):
                continue
            if not entry.is_file(follow_symlinks=False) or (
                    match["host"] == host and int(match["pid"]) != os.getpid() and _process_gone(int(match["pid"]))):
                stale.append(Path(entry.path))
    return stale


def sweep_folders(layout: OutputLayout, datasets: Iterable[str]) -> list[Path]:
    """The folders temporary files can be in: the root, its ledger and shards folders, each dataset's
    pickle and GIF folders, and the same in the debug folder."""
    folders = []
    for base in (layout, layout.debug):
        folders += [base.root, base.ledger_dir, base.shards_dir]
        for dataset in sorted(set(datasets)):
            folders += [base.pickle(dataset, "x").parent, base.gif(dataset, "x").parent]
    return folders


def sweep(layout: OutputLayout, datasets: Iterable[str]) -> int:
    """Remove the stale temporary files of `layout` (see `stale_temporaries`); -> how many."""
    removed = 0
    for path in stale_temporaries(sweep_folders(layout, datasets)):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed += 1
    return removed
