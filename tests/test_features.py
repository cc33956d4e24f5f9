"""DINOv2 features: parity with the official hub model's stored outputs (shared/dinov2/)."""
import importlib.util

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from _shared import shared_path
from semtrack.features import (
    MODELS,
    DinoV2Extractor,
    official_layout,
    recipe_state_dict,
)
from semtrack.resize import (
    _resample,
    fixed_point_resize,
    pil_height_first,
    resize_pil,
    resize_pil_identical,
    resize_tensor,
)
from semtrack.weights import WeightsError

CASES = {  # model -> (fixture, manifest)
    "vitb14": ("features_vitb14.npz", "state_dict_manifest.tsv"),
    "vits14": ("features_vits14.npz", "state_dict_manifest_vits14.tsv"),
}


@pytest.fixture(scope="module")
def shared_weights():
    """The reference recipe implementation, `shared/dinov2/weights.py`."""
    spec = importlib.util.spec_from_file_location("dinov2_weights", shared_path("dinov2", "weights.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class PerModel(dict):
    """{model: value}, each made on first use (a GPU run carries only the ViT-B fixture)."""

    def __init__(self, make):
        super().__init__()
        self.make = make

    def __missing__(self, model):
        value = self[model] = self.make(model)
        return value


def _load_fixture(model: str) -> dict:
    with np.load(shared_path("dinov2", CASES[model][0])) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def fixtures():
    return PerModel(_load_fixture)


@pytest.fixture(scope="module")
def reference_sd(shared_weights):
    """Official-format recipe weights as `weights.py` makes them (dict of numpy float32)."""
    return PerModel(lambda m: shared_weights.make_state_dict(str(shared_path("dinov2", CASES[m][1])), seed=0))


@pytest.fixture(scope="module")
def extractors(reference_sd):
    """ViT-B from the official-format state dict as is; ViT-S from checkpoint="random" (the recipe)."""
    def make(model: str) -> DinoV2Extractor:
        checkpoint = reference_sd[model] if model == "vitb14" else "random"
        return DinoV2Extractor(model, checkpoint=checkpoint, preprocess="pil")
    return PerModel(make)


def frames_of(fixture) -> torch.Tensor:
    return torch.from_numpy(fixture["frames"]).permute(0, 3, 1, 2).contiguous()  # (T, 3, 480, 854) uint8


def reference_tokens(fixture) -> torch.Tensor:
    t, n, d = fixture["x_norm_patchtokens"].shape
    return torch.from_numpy(fixture["x_norm_patchtokens"]).reshape(t, 16, 16, d)


@pytest.mark.parametrize("model", CASES)
def test_random_recipe_is_byte_identical_to_shared_weights(model, reference_sd, fixtures, shared_weights):
    ours = recipe_state_dict(model, seed=0)
    ref = reference_sd[model]
    assert list(ours) == list(ref)
    for key in ref:
        assert ours[key].dtype == ref[key].dtype and ours[key].shape == ref[key].shape, key
        assert ours[key].tobytes() == ref[key].tobytes(), key
    assert shared_weights.sha256_of(ours) == str(fixtures[model]["weights_sha256"])


@pytest.mark.parametrize("model", ["vits14", "vitb14", "vitl14"])
def test_official_layout_matches_timm_and_manifest(model, shared_weights):
    import timm

    layout = official_layout(MODELS[model])
    if model in CASES:
        rows = shared_weights.read_manifest(str(shared_path("dinov2", CASES[model][1])))
        assert layout == [(key, shape) for key, shape, _ in rows]
    with torch.device("meta"):  # the official keys are timm's at 518 px plus `mask_token`
        net = timm.create_model(MODELS[model].timm_name, pretrained=False, num_classes=0)
    timm_layout = [(k, tuple(v.shape)) for k, v in net.state_dict().items()]
    assert [row for row in layout if row[0] != "mask_token"] == timm_layout


@pytest.mark.parametrize("model", CASES)
def test_position_table_matches_official(model, extractors, fixtures):
    table = extractors[model].backbone.pos_embed.detach()
    ref = torch.from_numpy(fixtures[model]["pos_embed_224"])
    assert table.shape == ref.shape
    assert (table - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("model", CASES)
def test_embedding_stage_matches_official(model, extractors, fixtures):
    net = extractors[model].backbone
    with torch.inference_mode():
        seq = net._pos_embed(net.patch_embed(torch.from_numpy(fixtures[model]["inputs"])))
    assert (seq - torch.from_numpy(fixtures[model]["tokens_before_blocks"])).abs().max().item() <= 1e-5


@pytest.fixture(scope="module")
def tokens_from_inputs(extractors, fixtures):
    return {m: extractors[m].tokens(torch.from_numpy(fixtures[m]["inputs"])) for m in CASES}


@pytest.mark.parametrize("model", CASES)
def test_tokens_from_stored_inputs_match_official(model, tokens_from_inputs, fixtures):
    tokens, ref = tokens_from_inputs[model], reference_tokens(fixtures[model])
    assert tokens.shape == ref.shape and tokens.dtype == torch.float32
    assert (tokens - ref).abs().max().item() <= 1e-4
    assert ((tokens - ref).norm() / ref.norm()).item() <= 1e-5


@pytest.mark.parametrize("model", CASES)
def test_pil_preprocessing_reproduces_research_inputs(model, extractors, fixtures):
    inputs = extractors[model].preprocess_frames(frames_of(fixtures[model]))
    assert inputs.dtype == torch.float32 and inputs.shape == fixtures[model]["inputs"].shape
    assert (inputs - torch.from_numpy(fixtures[model]["inputs"])).abs().max().item() <= 1e-6


def test_pil_path_end_to_end_matches_official(extractors, fixtures):
    tokens = extractors["vits14"](frames_of(fixtures["vits14"]))
    assert tokens.dtype == torch.float32 and tokens.shape == (2, 16, 16, 384)
    assert (tokens - reference_tokens(fixtures["vits14"])).abs().max().item() <= 1e-4


def test_clips_of_several_sizes_in_one_call_give_each_clip_its_own_tokens(extractors, fixtures):
    """`forward_clips`: clips of two sizes, one size split over two clips that are not adjacent, in
    network calls that mix the clips -> each clip's `forward` tokens, clip after clip (bit-equal on the
    development CPU; a BLAS may sum in another order for another batch size)."""
    ext, frames = extractors["vits14"], frames_of(fixtures["vits14"])
    clips = [frames, frames[:1, :, :240, :428].contiguous(), frames[1:]]
    out = ext.forward_clips(clips, batch_size=3)
    assert (out - torch.cat([ext(c) for c in clips])).abs().max().item() <= 1e-5


@pytest.mark.parametrize("model", CASES)
def test_tensor_path_within_quality_bounds_of_research_path(model, extractors, fixtures):
    """PyTorch's kernel ("tensor") vs the research (PIL) path's tokens, which equal the fixture's."""
    ext = extractors[model]
    ext.preprocess = "tensor"
    try:
        tokens = ext(frames_of(fixtures[model]))
    finally:
        ext.preprocess = "pil"
    ref = reference_tokens(fixtures[model])
    assert (tokens - ref).abs().mean().item() <= 2e-3
    assert F.cosine_similarity(tokens, ref, dim=-1).min().item() >= 0.9999
    assert (tokens - ref).abs().max().item() > 0  # really a different resize than PIL on the CPU


def test_default_preprocessing_is_pil_identical():
    import inspect

    assert inspect.signature(DinoV2Extractor).parameters["preprocess"].default == "pil"


def _first_frame(path) -> torch.Tensor:
    import av

    with av.open(str(path)) as container:
        frame = next(container.decode(video=0)).to_ndarray(format="rgb24")
    return torch.from_numpy(frame).permute(2, 0, 1)[None].contiguous()  # (1, 3, H, W) uint8


# (H, W): portrait phone video, 720p, 4:3, tall and wide strips, tiny, odd, square, upscales
SYNTHETIC_SHAPES = [(1280, 720), (720, 1280), (480, 640), (2000, 300), (500, 230), (300, 2000),
                    (1000, 224), (224, 1000), (1, 1), (7, 5), (3, 2000), (2000, 3), (223, 225), (301, 299),
                    (641, 479), (224, 224), (256, 256), (100, 100), (57, 203), (129, 97)]


def test_fixed_point_resize_is_pil_for_every_shape(videos_dir):
    """Bit-identical to PIL on the first frame of every shared clip and on noise of many shapes,
    for both models' input sizes and an odd non-square one."""
    clips = [p for p in sorted(videos_dir.glob("*")) if p.suffix in (".mp4", ".webm")
             and not p.stem.startswith(("corrupt", "not_a"))]
    real = list({tuple(f.shape[-2:]): f for f in map(_first_frame, clips)}.values())  # one frame per clip size
    assert {tuple(f.shape[-2:]) for f in real} >= {(480, 854), (240, 428), (480, 368), (720, 1296), (340, 604)}
    gen = torch.Generator().manual_seed(0)
    noise = [torch.randint(0, 256, (1, 3, h, w), dtype=torch.uint8, generator=gen) for h, w in SYNTHETIC_SHAPES]
    for size in ((224, 224), (256, 256), (37, 91)):
        for frames in real + noise:
            assert torch.equal(fixed_point_resize(frames, size), resize_pil(frames, size)), (tuple(frames.shape), size)
    assert pil_height_first(1280, 720, 224, 224) and not pil_height_first(480, 368, 224, 224)


def test_pil_pass_order_matters_where_pillow_starts_with_the_height():
    """For a tall strip the width-first composition differs from PIL, the height-first one is PIL."""
    frames = torch.randint(0, 256, (1, 3, 2000, 300), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    x = frames.to(torch.int32)
    width_first = _resample(_resample(x, "width", 224), "height", 224).to(torch.uint8)
    height_first = _resample(_resample(x, "height", 224), "width", 224).to(torch.uint8)
    pil = resize_pil(frames)
    assert pil_height_first(2000, 300, 224, 224)
    assert torch.equal(height_first, pil) and not torch.equal(width_first, pil)


def test_pil_identical_and_tensor_resizes_on_the_cpu(fixtures):
    frames = frames_of(fixtures["vitb14"])
    pil = resize_pil(frames)
    assert torch.equal(resize_pil_identical(frames), pil)
    diff = (resize_tensor(frames).int() - pil.int()).abs()
    assert 0 < diff.max().item() <= 1 and diff.float().mean().item() < 5e-3  # PyTorch's uint8 kernel


def _timm_format_sd(model: str, official: dict) -> dict:
    """What timm's hub file holds: its keys at the native 518 px (37x37 table, no mask_token)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    with torch.device("meta"):
        net = timm.create_model(MODELS[model].timm_name, pretrained=False, num_classes=0)
    sd = checkpoint_filter_fn({k: torch.from_numpy(v) for k, v in official.items()}, net)
    net.load_state_dict(sd, strict=True, assign=True)
    return {k: v.contiguous() for k, v in net.state_dict().items()}


@pytest.mark.parametrize("fmt", ["official.pth", "timm.safetensors", "timm.pth"])
def test_checkpoint_files_load_through_the_same_path(fmt, tmp_path, extractors, fixtures, tokens_from_inputs):
    from safetensors.torch import save_file

    official = recipe_state_dict("vits14")
    path = tmp_path / fmt
    if fmt == "official.pth":
        torch.save({k: torch.from_numpy(v) for k, v in official.items()}, path)
    else:
        sd = _timm_format_sd("vits14", official)
        assert sd["pos_embed"].shape == (1, 1370, 384) and "mask_token" not in sd
        save_file(sd, str(path)) if fmt.endswith(".safetensors") else torch.save(sd, path)
    ext = DinoV2Extractor("vits14", checkpoint=path)
    assert ext.weights_id == f"file:{path}"
    ref_net = extractors["vits14"].backbone
    for key, value in ref_net.state_dict().items():
        assert torch.equal(ext.backbone.state_dict()[key], value), key
    tokens = ext.tokens(torch.from_numpy(fixtures["vits14"]["inputs"]))
    assert torch.equal(tokens, tokens_from_inputs["vits14"])


def test_register_model_official_and_timm_formats_agree(tmp_path):
    """Register variants: CLS row folded into cls_token, registers moved, 37x37 table -> 16x16 with the
    register models' rule (bicubic to size 16, antialias)."""
    import timm

    with torch.device("meta"):
        native = timm.create_model(MODELS["vits14_reg"].timm_name, pretrained=False, num_classes=0)
    gen = torch.Generator().manual_seed(1)
    timm_sd = {k: 0.02 * torch.randn(v.shape, generator=gen) for k, v in native.state_dict().items()}
    assert timm_sd["pos_embed"].shape == (1, 1369, 384)  # no CLS row (no_embed_class)
    cls_row = 0.02 * torch.randn(1, 1, 384, generator=torch.Generator().manual_seed(2))
    official = {
        "cls_token": timm_sd["cls_token"] - cls_row,
        "pos_embed": torch.cat([cls_row, timm_sd["pos_embed"]], dim=1),
        "register_tokens": timm_sd["reg_token"],
        "mask_token": torch.zeros(1, 384),
        **{k: v for k, v in timm_sd.items() if k not in ("cls_token", "pos_embed", "reg_token")},
    }
    torch.save(timm_sd, tmp_path / "reg.pth")
    a = DinoV2Extractor("vits14_reg", checkpoint=tmp_path / "reg.pth").backbone
    b = DinoV2Extractor("vits14_reg", checkpoint=official).backbone
    grid = timm_sd["pos_embed"].reshape(1, 37, 37, 384).permute(0, 3, 1, 2)
    expect = F.interpolate(grid, size=(16, 16), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 256, 384)
    assert torch.equal(a.pos_embed.detach(), expect) and torch.equal(b.pos_embed.detach(), expect)
    assert (a.cls_token - b.cls_token).abs().max().item() <= 1e-7
    assert torch.equal(a.reg_token, timm_sd["reg_token"]) and torch.equal(b.reg_token, timm_sd["reg_token"])
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        ta, tb = a.forward_features(x), b.forward_features(x)
    assert (ta - tb).abs().max().item() <= 1e-5


def test_registry_names_and_errors():
    import timm

    available = set(timm.list_models("*dinov2*", pretrained=True))
    dinov2 = {name: spec for name, spec in MODELS.items() if spec.family == "DINOv2"}
    assert {spec.timm_name for spec in dinov2.values()} <= available
    sizes = ("vits14", "vitb14", "vitl14", "vitg14")
    assert {*sizes, *(f"{s}_reg" for s in sizes)} == set(dinov2)
    rng_state = torch.get_rng_state()
    ext = DinoV2Extractor("vits14_reg", checkpoint="random")  # timm init under a fixed seed
    assert torch.equal(torch.get_rng_state(), rng_state)  # the global RNG is left alone
    assert ext.weights_id == "random:timm-init-seed0" and ext.backbone.num_prefix_tokens == 5
    frames = torch.randint(0, 256, (2, 3, 60, 90), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ext.batch_size = 1  # one network call per frame
    tokens = ext(frames)
    assert tokens.shape == (2, 16, 16, 384) and tokens.dtype == torch.float32
    assert torch.allclose(tokens[1:], ext(frames[1:]), atol=1e-5)
    with pytest.raises(ValueError, match="unknown feature model"):
        DinoV2Extractor("vitx14", checkpoint="random")
    with pytest.raises(ValueError, match="preprocess"):
        DinoV2Extractor("vits14", checkpoint="random", preprocess="cv2")
    with pytest.raises(ValueError, match="uint8"):
        ext(frames.float())
    with pytest.raises(ValueError, match="224"):
        ext.tokens(torch.zeros(1, 3, 112, 112))
    with pytest.raises(WeightsError, match="does not fit DINOv2 'vitb14': wrong shapes"):
        DinoV2Extractor("vitb14", checkpoint=recipe_state_dict("vits14"))


@pytest.mark.cuda
def test_cuda_parity_and_tensor_path(extractors, fixtures):
    ext = extractors["vitb14"].cuda()
    fx = fixtures["vitb14"]
    ref = reference_tokens(fx).cuda()
    try:
        tokens = ext.tokens(torch.from_numpy(fx["inputs"]).cuda())
        assert (tokens - ref).abs().max().item() <= 1e-4
        frames = frames_of(fx).cuda()
        assert torch.equal(resize_pil_identical(frames).cpu(), resize_pil(frames))  # fixed-point form on the GPU
        tokens = ext(frames)  # "pil": research-exact inputs on the GPU too
        assert (tokens - ref).abs().max().item() <= 1e-4
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = ext(frames)
        assert low.dtype == torch.float32
        assert (low - ref).abs().max().item() <= 0.1 and (low - ref).abs().mean().item() <= 5e-3
        ext.preprocess = "tensor"
        fast = ext(frames)  # PyTorch's float kernel on the GPU, rounded to grey levels
        assert (fast - ref).abs().mean().item() <= 2e-3
        assert F.cosine_similarity(fast, ref, dim=-1).min().item() >= 0.9999
    finally:
        ext.preprocess = "pil"
        ext.cpu()


@pytest.mark.cuda
def test_cuda_fixed_point_resize_is_pil_for_every_shape():
    gen = torch.Generator().manual_seed(2)
    for h, w in SYNTHETIC_SHAPES:
        frames = torch.randint(0, 256, (2, 3, h, w), dtype=torch.uint8, generator=gen)
        for size in ((224, 224), (256, 256)):
            assert torch.equal(fixed_point_resize(frames.cuda(), size).cpu(), resize_pil(frames, size)), (h, w, size)
