"""Smoke test of benchmarks/bench_label_stability.py on one tiny clip (2 clustering frames, ViT-S stand-ins)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_label_stability as bench  # noqa: E402

METHODS = {"bipartite", "kmeans", "bipartite_positional", "bipartite_score_grid"}


pytestmark = pytest.mark.usefixtures("one_thread")


def _fractions(block: dict) -> list[float]:
    return [v["changed"] for v in block.values() if isinstance(v, dict) and "changed" in v]


def test_perturb_moves_the_asked_share_by_one_grey_level():
    pixels = torch.tensor([0, 255, 7, 100] * 250, dtype=torch.uint8)  # the reflection at 0 and 255 included
    moved = bench.perturb(pixels, 0.1, seed=3)
    step = (moved.int() - pixels.int()).abs()
    assert int((step == 1).sum()) == 100 and int(step.max()) == 1
    assert torch.equal(bench.perturb(pixels, 0.1, seed=3), moved) and torch.equal(bench.perturb(pixels, 0.0, 3), pixels)


def test_changed_fraction_ignores_label_names():
    a = torch.tensor([0, 0, 1, 1, 2, 2])
    assert bench.changed_fraction(a, torch.tensor([5, 5, 9, 9, 1, 1])) == 0.0  # renamed only
    assert bench.changed_fraction(a, torch.tensor([5, 5, 9, 9, 9, 1])) == pytest.approx(1 / 6)
    assert bench.changed_fraction(a, torch.zeros(6, dtype=torch.long)) == pytest.approx(4 / 6)


def test_benchmark_json_on_a_tiny_clip(tmp_path, videos_dir):
    out = tmp_path / "still.json"
    result = bench.main([
        "--videos", str(videos_dir / "tiny_ssv2.webm"), "--frames", "2", "--model", "vits14",
        "--fraction", "0", "--device", "cpu", "--json", str(out),
    ])
    assert json.loads(out.read_text())["overall"] == result["overall"]
    assert "random" in result["settings"]["weights"] and "stand-in" in result["settings"]["weights_caveat"]
    (row,) = result["clips"]
    assert row["frames"] == 2 and row["size_hw"] == [192, 256]  # tiny_ssv2.webm: 256x192
    assert set(row["perturbation"]) == METHODS
    devices = row["devices"]
    for block in (row["perturbation"], devices["cpu_vs_device_fp32"]):  # nothing moved / CPU vs CPU: identical
        assert all(v["changed"] == 0.0 and v["entity_change"] == 0 for v in block.values() if isinstance(v, dict))
    # the same forward twice on the CPU: oneDNN on some CPUs (AMD AVX2) splits work differently run to run,
    # so tokens agree to float32 rounding, not bit for bit; the labels above must still be identical
    assert row["token_change"]["max_abs"] < 1e-5 and devices["cpu_vs_device_fp32"]["token_max_abs"] < 1e-5
    assert devices["fp32_vs_bf16"]["token_max_abs"] > 0  # bf16 autocast runs on the CPU too
    assert all(0.0 <= f <= 1.0 for f in _fractions(devices["fp32_vs_bf16"]))
    assert all(0.0 <= v["changed"] <= 1.0 for block in result["overall"].values() for v in block.values())

    temporal, merge = row["temporal"], row["merge"]
    assert temporal["decisions"] == 12 and 0 <= temporal["marginal"] <= 12  # frame 1's 12 centroids
    assert 0 <= merge["sorted_near_ties"] <= merge["sorted_small_gaps"] <= merge["sorted_score_gaps"]
    assert merge["score_shift_iter1"]["max"] < 1e-5  # rounding only, as for the tokens
    fixture = result["fixture_check"]  # the prototype harness reproduces the reference with its order
    assert fixture["reference"]["m25_i11"]["labels_equal"] and fixture["reference"]["m40_i5"]["labels_equal"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_a_perturbed_clip_and_cuda_checks_skipped_without_a_gpu():
    ext = bench.DinoV2Extractor("vits14", checkpoint="random", preprocess="pil")
    frames = torch.randint(0, 256, (1, 3, 60, 80), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    row = bench.run_clip(ext, "synthetic", frames, fraction=0.01, seed=0, device="cuda")
    assert row["devices"] == {"skipped": "no CUDA device"}
    assert row["token_change"]["max_abs"] > 0 and row["merge"]["score_shift_iter1"]["max"] > 0
    assert all(0.0 <= f <= 1.0 for f in _fractions(row["perturbation"]))
