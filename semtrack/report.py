"""The run report: per-rank parts merged into `run_report.json` and `failures.csv`, and its text form."""
from __future__ import annotations

import csv
import io
from collections import defaultdict

import semtrack
from semtrack.pipeline import STAGES

FAILURE_COLUMNS = ("row", "video_id", "dataset", "video_path", "stage", "reason")


def merge_parts(parts: list[dict], num_rows: int, num_skipped: int, output_dir: str, csv_path: str) -> dict:
    """One run report from the per-rank parts (counts summed, failures by CSV row, stage means)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for part in parts:
        for stage, (seconds, videos) in part["stage_totals"].items():
            totals[stage][0] += seconds
            totals[stage][1] += videos
    done = sum(p["done"] for p in parts)
    failed = sum(p["failed"] for p in parts)
    wall = max((p["wall_s"] for p in parts), default=0.0)
    failures = sorted((f for p in parts for f in p["failures"]), key=lambda f: f["row"])
    return {
        "semtrack_version": semtrack.__version__,
        "output_dir": str(output_dir),
        "csv_path": str(csv_path),
        "world_size": len(parts),
        "counts": {"rows": num_rows, "done": done, "failed": failed, "skipped": num_skipped},
        "failures": failures,
        "stage_mean_s": {s: totals[s][0] / totals[s][1] for s in (*STAGES, "write") if totals[s][1]},
        "data_wait_s": sum(p["data_wait_s"] for p in parts),
        "points_dropped": sum(p["points_dropped"] for p in parts),
        "wall_s": wall,
        "videos_per_s": (done + failed) / wall if wall > 0 else 0.0,
    }


def failures_csv(failures: list[dict]) -> str:
    """`failures.csv`: one line per failed row, FAILURE_COLUMNS."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FAILURE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: f[k] for k in FAILURE_COLUMNS} for f in failures)
    return out.getvalue()


def format_report(report: dict) -> str:
    """The report as the few lines printed at the end of a run."""
    c = report["counts"]
    lines = [
        f"semtrack: {c['rows']} rows: {c['done']} done, {c['failed']} failed, {c['skipped']} skipped "
        f"in {report['wall_s']:.1f} s ({report['videos_per_s']:.2f} videos/s, {report['world_size']} rank(s))"
    ]
    if report["stage_mean_s"]:
        lines.append("  mean s/video: " + ", ".join(f"{k} {v:.3f}" for k, v in report["stage_mean_s"].items()))
    lines += [f"  FAILED row {f['row']} {f['video_id']} [{f['stage']}]: {f['reason']}" for f in report["failures"]]
    lines.append(f"  outputs: {report['output_dir']}")
    return "\n".join(lines)
