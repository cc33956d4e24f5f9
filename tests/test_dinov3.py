"""DINOv3 as an opt-in backbone: timm's RoPE ViTs at 256 px give the same 16x16 patch grid."""
from __future__ import annotations

import av
import numpy as np
import pytest
import torch
from test_weights import offline_hub, put_in_hub_cache  # noqa: F401 (offline_hub is a fixture)

from semtrack.features import MODELS, DinoV2Extractor
from semtrack.weights import WeightsError

DINOV3 = ("dinov3_vits16", "dinov3_vitb16", "dinov3_vitl16")


@pytest.fixture(scope="module")
def stand_in():
    return DinoV2Extractor("dinov3_vits16", checkpoint="random")


@pytest.fixture(scope="module")
def clip_frames(videos_dir) -> torch.Tensor:
    """Three decoded frames of a shared clip, uint8 (3, 3, 240, 320)."""
    frames = []
    with av.open(str(videos_dir / "tiny_25fps.mp4")) as container:
        for frame in container.decode(video=0):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == 3:
                break
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous()


def test_registry_matches_timm():
    import timm

    assert {MODELS[m].timm_name for m in DINOV3} <= set(timm.list_models("*dinov3*", pretrained=True))
    for name in DINOV3:
        spec = MODELS[name]
        with torch.device("meta"):
            net = timm.create_model(spec.timm_name, pretrained=False, num_classes=0)
        assert spec.family == "DINOv3" and spec.input_size == 256 and net.patch_embed.patch_size == (16, 16)
        arch = (net.embed_dim, len(net.blocks), net.num_prefix_tokens)
        assert arch == (spec.embed_dim, spec.depth, 1 + spec.registers)
    assert MODELS["vitb14"].input_size == 224  # the default stays DINOv2 ViT-B/14


def test_stand_in_tokens_for_a_shared_clip(stand_in, clip_frames):
    rng_state = torch.get_rng_state()
    again = DinoV2Extractor("dinov3_vits16", checkpoint="random", batch_size=2)
    assert torch.equal(torch.get_rng_state(), rng_state)  # timm init under its own seed
    assert stand_in.weights_id == "random:timm-init-seed0" and stand_in.input_size == 256
    tokens = stand_in(clip_frames)
    assert tokens.shape == (3, 16, 16, 384) and tokens.dtype == torch.float32
    assert torch.isfinite(tokens).all() and tokens.std().item() > 0.1
    assert torch.allclose(again(clip_frames), tokens, atol=1e-5)  # same weights, batches of 2 and 1
    assert not torch.allclose(tokens[0], tokens[2], atol=1e-3)  # content-dependent: the frames differ
    assert stand_in.preprocess_frames(clip_frames).shape == (3, 3, 256, 256)
    with pytest.raises(ValueError, match="256"):
        stand_in.tokens(torch.zeros(1, 3, 224, 224))


def test_official_dinov3_from_a_prepared_offline_hub_cache(offline_hub, stand_in, clip_frames):  # noqa: F811
    from safetensors.torch import save_file

    hub_cache, _ = offline_hub
    spec = MODELS["dinov3_vits16"]
    timm_sd = {k: v.contiguous() for k, v in stand_in.backbone.state_dict().items()}  # timm's hub file layout
    put_in_hub_cache(hub_cache, "timm/" + spec.timm_name, "model.safetensors", "0" * 40,
                     lambda p: save_file(timm_sd, str(p)))
    ext = DinoV2Extractor("dinov3_vits16")  # official: the cache's main snapshot (no pinned revision)
    assert spec.revision is None and ext.weights_id == f"hub:timm/{spec.timm_name}@{'0' * 40}"
    assert torch.equal(ext(clip_frames[:1]), stand_in(clip_frames[:1]))


def test_dinov3_rejects_dinov2_weights(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    dinov2 = DinoV2Extractor("vits14", checkpoint="random").backbone.state_dict()
    save_file({k: v.contiguous() for k, v in dinov2.items()}, str(path))
    with pytest.raises(WeightsError, match="does not fit DINOv3 'dinov3_vits16'"):
        DinoV2Extractor("dinov3_vits16", checkpoint=path)
