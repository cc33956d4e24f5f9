"""`semtrack.video` is core: it imports neither Lightning, nor `datamodules`, nor the stages, the
tracker or the application; and the Dataset module a DataLoader worker unpickles loads no Lightning."""
from __future__ import annotations

import ast
import json
import subprocess
import sys

from _shared import REPO_ROOT

PACKAGE = REPO_ROOT / "semtrack" / "video"
ABOVE = ("lightning", "pytorch_lightning", "datamodules", "semtrack.api", "semtrack.cli", "semtrack.module",
         "semtrack.writer", "semtrack.pipeline", "semtrack.runner", "semtrack.tracker", "semtrack.features",
         "semtrack.clustering", "semtrack.points")


def imported_modules(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module)
    return names


def test_the_video_package_imports_nothing_above_it():
    files = sorted(PACKAGE.glob("*.py"))
    assert len(files) >= 5
    for path in files:
        bad = sorted(m for m in imported_modules(path) if any(m == a or m.startswith(a + ".") for a in ABOVE))
        assert not bad, (path.name, bad)


def test_importing_the_video_package_or_the_dataset_loads_no_lightning():
    code = ("import json, sys\n"
            "import semtrack.video\n"
            "core = sorted(sys.modules)\n"
            "from datamodules import VideoCSVDataset\n"
            "print(json.dumps([core, sorted(sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    core, dataset = (set(names) for names in json.loads(out.stdout))
    assert "semtrack.video.decode" in core and "datamodules.video" in dataset
    assert not {m for m in core if m.split(".")[0] == "datamodules"}
    assert not {m for m in dataset if m.split(".")[0] in ("lightning", "pytorch_lightning")}
    assert "datamodules.tracks" not in dataset
