"""What the machine can give this process: memory still available (cgroup-aware)."""
from __future__ import annotations

from pathlib import Path


def available_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, lowered by a cgroup v2 limit; None if
    unknown (not Linux)."""
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    available = next((int(ln.split()[1]) * 1024 for ln in meminfo.splitlines() if ln.startswith("MemAvailable:")), None)
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            available = min(available or 2**63, int(limit) - used)
    except (OSError, ValueError):
        pass
    return available
