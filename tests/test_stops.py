"""Stops that lose nothing: a SIGTERM sent to the whole process group (SLURM pre-emption, scancel) with
decoding workers (end to end), SIGHUP, and the resume command the stop names (semtrack.stopping)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from _shared import REPO_ROOT
from semtrack.layout import OutputLayout
from semtrack.ledger import read_records
from semtrack.stopping import SIGNALS, Stopped, StopRequest, resume_command

SCRIPT = REPO_ROOT / "scripts" / "extract.py"
DUMP = "cotracker3_bip_fr_32_fps_10"
ROWS = 10  # more than the workers prefetch (2 x 2), so they are still decoding when the signal comes
TINY = ["--weights", "random", "--max_frames", "4", "--tracker_resolution", "64", "96", "--accelerator", "cpu",
        "--use_grid", "--cotracker_grid_size", "2", "--trainer.enable_progress_bar=false", "--bucket_batches", "1"]


def test_the_resume_command_drops_the_flags_that_redo_done_rows():
    argv = ["--csv_path", "a b.csv", "--rerun", "--extract.rerun", "true", "--extract.rerun=false", "--rerun=true",
            "--fps", "5"]
    assert resume_command(argv) == "semtrack-extract --csv_path 'a b.csv' --fps 5"


def _csv(tmp_path, videos_dir, rows: int):
    names = ["tiny_ssv2.webm", "tiny_25fps.mp4"]
    path = tmp_path / "v.csv"
    path.write_text("video_path,dataset,video_id\n"
                    + "".join(f"{videos_dir / names[i % 2]},d,v{i}\n" for i in range(rows)))
    return path


def _start(args: list[str]) -> subprocess.Popen:
    """The CLI in a process group of its own (as a batch system runs it)."""
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)


def _wait_for_a_pickle(out, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not list(out.glob("*/feat_dump/*.pkl")):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def test_sighup_is_a_stop_request_like_sigterm_and_workers_ignore_all_three():
    before = {s: signal.getsignal(s) for s in SIGNALS}
    request = StopRequest()
    request.install()
    try:
        request.started = True
        os.kill(os.getpid(), signal.SIGHUP)
        with pytest.raises(Stopped, match="stopped by SIGHUP"):
            request.check()
    finally:
        request.restore()
    assert {s: signal.getsignal(s) for s in SIGNALS} == before
    worker = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import os, signal, time
        from semtrack.stopping import detach_worker
        detach_worker(os.getppid())
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            os.kill(os.getpid(), s)
        time.sleep(0.1)
        print("alive")
        """)], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert worker.stdout == "alive\n", worker.stderr


@pytest.mark.slow
def test_a_group_sigterm_with_two_workers_records_no_failure_and_a_resume_completes(tmp_path, videos_dir):
    signum = signal.SIGTERM
    out = tmp_path / "out" / DUMP
    args = ["--csv_path", str(_csv(tmp_path, videos_dir, ROWS)), "--base_feat_path", str(tmp_path / "out"), *TINY,
            "--num_workers", "2", "--batch_size", "1"]
    proc = _start([*args, "--rerun"])
    _wait_for_a_pickle(out, proc)
    os.killpg(proc.pid, signum)  # the main process and both decoding workers, as SLURM does
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signum, err[-3000:]
    records = read_records(OutputLayout(out))
    assert [r for r in records if r["kind"] == "video" and r["status"] != "done"] == []  # nothing recorded failed
    ends = [r for r in records if r["kind"] == "end"]
    assert [(e["status"], e["reason"]) for e in ends] == [("stopped", f"stopped by {signal.Signals(signum).name}")]
    stop_line = next(line for line in err.splitlines() if "to resume, run:" in line)
    assert "--rerun" not in stop_line and "--num_workers 2" in stop_line
    resumed = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    report = json.loads((out / "run_report.json").read_text())
    assert report["counts"] == {"rows": ROWS, "done": ROWS, "failed": 0, "pending": 0}


def test_a_signal_the_run_was_started_ignoring_stays_ignored():
    worker = subprocess.run(["nohup", sys.executable, "-c", textwrap.dedent("""
        import os, signal, time
        from semtrack.stopping import StopRequest
        request = StopRequest()
        request.install()
        request.started = True
        os.kill(os.getpid(), signal.SIGHUP)
        time.sleep(0.1)
        print("ignored" if request.signum is None else "stopped", signal.getsignal(signal.SIGTERM) is not None)
        """)], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
    assert worker.stdout == "ignored True\n", worker.stderr
