"""Host budget per video: the process CPU time (`time.process_time`) of the host work each video
costs, section by section, on input sets made from ../shared/videos.

    python benchmarks/bench_host.py --json OUT [--sections decode transfer] [--repeats 5]
        [--set NAME=CSV ...] [--sources CLIP ...] [--cache DIR]

Input sets, made once into `--cache` (default: a folder under the system's temporary directory,
named after the sources and the recipe) unless `--set` names a CSV (`video_path`, `dataset`, optional
`fps`, read by `VideoCSVDataset`, whose rules pick each row's frame rate):

* `ssv2_like`: every source re-encoded the way SSV2 stores clips (`make_ssv2_like.py`, 3 lengths
  each): VP9 WebM, 12 fps, 240 px high, dataset `ssv2` (decoded at the native rate).
* `480p`: the sources that already are 480 px high at 24-31 fps, as they are (dataset `k400`,
  decoded at 10 fps).
* `480p_x264`: the sources at 24-31 fps re-encoded 480 px high with libx264's defaults (preset
  medium, crf 23: B-frames, a keyframe at most every 250 frames), as Kinetics clips were cut
  (decoded at 10 fps).

Sections (`SECTIONS`, a registry: `@section(name, rows)` adds one; each takes the sets and the
arguments and returns its part of the JSON, and `rows` turns that part into table rows):

* `decode`: `semtrack.video.decode_video` per decoder (`auto`, `decord`, `pyav`) inside a DataLoader
  worker (one decoder thread, as in the job), each video once untimed, then `--repeats` times; and
  `floor`: the codec alone decoding the reference frames (non-reference ones skipped, no RGB
  conversion; its `frames` are the frames it decoded): about what no exact decode of a one-keyframe
  clip goes below.
* `transfer`: moving a decoded clip into shared memory (`Tensor.share_memory_`, what a worker's
  queue pickler does to every tensor it hands to the main process), in a DataLoader worker.
* `writer`: what the writer does per video, in this process: the pickle (`dumps_tracks` of
  `tracks_dict`), one ledger record appended and fsynced (a batch of 1), and the trail GIF
  (`gif_bytes`, the job's default width; `gif` with PIL's encoder, `gif_literal` with `--gif_encoder
  literal`), on the `ssv2_like` set's clips with stand-in tracks
  (`POINTS` random-walk points in `ENTITIES` entities, 10 % invisible: the issue's GIF case).
* `overlap`: how much of the writing the next step hides. A stand-in step sleeps `--step_ms` per
  video of a batch of `--batch` (a stand-in for GPU time: the main thread is idle, as while it waits
  for the GPU), `--batches` times, alone and then handing each batch to a real `semtrack.run.Run`
  (background writer, GIF workers with `--make_vis`) in a temporary folder, without GIFs and with
  GIFs of each `--gif_encoder`.
  Reported: the wall time per batch from the first step to the last record written (`Run.finish`
  included) against the stand-in step alone (the claim: <= 1.1x, i.e. the device would not wait for
  the host; the last batch's writing is never hidden, so more batches make it smaller), the same for
  the loop alone (until the last batch is handed over), the drain after the last batch, the
  main thread's CPU per batch (`time.thread_time`: what the step loses to writing) and the CPU of
  the writer thread and of the GIF workers per video.

Reported per set (decode, transfer, writer): the median over videos of each video's median time (ms), the mean, and the
videos' median frame count. The JSON holds every video's times, the commit, date and hardware.
"""
from __future__ import annotations

import argparse
import csv
import functools
import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import av
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_ssv2_like  # noqa: E402
from bench_extract import environment  # noqa: E402

from _shared import shared_path  # noqa: E402
from datamodules.video import VideoCSVDataset  # noqa: E402
from semtrack.config import DECODERS, ExtractConfig  # noqa: E402
from semtrack.defaults import GIF_ENCODERS  # noqa: E402
from semtrack.gif import gif_bytes  # noqa: E402
from semtrack.job import Job  # noqa: E402
from semtrack.ledger import LedgerPart, done_record  # noqa: E402
from semtrack.records import Clip, Tracks, VideoResult  # noqa: E402
from semtrack.renders import gif_arrays  # noqa: E402
from semtrack.run import Run  # noqa: E402
from semtrack.sidecar import run_options  # noqa: E402
from semtrack.trackfile import dumps_tracks, tracks_dict  # noqa: E402
from semtrack.video import FramePlan, decode_video  # noqa: E402

SSV2_VARIANTS = 3  # lengths per source in the SSV2-like set (make_ssv2_like.py --variants)
RATE_RANGE = (24.0, 31.0)  # frames per second of the "480p 25-30 fps" sets
HEIGHT = 480
X264_OPTIONS = {"preset": "medium", "crf": "23"}  # libx264's defaults, spelled out
POINTS, ENTITIES = 250, 20  # stand-in tracks of the writer and overlap sections (the GIF case)
STEP_MS = 40.0  # stand-in device time per video: 25 videos/s per device, the rate
OVERLAP_LIMIT = 1.1  # the claim: the loop's wall time per batch <= this x the stand-in step alone
WEIGHTS = {"tracker": "random:bench", "dinov2": None}  # the weights the stand-in pickles name
RECIPE = "ssv2x3-480p-x264medium23-v1"  # names the cache folder: change it when a set's recipe changes

Row = tuple[str, str, str, float, str]  # section, set, what, ms per video (median), note


# ---------------------------------------------------------------------------------------------
# input sets
# ---------------------------------------------------------------------------------------------


def default_sources() -> list[Path]:
    """Every shared clip PyAV can open with a video stream (the broken test files left out)."""
    sources = []
    for path in sorted(shared_path("videos").iterdir()):
        if path.suffix not in (".mp4", ".webm"):
            continue
        try:
            with av.open(str(path)) as container:
                if container.streams.video:
                    sources.append(path)
        except av.FFmpegError:
            continue
    return sources


def _rate_and_height(path: Path) -> tuple[float, int]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        return float(stream.average_rate or 0), stream.codec_context.height


def reencode_x264(src: Path, dst: Path, height: int = HEIGHT) -> None:
    """Every frame of `src`, `height` px high (aspect kept, even width), at its average rate, as
    H.264 in mp4 with `X264_OPTIONS`."""
    with av.open(str(src)) as container:
        stream = container.streams.video[0]
        rate = Fraction(stream.average_rate).limit_denominator(1001)
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    width, height = make_ssv2_like.output_size(frames[0].shape[1], frames[0].shape[0], height)
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(dst.name + ".part")
    with av.open(str(part), "w", format="mp4") as out:
        video = out.add_stream("libx264", rate=rate, options=X264_OPTIONS)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        for k, image in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24").reformat(
                width=width, height=height, format="yuv420p", interpolation="AREA")
            frame.pts = k
            out.mux(video.encode(frame))
        out.mux(video.encode(None))
    part.replace(dst)


def _write_csv(path: Path, videos: list[Path], dataset: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    with open(part, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["video_path", "dataset", "video_id"])
        for video in videos:
            writer.writerow([video, dataset, video.stem])
    part.replace(path)  # a set is complete once its CSV exists
    return path


def build_sets(sources: list[Path], cache: Path) -> dict[str, Path]:
    """-> {set name: CSV}, made under `cache/<key>` (reused when already there); empty sets left out."""
    stamp = "|".join(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in sources) + RECIPE
    folder = cache / hashlib.sha256(stamp.encode()).hexdigest()[:16]
    sets: dict[str, Path] = {}
    ssv2 = folder / "ssv2_like" / "ssv2_like.csv"
    if not ssv2.exists():
        make_ssv2_like.main([*map(str, sources), "--out", str(ssv2.parent), "--csv", str(ssv2),
                             "--variants", str(SSV2_VARIANTS)])
    sets["ssv2_like"] = ssv2
    facts = {p: _rate_and_height(p) for p in sources}
    in_range = [p for p in sources if RATE_RANGE[0] <= facts[p][0] <= RATE_RANGE[1]]
    as_is = [p for p in in_range if facts[p][1] == HEIGHT and p.suffix == ".mp4"]
    if as_is:
        sets["480p"] = _write_csv(folder / "480p.csv", as_is, "k400")
    if in_range:
        x264 = folder / "480p_x264.csv"
        if not x264.exists():
            made = [folder / "480p_x264" / f"{p.stem}.mp4" for p in in_range]
            for src, dst in zip(in_range, made):
                reencode_x264(src, dst)
            _write_csv(x264, made, "k400")
        sets["480p_x264"] = x264
    return sets


# ---------------------------------------------------------------------------------------------
# running measurements inside a DataLoader worker
# ---------------------------------------------------------------------------------------------


class _InWorker(Dataset):
    """Item i: `fn(*items[i])`, run in a DataLoader worker (so `get_worker_info()` is set)."""

    def __init__(self, fn: Callable, items: list[tuple]):
        self.fn, self.items = fn, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.fn(*self.items[i])


def in_worker(fn: Callable, items: list[tuple]) -> list:
    """[fn(*item) for item in items], computed in one DataLoader worker process, in order."""
    loader = DataLoader(_InWorker(fn, items), batch_size=None, num_workers=1, multiprocessing_context="fork")
    return list(loader)


def _plans(csv_path: Path) -> list[tuple[str, FramePlan]]:
    """[(video path, the frame plan the Dataset gives its row)] of one set."""
    ds = VideoCSVDataset(csv_path)
    return [(row.video_path, FramePlan(ds.target_fps(row), ds.fps_rule, ds.max_frames)) for row in ds.rows]


def _median_ms(values: list[float]) -> float:
    return round(1000 * statistics.median(values), 3)


def summarise(per_video: list[dict], key: str = "ms") -> dict:
    """Median over videos of the per-video medians, their mean, and the median frame count."""
    medians = [v[key] for v in per_video]
    return {"videos": len(per_video), "median_ms": round(statistics.median(medians), 3),
            "mean_ms": round(statistics.fmean(medians), 3),
            "median_frames": statistics.median(v["frames"] for v in per_video)}


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Section:
    run: Callable[[dict[str, Path], argparse.Namespace], dict]  # (sets, args) -> its JSON part
    rows: Callable[[dict], list[Row]]  # its JSON part -> table rows


SECTIONS: dict[str, Section] = {}


def section(name: str, rows: Callable[[dict], list[Row]]):
    """Register `run` as the section `name`, whose table rows `rows` makes."""
    def register(run):
        SECTIONS[name] = Section(run, rows)
        return run
    return register


def _time_decode(path: str, plan: FramePlan, decoder: str, repeats: int) -> dict:
    decoded, served, error = decode_video(path, plan, decoder)  # untimed: page cache, lazy imports
    times = []
    for _ in range(repeats):
        start = time.process_time()
        decode_video(path, plan, decoder)
        times.append(time.process_time() - start)
    frames = 0 if decoded is None else len(decoded.frames)
    return {"video": Path(path).name, "decoder": served, "error": error, "frames": frames,
            "ms": _median_ms(times), "times_ms": [round(1000 * t, 3) for t in times]}


def _time_codec_floor(path: str, repeats: int) -> dict:
    """The codec's own CPU (PyAV, one thread) for the reference frames alone: every packet sent with
    `skip_frame = NONREF`, nothing converted to RGB. An exact decode of a clip with one keyframe
    decodes at least every reference frame up to its last selected one (and the selected
    non-reference frames), so this is about its floor (above it only by the frames after the last
    selected one)."""
    def decode() -> int:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.codec_context.thread_count = 1
            stream.codec_context.skip_frame = "NONREF"
            return sum(1 for _ in container.decode(stream))

    frames = decode()
    return {"video": Path(path).name, "decoder": "floor", "error": None, "frames": frames,
            **_cpu_ms(decode, repeats)}


def _decode_rows(part: dict) -> list[Row]:
    return [("decode", name, decoder, s["median_ms"], f"mean {s['mean_ms']:.1f}, {s['videos']} videos, "
             f"median {s['median_frames']:g} frames")
            for name, by_decoder in part.items() for decoder, s in by_decoder["summary"].items()]


@section("decode", _decode_rows)
def decode_section(sets: dict[str, Path], args: argparse.Namespace) -> dict:
    out = {}
    for name, csv_path in sets.items():
        plans = _plans(csv_path)
        items = [(path, plan, decoder, args.repeats) for decoder in DECODERS for path, plan in plans]
        results = in_worker(_time_decode, items)
        per_decoder = {d: [r for r, item in zip(results, items) if item[2] == d] for d in DECODERS}
        failed = [f"{r['video']} ({d}): {r['error']}" for d, rs in per_decoder.items() for r in rs if r["error"]]
        if failed:
            raise RuntimeError(f"set {name}: decoding failed: {'; '.join(failed)}")
        per_decoder["floor"] = in_worker(_time_codec_floor, [(path, args.repeats) for path, _ in plans])
        out[name] = {"summary": {d: summarise(rs) for d, rs in per_decoder.items()}, "videos": per_decoder}
    return out


def _time_transfer(path: str, plan: FramePlan, repeats: int) -> dict:
    decoded, _, error = decode_video(path, plan, "auto")
    if decoded is None:
        return {"video": Path(path).name, "error": error}
    frames = torch.from_numpy(decoded.frames)
    times = []
    for _ in range(repeats + 1):
        fresh = frames.clone()
        start = time.process_time()
        fresh.share_memory_()
        times.append(time.process_time() - start)
    return {"video": Path(path).name, "error": None, "frames": len(frames), "bytes": frames.numel(),
            "ms": _median_ms(times[1:]), "times_ms": [round(1000 * t, 3) for t in times[1:]]}


def _transfer_rows(part: dict) -> list[Row]:
    return [("transfer", name, "share_memory_", s["summary"]["median_ms"],
             f"{s['ms_per_mb']:.2f} ms/MB, median clip {s['median_mb']:.1f} MB") for name, s in part.items()]


@section("transfer", _transfer_rows)
def transfer_section(sets: dict[str, Path], args: argparse.Namespace) -> dict:
    out = {}
    for name, csv_path in sets.items():
        results = in_worker(_time_transfer, [(path, plan, args.repeats) for path, plan in _plans(csv_path)])
        failed = [f"{r['video']}: {r['error']}" for r in results if r["error"]]
        if failed:
            raise RuntimeError(f"set {name}: decoding failed: {'; '.join(failed)}")
        total_mb = sum(r["bytes"] for r in results) / 2**20
        out[name] = {"summary": summarise(results), "median_mb": statistics.median(r["bytes"] / 2**20 for r in results),
                     "ms_per_mb": sum(r["ms"] for r in results) / total_mb, "videos": results}
    return out


# ---------------------------------------------------------------------------------------------
# stand-in results: real clips, random-walk tracks
# ---------------------------------------------------------------------------------------------


def stand_in_result(row: int, path: str, plan: FramePlan, points: int = POINTS) -> VideoResult:
    """The clip of `path` decoded (`auto`) with `points` random-walk tracks (seed `row`: uniform starts,
    steps of 2 px std) in `ENTITIES` entities, 10 % of the positions invisible, as row `row`."""
    decoded, served, error = decode_video(path, plan, "auto")
    if decoded is None:
        raise RuntimeError(f"{path}: {error}")
    t, h, w = decoded.frames.shape[:3]
    rng = np.random.default_rng(row)
    start = rng.uniform([0, 0], [w, h], size=(points, 2))
    walk = start[None] + np.cumsum(rng.normal(0, 2.0, size=(t, points, 2)), axis=0)
    frames = torch.from_numpy(decoded.frames).permute(0, 3, 1, 2)  # (T, 3, H, W), channels-last strides
    clip = Clip(row, f"v{row}", "bench", path, frames=frames, frame_times=torch.from_numpy(decoded.times),
                source_fps=decoded.source_fps, fps=decoded.fps, cluster_frames=torch.zeros(1, dtype=torch.int64),
                decoder=served)
    visibility = torch.from_numpy(rng.random((t, points)) > 0.1)
    ids = torch.from_numpy(np.sort(rng.integers(0, ENTITIES, points)))
    tracks = Tracks(torch.from_numpy(walk).float(), visibility, ids, torch.zeros(points, dtype=torch.int64))
    return VideoResult(clip, tracks)


def _config(folder: Path, make_vis: bool = False, gif_encoder: str = GIF_ENCODERS[0]) -> ExtractConfig:
    return ExtractConfig(csv_path=str(folder / "rows.csv"), base_feat_path=str(folder / "out"), weights="random",
                         use_grid=True, make_vis=make_vis, gif_encoder=gif_encoder)


def _cpu_ms(fn: Callable, repeats: int) -> dict:
    """Median and every process CPU time (ms) of `repeats` calls of fn() after one untimed call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return {"ms": _median_ms(times), "times_ms": [round(1000 * t, 3) for t in times]}


def _pickle(result: VideoResult, options: dict) -> bytes:
    return dumps_tracks(tracks_dict(result, WEIGHTS, options))


def _writer_rows(part: dict) -> list[Row]:
    return [("writer", "ssv2_like", what, s["median_ms"], f"mean {s['mean_ms']:.1f}, {s['videos']} videos, "
             f"median {s['median_frames']:g} frames, {part['points']} points")
            for what, s in part["summary"].items()]


@section("writer", _writer_rows)
def writer_section(sets: dict[str, Path], args: argparse.Namespace) -> dict:
    if "ssv2_like" not in sets:
        raise RuntimeError("the writer section needs the ssv2_like set")
    with tempfile.TemporaryDirectory(prefix="bench_host_") as folder:
        config = _config(Path(folder))
        options = run_options(config, "32-true")
        ledger = LedgerPart(Path(folder) / "ledger.jsonl")
        per_what: dict[str, list[dict]] = {"pickle": [], "ledger": [], "gif": [], "gif_literal": []}
        for row, (path, plan) in enumerate(_plans(sets["ssv2_like"])):
            result = stand_in_result(row, path, plan)
            frames, tracks = result.clip.num_frames, result.tracks.tracks
            record = done_record(row, "bench", f"v{row}", frames, int(tracks.shape[1]), outputs={})
            work = {"pickle": functools.partial(_pickle, result, options),
                    "ledger": functools.partial(ledger.append, [record]),
                    "gif": functools.partial(gif_bytes, *gif_arrays(result), max_width=config.vis_max_width),
                    "gif_literal": functools.partial(gif_bytes, *gif_arrays(result), max_width=config.vis_max_width,
                                                     encoder="literal")}
            for what, fn in work.items():
                per_what[what].append({"video": Path(path).name, "frames": frames, **_cpu_ms(fn, args.repeats)})
    return {"points": POINTS, "summary": {w: summarise(v) for w, v in per_what.items()}, "videos": per_what}


def _children_cpu() -> float:
    """CPU seconds of this process's ended, waited-for child processes."""
    t = os.times()
    return t.children_user + t.children_system


def overlap_run(results: list[VideoResult], folder: Path, make_vis: bool, batch: int, batches: int,
                step_s: float, gif_encoder: str = GIF_ENCODERS[0]) -> dict:
    """The stand-in step alone, then with a `Run` writing behind it (see the module docstring)."""
    alone = time.perf_counter()
    for _ in range(batches):
        time.sleep(step_s * batch)
    alone = (time.perf_counter() - alone) / batches
    config = _config(folder, make_vis, gif_encoder)
    job = Job.of(config)
    rows = [(i, results[i % len(results)]) for i in range(batch * batches)]
    job.settle([SimpleNamespace(index=i, dataset="bench", video_id=f"v{i}") for i, _ in rows], 0, 1, 1)
    run = Run(job)
    run.begin("bench", "32-true", WEIGHTS, sidecar=False)
    children, process, main = _children_cpu(), time.process_time(), 0.0
    start = time.perf_counter()
    for b in range(batches):
        time.sleep(step_s * batch)
        handed = [VideoResult(_renumbered(r.clip, i), r.tracks) for i, r in rows[b * batch: (b + 1) * batch]]
        before = time.thread_time()
        run.submit(handed, {"tracking": (step_s * batch, batch)})
        main += time.thread_time() - before
    loop = time.perf_counter() - start
    run.finish()
    drain = time.perf_counter() - start - loop
    run.release()  # joins the GIF workers, so their CPU is counted
    process = time.process_time() - process
    videos = batch * batches
    if (run.done, run.failed) != (videos, 0):
        raise RuntimeError(f"the run wrote {run.done} of {videos} videos ({run.failed} failed): {run.errors}")
    return {"make_vis": make_vis, "gif_encoder": gif_encoder if make_vis else None,
            "step_ms": round(1000 * step_s * batch, 3), "alone_ms": round(1000 * alone, 3),
            "run_ms": round(1000 * (loop + drain) / batches, 3), "ratio": round((loop + drain) / batches / alone, 4),
            "loop_ms": round(1000 * loop / batches, 3), "loop_ratio": round(loop / batches / alone, 4),
            "drain_ms": round(1000 * drain, 3), "main_cpu_ms_per_batch": round(1000 * main / batches, 3),
            "writer_cpu_ms_per_video": round(1000 * (process - main) / videos, 3),
            "gif_workers_cpu_ms_per_video": round(1000 * (_children_cpu() - children) / videos, 3)}


def _renumbered(clip: Clip, row: int) -> Clip:
    return Clip(row, f"v{row}", clip.dataset, clip.video_path, clip.frames, clip.frame_times, clip.source_fps,
                clip.fps, clip.cluster_frames, clip.decoder)


def _overlap_rows(part: dict) -> list[Row]:
    """Rows of ms per batch (not per video), wall time."""
    return [("overlap", "ssv2_like", f"{'GIFs ' + r['gif_encoder'] if r['make_vis'] else 'pickles'}, /batch",
             r["run_ms"],
             f"{r['ratio']:.3f}x the step alone ({r['alone_ms']:.0f} ms, batch {part['batch']}); loop only "
             f"{r['loop_ratio']:.3f}x, drain {r['drain_ms']:.0f} ms; CPU: main thread "
             f"{r['main_cpu_ms_per_batch']:.2f} ms/batch, writer {r['writer_cpu_ms_per_video']:.1f} ms/video, "
             f"GIF workers {r['gif_workers_cpu_ms_per_video']:.1f} ms/video")
            for r in part["runs"]]


@section("overlap", _overlap_rows)
def overlap_section(sets: dict[str, Path], args: argparse.Namespace) -> dict:
    if "ssv2_like" not in sets:
        raise RuntimeError("the overlap section needs the ssv2_like set")
    results = [stand_in_result(row, path, plan) for row, (path, plan) in enumerate(_plans(sets["ssv2_like"]))]
    runs = []
    for make_vis, encoder in ((False, GIF_ENCODERS[0]), *((True, e) for e in GIF_ENCODERS)):
        with tempfile.TemporaryDirectory(prefix="bench_host_") as folder:
            runs.append(overlap_run(results, Path(folder), make_vis, args.batch, args.batches, args.step_ms / 1000,
                                    encoder))
    return {"batch": args.batch, "batches": args.batches, "step_ms_per_video": args.step_ms, "limit": OVERLAP_LIMIT,
            "within_limit": all(r["ratio"] <= OVERLAP_LIMIT for r in runs), "runs": runs}


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------


def _parse_set(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=CSV, got {text!r}")
    return name, Path(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--sections", nargs="+", default=None, help=f"of {list(SECTIONS)} (default: all)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per video (its median is used)")
    parser.add_argument("--set", dest="sets", type=_parse_set, action="append", default=None, metavar="NAME=CSV",
                        help="an input set (repeatable); none given: the sets are made from --sources")
    parser.add_argument("--sources", type=Path, nargs="+", default=None,
                        help="clips the sets are made from (default: every clip in ../shared/videos)")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "semtrack_bench_host",
                        help="folder for the sets made from the sources (reused across runs)")
    parser.add_argument("--step_ms", type=float, default=STEP_MS, help="overlap: stand-in device time per video (ms)")
    parser.add_argument("--batch", type=int, default=8, help="overlap: videos per batch")
    parser.add_argument("--batches", type=int, default=10, help="overlap: batches per run")
    return parser


def print_table(result: dict) -> None:
    env = result["env"]
    print(f"bench_host {env['date_utc']} commit {(env['git_commit'] or '?')[:7]}"
          f"{' (dirty)' if env['git_dirty'] else ''}; {env['hardware']['cpu_model']}, "
          f"{env['hardware']['cpu_count']} cores; torch {env['torch']}")
    print(f"{'section':10} {'set':12} {'what':16} {'ms/video':>9}  note")
    for name, part in result["sections"].items():
        for sec, set_name, what, ms, note in SECTIONS[name].rows(part):
            print(f"{sec:10} {set_name:12} {what:16} {ms:9.2f}  {note}")


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    chosen = args.sections or list(SECTIONS)
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
    if min(args.repeats, args.batch, args.batches) < 1 or args.step_ms <= 0:
        raise SystemExit("--repeats, --batch and --batches must be >= 1 and --step_ms > 0")
    sources = args.sources or default_sources()
    sets = dict(args.sets) if args.sets else build_sets(sources, args.cache)
    result = {
        "benchmark": "host", "env": environment(),
        "settings": {"repeats": args.repeats, "sets": {name: str(path) for name, path in sets.items()},
                     "sources": None if args.sets else [str(p) for p in sources],
                     "overlap": {"batch": args.batch, "batches": args.batches, "step_ms": args.step_ms},
                     "time": "time.process_time of the process that does the work (ms)"},
        "sections": {name: SECTIONS[name].run(sets, args) for name in chosen},
    }
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print_table(result)
    return result


if __name__ == "__main__":
    main()
