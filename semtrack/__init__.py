"""semtrack: semantic point tracks for video datasets.

Video -> resampled frames -> DINOv2 patch tokens -> semantic clusters -> query points ->
CoTracker3 tracks -> one pickle per video. See README.md.
"""
from __future__ import annotations

__version__ = "0.1.0"

_LAZY = {
    "extract": ("semtrack.api", "extract"),
    "load_tracks": ("semtrack.trackfile", "load_tracks"),
}


def __getattr__(name: str):
    # Lazy so that `import semtrack` stays cheap (no torch/lightning import) in DataLoader workers.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'semtrack' has no attribute {name!r}")
