"""The one place tests and benchmarks find the shared reference data (`../shared`)."""
from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_dir() -> Path:
    """`$SEMTRACK_SHARED` if set, else `../shared` relative to the repository root."""
    env = os.environ.get("SEMTRACK_SHARED")
    path = Path(env) if env else REPO_ROOT.parent / "shared"
    if not (path / "spec" / "REFERENCE.md").is_file():
        raise FileNotFoundError(
            f"shared reference data not found at {path}; set $SEMTRACK_SHARED to the folder "
            "that holds spec/, videos/, cotracker3/ and dinov2/"
        )
    return path


def shared_path(*parts: str) -> Path:
    """A path inside the shared folder, e.g. `shared_path("videos", "cat.mp4")`."""
    return shared_dir().joinpath(*parts)
