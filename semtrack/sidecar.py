"""The output folder's config sidecar: which options made its outputs, so a run that would mix in
outputs made differently is refused.

`check_sidecar` compares before any video is read (and writes nothing); `write_sidecar` records the
options once the models have loaded, so a run that fails to start leaves no sidecar behind. A
sidecar in a folder that holds no outputs (no ledger record, no pickle, no tar shard) is replaced
rather than obeyed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import semtrack
from semtrack.config import ExtractConfig
from semtrack.safeio import SIDECAR_MAX, UnsafeFile, create_temporary, discard_temporary, read_text, shown
from semtrack.util import one_line

DEFAULT_FORMAT = "pickle"  # what a sidecar without an output_format key describes


def run_options(config: ExtractConfig, precision: str) -> dict:
    """The options that decide the outputs (what the sidecar records and compares, and each pickle's
    metadata holds): the config's output options, the precision and the requested weights."""
    options = config.output_options()
    options.update(
        precision=str(precision),
        tracker_weights=config.tracker_weights,
        dinov2_weights=None if config.use_grid else config.dinov2_weights,
    )
    return options


def _read(path: Path) -> dict:
    """The sidecar at `path`, read as `semtrack.safeio` reads (no link, FIFO or device, at most
    `SIDECAR_MAX` bytes); ValueError naming the file for anything that is not a semtrack sidecar."""
    try:
        recorded = json.loads(read_text(path, SIDECAR_MAX))
        if not isinstance(recorded, dict) or not isinstance(recorded.get("options"), dict):
            raise ValueError("not a JSON object with an 'options' object")
        if not isinstance(recorded.get("output_format", DEFAULT_FORMAT), str):
            raise ValueError("'output_format' is not a string")
        return recorded
    except UnsafeFile as exc:
        raise ValueError(f"{exc}; remove it or use another --base_feat_path") from None
    except RecursionError:
        reason = "JSON nested too deeply"
    except (OSError, ValueError) as exc:
        reason = one_line(exc)
    raise ValueError(f"{shown(path)}: unreadable config sidecar ({reason}); remove it or use another "
                     "--base_feat_path")


def has_outputs(config: ExtractConfig) -> bool:
    """Whether the output folder holds any output: a ledger file, a pickle or a tar shard."""
    layout = config.layout
    patterns = ((layout.ledger_dir, "*.jsonl"), (layout.shards_dir, "*.tar"), (layout.root, "*/feat_dump/*.pkl"))
    return any(next(folder.glob(pattern), None) is not None for folder, pattern in patterns if folder.is_dir())


def _differences(recorded: dict, options: dict, output_format: str) -> list[str]:
    theirs, ours = recorded["options"], options
    differing = [f"{k}: folder has {theirs.get(k)!r}, this run {ours.get(k)!r}"
                 for k in sorted(set(theirs) | set(ours)) if theirs.get(k) != ours.get(k)]
    folder_format = recorded.get("output_format", DEFAULT_FORMAT)
    if folder_format != output_format:
        differing.append(f"output_format: folder has {folder_format!r}, this run {output_format!r}")
    return differing


def check_sidecar(config: ExtractConfig, precision: str) -> Path:
    """Refuse (ValueError naming each differing option) a run whose output options differ from the
    sidecar of a folder that holds outputs. Writes nothing. Returns the sidecar path."""
    path = config.layout.sidecar
    if not os.path.lexists(path):
        return path
    differing = _differences(_read(path), run_options(config, precision), config.output_format)
    if differing and has_outputs(config):
        raise ValueError(
            f"refusing to write into {config.layout.root}: its outputs were made with a different "
            f"configuration ({'; '.join(differing)}). Use another --base_feat_path, or delete that folder to "
            "start over."
        )
    return path


def write_sidecar(config: ExtractConfig, precision: str) -> Path:
    """Record this run's output options in the folder's sidecar, unless an equal one is there.

    Created with a hard link from a complete temporary file, so of two runs starting at once in an
    empty folder one creates it and the other then checks against it (ValueError as `check_sidecar`).
    A sidecar of a folder without outputs is replaced."""
    path = config.layout.sidecar
    options = run_options(config, precision)
    sidecar = {"semtrack_version": semtrack.__version__, "dump_name": config.dump_name(),
               "output_format": config.output_format, "options": options}
    if os.path.lexists(path):
        if not _differences(_read(path), options, config.output_format):
            return path
        check_sidecar(config, precision)  # raises if the folder has outputs
        path.unlink(missing_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    file, tmp = create_temporary(path)
    try:
        file.write((json.dumps(sidecar, indent=2, sort_keys=True) + "\n").encode("utf-8"))
        file.flush()
        os.fsync(file.fileno())
        file.close()
        try:
            os.link(tmp, path)
        except FileExistsError:  # another run created it first: it must agree
            differing = _differences(_read(path), options, config.output_format)
            if differing:
                raise ValueError(f"refusing to write into {config.layout.root}: a run with a different "
                                 f"configuration started at the same time ({'; '.join(differing)})") from None
        except OSError:
            os.replace(tmp, path)  # a filesystem without hard links
    finally:
        discard_temporary(file, tmp)
    return path
