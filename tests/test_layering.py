"""The layering contract (pyproject's [tool.importlinter], checked by `lint-imports` in `.ci/run`) covers
every module, which import-linter cannot check itself: its contracts list modules by name, and a new
module outside every list would escape them. The README's Architecture section names every module too."""
from __future__ import annotations

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own TOML reader
    import tomli as tomllib

from _shared import REPO_ROOT

APPLICATION = "Only the application imports the application"
STAGES = "Only the compute imports the model stages: decoding, configuration and the output side never do"


def contracts() -> dict[str, dict]:
    config = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    return {contract["name"]: contract for contract in config["contracts"]}


def semtrack_modules() -> set[str]:
    """The children of `semtrack`: its modules and subpackages, as dotted names."""
    package = REPO_ROOT / "semtrack"
    modules = {f"semtrack.{p.stem}" for p in package.glob("*.py") if p.stem != "__init__"}
    return modules | {f"semtrack.{p.parent.name}" for p in package.glob("*/__init__.py")}


def test_every_semtrack_module_is_in_exactly_one_layer():
    by_name = contracts()
    layers = {
        "the application": set(by_name[APPLICATION]["protected_modules"]),
        "the compute (model stages)": set(by_name[STAGES]["forbidden_modules"]),
        "the rest of the core": {m for m in by_name[STAGES]["source_modules"] if m.startswith("semtrack.")},
    }
    placed = [m for members in layers.values() for m in members]
    modules = semtrack_modules()
    unplaced = sorted(modules - set(placed))
    assert not unplaced, (
        f"{unplaced} are in no layer: in pyproject.toml's [tool.importlinter], add each to the application "
        f"({APPLICATION!r}: protected_modules and allowed_importers of the first three contracts), or to the "
        f"core: a model stage in {STAGES!r} forbidden_modules, anything else in its source_modules"
    )
    assert len(placed) == len(set(placed)), f"modules in two layers: {sorted(m for m in placed if placed.count(m) > 1)}"
    assert not set(placed) - modules, f"no such modules: {sorted(set(placed) - modules)}"


def test_the_contracts_agree_on_the_application():
    by_name = contracts()
    application = set(by_name[APPLICATION]["protected_modules"])
    assert application == {"semtrack.api", "semtrack.cli", "semtrack.module", "semtrack.writer"}
    protected = [c for c in by_name.values() if c["type"] == "protected"]
    assert len(protected) == 3
    for contract in protected:  # datamodules may import Lightning; nothing else of the core may import anything
        assert set(contract["allowed_importers"]) - {"datamodules"} == application, contract["name"]


def test_the_readme_architecture_section_names_every_module():
    readme = (REPO_ROOT / "README.md").read_text()
    section = readme[readme.index("\n## Architecture\n"):]
    section = section[: section.index("\n## ", 1)]
    core = REPO_ROOT / "semtrack"
    paths = [p.relative_to(core).as_posix() for p in core.rglob("*.py") if p.name != "__init__.py"]
    paths += [f"datamodules/{p.name}" for p in (REPO_ROOT / "datamodules").glob("*.py") if p.name != "__init__.py"]
    missing = sorted(p for p in paths if f"`{p}`" not in section and f"`semtrack/{p}`" not in section)
    assert not missing, f"README's Architecture section does not name {missing}"


WORKER_PROBE = '''
import json
import sys

from torch.utils.data import DataLoader, Dataset


class Probe(Dataset):
    """The job's Dataset, and what the worker process had imported once it fetched an item."""

    def __init__(self, inner):
        self.inner = inner

    def __len__(self):
        return len(self.inner)

    def __getitem__(self, i):
        clip = self.inner[i]
        return clip.num_frames, sorted(m for m in sys.modules if m.split(".")[0] in ("semtrack", "datamodules",
                                                                                   "lightning"))


if __name__ == "__main__":
    import functools
    import os

    from datamodules.video import PendingRows, VideoCSVDataset, worker_start

    rows = PendingRows(VideoCSVDataset(sys.argv[1], max_frames=4), [0])
    loader = DataLoader(Probe(rows), batch_size=None, num_workers=1, multiprocessing_context="spawn",
                        worker_init_fn=functools.partial(worker_start, os.getpid()))
    (frames, modules), = list(loader)
    print(json.dumps({"frames": frames, "modules": modules}))
'''


def test_a_dataloader_worker_imports_no_model_stage_and_no_lightning(tmp_path):
    """A spawned DataLoader worker decoding a real clip through the job's Dataset (`PendingRows` over
    `VideoCSVDataset`) imports neither the tracker nor any other model stage (configuration takes its
    defaults from `semtrack.defaults`, not from the stages), nor Lightning."""
    import json
    import os
    import subprocess
    import sys

    from _shared import shared_path

    csv = tmp_path / "one.csv"
    csv.write_text(f"video_path,dataset\n{shared_path('videos', 'tiny_ssv2.webm')},test\n")
    script = tmp_path / "probe.py"
    script.write_text(WORKER_PROBE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(script), str(csv)], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["frames"] >= 2  # a real decode ran in the worker
    assert "datamodules.video" in probe["modules"] and "semtrack.config" in probe["modules"]
    stages = ("semtrack.tracker", "semtrack.features", "semtrack.clustering", "semtrack.points",
              "semtrack.runner", "semtrack.pipeline")
    imported = [m for m in probe["modules"] if ".".join(m.split(".")[:2]) in stages]
    assert not imported, f"a DataLoader worker imported model stages: {imported}"
    assert not [m for m in probe["modules"] if m.startswith("lightning")], "a DataLoader worker imported Lightning"
