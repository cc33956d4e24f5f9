"""End-to-end extraction throughput: the real job (`scripts/extract.py`'s objects, the writer
included) on a CSV, stand-in weights, into a temporary output folder.

    python benchmarks/bench_extract.py --csv_path CSV [--precision 32|bf16-mixed] [--batch_size B]
        [--num_workers W] [--devices N] [--compare_precision] [--json OUT] [extraction flags...]

Every other flag is the job's, read by the command line's own parser (`semtrack.cli.parse_flat`:
`--fps 12`, `--max_frames 200`, `--tracker_resolution 192 256`, `--devices 2`, `--trainer.NAME V`,
...); `--weights` defaults to `random` (the deterministic stand-ins: same work, no download).
Make an SSV2-like input set with `benchmarks/make_ssv2_like.py`.

The run is built by `semtrack.api.build_trainer` and `semtrack.api.predict`, exactly as the command
line builds it, plus a timing callback after the writer.

What it reports (per precision; printed and written to `--json`):

* `videos_per_s`: videos (done + failed) / wall time of the predict loop (`on_predict_start` to
  the last batch written); `steady_videos_per_s` leaves out the first batch (worker start-up,
  lazy initialisation, autotuning). `loop` (these and the stage times) is rank 0's; with several
  devices `all_ranks.videos_per_s` = all ranks' videos / the slowest rank's loop wall time.
* `stage_s_per_video`: `decode_wait` (the loop waiting for the DataLoader between batches, first
  batch excluded; 0 means decoding is hidden), `features`, `clustering`, `sampling` (the pipeline's
  "points"), `tracking` (the pipeline's own stage clocks: CUDA events on a GPU, wall time on CPU,
  summed over the run and divided by the videos), `step_other` (the rest of `predict_step`:
  host->device copies, the final device->host copy, grouping), `writing` (the main thread's time in
  the writer's `write_on_batch_end`: handing the batch to the background writer), `writer_thread`
  (the background writer's time per video: pickle, GIF, fsyncs, ledger; hidden behind the steps).
  `startup_wait_s`: the wait for the first batch.
  `decode_s_per_video`: decoding + resampling each row once in this process (`VideoCSVDataset[i]`)
  after the run: the CPU work the DataLoader workers have to hide.
* `tracker_calls`, `videos_per_tracker_call`, `padded_frame_fraction`: how the tracker batched
  (length-bucketed batches, one `track_many` call per batch unless the memory budget splits it; the
  share of the frames it ran that were padding).
* `busy_fraction`: sum of the four compute stages' clock time / steady loop wall time (first batch
  excluded). On CUDA the stage clocks are CUDA-event intervals on the compute stream, so this is an
  upper bound of the GPU's busy time (an interval also counts the GPU idling inside a stage while
  the CPU launches kernels or waits on a sync); `nvml_utilization` (mean of
  `torch.cuda.utilization()` sampled every 0.1 s, if pynvml is installed) is the driver's view. On
  CPU it is the share of the loop spent computing rather than waiting or writing.
* `peak_memory`: per rank `cuda_max_allocated_gb` / `cuda_max_reserved_gb`
  (`torch.cuda.max_memory_allocated/reserved` over the loop) and `cpu_max_rss_gb` (the rank's peak
  resident set); `children_max_rss_gb`: the largest finished child process's peak (rank 0: the
  DataLoader workers, and small helpers such as git).
* `bf16_vs_fp32` (`--compare_precision`: runs `32-true` then `bf16-mixed` on the same CSV): per
  video, how many query points both runs chose (DINOv2 stays fp32 unless `--features_precision bf16`,
  which can change the clusters; points are matched by query frame, pixel and entity id), and over
  the matched
  points the max / mean track deviation in pixels and the visibility agreement
  (`semtrack.load_tracks` on both pickles). bf16 is meant for CUDA: on CPU it is several times
  slower than fp32.

The JSON also records the date, git commit, torch/lightning versions, CPU model, GPU name and the
exact command.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402

from datamodules.extraction import ExtractionDataModule  # noqa: E402
from semtrack.api import build_trainer, predict  # noqa: E402
from semtrack.cli import parse_flat  # noqa: E402
from semtrack.config import ExtractConfig  # noqa: E402
from semtrack.trackfile import load_tracks  # noqa: E402

PRECISIONS = {"32": "32-true", "32-true": "32-true", "bf16-mixed": "bf16-mixed"}
COMPUTE_STAGES = {"features": "features", "clustering": "clustering", "points": "sampling", "tracking": "tracking"}
OUT_ENV = "SEMTRACK_BENCH_OUT"  # shares the output folder with DDP ranks Lightning re-launches


# ---------------------------------------------------------------------------- timing callback
class LoopProbe(Callback):
    """Runs after the writer: batch start/end stamps, the writer's time per batch, the steps' stage
    clocks, peak memory."""

    def __init__(self, writer):
        self.writer = writer
        self.result: dict | None = None

    def on_predict_start(self, trainer, pl_module) -> None:
        self.cuda = pl_module.device.type == "cuda"
        if self.cuda:
            torch.cuda.synchronize(pl_module.device)
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.writes: list[float] = []
        self.tracker_calls: list[tuple[int, int, int]] = []  # (clips, frames, padded frames) per call
        self.videos: list[int] = []
        self.stage_s: dict[str, float] = {}
        self.batch_compute: list[float] = []  # per batch: seconds of the compute stages
        self.nvml: list[float] = []
        self._sampling = threading.Event()
        if self.cuda:
            self._sampler = threading.Thread(target=self._sample_nvml, args=(pl_module.device,), daemon=True)
            self._sampler.start()
        self.t0 = time.perf_counter()

    def _sample_nvml(self, device) -> None:
        while not self._sampling.wait(0.1):
            try:
                self.nvml.append(float(torch.cuda.utilization(device)))
            except Exception:  # noqa: BLE001 - pynvml missing or unsupported: no driver view
                return

    def on_predict_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self.starts.append(time.perf_counter())

    def on_predict_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.ends.append(time.perf_counter())
        self.writes.append(self.writer.last_write_s)
        self.tracker_calls += outputs.tracking_calls
        self.videos.append(len(batch))
        for stage, (seconds, _videos) in outputs.timings.items():
            self.stage_s[stage] = self.stage_s.get(stage, 0.0) + seconds
        self.batch_compute.append(sum(seconds for seconds, _ in outputs.timings.values()))

    def on_predict_end(self, trainer, pl_module) -> None:
        self._sampling.set()
        device = pl_module.device
        local = {
            "rank": trainer.global_rank,
            "cuda_max_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9 if self.cuda else None,
            "cuda_max_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9 if self.cuda else None,
            "cpu_max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,  # KiB on Linux
        }
        loop = self.summary()
        per_rank = trainer.strategy.all_gather(torch.tensor(
            [local["rank"], local["cuda_max_allocated_gb"] or -1.0, local["cuda_max_reserved_gb"] or -1.0,
             local["cpu_max_rss_gb"], loop["videos"], loop["wall_s"]], dtype=torch.float64, device=device))
        per_rank = per_rank.reshape(-1, 6).cpu().tolist()
        videos, wall = sum(row[4] for row in per_rank), max(row[5] for row in per_rank)
        self.result = {
            "loop": loop,
            "all_ranks": {"ranks": len(per_rank), "videos": int(videos), "wall_s": wall,
                          "videos_per_s": videos / wall if wall > 0 else None},
            "per_rank_memory": [
                {"rank": int(r), "cuda_max_allocated_gb": _gb(a), "cuda_max_reserved_gb": _gb(m),
                 "cpu_max_rss_gb": _gb(c)}
                for r, a, m, c, _, _ in per_rank
            ],
            "nvml_utilization": round(sum(self.nvml) / len(self.nvml) / 100, 3) if self.nvml else None,
        }

    def summary(self) -> dict:
        """This rank's loop timings (see the module docstring)."""
        writes = self.writes
        steps = [e - s - w for s, e, w in zip(self.starts, self.ends, writes)]
        waits = [s - e for s, e in zip(self.starts[1:], self.ends[:-1])]
        videos = sum(self.videos)
        wall = (self.ends[-1] if self.ends else time.perf_counter()) - self.t0
        steady_wall = self.ends[-1] - self.ends[0] if len(self.ends) > 1 else 0.0
        steady_videos = videos - (self.videos[0] if self.videos else 0)
        compute = sum(self.batch_compute)
        per_video = lambda seconds, n: seconds / n if n else None  # noqa: E731
        stages = {"decode_wait": per_video(sum(waits), steady_videos)}
        stages.update({name: per_video(self.stage_s.get(key, 0.0), videos) for key, name in COMPUTE_STAGES.items()})
        stages["step_other"] = per_video(max(0.0, sum(steps) - compute), videos)
        stages["writing"] = per_video(sum(writes), videos)
        seconds, written = self.writer.run.stage_totals.get("write", (0.0, 0))
        stages["writer_thread"] = per_video(seconds, written)
        return {
            "batches": len(self.ends),
            "videos": videos,
            "wall_s": wall,
            "videos_per_s": videos / wall if wall > 0 else None,
            "steady_videos_per_s": steady_videos / steady_wall if steady_wall > 0 else None,
            "startup_wait_s": self.starts[0] - self.t0 if self.starts else None,
            "stage_s_per_video": stages,
            "step_s_per_video": per_video(sum(steps), videos),
            "busy_fraction": sum(self.batch_compute[1:]) / steady_wall if steady_wall > 0 else None,
            "tracker_calls": len(self.tracker_calls),
            "videos_per_tracker_call": per_video(sum(c for c, _, _ in self.tracker_calls), len(self.tracker_calls)),
            "padded_frame_fraction": per_video(sum(p - f for _, f, p in self.tracker_calls),
                                               sum(p for _, _, p in self.tracker_calls)),
        }


def _gb(value: float) -> float | None:
    return None if value < 0 else round(value, 3)


# ---------------------------------------------------------------------------- one run
def run_once(config: ExtractConfig, precision: str, trainer_options: dict) -> dict:
    """One extraction run, built as `semtrack.api.run` builds it, plus the timing callback."""
    probe = LoopProbe(None)
    options = {**trainer_options, "precision": precision, "enable_progress_bar": False}
    trainer, probe.writer = build_trainer(config, [probe], **options)
    predict(trainer, config)
    report = probe.writer.report
    return {"is_global_zero": trainer.is_global_zero, "precision": str(trainer.precision),
            "world_size": trainer.world_size, **probe.result, "run_report": report}


def clip_stats(config: ExtractConfig) -> list[dict]:
    """Per written pickle: frames, points, clip size (what the work per video was)."""
    out = []
    for path in sorted(config.layout.root.glob("*/feat_dump/*.pkl")):
        tf = load_tracks(path)
        out.append({"video_id": path.stem, "frames": tf.num_frames, "points": tf.num_points,
                    "clip_hw": tf.meta.get("clip_size")})
    return out


def decode_cost(config: ExtractConfig) -> float | None:
    """Mean seconds to decode + resample one row in this process (what the workers must hide)."""
    dataset = ExtractionDataModule(config).make_dataset()
    if len(dataset) == 0:
        return None
    start = time.perf_counter()
    for i in range(len(dataset)):
        dataset[i]
    return (time.perf_counter() - start) / len(dataset)


def _query_index(tf) -> dict[tuple, int]:
    """(query frame, x, y, entity id) of each point -> its column; x, y as stored (float16 values)."""
    n = torch.arange(tf.num_points)
    xy = tf.tracks[tf.query_frames, n]  # (N, 2) the query pixel: tracks are overwritten there
    keys = zip(tf.query_frames.tolist(), xy[:, 0].tolist(), xy[:, 1].tolist(), tf.obj_ids.tolist())
    return {key: i for i, key in enumerate(keys)}


def compare_outputs(cfg32: ExtractConfig, cfg16: ExtractConfig) -> dict:
    """bf16 vs fp32 pickles of the same videos.

    With DINOv2 in fp32 (the default) both runs have the same query points; with
    `--features_precision bf16` the clusters can differ. Points are matched by (query frame, query
    pixel, entity id); the deviation is over matched points:
    Euclidean distance per (frame, point) in clip pixels, and visibility agreement.
    """
    per_video, devs, vis_same, vis_total = [], [], 0, 0
    for p32 in sorted(cfg32.layout.root.glob("*/feat_dump/*.pkl")):
        p16 = cfg16.layout.root / p32.relative_to(cfg32.layout.root)
        if not p16.is_file():
            per_video.append({"video_id": p32.stem, "note": "no bf16 pickle"})
            continue
        a, b = load_tracks(p32), load_tracks(p16)
        ia, ib = _query_index(a), _query_index(b)
        common = [key for key in ia if key in ib]
        entry = {"video_id": p32.stem, "points_fp32": a.num_points, "points_bf16": b.num_points,
                 "matched_points": len(common),
                 "same_queries": len(common) == a.num_points == b.num_points}
        if common:
            ca, cb = torch.tensor([ia[k] for k in common]), torch.tensor([ib[k] for k in common])
            dev = (a.tracks[:, ca] - b.tracks[:, cb]).norm(dim=-1)  # (T, M) px
            same_vis = a.visibility[:, ca] == b.visibility[:, cb]
            entry.update(max_px=round(dev.max().item(), 4), mean_px=round(dev.mean().item(), 5),
                         visibility_agreement=round(same_vis.float().mean().item(), 5))
            devs.append(dev.flatten())
            vis_same, vis_total = vis_same + int(same_vis.sum()), vis_total + same_vis.numel()
        per_video.append(entry)
    dev = torch.cat(devs) if devs else None
    return {
        "videos": len(per_video),
        "videos_same_queries": sum(1 for v in per_video if v.get("same_queries")),
        "matched_point_fraction": round(
            sum(v.get("matched_points", 0) for v in per_video)
            / max(1, sum(v.get("points_fp32", 0) for v in per_video)), 4),
        "max_px": None if dev is None else round(dev.max().item(), 4),
        "mean_px": None if dev is None else round(dev.mean().item(), 5),
        "visibility_agreement": round(vis_same / vis_total, 5) if vis_total else None,
        "deviation": "Euclidean px per (frame, point) over points matched by query frame, pixel and entity",
        "per_video": per_video,
    }


# ---------------------------------------------------------------------------- environment
def environment() -> dict:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cuda = torch.cuda.is_available()
    return {
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "torch": torch.__version__,
        "lightning": L.__version__,
        "python": platform.python_version(),
        "hardware": {
            "cpu_model": cpu_model,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_avg_1min_at_start": round(os.getloadavg()[0], 2),
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "gpu_count": torch.cuda.device_count() if cuda else 0,
        },
    }


# ---------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    """The benchmark's own flags; every other flag is the extraction job's (`semtrack.cli.parse_flat`)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     allow_abbrev=False)
    parser.add_argument("--csv_path", required=True, help="CSV of videos (see make_ssv2_like.py)")
    parser.add_argument("--precision", choices=sorted(PRECISIONS), default="32-true")
    parser.add_argument("--compare_precision", action="store_true",
                        help="run 32-true and bf16-mixed and report the track deviation (ignores --precision)")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--keep_outputs", type=Path, default=None,
                        help="write the outputs here and keep them (default: a temporary folder, removed)")
    return parser


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, ExtractConfig, dict]:
    """-> (the benchmark's flags, the extraction config (stand-in weights unless --weights is given),
    the trainer options)."""
    args, rest = build_parser().parse_known_args(argv)
    if not any(a.split("=")[0] == "--weights" for a in rest):
        rest = [*rest, "--weights", "random"]
    config, trainer_options = parse_flat(rest)
    return args, config, {"accelerator": "auto", "devices": 1, **trainer_options}


def config_for(config: ExtractConfig, csv_path: str, out_root: Path, precision: str) -> ExtractConfig:
    return dataclasses.replace(config, csv_path=str(csv_path), base_feat_path=str(out_root / precision), rerun=True)


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_summary(result: dict) -> None:
    hw = result["hardware"]
    commit = (result["git_commit"] or "?")[:10] + (" (dirty)" if result["git_dirty"] else "")
    device = hw["gpu"] or hw["cpu_model"]
    print(f"bench_extract {result['date_utc']} commit {commit}; {device}; torch {result['torch']}")
    for precision, run in result["runs"].items():
        loop, counts = run["loop"], run["run_report"]["counts"]
        print(f"[{precision}] {counts['done']} done, {counts['failed']} failed in {loop['wall_s']:.1f} s: "
              f"{_fmt(loop['videos_per_s'])} videos/s (steady {_fmt(loop['steady_videos_per_s'])})")
        if run["all_ranks"]["ranks"] > 1:
            print(f"  all {run['all_ranks']['ranks']} ranks: {_fmt(run['all_ranks']['videos_per_s'])} videos/s "
                  "(stage times below are rank 0's)")
        stages = ", ".join(f"{k} {_fmt(v)}" for k, v in loop["stage_s_per_video"].items())
        print(f"  s/video: {stages}")
        print(f"  tracker: {loop['tracker_calls']} calls, {_fmt(loop['videos_per_tracker_call'], '.2f')} videos per "
              f"call, {_fmt(loop['padded_frame_fraction'])} of the frames padding")
        print(f"  startup wait {_fmt(loop['startup_wait_s'], '.2f')} s; decode in-process "
              f"{_fmt(run['decode_s_per_video'])} s/video; busy fraction {_fmt(loop['busy_fraction'])}; "
              f"nvml utilization {_fmt(run['nvml_utilization'])}")
        for mem in run["per_rank_memory"]:
            print(f"  rank {mem['rank']}: cuda max allocated {mem['cuda_max_allocated_gb']} GB, "
                  f"reserved {mem['cuda_max_reserved_gb']} GB, cpu max rss {mem['cpu_max_rss_gb']} GB")
        print(f"  largest child process (DataLoader worker) rss {run['children_max_rss_gb']} GB")
    if "bf16_vs_fp32" in result:
        c = result["bf16_vs_fp32"]
        print(f"bf16 vs fp32: {c['videos_same_queries']}/{c['videos']} videos with the same queries, "
              f"{c['matched_point_fraction']:.1%} of fp32 points matched; max {c['max_px']} px, "
              f"mean {c['mean_px']} px, visibility agreement {c['visibility_agreement']}")


def main(argv: list[str] | None = None) -> int:
    args, base_config, trainer_options = parse(argv)
    if not Path(args.csv_path).is_file():
        raise SystemExit(f"error: --csv_path {args.csv_path} is not a file")
    precisions = ["32-true", "bf16-mixed"] if args.compare_precision else [PRECISIONS[args.precision]]

    launcher = OUT_ENV not in os.environ  # False in a DDP rank that Lightning re-launched
    temporary = args.keep_outputs is None and launcher
    if args.keep_outputs is not None:
        out_root = args.keep_outputs
    else:
        out_root = Path(os.environ.get(OUT_ENV) or tempfile.mkdtemp(prefix="bench_extract_"))
    os.environ[OUT_ENV] = str(out_root)  # DDP ranks started by Lightning inherit it
    result = {**environment(), "command": [sys.executable, *sys.argv], "runs": {}}
    is_zero = True
    try:
        configs = {}
        for precision in precisions:
            config = configs[precision] = config_for(base_config, args.csv_path, out_root, precision)
            run = run_once(config, precision, trainer_options)
            is_zero = run.pop("is_global_zero")
            if is_zero:
                run["videos"] = clip_stats(config)
                run["decode_s_per_video"] = decode_cost(config)
                run["children_max_rss_gb"] = round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6, 3)
            result["runs"][precision] = run
        result["settings"] = {**configs[precisions[0]].to_dict(), **trainer_options, "precisions": precisions}
        if args.compare_precision and is_zero:
            result["bf16_vs_fp32"] = compare_outputs(configs["32-true"], configs["bf16-mixed"])
    finally:
        if launcher:
            del os.environ[OUT_ENV]
        if temporary and is_zero:
            shutil.rmtree(out_root, ignore_errors=True)
    if not is_zero:
        return 0
    print_summary(result)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    failed = any(run["run_report"]["counts"]["failed"] for run in result["runs"].values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
