"""Track statistics (`semtrack.trackstats`), the folder's survey (`semtrack.survey`) and the report's
`--json`, `--where`, `--verify_outputs` and `--html` (`semtrack.report`, `semtrack.report_html`) on a
hand-made output folder whose ledger predates the statistics. No models."""
from __future__ import annotations

import base64
import io
import json
from html.parser import HTMLParser
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import unquote

import pytest
import torch
from PIL import Image

from semtrack.layout import OutputLayout
from semtrack.ledger import DoneRule, LedgerPart, done_record, failed_record, latest_videos, output_entry, read_records
from semtrack.report import main
from semtrack.survey import FilterError, parse_where
from semtrack.trackfile import dumps_tracks, load_tracks, save_tracks
from semtrack.trackstats import file_stats, track_stats


def hand_made(video_path: str | None = None) -> dict:
    """4 frames, 4 points (entities 0, 0, 0, 1) in a 30 x 40 clip (diagonal 50 px):
    p0 still at (0, 0), always visible: displacement 0;
    p1 queried at t0 at (10, 10), at (13, 14) at t2 (5 px away), visible t0-t2, far away but hidden at t3: 5;
    p2 queried at t1 at (20, 20), visible at t1 and t3, at (20, 30) at t3: 10;
    p3 queried and visible at t3 only: 0."""
    tracks = torch.zeros(4, 4, 2)
    tracks[:, 1] = torch.tensor([[10, 10], [11, 11], [13, 14], [100, 100]])
    tracks[:, 2] = torch.tensor([[0, 0], [20, 20], [90, 90], [20, 30]])
    tracks[:, 3] = torch.tensor([[70, 70], [70, 70], [70, 70], [5, 5]])
    vis = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 1, 1]], dtype=torch.bool)
    meta = {"clip_size": [30, 40]}
    if video_path is not None:
        meta.update(clip_size=[240, 320], video_path=video_path)
    return {"pred_tracks": tracks.to(torch.float16), "pred_visibility": vis, "obj_ids": torch.tensor([0, 0, 0, 1]),
            "point_queries": torch.tensor([0, 0, 1, 3]), "semtrack": meta}


KNOWN = {
    "frames": 4, "points": 4, "entities": 2, "points_per_entity_min": 1, "points_per_entity_median": 2.0,
    "points_per_entity_max": 3, "largest_entity_share": 0.75, "visible": 10 / 16, "visible_half": 0.75,
    "displacement_median_px": 2.5,  # displacements (0, 0, 5, 10): between 0 and 5
    "displacement_p95_px": 9.25,  # at 0.95 * 3 = 2.85: 5 + 0.85 * 5
    "displacement_median_rel": 0.05, "displacement_p95_rel": 0.185, "static": 0.5, "step_s": None, "wait_s": None,
}


def test_statistics_of_a_hand_made_track_file_have_known_answers(tmp_path):
    save_tracks(tmp_path / "v.pkl", hand_made())
    tf = load_tracks(tmp_path / "v.pkl")
    assert file_stats(tf) == KNOWN
    research = track_stats(tf.tracks, tf.visibility, tf.obj_ids, tf.query_frames, None)  # no clip size
    assert research["displacement_median_rel"] is None and research["displacement_p95_px"] == 9.25


def test_the_filter_syntax_and_its_errors():
    assert parse_where("visible<0.1 and points>=8") == [("visible", "<", 0.1), ("points", ">=", 8.0)]
    assert parse_where("no_motion, static==1") == [("displacement_p95_px", "<", 1.0), ("static", "==", 1.0)]
    with pytest.raises(FilterError, match="no statistic 'visibility'"):
        parse_where("visibility<0.1")
    with pytest.raises(FilterError, match="cannot read"):
        parse_where("visible << 2")


@pytest.fixture
def old_folder(tmp_path, videos_dir):
    """An output folder written before the statistics: 3 done videos (one with a GIF), 1 failed."""
    layout = OutputLayout(tmp_path / "out")
    data = dumps_tracks(hand_made(str(videos_dir / "tiny_25fps.mp4")))
    records = [{"kind": "start", "run": "R", "rank": 0, "time": 1.0, "world_size": 1, "shard": [0, 1], "rows": 4,
                "csv_rows": 4, "skipped": 0}]
    for i, vid in enumerate(("a", "b", "c")):
        layout.pickle("d", vid).parent.mkdir(parents=True, exist_ok=True)
        layout.pickle("d", vid).write_bytes(data)
        outputs = {"pickle": output_entry(data)}
        if vid == "a":
            layout.gif("d", vid).parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (8, 6)).save(layout.gif("d", vid), format="GIF")
            outputs["gif"] = {"bytes": layout.gif("d", vid).stat().st_size}
        records.append({**done_record(i, "d", vid, 4, 4, outputs), "run": "R", "rank": 0, "time": 2.0})
    failed = failed_record(3, "d", "x", "decode", "not a video", "/x.mp4")
    records.append({**failed, "run": "R", "rank": 0, "time": 2.0})
    records.append({"kind": "end", "run": "R", "rank": 0, "time": 3.0, "status": "complete", "wall_s": 2.0,
                    "stage_totals": {"tracking": [1.5, 3]}})
    LedgerPart(layout.ledger_part("R", 0)).append(records)
    return layout


def test_an_old_ledger_reports_and_verify_outputs_fills_the_statistics(old_folder, capsys):
    root = str(old_folder.root)
    assert main([root]) == 1  # a video failed
    assert "3 done video(s) have no statistics; rerun with --verify_outputs to compute them" in capsys.readouterr().out
    assert main([root, "--json"]) == 0
    survey = json.loads(capsys.readouterr().out)
    assert survey["counts"]["without_statistics"] == 3 and survey["statistics"]["visible"]["count"] == 0
    assert survey["failures_by_stage"] == {"decode": {"not a video": 1}}

    assert main([root, "--verify_outputs", "--json"]) == 0
    survey = json.loads(capsys.readouterr().out)
    assert survey["counts"]["with_statistics"] == 3 and survey["counts"]["without_statistics"] == 0
    assert survey["statistics"]["visible"]["median"] == 0.625 and survey["statistics"]["points"]["max"] == 4
    assert [r["run_id"] for r in survey["runs"]] == ["R"]  # the pass that restated them is no run
    assert survey["runs"][0]["counts"]["done"] == 3  # restated records are not counted again
    restated = [r for r in read_records(old_folder) if r.get("restated")]
    assert len(restated) == 3
    assert {k: v for k, v in restated[0]["stats"].items() if not k.endswith("_rel")} == \
        {k: v for k, v in KNOWN.items() if not k.endswith("_rel")}
    assert restated[0]["stats"]["displacement_p95_rel"] == 0.0231  # 9.25 / 400 px, the 240 x 320 clip's diagonal
    assert main([root]) == 1
    assert "no statistics" not in capsys.readouterr().out  # they are in the ledger now


def test_a_verifying_resume_restates_the_records_without_statistics(old_folder):
    """semtrack-extract --verify_outputs reads every done pickle anyway: it fills the statistics in too."""
    rows = [SimpleNamespace(index=i, dataset="d", video_id=v) for i, v in enumerate("abcx")]
    plan = DoneRule(old_folder, latest_videos(read_records(old_folder)), want_gif=False, verify=True).plan(rows)
    assert (plan.pending, plan.skipped) == ([3], 3)
    assert [(r["video_id"], r["restated"], r["stats"]["visible"]) for r in plan.adopted] == \
        [("a", True, 0.625), ("b", True, 0.625), ("c", True, 0.625)]


def test_where_prints_the_matching_videos(old_folder, capsys):
    assert main([str(old_folder.root), "--verify_outputs", "--where", "visible<0.7 and points==4"]) == 0
    assert capsys.readouterr().out == "dataset,video_id\nd,a\nd,b\nd,c\n"
    assert main([str(old_folder.root), "--where", "few_points"]) == 0
    assert capsys.readouterr().out == "dataset,video_id\nd,a\nd,b\nd,c\n"  # N = 4 < 8
    assert main([str(old_folder.root), "--where", "visible<"]) == 2


class Page(HTMLParser):
    """Every href and src of a page, checking that each element it opens is closed in order."""

    VOID = {"meta", "img", "br", "hr", "link", "input"}

    def __init__(self):
        super().__init__()
        self.links, self.open, self.errors = [], [], []

    def handle_starttag(self, tag, attrs):
        self.links += [v for k, v in attrs if k in ("href", "src")]
        if tag not in self.VOID:
            self.open.append(tag)

    def handle_endtag(self, tag):
        if not self.open or self.open.pop() != tag:
            self.errors.append(f"</{tag}> closes nothing open")


def check_page(page: Path) -> list[str]:
    """Parse the page; every link must point to an existing file (data URIs must hold a JPEG) -> the links."""
    parser = Page()
    parser.feed(page.read_text(encoding="utf-8"))
    parser.close()
    assert not parser.errors and parser.open == [], (parser.errors, parser.open)
    for link in parser.links:
        if link.startswith("data:image/jpeg;base64,"):
            Image.open(io.BytesIO(base64.b64decode(link.split(",", 1)[1]))).verify()
        else:
            assert "://" not in link and (page.parent / unquote(link)).is_file(), link
    return parser.links


def test_the_html_page_parses_and_every_link_points_to_a_file(old_folder, tmp_path, capsys):
    assert main([str(old_folder.root), "--verify_outputs", "--html"]) == 1  # the failed video
    links = check_page(old_folder.root / "report.html")
    assert "d/gif_dump/a.gif" in links and "d/feat_dump/b.pkl" in links
    assert sum(link.startswith("data:image/jpeg") for link in links) == 2  # b and c: previews from pickle + video
    elsewhere = tmp_path / "pages" / "r.html"
    elsewhere.parent.mkdir()
    main([str(old_folder.root), "--html", str(elsewhere)])
    assert "../out/d/gif_dump/a.gif" in check_page(elsewhere)
    text = elsewhere.read_text()
    assert "few_points" in text and "<svg" in text and "not a video" in text
