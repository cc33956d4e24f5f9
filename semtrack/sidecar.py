"""The output folder's config sidecar: which options made its outputs, so a run that would mix in
outputs made differently is refused."""
from __future__ import annotations

import json
from pathlib import Path

import semtrack
from semtrack.config import ExtractConfig
from semtrack.util import one_line, write_text_atomic


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


def check_sidecar(config: ExtractConfig, precision: str) -> Path:
    """Create the output folder's sidecar, or refuse (ValueError naming each differing option) if the
    folder's existing sidecar records different output options. Returns the sidecar path."""
    path = config.layout.sidecar
    options = run_options(config, precision)
    if path.is_file():
        try:
            recorded = json.loads(path.read_text(encoding="utf-8"))["options"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}: unreadable config sidecar ({one_line(exc)}); remove it or use another --base_feat_path"
            ) from None
        differing = sorted(k for k in set(recorded) | set(options) if recorded.get(k) != options.get(k))
        if differing:
            detail = "; ".join(f"{k}: folder has {recorded.get(k)!r}, this run {options.get(k)!r}" for k in differing)
            raise ValueError(
                f"refusing to write into {config.layout.root}: its outputs were made with a different "
                f"configuration ({detail}). Use another --base_feat_path, or delete that folder to start over."
            )
        return path
    sidecar = {"semtrack_version": semtrack.__version__, "dump_name": config.dump_name(), "options": options}
    write_text_atomic(path, json.dumps(sidecar, indent=2, sort_keys=True) + "\n")
    return path
