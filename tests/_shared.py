"""The one place tests and benchmarks find the shared reference data (`../shared`), and read its clips."""
from __future__ import annotations

import os
from pathlib import Path

import torch

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


def decode_first(path: str | os.PathLike, num_frames: int) -> torch.Tensor:
    """The first `num_frames` frames of a video as uint8 (T, 3, H, W) RGB (PyAV, in decode order)."""
    import av
    import numpy as np

    frames = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == num_frames:
                break
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()
