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
