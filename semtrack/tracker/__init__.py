"""CoTracker3 offline tracker, re-implemented from ../shared/cotracker3/ARCHITECTURE.md.

`load_tracker(weights)` -> `OfflineTracker` (the offline predictor, batched, fp32 or bf16);
`OfflineTracker.model` is the `CoTrackerThreeOffline` module that loads `scaled_offline.pth`
with strict=True.
"""
from .model import CoTrackerThreeOffline
from .predictor import OfflineTracker
from .weights import OFFICIAL_URL, load_state_dict, load_tracker, random_state_dict

__all__ = [
    "CoTrackerThreeOffline",
    "OFFICIAL_URL",
    "OfflineTracker",
    "load_state_dict",
    "load_tracker",
    "random_state_dict",
]
