"""Weights for the CoTracker3 offline tracker: the official checkpoint, a file/URL, or test weights.

`load_tracker(weights)` never falls back silently: a missing or undownloadable checkpoint raises
an error that says where to get it, where to put it and how to pass it.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from .model import CoTrackerThreeOffline, time_embedding_table
from .predictor import OfflineTracker

OFFICIAL_URL = "https://huggingface.co/facebook/cotracker3/resolve/main/scaled_offline.pth"
CORR_MLP_GAIN = 3.0  # RECIPE.md: gain on the drawn corr_mlp weight matrices
URL_SCHEMES = ("http://", "https://", "file://")


def random_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """The deterministic stand-in weights of ../shared/cotracker3/RECIPE.md (numpy legacy MT19937).

    Keys in `state_dict()` order; float32 CPU tensors. Byte-identical to the fixtures' weights for
    seed 0. Meaningless values: for tests and benchmarks only.
    """
    with torch.device("meta"):
        template = CoTrackerThreeOffline().state_dict()
    rng = np.random.RandomState(seed)
    out = {}
    for key, ref in template.items():
        shape = tuple(ref.shape)
        if key == "time_emb":
            val = time_embedding_table(shape[1], shape[2])  # fixed table, no draws
        elif not ref.dtype.is_floating_point:
            val = np.zeros(shape)
        elif len(shape) >= 2:
            bound = 1.0 / np.sqrt(int(np.prod(shape[1:])))
            val = rng.uniform(-bound, bound, size=shape)
            if key.startswith("corr_mlp."):
                val = val * CORR_MLP_GAIN
        elif key.endswith("weight"):
            val = 1.0 + 0.1 * rng.standard_normal(size=shape)
        else:
            val = 0.02 * rng.standard_normal(size=shape)
        out[key] = torch.from_numpy(np.asarray(val, dtype=np.float64).astype(np.float32))
    return out


def _how_to(url: str) -> str:
    target = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    return (
        f"Download {url} yourself and either put it at {target} (torch hub's cache, found "
        "automatically) or pass its path: load_tracker(weights='/path/to/file.pth'), or "
        "`--cotracker_checkpoint /path/to/file.pth` on the semtrack-extract command line."
    )


def _download(url: str) -> Mapping:
    try:
        return torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=False, weights_only=True)
    except OSError as err:  # URLError, HTTPError, socket errors, missing file:// targets
        raise RuntimeError(f"could not download the CoTracker3 weights from {url}: {err}. {_how_to(url)}") from err


def load_state_dict(weights: str | os.PathLike) -> Mapping:
    """Resolve `weights` ("official" | "random" | path | http(s):// or file:// URL) to a state dict.

    URLs go through `torch.hub.load_state_dict_from_url`, i.e. they are cached in
    `<torch hub dir>/checkpoints/` (the cache the official hub entry uses too). A checkpoint that
    wraps the state dict under "model" is unwrapped.
    """
    name = os.fspath(weights)
    if name == "random":
        return random_state_dict(0)
    if name == "official":
        state = _download(OFFICIAL_URL)
    elif name.startswith(URL_SCHEMES):
        state = _download(name)
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"CoTracker3 weights file not found: {path}. Use weights='official' to download "
                f"{OFFICIAL_URL}, or: {_how_to(OFFICIAL_URL)}"
            )
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]
    if not isinstance(state, Mapping):
        raise ValueError(f"CoTracker3 weights {name!r} are not a state dict (got {type(state).__name__})")
    return state


def load_tracker(
    weights: str | os.PathLike = "official",
    device: str | torch.device | None = None,
    precision: str = "fp32",
    encoder_chunk: int = 16,
    interp_shape: tuple[int, int] | None = None,
) -> OfflineTracker:
    """An eval-mode `OfflineTracker` with `weights` loaded strictly (see `load_state_dict`).

    "random" gives the deterministic stand-in weights (tests and benchmarks only). device: where
    to put the tracker (default CPU); precision, encoder_chunk, interp_shape: see `OfflineTracker`.
    """
    tracker = OfflineTracker(precision=precision, encoder_chunk=encoder_chunk, interp_shape=interp_shape)
    tracker.model.load_state_dict(load_state_dict(weights), strict=True)
    return tracker.to(device if device is not None else "cpu").eval()
