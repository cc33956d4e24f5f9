"""Weights for the CoTracker3 offline tracker, resolved by the rule of `semtrack.weights`.

`load_tracker(weights)`: "official" (torch hub's cache file `scaled_offline.pth` when present, else
the pinned Hugging Face file), "random" (the stand-in recipe), a path or a URL. It never falls back
silently: every failure raises `WeightsError` saying how to provide the weights.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from semtrack.weights import (
    OFFICIAL,
    HubFile,
    ModelWeights,
    is_random,
    load_strict,
    locate,
    read_state_dict,
    stand_in_state_dict,
)

from .model import CoTrackerThreeOffline, time_embedding_table
from .predictor import OfflineTracker

# facebook/cotracker3 on the Hugging Face hub: commit b748ec5 ("Updated README.md", the newest commit of
# main found). scaled_offline.pth is unchanged since a304f91 (LFS sha256 2670d456...7834, 101,890,938 bytes).
COTRACKER3_REVISION = "b748ec5e5cd4b9f525a94cc544f0be34bbcc22e2"
COTRACKER3 = ModelWeights(
    label="CoTracker3",
    option="--cotracker_checkpoint",
    hub=HubFile("facebook/cotracker3", "scaled_offline.pth", COTRACKER3_REVISION),
    torch_hub_name="scaled_offline.pth",
)
OFFICIAL_URL = COTRACKER3.hub.url
CORR_MLP_GAIN = 3.0  # RECIPE.md: gain on the drawn corr_mlp weight matrices


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The deterministic stand-in weights of ../shared/cotracker3/RECIPE.md: float32 CPU tensors in
    `state_dict()` order, byte-identical to the fixtures' weights for seed 0. Meaningless values.

    Rule (on top of `semtrack.weights.plain_draw`): `time_emb` is the fixed sin/cos table and integer
    buffers are zeros (no draws); the `corr_mlp.*` weight matrices are the plain draw times 3.
    """
    with torch.device("meta"):
        template = CoTrackerThreeOffline().state_dict()

    def special(key: str, shape: tuple[int, ...], rng: np.random.RandomState) -> np.ndarray | None:
        if key == "time_emb":
            return time_embedding_table(shape[1], shape[2])
        if not template[key].dtype.is_floating_point:
            return np.zeros(shape)
        if key.startswith("corr_mlp.") and len(shape) >= 2:
            bound = 1.0 / np.sqrt(int(np.prod(shape[1:])))
            return rng.uniform(-bound, bound, size=shape) * CORR_MLP_GAIN
        return None

    layout = [(key, tuple(ref.shape)) for key, ref in template.items()]
    return {k: torch.from_numpy(v) for k, v in stand_in_state_dict(layout, seed, special).items()}


def resolve_weights(weights: str | os.PathLike = OFFICIAL) -> tuple[dict[str, torch.Tensor], str]:
    """`weights` ("official" | "random" | path | http(s):// or file:// URL) -> (state dict, weights id).

    The weights id says what was loaded: "hub:facebook/cotracker3@<commit>", "torch-hub-cache:<path>",
    "url:<url>", "file:<path>" or "random:recipe-seed0".
    """
    if is_random(weights):
        return random_state_dict(0), "random:recipe-seed0"
    path, weights_id = locate(weights, COTRACKER3)
    return read_state_dict(path, COTRACKER3), weights_id


def load_state_dict(weights: str | os.PathLike = OFFICIAL) -> dict[str, torch.Tensor]:
    """The state dict `resolve_weights(weights)` finds."""
    return resolve_weights(weights)[0]


def load_tracker(
    weights: str | os.PathLike = OFFICIAL,
    device: str | torch.device | None = None,
    precision: str = "fp32",
    interp_shape: tuple[int, int] | None = None,
) -> OfflineTracker:
    """An eval-mode `OfflineTracker` with `weights` loaded strictly (see `resolve_weights`).

    The tracker's `weights_id` says what was loaded. device: where to put the tracker (default CPU);
    precision, interp_shape: see `OfflineTracker`.
    """
    state, weights_id = resolve_weights(weights)
    tracker = OfflineTracker(precision=precision, interp_shape=interp_shape, weights_id=weights_id)
    load_strict(tracker.model, state, COTRACKER3, weights_id.split(":", 1)[-1])
    return tracker.to(device if device is not None else "cpu").eval()
