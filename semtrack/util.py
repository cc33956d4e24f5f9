"""Helpers every stage shares: one-line error reasons, the host tag of temporary names, stable seeds.
(Atomic and bounded file operations: `semtrack.safeio`.)"""
from __future__ import annotations

import hashlib
import re
import socket

MAX_REASON_CHARS = 300
HOST_TAG_CHARS = 32  # the host part of a temporary name (`semtrack.safeio`): the short host name, at most this long


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


def stable_seed(*parts) -> int:
    """A 63-bit seed from the SHA-256 of `parts` joined by U+001F: the same on every machine, process
    and Python run (`stable_seed(video_id)` seeds a video's k-means)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") >> 1
