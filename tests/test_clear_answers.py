"""Clear answers to bad input: checkpoints of the wrong dtype, with NaNs or given as a folder; option
bounds; the end-of-rows partition at a large batch size; names with control characters."""
from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch

from datamodules.extraction import _least_padding_partition, _padded_frames
from semtrack.config import MAX_NUM_ITERS, MAX_POINTS_PER_ENTITY, ExtractConfig
from semtrack.report import format_report
from semtrack.stopping import resume_command
from semtrack.tracker import load_tracker, random_state_dict
from semtrack.weights import WeightsError


@pytest.fixture(scope="module")
def stand_in():
    return random_state_dict(seed=3)


@pytest.mark.parametrize("spoil, message", [
    (lambda t: t.to(torch.int64), "wrong dtypes .* int64 \\(model float32\\)"),
    (lambda t: torch.full_like(t, float("nan")), "NaN or infinite values in"),
])
def test_a_checkpoint_of_the_wrong_dtype_or_with_nans_is_refused_in_one_line(tmp_path, stand_in, spoil, message):
    from safetensors.torch import save_file

    key = next(k for k, v in stand_in.items() if v.is_floating_point())
    path = tmp_path / "bad.safetensors"
    save_file({**stand_in, key: spoil(stand_in[key]).contiguous()}, str(path))
    with pytest.raises(WeightsError, match=message) as err:
        load_tracker(str(path))
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_a_folder_given_as_checkpoint_is_named_as_a_folder(tmp_path):
    with pytest.raises(WeightsError, match="is a folder, not a weights file"):
        load_tracker(str(tmp_path))


@pytest.mark.parametrize("options, message", [
    ({"num_iters": MAX_NUM_ITERS + 1, "merge_ratio": 1}, f"num_iters must be at most {MAX_NUM_ITERS}"),
    ({"num_points_per_entity": 10**9}, f"num_points_per_entity must be at most {MAX_POINTS_PER_ENTITY}"),
    ({"num_points_per_entity": 300}, "at most 256 with sampler 'fast'"),
])
def test_options_out_of_bounds_are_refused_before_any_video(options, message):
    with pytest.raises(ValueError, match=message):
        ExtractConfig(**options)
    ExtractConfig(num_iters=MAX_NUM_ITERS, merge_ratio=1)  # the bound itself is allowed
    ExtractConfig(num_points_per_entity=300, sampler="exact")


def _clips(frames: list[int], failed: set[int] = frozenset()) -> list:
    return [SimpleNamespace(num_frames=t, frames=None if i in failed else object()) for i, t in enumerate(frames)]


def _brute_force(clips, batch_size: int) -> int:
    """The least padding over every way to cut the frame-count order into ceil(n / b) runs of <= b."""
    order = sorted(range(len(clips)), key=lambda i: (clips[i].num_frames, i))
    count = -(-len(clips) // batch_size)
    best = None
    for cuts in itertools.combinations(range(1, len(clips)), count - 1):
        bounds = [0, *cuts, len(clips)]
        runs = [order[a:b] for a, b in zip(bounds, bounds[1:])]
        if all(len(r) <= batch_size for r in runs):
            cost = sum(_padded_frames(clips[i] for i in r) for r in runs)
            best = cost if best is None else min(best, cost)
    return best


def test_the_end_of_rows_partition_is_least_padding_and_handles_a_large_batch():
    generator = torch.Generator().manual_seed(0)
    for n, b in [(7, 3), (9, 2), (10, 4), (8, 8), (11, 5)]:
        frames = torch.randint(2, 40, (n,), generator=generator).tolist()
        clips = _clips(frames, failed={1})
        runs = _least_padding_partition(clips, b)
        assert sorted(i for r in runs for i in r) == list(range(n)) and all(len(r) <= b for r in runs)
        assert len(runs) == -(-n // b)
        assert sum(_padded_frames(clips[i] for i in r) for r in runs) == _brute_force(clips, b)
    big = _clips(torch.randint(2, 300, (3 * 128 + 1,), generator=generator).tolist())  # the most slack
    runs = _least_padding_partition(big, 128)  # --batch_size 128: was minutes, now a blink
    assert len(runs) == 4 and sorted(i for r in runs for i in r) == list(range(len(big)))


def test_names_with_control_characters_are_shown_escaped():
    report = {"counts": {"rows": 1, "done": 0, "failed": 1, "pending": 0}, "runs": [], "last_run": None,
              "output_dir": "/out/\x1b[2Jdump",
              "failures": [{"row": 0, "video_id": "v\x1b[31m\nred", "stage": "decode", "reason": "bad\rline"}]}
    text = format_report(report)
    assert "\x1b" not in text and "\r" not in text and "\\x1b[31m\\nred" in text
    assert len(text.splitlines()) == 3
    assert resume_command(["--csv_path", "a\x1bb.csv"]) == "semtrack-extract --csv_path 'a\\x1bb.csv'"
