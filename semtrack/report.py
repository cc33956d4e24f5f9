"""The folder's report, rebuilt from its ledger: `run_report.json`, `failures.csv` (and, for
WebDataset output, `manifest.csv`), and its text form.

The report covers the whole folder, whichever runs, shards or ranks wrote it: `counts` (rows of the
CSV, done, failed, pending) and `failures` come from each video's latest ledger record. `last_run`
holds one run's own figures (the run that just ended, or the latest one): its counts (rows it was
given, done, failed, skipped, pending), its failures, mean seconds per video per stage, wall time
and `videos_per_s` (done videos only; `attempts_per_s` counts failures too). `runs` lists every run.

    semtrack-report OUT_DIR            (also: python -m semtrack.report OUT_DIR)

merges every ledger file of OUT_DIR, rewrites those files and prints the report (OUT_DIR a base folder:
every job folder in it, in turn). Exit status: 0 no video of the folder failed, 1 some did (or the
files could not be written), 2 not a semtrack output folder nor a base folder holding one (neither a
semtrack sidecar nor a ledger with a `start` record of its schema: nothing written).
The track statistics (`semtrack.survey`): `--json` prints them, `--where EXPR` prints the videos
matching a filter (both on stdout, the report on stderr, exit status 0 unless they cannot be
made), `--html [PATH]` writes the page (`semtrack.report_html`), `--verify_outputs` first computes
the statistics that older records lack from the pickles.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

import semtrack
from semtrack.layout import LEDGER_DIR, REPORT_HTML, OutputLayout
from semtrack.ledger import DONE, FAILED, iter_records, latest_videos, order, read_records, unique_records
from semtrack.records import STAGES
from semtrack.report_html import render_html
from semtrack.safeio import SIDECAR_MAX, read_text, shown, write_text_atomic
from semtrack.survey import MISSING_NOTE, FilterError, StatsTable, build_survey, restate
from semtrack.util import one_line
from semtrack.webdataset import manifest_csv

FAILURE_COLUMNS = ("row", "video_id", "dataset", "video_path", "stage", "reason")
MAX_PRINTED_FAILURES = 20


def _failure(record: dict) -> dict:
    return {"row": record["row"], "video_id": record["video_id"], "dataset": record["dataset"],
            "video_path": record.get("video_path", ""), "stage": record.get("stage", ""),
            "reason": record.get("reason", ""), "run": record["run"]}


def _sorted_failures(records) -> list[dict]:
    return sorted((_failure(r) for r in records), key=lambda f: (f["row"], f["dataset"], f["video_id"]))


def run_summary(run_id: str, records: list[dict]) -> dict:
    """One run's figures from its `start`, `video` and `end` records (all processes of the run)."""
    starts = [r for r in records if r["kind"] == "start"]
    ends = [r for r in records if r["kind"] == "end"]
    videos = [r for r in records if r["kind"] == "video" and not r.get("adopted") and not r.get("restated")]
    done = sum(r["status"] == DONE for r in videos)
    failed = sum(r["status"] == FAILED for r in videos)
    first = min(starts, key=order) if starts else {}
    rows = first.get("rows", done + failed)
    skipped = sum(r.get("skipped", 0) for r in starts)
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for end in ends:
        for stage, (seconds, count) in end.get("stage_totals", {}).items():
            totals[stage][0] += seconds
            totals[stage][1] += count
    wall = max((e.get("wall_s", 0.0) for e in ends), default=0.0)
    world = first.get("world_size", len(starts))
    complete = bool(starts) and len(ends) == world and all(e.get("status") == "complete" for e in ends)
    stopped = [e for e in ends if e.get("status") != "complete"]
    return {
        "run_id": run_id,
        "started": first.get("time"),
        "shard": first.get("shard", [0, 1]),
        "world_size": world,
        "csv_path": first.get("csv_path"),
        "status": "complete" if complete else (stopped[0].get("status", "stopped") if stopped else "interrupted"),
        "reason": stopped[0].get("reason") if stopped else None,
        "counts": {"rows": rows, "done": done, "failed": failed, "skipped": skipped,
                   "pending": max(0, rows - done - failed - skipped)},
        "failures": _sorted_failures(r for r in videos if r["status"] == FAILED),
        "not_retried": sum(r.get("not_retried", 0) for r in starts),  # of skipped: failed earlier, not redone
        "stage_mean_s": {s: totals[s][0] / totals[s][1] for s in STAGES if totals[s][1]},
        "data_wait_s": sum(e.get("data_wait_s", 0.0) for e in ends),
        "points_dropped": sum(e.get("points_dropped", 0) for e in ends),
        "startup_s": max((e["startup_s"] for e in ends if e.get("startup_s") is not None), default=None),
        "wall_s": wall,
        "videos_per_s": done / wall if wall > 0 else 0.0,
        "attempts_per_s": (done + failed) / wall if wall > 0 else 0.0,
    }


def build_report(layout: OutputLayout, records: list[dict], run_id: str | None = None) -> dict:
    """The folder's report from all its ledger `records`; `last_run` is run `run_id` (default: the
    run that started last). `counts.rows` is the latest run's CSV row count; `pending` is None when
    runs read different CSVs (it cannot be told then). A record read twice (a copied ledger file)
    counts once."""
    records = unique_records(records)
    by_run: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if not r.get("restated"):  # a done record repeated with its statistics: no part of any run
            by_run[r["run"]].append(r)
    starts = sorted((r for r in records if r["kind"] == "start"), key=order)
    runs = sorted(by_run, key=lambda run: min(order(r) for r in by_run[run]))
    if run_id is None and runs:
        run_id = runs[-1]
    latest = latest_videos(records)
    done = sum(r["status"] == DONE for r in latest.values())
    failed = sum(r["status"] == FAILED for r in latest.values())
    last_start = starts[-1] if starts else {}
    rows = last_start.get("csv_rows", done + failed)
    same_csv = len({s.get("csv_keys") for s in starts}) <= 1
    summaries = [run_summary(run, by_run[run]) for run in runs]
    return {
        "semtrack_version": semtrack.__version__,
        "output_dir": str(layout.root),
        "csv_path": last_start.get("csv_path"),
        "counts": {"rows": rows, "done": done, "failed": failed,
                   "pending": max(0, rows - done - failed) if same_csv else None},
        "failures": _sorted_failures(r for r in latest.values() if r["status"] == FAILED),
        "last_run": next((s for s in summaries if s["run_id"] == run_id), None),
        "runs": [{k: s[k] for k in ("run_id", "started", "shard", "world_size", "status", "counts", "wall_s",
                                    "videos_per_s", "stage_mean_s")} for s in summaries],
    }


def failures_csv(failures: list[dict]) -> str:
    """`failures.csv`: one line per failed row, FAILURE_COLUMNS."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=FAILURE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: f[k] for k in FAILURE_COLUMNS} for f in failures)
    return out.getvalue()


def write_report_files(layout: OutputLayout, report: dict, records: list[dict]) -> None:
    """Write `failures.csv`, `run_report.json` and, when the ledger names tar shards, `manifest.csv`."""
    write_text_atomic(layout.failures, failures_csv(report["failures"]))
    write_text_atomic(layout.report, json.dumps(report, indent=2) + "\n")
    latest = latest_videos(records)
    if any("shard" in ((r.get("outputs") or {}).get("pickle") or {}) for r in latest.values()):
        write_text_atomic(layout.manifest, manifest_csv(latest.values()))


def rebuild(layout: OutputLayout, run_id: str | None = None, errors: list[str] | None = None,
            records: list[dict] | None = None, problems: list[str] | None = None) -> dict:
    """Read the ledger (unless its `records` are given, with the `problems` met reading them), build the
    report and write its files -> the report. `errors` (one line each: what the run could not write) go
    into `last_run.errors`; a report file that cannot be written adds its line there too (in the
    returned report only). `ledger_problems`: one line per ledger file or lines skipped."""
    if records is None:
        problems = []
        records = read_records(layout, problems)
    report = build_report(layout, records, run_id)
    report["ledger_problems"] = list(problems or ())
    if report["last_run"] is not None:
        report["last_run"]["errors"] = list(errors or ())
    try:
        write_report_files(layout, report, records)
    except OSError as exc:
        stale = [path for path in (layout.failures, layout.report, layout.manifest) if _removed(path)]
        note = f"; removed the stale {', '.join(p.name for p in stale)}" if stale else ""
        if report["last_run"] is not None:
            report["last_run"]["errors"].append(
                f"could not write the report files in {layout.root}: {one_line(exc)}{note}; run semtrack-report "
                f"{layout.root} once it can be written")
    return report


def _removed(path: Path) -> bool:
    """Remove a report file that can no longer be brought up to date -> whether one was removed."""
    try:
        path.unlink()
        return True
    except OSError:
        return False


def _rate(run: dict) -> str:
    return f"{run['videos_per_s']:.2f} done videos/s, {run['world_size']} rank(s)"


def format_report(report: dict) -> str:
    """The report as the few lines printed at the end of a run (failures: the first `MAX_PRINTED_FAILURES`)."""
    c = report["counts"]
    pending = "?" if c["pending"] is None else c["pending"]
    lines = [f"semtrack: {c['rows']} rows: {c['done']} done, {c['failed']} failed, {pending} pending "
             f"(whole folder, {len(report['runs'])} run(s))"]
    run = report["last_run"]
    if run is not None:
        rc = run["counts"]
        where = "" if run["shard"][1] == 1 else f", shard {run['shard'][0]} of {run['shard'][1]}"
        status = "" if run["status"] == "complete" else f"; {run['status']}: {run['reason'] or 'incomplete'}"
        lines.append(f"  this run{where}: {rc['rows']} rows: {rc['done']} done, {rc['failed']} failed, "
                     f"{rc['skipped']} skipped, {rc['pending']} not reached in {run['wall_s']:.1f} s "
                     f"({_rate(run)}){status}")
        if run.get("not_retried"):
            lines.append(f"  {run['not_retried']} rows failed earlier and were not retried (--retry_failed always "
                         "redoes them)")
        if run["stage_mean_s"]:
            lines.append("  mean s/video: " + ", ".join(f"{k} {v:.3f}" for k, v in run["stage_mean_s"].items()))
    failures = report["failures"]
    lines += [f"  FAILED row {f['row']} {shown(f['video_id'])} [{shown(f['stage'])}]: {shown(f['reason'])}"
              for f in failures[:MAX_PRINTED_FAILURES]]
    if len(failures) > MAX_PRINTED_FAILURES:
        lines.append(f"  ... and {len(failures) - MAX_PRINTED_FAILURES} more failures in failures.csv")
    lines += [f"  warning: {line}" for line in report.get("ledger_problems", ())[:MAX_PRINTED_FAILURES]]
    lines.append(f"  outputs: {shown(report['output_dir'])}")
    return "\n".join(lines)


def is_output_folder(layout: OutputLayout) -> bool:
    """Whether `layout.root` is a semtrack output folder: its sidecar is one semtrack wrote, or one of its
    ledger files holds a `start` record of semtrack's schema (`semtrack.ledger_schema`)."""
    try:
        sidecar = json.loads(read_text(layout.sidecar, SIDECAR_MAX))
        if isinstance(sidecar, dict) and isinstance(sidecar.get("semtrack_version"), str) \
                and isinstance(sidecar.get("options"), dict):
            return True
    except (OSError, ValueError, RecursionError):
        pass
    return any(r["kind"] == "start" for r in iter_records(layout))


def main(argv: list[str] | None = None) -> int:
    """`semtrack-report OUT_DIR [--json] [--where EXPR] [--html [PATH]] [--verify_outputs]`: merge the
    folder's ledger, rewrite its report files, print the report (or its statistics as JSON, or the
    videos matching a filter) and write the HTML page."""
    parser = argparse.ArgumentParser(prog="semtrack-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="an output folder (<base_feat_path>/<dump_name>), or a base folder")
    parser.add_argument("--json", action="store_true", help="print the folder's numbers and statistics as JSON")
    parser.add_argument("--where", metavar="EXPR", help='print "dataset,video_id" of the done videos matching EXPR, '
                                                        'e.g. "visible<0.1 and points>=8" or a rule name')
    parser.add_argument("--html", nargs="?", const="", metavar="PATH",
                        help=f"write the HTML report to PATH (default: OUT_DIR/{REPORT_HTML})")
    parser.add_argument("--verify_outputs", action="store_true",
                        help="compute the statistics of done videos recorded without them, from their pickles")
    args = parser.parse_args(argv)
    layout = OutputLayout(args.out_dir)
    if not is_output_folder(layout):
        jobs = sorted(p for p in Path(args.out_dir).glob("*")
                      if p.is_dir() and not p.is_symlink() and is_output_folder(OutputLayout(p)))
        if jobs:  # a base folder (--base_feat_path): each job folder in it, with the same options
            rest = list(sys.argv[1:] if argv is None else argv)
            rest.remove(args.out_dir)
            return max(main([str(job), *rest]) for job in jobs)
        print(f"error: {shown(layout.root)} holds neither a semtrack config sidecar ({layout.sidecar.name}) nor a "
              f"semtrack ledger ({LEDGER_DIR}/*.jsonl), and no job folder in it does: not a semtrack output "
              "folder; nothing written", file=sys.stderr)
        return 2
    problems: list[str] = []
    records = read_records(layout, problems)
    latest = latest_videos(records)
    table = StatsTable.of(latest)
    if args.verify_outputs and table.missing:
        try:
            restated, problems = restate(layout, table.missing, max((r.get("seq", 0) for r in records), default=0))
        except OSError as exc:
            print(f"error: cannot write the ledger of {layout.root}: {one_line(exc)}", file=sys.stderr)
            return 1
        for line in problems:
            print(f"error: no statistics for {line}", file=sys.stderr)
        print(f"semtrack: statistics computed from the pickles of {len(restated)} done video(s)", file=sys.stderr)
        records += restated
        latest = latest_videos(records)
        table = StatsTable.of(latest)
    try:
        selected = table.where(args.where) if args.where is not None else None
    except FilterError as exc:
        print(f"error: --where: {exc}", file=sys.stderr)
        return 2
    report = rebuild(layout, records=records, problems=problems)
    quiet = args.json or selected is not None  # stdout is for the JSON or the ids
    print(format_report(report), file=sys.stderr if quiet else sys.stdout)
    if table.missing:
        print(f"  statistics: {len(table.missing)} done video(s) have {MISSING_NOTE} "
              f"(semtrack-report {layout.root} --verify_outputs)",
              file=sys.stderr if quiet else sys.stdout)
    errors = report["last_run"]["errors"] if report["last_run"] else []
    for line in errors:
        print(f"error: {shown(line)}", file=sys.stderr)
    survey = build_survey(report, latest, table) if args.json or args.html is not None else None
    if args.html is not None:
        page = Path(args.html) if args.html else layout.root / REPORT_HTML
        try:
            write_text_atomic(page, render_html(survey, layout, page, dict(zip(table.keys, table.records))))
        except OSError as exc:
            print(f"error: cannot write {page}: {one_line(exc)}", file=sys.stderr)
            return 1
        print(f"semtrack: wrote {page} ({page.stat().st_size} bytes)", file=sys.stderr if quiet else sys.stdout)
    if args.json:
        print(json.dumps(survey, indent=1))
    if selected is not None:
        print("dataset,video_id")
        print("".join(f"{d},{v}\n" for d, v in selected), end="")
    if quiet:
        return 0
    return 1 if errors or report["counts"]["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
