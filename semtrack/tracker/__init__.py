"""CoTracker3 offline tracker, re-implemented from ../shared/cotracker3/ARCHITECTURE.md.

`load_tracker(weights)` -> `OfflineTracker` (the offline predictor, fp32 or bf16);
`OfflineTracker.track_many` tracks a list of clips of any lengths/sizes/point counts in one call;
`OfflineTracker.model` is the `CoTrackerThreeOffline` module that loads `scaled_offline.pth`
with strict=True. `estimate_tracking_bytes` bounds the peak memory of one call.
"""
from .memory import estimate_tracking_bytes
from .model import CoTrackerThreeOffline
from .predictor import OfflineTracker
from .weights import OFFICIAL_URL, load_state_dict, load_tracker, random_state_dict

__all__ = [
    "CoTrackerThreeOffline",
    "OFFICIAL_URL",
    "OfflineTracker",
    "estimate_tracking_bytes",
    "load_state_dict",
    "load_tracker",
    "random_state_dict",
]
