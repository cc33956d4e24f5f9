"""DINOv2 (and opt-in DINOv3) patch features through timm; DINOv2 numerically equal to the official hub model.

`DinoV2Extractor` maps uint8 frames (T, 3, H, W) to the final LayerNorm-ed patch tokens (T, 16, 16, D)
of a square input 16 patches wide (aspect ratio ignored, ImageNet mean/std): 224 px for DINOv2
(patch 14), 256 px for DINOv3 (patch 16). For DINOv2 these are the official
`forward_features(x)["x_norm_patchtokens"]` reshaped row-major (row = y).

Models (`MODELS`): DINOv2 "vits14", "vitb14" (default, the research setting), "vitl14", "vitg14" and
their "..._reg" variants (4 registers), Apache-2.0; DINOv3 "dinov3_vits16", "dinov3_vitb16",
"dinov3_vitl16" (RoPE, 4 registers, no position table; DINOv3 License), opt-in.

Weights (`checkpoint=`), resolved by the rule of `semtrack.weights`:
* None or "official": timm's copy of the official weights on the Hugging Face hub
  (`timm/<name>` model.safetensors, at the revision `ModelSpec.revision` pins where one is known).
* a path or URL: an official DINOv2 checkpoint (`dinov2_vitb14_pretrain.pth`, keys with
  `mask_token`), an official DINOv3 checkpoint (keys with `storage_tokens`) or a timm checkpoint
  (`model.safetensors` / `.pth`); or a state dict of any of these formats in memory.
* "random": meaningless stand-in weights for tests. DINOv2 ViT-S/B/L without registers use the
  deterministic numpy recipe of `shared/dinov2/RECIPE.md` in the official format (byte-identical to
  `shared/dinov2/weights.py` for S and B), loaded through the same path. The register variants,
  ViT-g and DINOv3 have no recipe layout: they keep timm's own initialisation under
  `torch.manual_seed(seed)`.

DINOv2 position embeddings: the checkpoints hold a 37x37 table (518 px). The official runtime
resamples it for every 224 px call with its own rule (no-register models: bicubic,
`scale_factor=(16 + 0.1) / 37`, no antialias; register models: bicubic to `size=(16, 16)` with
antialias). timm's load-time resampling differs for the no-register models (up to 0.44 in the
tokens), so the official rule is applied to the table before timm's checkpoint filter, which then
leaves it alone.

Preprocessing (`preprocess=`), a bilinear antialiased resize to the input size, then /255 and
ImageNet normalisation:
* "pil" (default): PIL-identical pixels on every device, i.e. the research inputs bit for bit. On
  the CPU each frame goes through PIL (`resize_pil`); on other devices `fixed_point_resize` computes
  Pillow's fixed-point filter exactly, batched on the frames' device.
* "tensor": PyTorch's own antialiased kernel on the frames' device (`resize_tensor`): the uint8
  kernel on the CPU (one grey level off PIL in ~0.1 % of values), the float kernel rounded to uint8
  elsewhere. Fastest, but the pixels depend on the device.
"""
from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from semtrack.resize import resize_pil_identical, resize_tensor
from semtrack.transfer import upload
from semtrack.util import one_line
from semtrack.weights import (
    OFFICIAL,
    REASON_CHARS,
    HubFile,
    ModelWeights,
    is_random,
    load_strict,
    locate,
    read_state_dict,
    stand_in_state_dict,
    tensors_of,
)

GRID = 16  # patches per side of every model's input
SOURCE_GRID = 37  # DINOv2 checkpoints hold the 518 px (37x37) position table
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PREPROCESS = ("pil", "tensor")
GPU_BATCH_FRAMES = 256  # frames per network call on a GPU: a batch of 8 clips x 32 clustering frames, ~2.5 GB for ViT-B


@dataclass(frozen=True)
class ModelSpec:
    """One selectable backbone.

    `mlp_hidden` is None for ViT-g (SwiGLU, no recipe layout). `pos_offset` is DINOv2's official
    runtime rule for the position table: 0.1 -> bicubic with `scale_factor=(g + 0.1) / 37`, no
    antialias; 0.0 -> bicubic to `size=(g, g)` with antialias (the register models); None: a RoPE
    model without a position table (DINOv3). `revision`: the pinned commit of the timm hub repo
    (None: its default branch).
    """

    timm_name: str
    patch: int
    embed_dim: int
    depth: int
    mlp_hidden: int | None
    registers: int
    pos_offset: float | None
    revision: str | None = None

    @property
    def family(self) -> str:
        return "DINOv3" if self.pos_offset is None else "DINOv2"

    @property
    def input_size(self) -> int:
        """Side of the square input in pixels (GRID patches)."""
        return GRID * self.patch

    @property
    def has_recipe(self) -> bool:
        return self.pos_offset is not None and self.registers == 0 and self.mlp_hidden is not None


# Pinned timm hub commits, from the repos' commit pages on huggingface.co: the newest commit of main
# found, each holding model.safetensors as uploaded by "Add model". None where no full sha was found.
MODELS: dict[str, ModelSpec] = {
    "vits14": ModelSpec("vit_small_patch14_dinov2.lvd142m", 14, 384, 12, 1536, 0, 0.1,
                        "cace07adb9220de26eb51226ecbef6d04d35defe"),
    "vitb14": ModelSpec("vit_base_patch14_dinov2.lvd142m", 14, 768, 12, 3072, 0, 0.1,
                        "1dc7cda4727a9f4baa37f3ef407928dd642d0149"),
    "vitl14": ModelSpec("vit_large_patch14_dinov2.lvd142m", 14, 1024, 24, 4096, 0, 0.1,
                        "8125e2a980163a1791d580087772445aec69d490"),
    "vitg14": ModelSpec("vit_giant_patch14_dinov2.lvd142m", 14, 1536, 40, None, 0, 0.1),
    "vits14_reg": ModelSpec("vit_small_patch14_reg4_dinov2.lvd142m", 14, 384, 12, 1536, 4, 0.0),
    "vitb14_reg": ModelSpec("vit_base_patch14_reg4_dinov2.lvd142m", 14, 768, 12, 3072, 4, 0.0),
    "vitl14_reg": ModelSpec("vit_large_patch14_reg4_dinov2.lvd142m", 14, 1024, 24, 4096, 4, 0.0,
                            "757db394c14a33b44296267d6dac0982d6c63a61"),
    "vitg14_reg": ModelSpec("vit_giant_patch14_reg4_dinov2.lvd142m", 14, 1536, 40, None, 4, 0.0),
    "dinov3_vits16": ModelSpec("vit_small_patch16_dinov3.lvd1689m", 16, 384, 12, 1536, 4, None),
    "dinov3_vitb16": ModelSpec("vit_base_patch16_dinov3.lvd1689m", 16, 768, 12, 3072, 4, None),
    "dinov3_vitl16": ModelSpec("vit_large_patch16_dinov3.lvd1689m", 16, 1024, 24, 4096, 4, None),
}


def model_spec(model: str) -> ModelSpec:
    if model not in MODELS:
        raise ValueError(f"unknown feature model {model!r}; choose one of {', '.join(MODELS)}")
    return MODELS[model]


def model_weights(model: str) -> ModelWeights:
    """How `model`'s weights are named in messages and where the official copy lives."""
    spec = model_spec(model)
    return ModelWeights(f"{spec.family} {model!r}", "--dinov2_checkpoint",
                        HubFile("timm/" + spec.timm_name, "model.safetensors", spec.revision))


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
    """Keys and shapes of the official DINOv2 hub model's `state_dict()`, in order (no-register S/B/L).

    Equals `shared/dinov2/state_dict_manifest*.tsv` for ViT-B/14 and ViT-S/14.
    """
    if not spec.has_recipe:
        raise ValueError(f"no official recipe layout for {spec.timm_name} (registers, SwiGLU or RoPE)")
    d, h = spec.embed_dim, spec.mlp_hidden
    rows = [
        ("cls_token", (1, 1, d)),
        ("pos_embed", (1, 1 + SOURCE_GRID * SOURCE_GRID, d)),
        ("mask_token", (1, d)),
        ("patch_embed.proj.weight", (d, 3, spec.patch, spec.patch)),
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


def _dinov2_special(key: str, shape: tuple[int, ...], rng: np.random.RandomState) -> np.ndarray | None:
    """RECIPE.md's rules ahead of the shared plain rule: token tables 0.02 N(0, 1), LayerScale
    gammas 0.1 + 0.05 N(0, 1)."""
    if key in ("pos_embed", "cls_token", "mask_token"):
        return 0.02 * rng.standard_normal(size=shape)
    if key.endswith(("ls1.gamma", "ls2.gamma")):
        return 0.1 + 0.05 * rng.standard_normal(size=shape)
    return None


def recipe_state_dict(model: str = "vitb14", seed: int = 0) -> dict[str, np.ndarray]:
    """Deterministic DINOv2 stand-in weights (RECIPE.md) in the official format: float32 numpy arrays.

    `semtrack.weights.stand_in_state_dict` over `official_layout` with RECIPE.md's token-table and
    LayerScale rules; every other key takes the shared plain rule.
    """
    return stand_in_state_dict(official_layout(model_spec(model)), seed, _dinov2_special)


def to_timm_state_dict(state: Mapping[str, torch.Tensor], model: torch.nn.Module, spec: ModelSpec,
                       weights: ModelWeights, source: str) -> dict[str, torch.Tensor]:
    """Official- or timm-format float tensors -> timm keys for `model` (float32; a copy, the filters pop keys).

    DINOv2: the 37x37 table is resampled to 16x16 with `official_pos_embed` first, so timm's
    checkpoint filter (key renames, register/CLS folding, `mask_token` removal) finds nothing left to
    resample. DINOv3: timm's Eva filter (official `storage_tokens` layout -> timm keys; timm keys as is).
    """
    sd = {k: v.to(torch.float32) for k, v in state.items()}
    if spec.pos_offset is None:
        from timm.models.eva import checkpoint_filter_fn
    else:
        from timm.models.vision_transformer import checkpoint_filter_fn

        if "pos_embed" not in sd:
            raise weights.error(f"{source} is not a {weights.label} checkpoint (no 'pos_embed' key)")
    try:
        if spec.pos_offset is not None:
            sd["pos_embed"] = official_pos_embed(sd["pos_embed"], GRID, spec.pos_offset)
        return checkpoint_filter_fn(sd, model)
    except (ValueError, KeyError, IndexError, RuntimeError) as err:  # tables or keys of another layout
        raise weights.error(f"{source} is not a {weights.label} checkpoint ({one_line(err, REASON_CHARS)})") from err


def _timm_model(spec: ModelSpec, seed: int) -> torch.nn.Module:
    """timm's architecture for `spec` at its input size, initialised by timm under `torch.manual_seed(seed)`
    (the global RNG is left as it was)."""
    import timm

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return timm.create_model(spec.timm_name, pretrained=False, img_size=spec.input_size, num_classes=0)


def _empty_model(spec: ModelSpec, seed: int) -> torch.nn.Module:
    """A model to load every tensor into: on the meta device for DINOv2 (no initialisation cost);
    initialised for DINOv3, whose RoPE periods are a buffer computed at construction, not stored."""
    if spec.pos_offset is None:
        return _timm_model(spec, seed)
    import timm

    with torch.device("meta"):
        return timm.create_model(spec.timm_name, pretrained=False, img_size=spec.input_size, num_classes=0)


def build_backbone(model: str = "vitb14", checkpoint=None, seed: int = 0) -> tuple[torch.nn.Module, str]:
    """A timm backbone for `model`'s input size with weights loaded, and a one-line weights id.

    checkpoint: None / "official" (hub) | "random" | path | URL | state dict (see the module doc).
    The weights id: "hub:timm/<name>@<commit>", "file:PATH", "url:URL", "state_dict",
    "random:recipe-seed<seed>" or "random:timm-init-seed<seed>". Failures raise WeightsError.
    """
    spec, weights = model_spec(model), model_weights(model)
    if is_random(checkpoint) and not spec.has_recipe:
        return _timm_model(spec, seed), f"random:timm-init-seed{seed}"
    if is_random(checkpoint):
        state, source = tensors_of(recipe_state_dict(model, seed), "the recipe", weights), f"random:recipe-seed{seed}"
    elif isinstance(checkpoint, Mapping):  # copied: the model must not alias the caller's tensors
        state = {k: v.clone() for k, v in tensors_of(checkpoint, "the state dict", weights).items()}
        source = "state_dict"
    elif checkpoint is None or isinstance(checkpoint, (str, os.PathLike)):
        path, source = locate(OFFICIAL if checkpoint is None else checkpoint, weights)
        state = read_state_dict(path, weights)
    else:
        raise ValueError(f"checkpoint must be None, 'official', 'random', a path, a URL or a state dict, "
                         f"not {type(checkpoint).__name__}")
    net = _empty_model(spec, seed)
    sd = to_timm_state_dict(state, net, spec, weights, source)
    load_strict(net, sd, weights, source, assign=True)  # assign: meta tensors are replaced, not copied into
    return net, source


# ----------------------------------------------------------------------------- extractor


class DinoV2Extractor(torch.nn.Module):
    """Frozen DINOv2 / DINOv3 backbone: uint8 frames -> final normalised patch tokens.

    Args:
        model: one of `MODELS` (default "vitb14", the research setting; "dinov3_*" opt-in).
        checkpoint: None / "official" (timm's hub weights), "random" (stand-in weights), a path or
            URL (official or timm checkpoint) or a state dict of either format (see the module doc).
        preprocess: "pil" (PIL-identical pixels on every device) or "tensor" (PyTorch's kernel,
            device-dependent); see the module doc.
        batch_size: frames per network call; bounds memory for long inputs.

    `weights_id` says what was loaded (see `build_backbone`). Autocast set by the caller applies to
    the network only; preprocessing always runs in full precision and the output is float32.
    """

    def __init__(self, model: str = "vitb14", checkpoint=None, preprocess: str = "pil", batch_size: int = 32):
        super().__init__()
        if preprocess not in PREPROCESS:
            raise ValueError(f"preprocess must be one of {PREPROCESS}, not {preprocess!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, not {batch_size}")
        self.model_name, self.preprocess, self.batch_size = model, preprocess, batch_size
        self.spec = model_spec(model)
        self.backbone, self.weights_id = build_backbone(model, checkpoint)
        self.backbone.eval().requires_grad_(False)
        self.embed_dim = self.backbone.embed_dim
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 (B, 3, S, S) -> float32 (B, 3, S, S) on the module's device: /255 then ImageNet mean/std."""
        return (pixels.to(self.device).float().div(255.0) - self.mean) / self.std

    def preprocess_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (T, 3, H, W) -> normalised float32 (T, 3, S, S) on the module's device (S = input_size)."""
        size = (self.input_size, self.input_size)
        with torch.autocast(frames.device.type, enabled=False):
            pixels = resize_pil_identical(frames, size) if self.preprocess == "pil" else resize_tensor(frames, size)
            return self.normalise(pixels)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised float (B, 3, S, S) -> patch tokens (B, 16, 16, D) (dtype of the network run,
        i.e. float32 unless autocast is on)."""
        s = self.input_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise ValueError(f"tokens() expects (B, 3, {s}, {s}) inputs, got {tuple(x.shape)}")
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

    def forward_clips(self, clips: Sequence[torch.Tensor], batch_size: int | None = None) -> torch.Tensor:
        """uint8 RGB frames of several clips, (K_i, 3, H_i, W_i) each, on the module's device -> float32
        tokens (sum K_i, 16, 16, D), clip after clip: `forward` of each clip, concatenated.

        The frames of all clips of one size are preprocessed together, then the network takes every
        frame of every clip in calls of `batch_size` frames (default `self.batch_size`). Tokens are per
        image: a clip's tokens are its `forward` tokens whatever the other clips, up to the order in
        which the matmuls sum for another batch size (bit-equal on the development CPU). Preprocessing
        holds all the frames at the input size at once (0.6 MB per frame, float32).
        """
        if len(clips) == 0:
            raise ValueError("forward_clips needs at least one clip")
        for frames in clips:
            if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
                raise ValueError(f"frames must be uint8 (T, 3, H, W), got {frames.dtype} {tuple(frames.shape)}")
        batch_size = batch_size or self.batch_size
        starts = np.cumsum([0] + [len(f) for f in clips]).tolist()
        by_size: dict[tuple[int, int], list[int]] = {}
        for i, frames in enumerate(clips):
            by_size.setdefault(tuple(frames.shape[-2:]), []).append(i)
        pixels, rows = [], []  # normalised inputs per size group, and the output row of each input frame
        for members in by_size.values():
            pixels.append(self.preprocess_frames(torch.cat([clips[i] for i in members])))
            rows += [r for i in members for r in range(starts[i], starts[i + 1])]
        x = torch.cat(pixels)
        if rows != list(range(len(rows))):  # back to clip order
            x = x[upload(torch.from_numpy(np.argsort(rows, kind="stable")), x.device)]
        out = torch.empty(len(rows), GRID, GRID, self.embed_dim, device=self.device)  # (sum K_i, 16, 16, D)
        with torch.inference_mode():
            for start in range(0, len(rows), batch_size):
                out[start:start + batch_size] = self.tokens(x[start:start + batch_size]).float()
        return out
