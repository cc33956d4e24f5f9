"""The extraction DataModule: batches of similar length, and every pending row on exactly one rank."""
from __future__ import annotations

import json
import random
from pathlib import Path

import lightning as L
import pytest
import torch

from _shared import shared_path
from datamodules.extraction import ExtractionDataModule, length_batches
from semtrack.config import ExtractConfig
from semtrack.records import Clip


def clip(row: int, frames: int | None) -> Clip:
    """A clip of `frames` frames on the meta device (no memory), or a decode failure (None)."""
    if frames is None:
        return Clip(row, f"v{row}", "d", f"/v{row}.mp4", error="broken")
    return Clip(row, f"v{row}", "d", f"/v{row}.mp4", frames=torch.empty(frames, 3, 4, 4, dtype=torch.uint8,
                                                                          device="meta"))


def padded_fraction(batches: list[list[Clip]]) -> float:
    padded = sum(max(c.num_frames for c in b) * len(b) - sum(c.num_frames for c in b) for b in batches)
    return padded / sum(max(c.num_frames for c in b) * len(b) for b in batches)


def test_length_batches_group_similar_lengths_and_keep_every_clip_once():
    rng = random.Random(0)
    clips = [clip(i, rng.randint(28, 88)) for i in range(200)]  # SSV2's range of frame counts
    batches = list(length_batches(clips, batch_size=8, window=64, max_bytes=float("inf")))
    assert [len(b) for b in batches] == [8] * 25
    assert sorted(c.row for b in batches for c in b) == list(range(200))
    in_order = [clips[i:i + 8] for i in range(0, 200, 8)]
    assert padded_fraction(batches) < 0.15 < padded_fraction(in_order)
    assert list(length_batches(clips, 8, window=8, max_bytes=float("inf"))) == in_order  # no look-ahead


def test_the_clips_left_at_the_end_are_split_with_the_least_padding():
    # frame counts of the 33 SSV2-like clips of benchmarks/make_ssv2_like.py on the shared videos
    lengths = [12, 20, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 28, 29, 29, 30, 30, 30, 33, 33, 33, 40, 40, 40,
               44, 53, 53, 53, 56, 58, 60, 85, 89]
    clips = [clip(i, t) for i, t in enumerate(random.Random(1).sample(lengths, len(lengths)))]
    batches = list(length_batches(clips, batch_size=8, window=64, max_bytes=float("inf")))
    assert len(batches) == 5 and max(map(len, batches)) == 8
    assert sorted(c.row for b in batches for c in b) == list(range(33))
    sorted_runs = [[clip(0, t) for t in sorted(lengths)[i:i + 8]] for i in range(0, 33, 8)]
    assert padded_fraction(batches) < 0.10 < 0.15 < padded_fraction(sorted_runs)  # 9.0 % vs 19.0 %
    assert sorted(c.num_frames for c in max(batches, key=lambda b: max(c.num_frames for c in b))) == [85, 89]


def test_length_batches_bound_the_memory_held_and_pass_failures_through():
    clips = [clip(0, 10), clip(1, None), clip(2, 50), clip(3, 12), clip(4, None), clip(5, 49), clip(6, 11)]
    batches = list(length_batches(clips, batch_size=2, window=6, max_bytes=float("inf")))
    assert sorted(len(b) for b in batches) == [1, 2, 2, 2]
    assert sorted(c.row for b in batches for c in b) == list(range(7))
    lengths = [sorted(c.num_frames for c in b if c.frames is not None) for b in batches]
    assert [12, 10] not in lengths and [49, 50] in lengths  # similar lengths share a call
    frame_bytes = 3 * 4 * 4
    held = list(length_batches(clips, batch_size=2, window=6, max_bytes=25 * frame_bytes))
    assert [c.row for c in held[0]] == [0, 1]  # over the byte bound: emitted as soon as a batch is full


class RecordRows(L.LightningModule):
    """predict_step appends (rank, CSV row, decoded) to one JSON-lines file per rank."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir

    def predict_step(self, batch, batch_idx):
        with open(Path(self.out_dir) / f"rank{self.global_rank}.jsonl", "a") as f:
            for c in batch:
                f.write(json.dumps([self.global_rank, c.row, c.frames is not None]) + "\n")


@pytest.mark.slow
@pytest.mark.parametrize("rows", [5, 1], ids=["five-rows", "one-row"])
def test_ddp_gives_each_pending_row_to_exactly_one_rank(tmp_path, rows):
    """Two gloo ranks: every row once, none twice; a rank left without rows still runs the loop."""
    videos = shared_path("videos")
    paths = [videos / "tiny_ssv2.webm", videos / "not_a_video.mp4", tmp_path / "missing.mp4",
             videos / "tiny_25fps.mp4", videos / "bear_ssv2.webm"][:rows]
    csv = tmp_path / "rows.csv"
    csv.write_text("video_path,dataset\n" + "".join(f"{p},test\n" for p in paths))
    config = ExtractConfig(csv_path=str(csv), base_feat_path=str(tmp_path / "out"), batch_size=2, num_workers=0,
                           max_frames=4)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.predict(RecordRows(str(tmp_path)), datamodule=ExtractionDataModule(config), return_predictions=False)
    records = [json.loads(line) for f in sorted(tmp_path.glob("rank*.jsonl")) for line in f.read_text().splitlines()]
    decoded = [True, False, False, True, True][:rows]
    assert sorted((row, ok) for _, row, ok in records) == list(enumerate(decoded))
    assert {rank for rank, _, _ in records} == ({0, 1} if rows > 1 else {0})
