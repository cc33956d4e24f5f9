"""The input CSV (`semtrack.video.csv`): strict reading, validation that names the file and the
culprit, video ids and path resolution. Every CSV is written here; the one clip they list is real."""
from __future__ import annotations

from pathlib import Path

import pytest

from _shared import shared_path
from datamodules import VideoCSVDataset
from semtrack.video import read_video_csv, read_video_paths

GOOD = shared_path("videos", "tiny_25fps.mp4")  # 40 frames, 320x240, 1.56 s: 17 frames at 10 fps
VIDEOS = shared_path("videos")


def write_csv(path: Path, header: str, lines: list[str], encoding: str = "utf-8") -> Path:
    path.write_bytes((header + "\n" + "".join(line + "\n" for line in lines)).encode(encoding))
    return path


def assert_good_item(item) -> None:
    assert item.error is None, item.error
    assert item.frames.shape == (17, 3, 240, 320)


def test_csv_errors_name_the_file_and_the_culprit(tmp_path):
    clip = VIDEOS / "tiny_25fps.mp4"
    cases = {
        "missing_col.csv": ("video_path,split", [f"{clip},train"], r"missing required column\(s\) \['dataset'\]"),
        "header_only.csv": ("video_path,dataset", [], "no rows"),
        "blank_dataset.csv": ("video_path,dataset", [f"{clip},"], "'dataset' is empty in row"),
        "dup.csv": ("video_path,dataset", [f"a/{clip.name},k400", f"b/{clip.name},k400", f"c/{clip.name},ucf"],
                    r"dataset='k400' video_id='tiny_25fps' rows \[0, 1\]"),
        "dup_ids.csv": ("video_path,dataset,video_id", [f"{clip},k400,x", f"{VIDEOS / 'cat.mp4'},k400,x"],
                        "video_id='x'"),
        "bad_fps.csv": ("video_path,dataset,fps", [f"{clip},k400,-3"], "column 'fps' row 0"),
        "bad_id.csv": ("video_path,dataset,video_id", [f"{clip},k400,ok", f"{clip},k400,../../x"],
                       r"column 'video_id' must be a plain file name .*row 1 '../../x'"),
        "bad_dataset.csv": ("video_path,dataset", [f"{clip},k400/train"], r"column 'dataset' .*row 0 'k400/train'"),
    }
    for name, (header, lines, message) in cases.items():
        path = write_csv(tmp_path / name, header, lines)
        with pytest.raises(ValueError, match=message) as info:
            VideoCSVDataset(path)
        assert str(path) in str(info.value)
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        VideoCSVDataset(tmp_path / "empty.csv")
    with pytest.raises(ValueError, match="fps_rule"):
        VideoCSVDataset(write_csv(tmp_path / "ok.csv", "video_path,dataset", [f"{clip},x"]), fps_rule="round")


def test_unquoted_comma_in_a_path_is_a_ragged_row_error(tmp_path):
    """pandas would shift such a row (or use the first column as an index) and process another file."""
    folder = tmp_path / "a,b"
    folder.mkdir()
    (folder / "clip.mp4").symlink_to(GOOD)
    unquoted = write_csv(tmp_path / "unquoted.csv", "video_path,dataset",
                         [f"{GOOD},test", f"{folder / 'clip.mp4'},test"])
    with pytest.raises(ValueError, match=r"1 row\(s\) do not have the header's 2 fields: row 1 \(line 3\): 3 fields"):
        read_video_csv(unquoted)
    all_rows = write_csv(tmp_path / "all.csv", "video_path,dataset", [f"{folder / 'clip.mp4'},test"] * 2)
    with pytest.raises(ValueError, match="row 0 \\(line 2\\): 3 fields, row 1 \\(line 3\\): 3 fields") as info:
        VideoCSVDataset(all_rows)
    assert str(all_rows) in str(info.value)
    quoted = write_csv(tmp_path / "quoted.csv", "video_path,dataset", [f'"{folder / "clip.mp4"}",test'])
    item = VideoCSVDataset(quoted)[0]
    assert item.video_path == str(folder / "clip.mp4")
    assert_good_item(item)


def test_missing_field_duplicate_column_bad_quoting_and_encoding_name_the_file(tmp_path):
    cases = {
        "short.csv": ("video_path,dataset,video_id", [f"{GOOD},test,a", f"{GOOD},test"],
                      r"row 1 \(line 3\): 2 fields"),
        "dup_column.csv": ("video_path,dataset,dataset", [f"{GOOD},a,b"], r"duplicate column\(s\) \['dataset'\]"),
        "unclosed.csv": ("video_path,dataset", [f'"{GOOD},test', f"{GOOD},test"], "malformed CSV"),
        "junk_after_quote.csv": ("video_path,dataset", [f'"{GOOD}"x,test'], r"line 2: malformed CSV"),
    }
    for name, (header, lines, message) in cases.items():
        path = write_csv(tmp_path / name, header, lines)
        with pytest.raises(ValueError, match=message) as info:
            VideoCSVDataset(path)
        assert str(path) in str(info.value), name
    latin1 = write_csv(tmp_path / "latin1.csv", "video_path,dataset", [f"{GOOD},test", "vidéo.mp4,test"], "latin-1")
    with pytest.raises(ValueError, match=r"line 3: byte 4 \(b'\\xe9'\) is not UTF-8") as info:
        VideoCSVDataset(latin1)
    assert str(latin1) in str(info.value)
    binary = tmp_path / "video_as_csv.csv"
    binary.write_bytes(GOOD.read_bytes())
    with pytest.raises(ValueError, match="not UTF-8|malformed"):
        VideoCSVDataset(binary)


def test_bom_blank_lines_and_spaces_are_accepted(tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes(b"\xef\xbb\xbfvideo_path, dataset\r\n\r\n" + f"{GOOD}, test\r\n\n{GOOD},other\n".encode())
    rows = read_video_csv(path)
    assert [(r.index, r.dataset, r.video_path) for r in rows] == [(0, "test", str(GOOD)), (1, "other", str(GOOD))]


def test_video_id_rules(tmp_path):
    folder = tmp_path / "set.v1"
    folder.mkdir()
    for name in ("clip.v2.mp4", "x.mp4", "x.webm"):
        (folder / name).symlink_to(GOOD)
    csv = write_csv(tmp_path / "ids.csv", "video_path,dataset,video_id",
                    [f"{folder / 'clip.v2.mp4'},a,", f"{folder / 'x.mp4'},a,", f"{folder / 'x.webm'},b,",
                     f"{folder / 'clip.v2.mp4'},c,given"])
    assert [r.video_id for r in read_video_csv(csv)] == ["clip.v2", "x", "x", "given"]
    assert [r.video_id for r in read_video_csv(csv, video_id_rule="research")] == ["clip", "x", "x", "given"]
    ds = VideoCSVDataset(csv, video_id_rule="research")
    assert [ds[i].video_id for i in (0, 3)] == ["clip", "given"]
    (folder / "clip.v3.mp4").symlink_to(GOOD)
    versions = write_csv(tmp_path / "versions.csv", "video_path,dataset",
                         [f"{folder / 'clip.v2.mp4'},a", f"{folder / 'clip.v3.mp4'},a"])
    assert [r.video_id for r in read_video_csv(versions)] == ["clip.v2", "clip.v3"]
    with pytest.raises(ValueError, match=r"video_id='clip' rows \[0, 1\]"):
        read_video_csv(versions, video_id_rule="research")  # the research rule collides here
    with pytest.raises(ValueError, match="video_id_rule"):
        VideoCSVDataset(csv, video_id_rule="first_dot")
    with pytest.raises(ValueError, match="video_id_rule"):
        read_video_csv(csv, video_id_rule="")


def test_videos_without_a_csv_from_a_file_a_folder_or_a_glob(tmp_path):
    folder = tmp_path / "my clips"
    folder.mkdir()
    for name in ("b.webm", "a.mp4", "notes.txt"):
        (folder / name).write_bytes(b"x")
    (folder / "sub.mp4").mkdir()  # a folder named like a video is not one
    rows = read_video_paths(str(folder))
    assert [(r.index, Path(r.video_path).name, r.video_id, r.dataset) for r in rows] == [
        (0, "a.mp4", "a", "my clips"), (1, "b.webm", "b", "my clips")]
    assert all(Path(r.video_path).is_absolute() and r.fps is ... for r in rows)
    assert [r.video_id for r in read_video_paths(str(folder / "*.webm"), dataset="set")] == ["b"]
    assert [r.dataset for r in read_video_paths(str(tmp_path / "**" / "a.mp4"))] == ["my clips"]
    single = read_video_paths(str(folder / "a.mp4"), dataset="d")
    assert [(r.video_id, r.dataset) for r in single] == [("a", "d")]
    with pytest.raises(ValueError, match="matches no file"):
        read_video_paths(str(tmp_path / "nothing*.mp4"))
    with pytest.raises(ValueError, match="no videos"):
        read_video_paths(str(tmp_path))
    with pytest.raises(ValueError, match="plain file name"):
        read_video_paths(str(folder), dataset="a/b")


def test_limit_keeps_the_first_rows(tmp_path):
    csv = tmp_path / "v.csv"
    csv.write_text("video_path,dataset\n" + "".join(f"{tmp_path}/v{i}.mp4,d\n" for i in range(5)))
    assert [r.video_id for r in VideoCSVDataset(csv, limit=2).rows] == ["v0", "v1"]
    assert len(VideoCSVDataset(csv).rows) == 5
