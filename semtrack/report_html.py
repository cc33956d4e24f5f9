"""`semtrack-report OUT_DIR --html [PATH]`: the folder's survey (`semtrack.survey.build_survey`) as one
self-contained HTML page: inline CSS, histograms as inline SVG, gallery previews embedded as JPEG
data URIs, and relative links to the folder's pickles and GIFs; nothing is fetched from a network.

Sections: counts; failures by stage and reason; a histogram of every statistic; the rules and each
statistic's extreme 1 % with links to each video's pickle and GIF; a gallery of up to 48 videos
(its GIF when the folder has one as a file, else the first tracked frame with every track drawn on
it, rendered from the pickle and the video); the runs. Histograms are plain SVG rectangles: no
plotting library; previews are encoded by PIL.
"""
from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from semtrack.gif import entity_colours, fitted_size, resize_frames, scale_points
from semtrack.layout import OutputLayout
from semtrack.ledger import output_file, read_output
from semtrack.survey import EXTREME_MIN_VIDEOS, LISTED
from semtrack.trackfile import TrackFileError, loads_tracks
from semtrack.trackstats import STATS
from semtrack.video import TrackedFramePlan, decode_video

PREVIEW_WIDTH = 320  # px: gallery previews are scaled down to at most this wide
PREVIEW_QUALITY = 85  # JPEG quality of the previews: ~20 kB each, so 48 keep the page small (PNG: ~110 kB)
SVG_W, SVG_H, SVG_PAD = 220, 90, 14  # px: one histogram

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222;max-width:1250px}
h1{font-size:1.5em}h2{font-size:1.2em;border-bottom:1px solid #ccc;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:2px 8px;text-align:left}
th{background:#f3f3f3}td.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(232px,1fr));gap:8px}
.card{border:1px solid #ddd;padding:5px;border-radius:4px}.card p{margin:1px 0;font-size:11px;color:#555}
.gallery{display:grid;grid-template-columns:repeat(auto-fill,minmax(240px,1fr));gap:10px;align-items:start}
.gallery img{width:100%;height:auto;background:#eee}.why{color:#a00}.note{color:#a60}
svg rect.bar{fill:#4a7bd0}svg text{font-size:10px;fill:#444}
"""


def _e(value) -> str:
    return html.escape(str(value), quote=True)


def _fmt(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def histogram_svg(summary: dict) -> str:
    """One statistic's histogram (`summary["histogram"]` edges and counts) as an inline SVG."""
    hist = summary.get("histogram")
    if not hist:
        return "<p>no values</p>"
    counts, edges = hist["counts"], hist["edges"]
    top = max(counts) or 1
    width = (SVG_W - 2 * SVG_PAD) / len(counts)
    bars = []
    for k, c in enumerate(counts):
        h = (SVG_H - 2 * SVG_PAD) * c / top
        bars.append(f'<rect class="bar" x="{SVG_PAD + k * width:.1f}" y="{SVG_H - SVG_PAD - h:.1f}" '
                    f'width="{max(width - 1, 0.5):.1f}" height="{h:.1f}"><title>[{_fmt(edges[k])}, '
                    f'{_fmt(edges[k + 1])}): {c}</title></rect>')
    labels = (f'<text x="{SVG_PAD}" y="{SVG_H - 4}">{_e(_fmt(edges[0]))}</text>'
              f'<text x="{SVG_W - SVG_PAD}" y="{SVG_H - 4}" text-anchor="end">{_e(_fmt(edges[-1]))}</text>'
              f'<text x="{SVG_PAD}" y="{SVG_PAD - 4}">tallest bar: {top} videos</text>')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{SVG_H}" role="img">'
            + "".join(bars) + labels + "</svg>")


def preview_jpeg(layout: OutputLayout, record: dict, max_width: int = PREVIEW_WIDTH) -> bytes:
    """The first tracked frame of a done video with every track drawn on it (its visible positions
    joined, in its entity's colour; a dot at its query position), JPEG (quality PREVIEW_QUALITY), at
    most `max_width` px wide.
    Read from the video's pickle and the video it records (`meta["video_path"]`). Raises OSError,
    TrackFileError or ValueError (the video cannot be decoded)."""
    tf = loads_tracks(read_output(layout, record, "pickle"), record["video_id"])
    video = tf.meta.get("video_path")
    if not video:
        raise ValueError("the pickle records no video path")
    decoded, decoder, error = decode_video(video, TrackedFramePlan.of(tf.meta.get("frame_times"), tf.num_frames, [0]))
    if decoded is None:
        raise ValueError(f"cannot decode {video} ({decoder}): {error}")
    frame = decoded.frames[0]  # (H, W, 3) uint8
    source = (frame.shape[1], frame.shape[0])
    clip = tf.meta.get("clip_size")  # [H, W] the tracks' pixels
    tracks = tf.tracks.numpy().astype(np.float64)  # (T, N, 2)
    if clip is not None and (clip[1], clip[0]) != source:
        tracks = scale_points(tracks, (clip[1], clip[0]), source)
    size = fitted_size(*source, max_width)
    tracks = scale_points(tracks, source, size) if size != source else tracks
    image = Image.fromarray(resize_frames(frame[None], size)[0])
    draw = ImageDraw.Draw(image)
    vis = tf.visibility.numpy()
    colours = entity_colours(tf.obj_ids.numpy())
    for j, colour in enumerate(colours):
        path = [tuple(p) for p in tracks[vis[:, j], j].tolist()]
        if len(path) > 1:
            draw.line(path, fill=colour, width=1)
        x, y = tracks[int(tf.query_frames[j]), j]
        draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=PREVIEW_QUALITY)
    return out.getvalue()


class _Links:
    """Relative links from the page's folder to a video's pickle and GIF (files that exist only)."""

    def __init__(self, layout: OutputLayout, page: Path, records: dict[tuple[str, str], dict]):
        self.layout, self.base, self.records = layout, page.resolve().parent, records

    def href(self, path: Path) -> str:
        return Path(os.path.relpath(path.resolve(), self.base)).as_posix()

    def file(self, key: tuple[str, str], kind: str) -> Path | None:
        """The file holding output `kind` of video `key` (its own file or its tar shard), if it exists."""
        record = self.records.get(key)
        where = output_file(self.layout, record, kind) if record else None
        return where[0] if where and where[0].is_file() else None

    def cells(self, key: tuple[str, str]) -> str:
        out = []
        for kind in ("pickle", "gif"):
            path = self.file(key, kind)
            text = kind if path is None or path.suffix != ".tar" else f"{kind} in {path.name}"
            out.append(f'<a href="{_e(self.href(path))}">{_e(text)}</a>' if path else "")
        return "".join(f"<td>{c}</td>" for c in out)


def _table(header: list[str], rows: list[str]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in header)
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _counts(survey: dict) -> str:
    c = survey["counts"]
    names = ("rows", "done", "failed", "pending", "with_statistics", "without_statistics")
    rows = [f"<tr><td>{_e(n.replace('_', ' '))}</td><td class=n>{_e(_fmt(c.get(n)))}</td></tr>" for n in names]
    note = survey["without_statistics"]["note"]
    warn = f'<p class="note">{c["without_statistics"]} done videos: {_e(note)}</p>' if note else ""
    return "<h2>Counts</h2>" + _table(["", "videos"], rows) + warn


def _failures(survey: dict) -> str:
    rows = [f"<tr><td>{_e(stage)}</td><td>{_e(reason)}</td><td class=n>{n}</td></tr>"
            for stage, reasons in survey["failures_by_stage"].items() for reason, n in reasons.items()]
    return "<h2>Failures by stage and reason</h2>" + (_table(["stage", "reason", "videos"], rows) if rows
                                                       else "<p>none</p>")


def _histograms(survey: dict) -> str:
    cards = []
    for name, s in survey["statistics"].items():
        line = (f"n {s['count']}, min {_fmt(s.get('min'))}, median {_fmt(s.get('median'))}, "
                f"max {_fmt(s.get('max'))}")
        cards.append(f'<div class="card"><b>{_e(name)}</b><p>{_e(STATS[name])}</p><p>{_e(line)}</p>'
                     f"{histogram_svg(s)}</div>")
    return "<h2>Statistics of the done videos</h2><div class=grid>" + "".join(cards) + "</div>"


def _outliers(survey: dict, links: _Links) -> str:
    rows = []
    groups = [(f"rule {rule}: {r['where']}", r) for rule, r in survey["rules"].items()]
    groups += [(f"extreme 1 %: {name} (beyond {_fmt(e['threshold'])})", e) for name, e in survey["extremes"].items()]
    for title, group in groups:
        if not group["count"]:
            continue
        for v in group["videos"]:
            key = (v["dataset"], v["video_id"])
            rows.append(f"<tr><td>{_e(title)}</td><td class=n>{group['count']}</td><td>{_e(v['dataset'])}/"
                        f"{_e(v['video_id'])}</td><td class=n>{_e(_fmt(v.get('value')))}</td>{links.cells(key)}</tr>")
    head = ("<h2>Outliers</h2><p>Each rule's videos (worst first) and each statistic's extreme 1 % (given at "
            f"least {EXTREME_MIN_VIDEOS} videos); at most {LISTED} listed per group; "
            "<code>semtrack-report OUT_DIR --where RULE</code> lists them all.</p>")
    return head + (_table(["group", "videos in group", "video", "value", "pickle", "GIF"], rows) if rows
                   else "<p>none</p>")


def _gallery(survey: dict, links: _Links, previews: bool) -> str:
    figures = []
    for g in survey["gallery"]:
        key = (g["dataset"], g["video_id"])
        gif = links.file(key, "gif")
        if gif is not None and gif.suffix == ".gif":
            image = f'<img loading="lazy" src="{_e(links.href(gif))}" alt="GIF of {_e(g["video_id"])}">'
        elif previews:
            try:
                data = base64.b64encode(preview_jpeg(links.layout, links.records[key])).decode("ascii")
                image = f'<img src="data:image/jpeg;base64,{data}" alt="first frame of {_e(g["video_id"])}">'
            except (OSError, TrackFileError, ValueError, KeyError) as exc:
                image = f"<p class=note>no preview: {_e(str(exc).splitlines()[0] if str(exc) else repr(exc))}</p>"
        else:
            image = "<p class=note>no GIF</p>"
        stats = links.records[key].get("stats") or {}
        line = ", ".join(f"{n} {_fmt(stats.get(n))}" for n in ("points", "entities", "visible", "static"))
        figures.append(f'<div class=card>{image}<p><b>{_e(g["dataset"])}/{_e(g["video_id"])}</b> '
                       f'<span class=why>{_e(g["why"])}</span></p><p>{_e(line)}</p></div>')
    return "<h2>Gallery</h2><div class=gallery>" + "".join(figures) + "</div>"


def _runs(survey: dict) -> str:
    rows = []
    for r in survey["runs"]:
        c = r["counts"]
        stages = ", ".join(f"{k} {v:.3f}" for k, v in (r.get("stage_mean_s") or {}).items())
        rows.append(f"<tr><td>{_e(r['run_id'])}</td><td>{_e(r['status'])}</td><td>{_e(r['shard'])}</td>"
                    f"<td class=n>{r['world_size']}</td><td class=n>{c['rows']}</td><td class=n>{c['done']}</td>"
                    f"<td class=n>{c['failed']}</td><td class=n>{c['skipped']}</td><td class=n>{r['wall_s']:.1f}</td>"
                    f"<td class=n>{r['videos_per_s']:.3f}</td><td>{_e(stages)}</td></tr>")
    return "<h2>Runs</h2>" + _table(["run", "status", "shard", "ranks", "rows", "done", "failed", "skipped",
                                     "wall s", "done videos/s", "mean s/video per stage"], rows)


def render_html(survey: dict, layout: OutputLayout, page: Path, records: dict[tuple[str, str], dict],
                previews: bool = True) -> str:
    """The page for `survey`, to be written at `page`; `records` {(dataset, video_id): latest record}
    (for the links); `previews`: render a preview for gallery videos without a GIF file."""
    links = _Links(layout, Path(page), records)
    body = (_counts(survey) + _failures(survey) + _histograms(survey) + _outliers(survey, links)
            + _gallery(survey, links, previews) + _runs(survey))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>semtrack report: '
            f"{_e(survey['output_dir'])}</title><style>{_CSS}</style></head><body><h1>semtrack report</h1>"
            f"<p>{_e(survey['output_dir'])}</p>{body}</body></html>\n")
