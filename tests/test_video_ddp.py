"""A real 2-process DDP `Trainer.predict` (CPU, gloo) over VideoDataModule: every CSV row is
predicted on exactly one rank, none twice, no padding."""
from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest

from _shared import shared_path
from datamodules import VideoDataModule


class RecordIndices(L.LightningModule):
    """predict_step appends (rank, CSV row) pairs to one JSON-lines file per rank."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir

    def predict_step(self, batch, batch_idx):
        with open(Path(self.out_dir) / f"rank{self.global_rank}.jsonl", "a") as f:
            for item in batch:
                f.write(json.dumps([self.global_rank, item["index"], item["error"] is None]) + "\n")


@pytest.mark.slow
def test_ddp_predict_gives_each_video_to_exactly_one_rank(tmp_path):
    videos = shared_path("videos")
    rows = [videos / "tiny_ssv2.webm", videos / "not_a_video.mp4", tmp_path / "missing.mp4",
            videos / "tiny_25fps.mp4", videos / "bear_ssv2.webm"]
    csv = tmp_path / "five.csv"
    csv.write_text("video_path,dataset\n" + "".join(f"{p},test\n" for p in rows))
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.predict(RecordIndices(str(tmp_path)), datamodule=VideoDataModule(csv, batch_size=2, num_workers=0),
                    return_predictions=False)
    records = [json.loads(line) for f in sorted(tmp_path.glob("rank*.jsonl")) for line in f.read_text().splitlines()]
    assert sorted(index for _, index, _ in records) == [0, 1, 2, 3, 4]
    assert {rank for rank, _, _ in records} == {0, 1}
    assert sorted((index, ok) for _, index, ok in records) == [(0, True), (1, False), (2, False), (3, True), (4, True)]
