"""The GPU check script works before any GPU time is spent: its CPU rehearsal (`--dry-run`)."""
from __future__ import annotations

import json
import sys

import pytest

from _shared import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_runs_every_step_and_writes_the_summary(tmp_path, capsys):
    assert gpu_check.main(["--dry-run", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["dry_run"] and summary["environment"]["torch"]
    assert list(summary["steps"]) == ["cuda-tests", *(name for name, _, _ in gpu_check.RUNS)]
    assert all(step["status"] == "ok" for step in summary["steps"].values())
    for name, _, _ in gpu_check.RUNS:
        (precision, result), = summary["steps"][name]["result"].items()
        assert result["done"] == 2 and result["failed"] == 0 and result["videos_per_s"] > 0
    assert "cuda-tests" in capsys.readouterr().out  # the table, printed last
