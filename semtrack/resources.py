"""What the machine can give this process: memory still available (cgroup-aware)."""
from __future__ import annotations

from pathlib import Path

PROC_ROOT = Path("/proc")
CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_memory(proc_root: Path = PROC_ROOT, cgroup_root: Path = CGROUP_ROOT) -> int | None:
    """Bytes this process may still allocate: the smallest of MemAvailable and the headroom of every
    cgroup memory limit above this process; None if none of them is known (not Linux).

    The process's cgroups come from `proc_root/self/cgroup`: cgroup v2 (`0::/path`, hierarchy mounted
    at `cgroup_root` or `cgroup_root/unified`) and cgroup v1 (the `memory` controller, mounted at
    `cgroup_root/memory`). The path is read as given, so it also works without a cgroup namespace (as
    under SLURM, `/system.slice/.../job_1/step_0`); if that folder does not exist (a container that
    mounts its own cgroup as the root) the hierarchy's root is used. Every level from the process's
    cgroup up to the root counts: the tightest limit wins.
    """
    known = [m for m in (_meminfo_available(proc_root), _cgroup_headroom(proc_root, cgroup_root)) if m is not None]
    return min(known) if known else None


def _meminfo_available(proc_root: Path) -> int | None:
    """MemAvailable from `proc_root/meminfo`, in bytes."""
    try:
        meminfo = (proc_root / "meminfo").read_text()
    except OSError:
        return None
    return next((int(ln.split()[1]) * 1024 for ln in meminfo.splitlines() if ln.startswith("MemAvailable:")), None)


def _cgroup_headroom(proc_root: Path, cgroup_root: Path) -> int | None:
    """Smallest `limit - usage + inactive_file` over the cgroup v1 and v2 levels of this process."""
    try:
        lines = (proc_root / "self" / "cgroup").read_text().splitlines()
    except OSError:
        return None
    headrooms = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # cgroup v2 (unified) hierarchy
            for mount in (cgroup_root, cgroup_root / "unified"):
                headrooms += [_headroom(d, *_V2_FILES) for d in _levels(mount, path)]
        elif "memory" in controllers.split(","):
            headrooms += [_headroom(d, *_V1_FILES) for d in _levels(cgroup_root / "memory", path)]
    known = [h for h in headrooms if h is not None]
    return min(known) if known else None


# (limit, usage, memory.stat key of the hierarchical reclaimable page cache)
_V2_FILES = ("memory.max", "memory.current", "inactive_file")
_V1_FILES = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _levels(mount: Path, path: str) -> list[Path]:
    """Folders from the process's cgroup `path` under `mount` up to `mount` itself (empty if no mount)."""
    if not mount.is_dir():
        return []
    folder = mount / path.strip().lstrip("/")
    if not folder.is_dir():
        return [mount]
    levels = [folder]
    while levels[-1] != mount and levels[-1] != levels[-1].parent:
        levels.append(levels[-1].parent)
    return levels


def _headroom(folder: Path, limit_file: str, usage_file: str, inactive_key: str) -> int | None:
    """`limit - usage` of one cgroup, page cache on the inactive list counted as free (the kernel
    reclaims it first); None without a limit (no files, or "max")."""
    try:
        limit = (folder / limit_file).read_text().strip()
        if limit == "max":
            return None
        headroom = int(limit) - int((folder / usage_file).read_text())
    except (OSError, ValueError):
        return None
    return max(headroom + _stat_value(folder, inactive_key), 0)


def _stat_value(folder: Path, key: str) -> int:
    """One value (bytes) of the cgroup's memory.stat; 0 if absent."""
    try:
        lines = (folder / "memory.stat").read_text().splitlines()
    except OSError:
        return 0
    values = [ln.split()[1] for ln in lines if ln.split()[:1] == [key] and len(ln.split()) == 2]
    return int(values[0]) if values and values[0].isdigit() else 0
