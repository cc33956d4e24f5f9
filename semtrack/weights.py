"""Where model weights come from: one vocabulary and one ordered rule for the tracker and the features.

A weights source (`load_tracker(weights=...)`, `DinoV2Extractor(checkpoint=...)`, the command line's
`--cotracker_checkpoint` / `--dinov2_checkpoint` / `--weights`) is resolved by the first rule that
matches:

1. `"random"`: deterministic stand-in weights (`stand_in_state_dict`). Meaningless values, for tests
   and benchmarks only; never used as a fallback.
2. `"official"`: the model's official file. A model may name a file in torch hub's cache
   (`<TORCH_HOME>/hub/checkpoints/<name>`, where the official torch.hub entry of CoTracker3 puts it);
   it is used when present. Otherwise the file comes from the model's Hugging Face hub repo at a pinned
   revision through `huggingface_hub` (one cache for every model: HF_HOME / HF_HUB_CACHE choose the
   folder, HF_HUB_OFFLINE=1 forbids the network, HF_ENDPOINT names a mirror).
3. A URL (`http://`, `https://`, `file://`): downloaded once into torch hub's checkpoints folder
   (`<TORCH_HOME>/hub/checkpoints/<file name>`, written whole or not at all) and read from there after.
4. Anything else: a local file, a `.safetensors` file or a torch-saved state dict.

Every failure to provide weights (missing file, failed download, offline with nothing cached, a file
that is not a checkpoint, a state dict with the wrong keys) raises `WeightsError` with one line that
says what failed and how to provide the weights.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import torch

from semtrack.util import one_line

OFFICIAL = "official"
RANDOM = "random"
URL_SCHEMES = ("http://", "https://", "file://")
_MAX_KEYS_NAMED = 3  # keys a key-mismatch message names before counting the rest
REASON_CHARS = 90  # the underlying error's line inside a how-to-provide message
HUB_PROBE_S = 10.0  # s: the hub's answer to one metadata request before a download is tried


class WeightsError(RuntimeError):
    """Weights could not be provided; the message is one line saying why and what to do."""


@dataclass(frozen=True)
class HubFile:
    """One file of a Hugging Face hub repo. revision: a commit sha, or None for the default branch."""

    repo: str
    filename: str
    revision: str | None = None

    @property
    def download_command(self) -> str:
        """The `hf` command (huggingface_hub's CLI) that puts this file into the cache."""
        pinned = f" --revision {self.revision}" if self.revision else ""
        return f"hf download {self.repo} {self.filename}{pinned}"

    @property
    def url(self) -> str:
        return f"https://huggingface.co/{self.repo}/resolve/{self.revision or 'main'}/{self.filename}"


@dataclass(frozen=True)
class ModelWeights:
    """How one model's weights are named to the user and where its official copy lives.

    label: the model in messages ("CoTracker3", "DINOv2 'vitb14'"); option: the command-line option
    that takes a path or URL; torch_hub_name: the official file's name in torch hub's cache, used
    before the hub when present (None: the hub only).
    """

    label: str
    option: str
    hub: HubFile
    torch_hub_name: str | None = None

    def torch_hub_file(self, name: str | None = None) -> Path:
        """`<torch hub dir>/checkpoints/<name>` (default: the official file's name), read at call time."""
        return Path(torch.hub.get_dir()) / "checkpoints" / (name or self.torch_hub_name or self.hub.filename)

    def how_to_provide(self) -> str:
        """One sentence: every way to provide the weights, in the command line's spelling."""
        from huggingface_hub import constants

        local = f", or put the file at {self.torch_hub_file()}" if self.torch_hub_name else ""
        return (
            f"Provide them with `{self.option} PATH|URL`{local}, or run `{self.hub.download_command}` (into the "
            f"Hugging Face cache {constants.HF_HUB_CACHE}; HF_HOME / HF_HUB_CACHE move it, HF_ENDPOINT names a "
            "mirror); `--weights random` is for tests only (meaningless stand-in weights)."
        )

    def error(self, what: str) -> WeightsError:
        return WeightsError(f"{what}. {self.how_to_provide()}")


def is_random(source) -> bool:
    return isinstance(source, str) and source == RANDOM


def locate(source: str | os.PathLike, model: ModelWeights) -> tuple[Path, str]:
    """The local file for `source` ("official" | URL | path; rules 2-4 of the module doc) and its
    weights id ("hub:<repo>@<commit>", "torch-hub-cache:<path>", "url:<url>" or "file:<path>")."""
    name = os.fspath(source)
    if name == OFFICIAL:
        cached = model.torch_hub_file() if model.torch_hub_name else None
        if cached is not None and cached.is_file():
            return cached, f"torch-hub-cache:{cached}"
        path = hub_file(model)
        return path, f"hub:{model.hub.repo}@{path.parent.name}"  # .../snapshots/<commit>/<file>
    if name.startswith(URL_SCHEMES):
        return download(name, model), f"url:{name}"
    path = Path(name).expanduser()
    if path.is_dir():
        raise model.error(f"{model.label} weights {path} is a folder, not a weights file (give the "
                          ".safetensors or .pth file inside it)")
    if not path.is_file():
        raise model.error(f"{model.label} weights file not found: {path}")
    return path, f"file:{path}"


def hub_file(model: ModelWeights) -> Path:
    """The official file from the Hugging Face cache, downloaded into it first when allowed.

    Fails fast when it cannot come: the cache is read first; with nothing cached, an offline hub
    (HF_HUB_OFFLINE=1) or one that does not answer one metadata request within `HUB_PROBE_S` fails
    at once, without huggingface_hub's retries."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_download, hf_hub_url, try_to_load_from_cache

    hub = model.hub
    where = f"{hub.repo} {hub.filename} @{(hub.revision or 'main')[:7]}"
    cached = try_to_load_from_cache(hub.repo, hub.filename, revision=hub.revision)
    if isinstance(cached, str):
        return Path(cached)
    if constants.HF_HUB_OFFLINE:
        raise model.error(f"no {model.label} weights: {where} is not in the Hugging Face cache and the hub is off "
                          "(HF_HUB_OFFLINE=1)")
    try:
        get_hf_file_metadata(hf_hub_url(hub.repo, hub.filename, revision=hub.revision), timeout=HUB_PROBE_S)
        return Path(hf_hub_download(hub.repo, hub.filename, revision=hub.revision))
    except Exception as err:  # unreachable, gated, missing, interrupted: all mean "no weights here"
        raise model.error(f"no {model.label} weights: {where} is not in the Hugging Face cache and the hub "
                          f"did not provide it ({one_line(err, REASON_CHARS)})") from err


def check_sources(sources: Iterable[tuple[str | os.PathLike, ModelWeights]]) -> None:
    """Make sure every (source, model) pair's weights are on disk (`locate`; random stand-ins need
    none), fetching official or URL files that can be fetched. One WeightsError naming every model
    whose weights are missing, in one line."""
    errors = []
    for source, model in sources:
        if is_random(source):
            continue
        try:
            locate(source, model)
        except WeightsError as err:
            errors.append(str(err))
    if len(errors) == 1:
        raise WeightsError(errors[0])
    if errors:
        raise WeightsError(f"{len(errors)} models have no weights: " + " || ".join(errors))


def download(url: str, model: ModelWeights) -> Path:
    """`url` downloaded once into torch hub's checkpoints folder; the cached copy when already there."""
    target = model.torch_hub_file(os.path.basename(urlparse(url).path))
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        torch.hub.download_url_to_file(url, str(target), progress=False)  # via a temporary file: whole or nothing
    except (OSError, ValueError) as err:  # URLError, HTTPError, socket errors, missing file:// targets
        raise model.error(f"could not download the {model.label} weights from {url} into {target} "
                          f"({one_line(err, REASON_CHARS)})") from err
    return target


def read_state_dict(path: Path, model: ModelWeights) -> dict[str, torch.Tensor]:
    """The tensors of a `.safetensors` file or a torch-saved state dict (weights only, on the CPU).

    A state dict wrapped under "model" or "state_dict" is unwrapped. Anything else (a video, a text
    file, a pickle of something other than tensors) raises WeightsError.
    """
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling, zip, magic-number and safetensors header errors alike
        raise model.error(f"{path} is not a {model.label} checkpoint ({one_line(err, REASON_CHARS)})") from err
    return tensors_of(state, str(path), model)


def tensors_of(state, source: str, model: ModelWeights) -> dict[str, torch.Tensor]:
    """`state` (a mapping of tensors or arrays, possibly wrapped under "model" / "state_dict") as a
    dict of tensors; WeightsError for anything else."""
    for wrapper in ("model", "state_dict"):
        if isinstance(state, Mapping) and isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    if not isinstance(state, Mapping) or not state:
        raise model.error(f"{source} is not a {model.label} checkpoint (it holds a {type(state).__name__}, "
                          "not a state dict)")
    bad = [k for k, v in state.items() if not isinstance(v, (torch.Tensor, np.ndarray))]
    if bad:
        raise model.error(f"{source} is not a {model.label} checkpoint ({len(bad)} entries are not tensors, "
                          f"e.g. {bad[0]!r})")
    return {str(k): torch.as_tensor(v) for k, v in state.items()}


def _named(items: list[str]) -> str:
    """The first few items, comma-separated, and how many more."""
    more = f" and {len(items) - _MAX_KEYS_NAMED} more" if len(items) > _MAX_KEYS_NAMED else ""
    return ", ".join(items[:_MAX_KEYS_NAMED]) + more


def _value_problems(state: Mapping, expected: Mapping) -> list[str]:
    """Tensors of `state` whose dtype cannot stand for the model's (an integer or boolean tensor where a
    floating-point one belongs) or that hold NaN or infinite values: one line per kind, or none."""
    wrong, bad = [], []
    for k, v in expected.items():
        given = torch.as_tensor(state[k])
        if v.is_floating_point() and not given.is_floating_point():
            wrong.append(f"{k} {str(given.dtype).removeprefix('torch.')} (model "
                         f"{str(v.dtype).removeprefix('torch.')})")
        elif given.is_floating_point() and not bool(torch.isfinite(given).all()):
            bad.append(k)
    return ([f"wrong dtypes {_named(wrong)}"] if wrong else []) + ([f"NaN or infinite values in {_named(bad)}"]
                                                                   if bad else [])


def load_strict(module: torch.nn.Module, state: Mapping, model: ModelWeights, source: str,
                assign: bool = False) -> None:
    """`module.load_state_dict(state, strict=True)`; missing or unexpected keys, wrong shapes, integer
    tensors where the model holds floating-point ones, and NaN or infinite values raise WeightsError
    naming the first of them."""
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    parts = [f"{kind} {_named(keys)}" for kind, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    if not parts:
        wrong = [f"{k} {tuple(state[k].shape)} (model {tuple(v.shape)})" for k, v in expected.items()
                 if tuple(state[k].shape) != tuple(v.shape)]
        parts = [f"wrong shapes {_named(wrong)}"] if wrong else []
    if not parts:
        parts = _value_problems(state, expected)
    if parts:
        raise model.error(f"{source} does not fit {model.label}: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True, assign=assign)


# ----------------------------------------------------------------------------- stand-in weights

Special = Callable[[str, tuple[int, ...], np.random.RandomState], "np.ndarray | None"]


def plain_draw(key: str, shape: tuple[int, ...], rng: np.random.RandomState) -> np.ndarray:
    """The shared stand-in rule, prod(shape) float64 draws: ndim >= 2: U(-b, b) with
    b = 1/sqrt(prod(shape[1:])) (fan-in); 1-D keys ending in "weight": 1 + 0.1 N(0, 1); other 1-D: 0.02 N(0, 1)."""
    if len(shape) >= 2:
        bound = 1.0 / np.sqrt(int(np.prod(shape[1:])))
        return rng.uniform(-bound, bound, size=shape)
    if key.endswith("weight"):
        return 1.0 + 0.1 * rng.standard_normal(size=shape)
    return 0.02 * rng.standard_normal(size=shape)


def stand_in_state_dict(layout: Iterable[tuple[str, tuple[int, ...]]], seed: int = 0,
                        special: Special | None = None) -> dict[str, np.ndarray]:
    """Deterministic meaningless weights for `layout` ((key, shape) in state-dict order): float32 arrays.

    One `np.random.RandomState(seed)` (numpy's legacy MT19937 stream, frozen across numpy versions)
    walks the keys in order. `special(key, shape, rng)` gives a model's own rule for a key (drawing
    from rng or not) or None; every other key takes `plain_draw`. Values are float64, cast to float32.
    """
    rng = np.random.RandomState(seed)
    out = {}
    for key, shape in layout:
        shape = tuple(int(s) for s in shape)
        value = special(key, shape, rng) if special is not None else None
        out[key] = np.asarray(plain_draw(key, shape, rng) if value is None else value, np.float64).astype(np.float32)
    return out
