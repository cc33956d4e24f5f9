"""Every GPU check of semtrack in one command: CUDA tests and end-to-end throughput.

On the GPU machine, from the repository root, with `.whl/` and `.gpu_data/` made beforehand by
`bash benchmarks/gpu_prepare.sh` (carried with the call; ../shared does not travel):

    python3 benchmarks/gpu_check.py --out $OUT

It installs the carried wheels into a private folder, runs the CUDA tests (fp32, TF32 off) and
then `bench_extract.py` on the SSV2-like set in four settings, and `bench_tracker.py`:

    fp32+bf16   --compare_precision --batch_size 8  strict fp32 and bf16-mixed, and their track deviation
    bf16-b1     --precision bf16-mixed --batch_size 1
    tf32-b8     --precision 32-true --matmul_precision high --batch_size 8
    tracker     bench_tracker.py (the tracker alone: fp32 vs bf16 time, peak GPU memory, their deviation)

Each step has its own time limit (the whole is planned for under 7 minutes) and a failure does not
stop the others. Everything lands in `--out`: each step's JSON and log, `summary.json` (the
environment: nvidia-smi, torch and CUDA versions, the commit; each step's status and headline
numbers), and a table printed last.

`--dry-run` rehearses it on the CPU (CI runs it): no wheels, the CUDA tests only collected, two
clips made from ../shared, tiny grid-mode settings, the tracker benchmark left out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".gpu_data"
WHEELS = REPO / ".whl"
CUDA_TESTS = ["tests/test_tracker.py", "tests/test_features.py", "tests/test_points.py", "tests/test_clustering.py"]
WORKERS = 12  # decoding processes: SSV2-like decode ~0.15 s/video, so 12 keep up with ~80 videos/s
# (name, bench_extract flags, seconds allowed)
RUNS = [
    ("fp32+bf16", ["--compare_precision", "--batch_size", "8"], 150),
    ("bf16-b1", ["--precision", "bf16-mixed", "--batch_size", "1"], 90),
    ("tf32-b8", ["--precision", "32-true", "--matmul_precision", "high", "--batch_size", "8"], 60),
]
DRY_FLAGS = ["--use_grid", "--cotracker_grid_size", "2", "--tracker_resolution", "64", "96", "--max_frames", "4",
             "--accelerator", "cpu"]


def run_step(name: str, command: list[str], out: Path, timeout: float, env: dict) -> dict:
    """Run one step with its log in `out/<name>.log`; -> {status, seconds, returncode}."""
    start = time.perf_counter()
    log = out / f"{name}.log"
    with open(log, "w") as f:
        try:
            code = subprocess.run(command, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=timeout).returncode
            status = "ok" if code == 0 else f"exit {code}"
        except subprocess.TimeoutExpired:
            code, status = None, f"timed out after {timeout:.0f} s"
    return {"status": status, "returncode": code, "seconds": round(time.perf_counter() - start, 1), "log": log.name}


def install_wheels(env: dict) -> dict:
    """Install `.whl/*.whl` into a private folder put first on PYTHONPATH (no index, no dependencies)."""
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        return {"status": "no wheels carried"}
    target = Path(tempfile.mkdtemp(prefix="semtrack_site_"))
    code = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                           "--target", str(target), *map(str, wheels)], capture_output=True, text=True)
    env["PYTHONPATH"] = os.pathsep.join([str(target), env["PYTHONPATH"]])
    return {"status": "ok" if code.returncode == 0 else code.stderr[-500:], "wheels": [w.name for w in wheels]}


def environment() -> dict:
    def output(command: list[str]) -> str | None:
        try:
            return subprocess.run(command, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None

    import torch

    commit = (DATA / "commit.txt").read_text().split() if (DATA / "commit.txt").is_file() else []
    return {
        "nvidia_smi": output(["nvidia-smi"]),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": sys.version.split()[0],
        "commit": commit[0] if commit else output(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "dirty": "dirty" in commit,
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def dry_clips(tmp: Path) -> Path:
    """Two SSV2-like clips made from ../shared (the rehearsal's input set)."""
    sys.path.insert(0, str(REPO / "tests"))
    from _shared import shared_path

    subprocess.run([sys.executable, str(REPO / "benchmarks" / "make_ssv2_like.py"),
                    str(shared_path("videos", "tiny_ssv2.webm")), str(shared_path("videos", "bear_ssv2.webm")),
                    "--out", str(tmp), "--crf", "45"], check=True, capture_output=True)
    return tmp / "ssv2_like.csv"


def headline(result: dict) -> dict:
    """The numbers of one bench_extract JSON the table shows."""
    out = {}
    for precision, run in result.get("runs", {}).items():
        loop = run["loop"]
        memory = max((m["cuda_max_allocated_gb"] or 0) for m in run["per_rank_memory"])
        out[precision] = {"videos_per_s": loop["videos_per_s"], "steady_videos_per_s": loop["steady_videos_per_s"],
                          "busy_fraction": loop["busy_fraction"], "peak_gpu_gb": memory,
                          "stage_s_per_video": loop["stage_s_per_video"],
                          "done": run["run_report"]["counts"]["done"], "failed": run["run_report"]["counts"]["failed"]}
    if "bf16_vs_fp32" in result:
        c = result["bf16_vs_fp32"]
        out["bf16_vs_fp32"] = {k: c[k] for k in ("max_px", "mean_px", "visibility_agreement",
                                                 "matched_point_fraction")}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for every result")
    parser.add_argument("--dry-run", action="store_true", help="rehearse on the CPU: tiny settings, no CUDA")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "PYTHONUNBUFFERED": "1"}
    if (DATA / "shared").is_dir():
        env["SEMTRACK_SHARED"] = str(DATA / "shared")
    summary: dict = {"dry_run": args.dry_run, "install": {"status": "skipped (dry run)"} if args.dry_run
                     else install_wheels(env), "environment": environment(), "steps": {}}

    tests = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider", *CUDA_TESTS,
             "--junitxml", str(args.out / "cuda_tests.xml")]
    summary["steps"]["cuda-tests"] = run_step("cuda-tests", tests + (["--collect-only"] if args.dry_run else []),
                                              args.out, 150, env)

    with tempfile.TemporaryDirectory() as tmp:
        csv = dry_clips(Path(tmp)) if args.dry_run else DATA / "ssv2_like" / "ssv2_like.csv"
        extra = DRY_FLAGS + ["--num_workers", "0"] if args.dry_run else ["--num_workers", str(WORKERS)]
        for name, flags, limit in RUNS:
            flags = [f for f in flags if not (args.dry_run and f == "--compare_precision")]  # bf16 is slow on CPUs
            command = [sys.executable, "benchmarks/bench_extract.py", "--csv_path", str(csv), *flags, *extra,
                       "--json", str(args.out / f"{name}.json")]
            step = summary["steps"][name] = run_step(name, command, args.out, limit, env)
            if (args.out / f"{name}.json").is_file():
                step["result"] = headline(json.loads((args.out / f"{name}.json").read_text()))
    tracker = [sys.executable, "benchmarks/bench_tracker.py", "--json", str(args.out / "tracker.json")]
    if not args.dry_run:
        summary["steps"]["tracker"] = run_step("tracker", tracker, args.out, 60, env)

    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_table(summary)
    return 0 if all(step["status"] == "ok" for step in summary["steps"].values()) else 1


def print_table(summary: dict) -> None:
    e = summary["environment"]
    print(f"gpu_check {e['date_utc']} commit {e['commit']}{' (dirty)' if e['dirty'] else ''}: {e['gpu'] or 'no GPU'}, "
          f"torch {e['torch']} CUDA {e['cuda']}; install: {summary['install']['status']}")
    for name, step in summary["steps"].items():
        print(f"{name:12s} {step['status']:24s} {step['seconds']:7.1f} s")
        for precision, r in step.get("result", {}).items():
            if precision == "bf16_vs_fp32":
                print(f"    bf16 vs fp32: max {r['max_px']} px, mean {r['mean_px']} px, "
                      f"visibility {r['visibility_agreement']}, points matched {r['matched_point_fraction']}")
                continue
            fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            print(f"    {precision:10s} {fmt(r['videos_per_s'])} videos/s (steady {fmt(r['steady_videos_per_s'])}), "
                  f"busy {fmt(r['busy_fraction'])}, peak GPU {r['peak_gpu_gb']} GB, {r['done']} done / "
                  f"{r['failed']} failed")


if __name__ == "__main__":
    sys.exit(main())
