"""DINOv2 patch features through timm, numerically equal to the official hub model.

`DinoV2Extractor` maps uint8 frames (T, 3, H, W) to the final LayerNorm-ed patch tokens
(T, 16, 16, D) of a 224x224 input (aspect ratio ignored, ImageNet mean/std), i.e. the official
`forward_features(x)["x_norm_patchtokens"]` reshaped row-major (row = y).

Weights (`checkpoint=`), all through ONE loading path (`load_weights`):
* `None`: timm's copy of the official weights on the Hugging Face hub (downloaded and cached by
  `huggingface_hub`); offline with nothing cached raises a RuntimeError that says what to do.
* a path: an official DINOv2 checkpoint (`dinov2_vitb14_pretrain.pth`, keys with `mask_token`) or
  a timm checkpoint (`model.safetensors` / `.pth`), or a state dict of either format in memory.
* `"random"`: meaningless stand-in weights for tests. ViT-S/B/L without registers use the
  deterministic numpy recipe of `shared/dinov2/RECIPE.md` in the official format (byte-identical
  to `shared/dinov2/weights.py` for S and B), loaded through the same path. The register variants
  and ViT-g have no recipe layout: they keep timm's own initialisation under `torch.manual_seed(seed)`.

Position embeddings: the checkpoints hold a 37x37 table (518 px). The official runtime resamples it
for every 224 px call with its own rule (no-register models: bicubic, `scale_factor=(16 + 0.1) / 37`,
no antialias; register models: bicubic to `size=(16, 16)` with antialias). timm's load-time
resampling differs for the no-register models (up to 0.44 in the tokens), so `load_weights` applies
the official rule to the table before handing the state dict to timm's checkpoint filter, which then
leaves it alone.

Preprocessing (`preprocess=`):
* `"pil"`: the research path, frame by frame on the CPU: PIL bilinear resize to 224x224 (antialiased,
  uint8 result), /255, ImageNet normalisation. Bit-identical to the research inputs.
* `"tensor"` (default): batched uint8 antialiased bilinear resize on the frames' device, then the
  same normalisation. On the CPU it is `F.interpolate` on uint8 (PyTorch's fixed-point kernel: off
  by one grey level in 0.07-0.17 % of values vs PIL on the shared clips, tokens within mean abs
  1e-3 and cosine 0.99997 of the PIL path's). Other devices have no uint8 kernel, so there
  `fixed_point_resize` computes PIL's fixed-point tent filter as exact float64 matrix products;
  it equals PIL on every shared clip size (it is too slow to replace the CPU kernel).
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

INPUT_SIZE = 224
PATCH = 14
GRID = INPUT_SIZE // PATCH  # 16
SOURCE_GRID = 37  # checkpoints hold the 518 px (37x37) position table
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS = ("tensor", "pil")


@dataclass(frozen=True)
class ModelSpec:
    """One selectable DINOv2 backbone.

    `mlp_hidden` is None for ViT-g (SwiGLU, no recipe layout). `pos_offset` is the official
    runtime rule: 0.1 -> bicubic with `scale_factor=(g + 0.1) / 37`, no antialias; 0.0 -> bicubic
    to `size=(g, g)` with antialias (the register models).
    """

    timm_name: str
    embed_dim: int
    depth: int
    mlp_hidden: int | None
    registers: int
    pos_offset: float

    @property
    def has_recipe(self) -> bool:
        return self.registers == 0 and self.mlp_hidden is not None


MODELS: dict[str, ModelSpec] = {
    "vits14": ModelSpec("vit_small_patch14_dinov2.lvd142m", 384, 12, 1536, 0, 0.1),
    "vitb14": ModelSpec("vit_base_patch14_dinov2.lvd142m", 768, 12, 3072, 0, 0.1),
    "vitl14": ModelSpec("vit_large_patch14_dinov2.lvd142m", 1024, 24, 4096, 0, 0.1),
    "vitg14": ModelSpec("vit_giant_patch14_dinov2.lvd142m", 1536, 40, None, 0, 0.1),
    "vits14_reg": ModelSpec("vit_small_patch14_reg4_dinov2.lvd142m", 384, 12, 1536, 4, 0.0),
    "vitb14_reg": ModelSpec("vit_base_patch14_reg4_dinov2.lvd142m", 768, 12, 3072, 4, 0.0),
    "vitl14_reg": ModelSpec("vit_large_patch14_reg4_dinov2.lvd142m", 1024, 24, 4096, 4, 0.0),
    "vitg14_reg": ModelSpec("vit_giant_patch14_reg4_dinov2.lvd142m", 1536, 40, None, 4, 0.0),
}


def model_spec(model: str) -> ModelSpec:
    if model not in MODELS:
        raise ValueError(f"unknown DINOv2 model {model!r}; choose one of {', '.join(MODELS)}")
    return MODELS[model]


# ----------------------------------------------------------------------------- position table


def official_pos_embed(pos_embed: torch.Tensor, grid: int = GRID, offset: float = 0.1) -> torch.Tensor:
    """Resample a position table with the official DINOv2 runtime rule.

    pos_embed: (1, P + M*M, D) with P = 1 (a CLS row first) or 0 prefix rows; the M x M grid is
    row-major (row = y). Returns (1, P + grid*grid, D) in the input dtype, computed in float32.
    offset > 0: bicubic, `scale_factor=(grid + offset) / M`, no antialias (models without
    registers); offset == 0: bicubic to `size=(grid, grid)` with antialias (register models).
    A table already on a grid x grid grid is returned unchanged.
    """
    n, dim = pos_embed.shape[1], pos_embed.shape[2]
    prefix = 1 if math.isqrt(n - 1) ** 2 == n - 1 else 0
    side = math.isqrt(n - prefix)
    if side * side != n - prefix:
        raise ValueError(f"pos_embed with {n} rows is neither a square grid nor a CLS row plus a square grid")
    if side == grid:
        return pos_embed
    table = pos_embed[:, prefix:].float().reshape(1, side, side, dim).permute(0, 3, 1, 2)  # (1, D, M, M)
    if offset > 0:
        scale = (grid + offset) / side
        table = F.interpolate(table, scale_factor=(scale, scale), mode="bicubic", align_corners=False, antialias=False)
    else:
        table = F.interpolate(table, size=(grid, grid), mode="bicubic", align_corners=False, antialias=True)
    if table.shape[-2:] != (grid, grid):
        raise ValueError(f"position table resampled to {tuple(table.shape[-2:])}, expected {(grid, grid)}")
    table = table.permute(0, 2, 3, 1).reshape(1, grid * grid, dim)
    return torch.cat([pos_embed[:, :prefix].float(), table], dim=1).to(pos_embed.dtype)


# ----------------------------------------------------------------------------- weights


def official_layout(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Keys and shapes of the official hub model's `state_dict()`, in order (no-register S/B/L).

    Equals `shared/dinov2/state_dict_manifest*.tsv` for ViT-B/14 and ViT-S/14.
    """
    if not spec.has_recipe:
        raise ValueError(f"no official recipe layout for {spec.timm_name} (registers or SwiGLU)")
    d, h = spec.embed_dim, spec.mlp_hidden
    rows = [
        ("cls_token", (1, 1, d)),
        ("pos_embed", (1, 1 + SOURCE_GRID * SOURCE_GRID, d)),
        ("mask_token", (1, d)),
        ("patch_embed.proj.weight", (d, 3, PATCH, PATCH)),
        ("patch_embed.proj.bias", (d,)),
    ]
    for i in range(spec.depth):
        b = f"blocks.{i}."
        rows += [
            (b + "norm1.weight", (d,)), (b + "norm1.bias", (d,)),
            (b + "attn.qkv.weight", (3 * d, d)), (b + "attn.qkv.bias", (3 * d,)),
            (b + "attn.proj.weight", (d, d)), (b + "attn.proj.bias", (d,)),
            (b + "ls1.gamma", (d,)),
            (b + "norm2.weight", (d,)), (b + "norm2.bias", (d,)),
            (b + "mlp.fc1.weight", (h, d)), (b + "mlp.fc1.bias", (h,)),
            (b + "mlp.fc2.weight", (d, h)), (b + "mlp.fc2.bias", (d,)),
            (b + "ls2.gamma", (d,)),
        ]
    return rows + [("norm.weight", (d,)), ("norm.bias", (d,))]


def recipe_state_dict(model: str = "vitb14", seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic stand-in weights (RECIPE.md) in the official format: float32 numpy arrays.

    One `np.random.RandomState(seed)` walks the keys in state-dict order; each tensor takes
    prod(shape) draws (float64, C order) and is cast to float32. First matching rule:
    token tables 0.02*N(0,1); LayerScale gammas 0.1 + 0.05*N(0,1); ndim >= 2 weights
    U(-1/sqrt(fan_in), +1/sqrt(fan_in)); 1-D `weight` (LayerNorm) 1 + 0.1*N(0,1); other 1-D 0.02*N(0,1).
    """
    rng = np.random.RandomState(seed)
    out = {}
    for key, shape in official_layout(model_spec(model)):
        if key in ("pos_embed", "cls_token", "mask_token"):
            val = 0.02 * rng.standard_normal(size=shape)
        elif key.endswith(("ls1.gamma", "ls2.gamma")):
            val = 0.1 + 0.05 * rng.standard_normal(size=shape)
        elif len(shape) >= 2:
            bound = 1.0 / np.sqrt(int(np.prod(shape[1:])))
            val = rng.uniform(-bound, bound, size=shape)
        elif key.endswith(".weight"):
            val = 1.0 + 0.1 * rng.standard_normal(size=shape)
        else:
            val = 0.02 * rng.standard_normal(size=shape)
        out[key] = np.asarray(val, dtype=np.float64).astype(np.float32)
    return out


def _how_to_provide(model: str, spec: ModelSpec) -> str:
    from huggingface_hub import constants

    repo = "timm/" + spec.timm_name
    return (
        f"Provide the DINOv2 '{model}' weights in one of these ways: (1) a local checkpoint, either the "
        f"official dinov2 .pth or timm's model.safetensors from https://huggingface.co/{repo}, passed as "
        f"`--dinov2_checkpoint PATH` (DinoV2Extractor(checkpoint=PATH)); (2) the hub files in the Hugging "
        f"Face cache at {constants.HF_HUB_CACHE} (run once online, or `huggingface-cli download {repo}`; "
        f"HF_HOME / HF_HUB_CACHE choose the folder); (3) checkpoint='random' for tests only "
        f"(meaningless features)."
    )


def hub_checkpoint(model: str) -> Path:
    """Path of timm's hub checkpoint for `model`, downloaded into (or found in) the HF cache."""
    from huggingface_hub import hf_hub_download

    spec = model_spec(model)
    repo = "timm/" + spec.timm_name
    try:
        return Path(hf_hub_download(repo, "model.safetensors"))
    except Exception as err:  # offline, not cached, no network, gated: all mean "no weights here"
        raise RuntimeError(
            f"could not get the DINOv2 weights {repo} from the Hugging Face hub "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). "
            + _how_to_provide(model, spec)
        ) from err


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a `.safetensors` file or a torch pickle (weights only, CPU)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DINOv2 checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        raise ValueError(f"DINOv2 checkpoint {path} holds a {type(state).__name__}, not a state dict")
    return dict(state)


def to_timm_state_dict(state: Mapping, model: torch.nn.Module, spec: ModelSpec) -> dict[str, torch.Tensor]:
    """Official- or timm-format state dict -> timm keys for `model`, with the official position table.

    Accepts numpy arrays or tensors; a dict wrapped under "model" / "state_dict" is unwrapped. The
    37x37 table is resampled to 16x16 with `official_pos_embed` first, so timm's checkpoint filter
    (key renames, register/CLS folding, `mask_token` removal) finds nothing left to resample.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    for wrapper in ("model", "state_dict"):
        if isinstance(state.get(wrapper), Mapping):
            state = state[wrapper]
    sd = {k: torch.as_tensor(v).to(torch.float32) for k, v in state.items()}  # a copy: the filter pops keys
    if "pos_embed" not in sd:
        raise ValueError(f"not a DINOv2 state dict for {spec.timm_name}: no 'pos_embed' key")
    sd["pos_embed"] = official_pos_embed(sd["pos_embed"], GRID, spec.pos_offset)
    return checkpoint_filter_fn(sd, model)


def load_weights(model: torch.nn.Module, state: Mapping, spec: ModelSpec) -> None:
    """Strictly load `state` (either format) into a timm model built for 224 px (possibly on meta)."""
    sd = to_timm_state_dict(state, model, spec)
    try:
        model.load_state_dict(sd, strict=True, assign=True)
    except RuntimeError as err:
        raise ValueError(f"the checkpoint does not fit {spec.timm_name}: {err}") from err


def build_backbone(model: str = "vitb14", checkpoint=None, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """A timm DINOv2 backbone for 224 px inputs with weights loaded, and a one-line weights id.

    checkpoint: None (hub) | "random" | path | state dict (official or timm format).
    """
    import timm

    spec = model_spec(model)
    kwargs = dict(pretrained=False, img_size=INPUT_SIZE, num_classes=0)
    if isinstance(checkpoint, str) and checkpoint == "random" and not spec.has_recipe:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = timm.create_model(spec.timm_name, **kwargs)
        return net, f"random:timm-init-seed{seed}"
    if checkpoint is None:
        path = hub_checkpoint(model)  # .../snapshots/<revision>/model.safetensors
        state, source = read_checkpoint(path), f"hub:timm/{spec.timm_name}@{path.parent.name}"
    elif isinstance(checkpoint, Mapping):  # copied: the model must not alias the caller's tensors
        state, source = {k: torch.as_tensor(v).clone() for k, v in checkpoint.items()}, "state_dict"
    elif isinstance(checkpoint, str) and checkpoint == "random":
        state, source = recipe_state_dict(model, seed), f"random:recipe-seed{seed}"
    elif isinstance(checkpoint, (str, os.PathLike)):
        state, source = read_checkpoint(checkpoint), f"file:{os.fspath(checkpoint)}"
    else:
        raise ValueError(f"checkpoint must be None, 'random', a path or a state dict, not {type(checkpoint).__name__}")
    with torch.device("meta"):  # no init: every tensor comes from the checkpoint (assign=True)
        net = timm.create_model(spec.timm_name, **kwargs)
    load_weights(net, state, spec)
    if any(t.is_meta for t in net.state_dict().values()):
        raise RuntimeError(f"{spec.timm_name}: some tensors were not in the checkpoint")
    return net, source


# ----------------------------------------------------------------------------- preprocessing

_PRECISION_BITS = 22  # fixed-point filter coefficients, as PIL's and PyTorch's uint8 resamplers


def _filter_matrix(n_in: int, n_out: int, dtype: torch.dtype, device) -> torch.Tensor:
    """(n_out, n_in) integer-valued antialiased bilinear (tent) weights in units of 2**-22.

    Output i is centred at source coordinate (i + 0.5) * n_in / n_out; the tent is widened by the
    downscale factor, restricted to whole source pixels within the support, normalised to sum 1 and
    rounded to fixed point.
    """
    scale = n_in / n_out
    width = max(scale, 1.0)
    centre = (np.arange(n_out) + 0.5) * scale  # (n_out,)
    lo = np.maximum((centre - width + 0.5).astype(np.int64), 0)
    hi = np.minimum((centre + width + 0.5).astype(np.int64), n_in)
    j = np.arange(n_in)
    w = np.clip(1.0 - np.abs((j[None, :] - centre[:, None] + 0.5) / width), 0.0, None)
    w = np.where((j[None, :] >= lo[:, None]) & (j[None, :] < hi[:, None]), w, 0.0)
    w = w / w.sum(axis=1, keepdims=True)
    return torch.from_numpy(np.floor(w * (1 << _PRECISION_BITS) + 0.5)).to(device=device, dtype=dtype)


def _fixed_point_round(x: torch.Tensor) -> torch.Tensor:
    half = float(1 << (_PRECISION_BITS - 1))
    return torch.floor((x + half) / float(1 << _PRECISION_BITS)).clamp_(0, 255)


def fixed_point_resize(frames: torch.Tensor, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> torch.Tensor:
    """Antialiased bilinear resize of uint8 (T, 3, H, W) -> (T, 3, *size) uint8 on any device.

    A fixed-point separable tent filter (width pass, round to uint8, height pass, round) as float64
    matrix products: exact integer arithmetic, because every product and partial sum is an integer
    below 2**53. Equals PIL's bilinear resize on the fixture frames and on the first frames of every
    shared clip size; PIL runs the height pass first for some shapes, where this can be one grey
    level off.
    """
    h, w = frames.shape[-2:]
    x = frames.to(torch.float64)  # (T, 3, H, W)
    if w != size[1]:
        x = _fixed_point_round(x @ _filter_matrix(w, size[1], x.dtype, x.device).T)  # (T, 3, H, w')
    if h != size[0]:
        x = _fixed_point_round(_filter_matrix(h, size[0], x.dtype, x.device) @ x)  # (T, 3, h', w')
    return x.to(torch.uint8)


def resize_uint8(frames: torch.Tensor, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> torch.Tensor:
    """Batched antialiased bilinear resize of uint8 (T, 3, H, W) -> (T, 3, *size) uint8, on their device.

    CPU: PyTorch's uint8 kernel (`F.interpolate(..., antialias=True)`, fastest there). Other devices
    have no uint8 kernel: `fixed_point_resize` computes the same filter there.
    """
    if frames.device.type == "cpu":
        return F.interpolate(frames, size=size, mode="bilinear", antialias=True, align_corners=False)
    return fixed_point_resize(frames, size)


def resize_pil(frames: torch.Tensor, size: tuple[int, int] = (INPUT_SIZE, INPUT_SIZE)) -> torch.Tensor:
    """The research resize: each frame through PIL bilinear (antialiased) -> (T, 3, *size) uint8, CPU."""
    from PIL import Image

    hwc = frames.permute(0, 2, 3, 1).cpu().numpy()  # (T, H, W, 3) uint8
    out = [np.asarray(Image.fromarray(f).resize((size[1], size[0]), Image.BILINEAR)) for f in hwc]
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)


# ----------------------------------------------------------------------------- extractor


class DinoV2Extractor(torch.nn.Module):
    """Frozen DINOv2 backbone: uint8 frames -> final normalised patch tokens.

    Args:
        model: one of `MODELS` ("vits14", "vitb14" (default, the research setting), "vitl14",
            "vitg14", and "..._reg" with 4 registers).
        checkpoint: None (timm's hub weights), "random" (stand-in weights, see module doc), a path
            (official or timm checkpoint) or a state dict of either format.
        preprocess: "tensor" (batched on the frames' device) or "pil" (research-exact, CPU loop).
        batch_size: frames per network call; bounds memory for long inputs.

    `weights_id` says what was loaded ("hub:timm/<name>@<revision>", "file:PATH", "state_dict",
    "random:recipe-seed0" or "random:timm-init-seed0").
    Autocast set by the caller applies to the network only; preprocessing always runs in full
    precision and the output is float32.
    """

    def __init__(self, model: str = "vitb14", checkpoint=None, preprocess: str = "tensor", batch_size: int = 32):
        super().__init__()
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}, not {preprocess!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.model_name, self.preprocess, self.batch_size = model, preprocess, batch_size
        self.backbone, self.weights_id = build_backbone(model, checkpoint)
        self.backbone.eval().requires_grad_(False)
        self.embed_dim = self.backbone.embed_dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, 224, 224) -> float32 (B, 3, 224, 224): /255 then ImageNet mean/std."""
        return (pixels.to(self.device).float().div(255.0) - self.mean) / self.std

    def preprocess_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (T, 3, H, W) -> normalised float32 (T, 3, 224, 224) on the module's device."""
        if self.preprocess == "pil":
            return self.normalise(resize_pil(frames))
        with torch.autocast(frames.device.type, enabled=False):
            return self.normalise(resize_uint8(frames))

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float (B, 3, 224, 224) -> patch tokens (B, 16, 16, D) (dtype of the network
        run, i.e. float32 unless autocast is on)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, INPUT_SIZE, INPUT_SIZE):
            raise ValueError(f"tokens() expects (B, 3, {INPUT_SIZE}, {INPUT_SIZE}) inputs, got {tuple(x.shape)}")
        with torch.inference_mode():
            seq = self.backbone.forward_features(x.to(self.device))  # (B, prefix + 256, D) after the final norm
            patches = seq[:, self.backbone.num_prefix_tokens:]
            return patches.reshape(x.shape[0], GRID, GRID, patches.shape[-1])

    def forward(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 RGB frames (T, 3, H, W) on any device -> float32 tokens (T, 16, 16, D) on the module's device."""
        if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
            raise ValueError(f"frames must be uint8 (T, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
        out = torch.empty(frames.shape[0], GRID, GRID, self.embed_dim, device=self.device)  # (T, 16, 16, D)
        with torch.inference_mode():
            for start in range(0, frames.shape[0], self.batch_size):
                chunk = frames[start:start + self.batch_size]
                out[start:start + chunk.shape[0]] = self.tokens(self.preprocess_frames(chunk)).float()
        return out
