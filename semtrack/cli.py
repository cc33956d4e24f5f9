"""`scripts/extract.py` / `semtrack-extract`: a LightningCLI program, plus the research flags.

Two spellings, one program:

* LightningCLI: `extract.py predict --config run.yaml --trainer.devices 8 --extract.csv_path v.csv`
  (`--print_config`, YAML configs; every `ExtractConfig` option lives under `extract:`).
* Research / flat flags: `extract.py --clustering_method bipartite --csv_path v.csv --devices 2`.
  `translate` rewrites them into the form above (research flags -> `--extract.<name>`, store-true
  switches -> `--extract.<name>=true`, `--devices --num_nodes --accelerator --strategy
  --precision` -> `--trainer.<name>`, `--tracker_resolution H W` -> a list) and adds `predict`.

Exit status: 0 when every video was done or skipped, 1 when any failed, 2 for a configuration
error (bad CSV, sidecar mismatch, missing weights, bad option), reported in one line.
"""
from __future__ import annotations

import dataclasses
import sys

from lightning.pytorch.cli import LightningCLI

from datamodules.extraction import ExtractionDataModule
from semtrack.api import TRAINER_DEFAULTS, build_trainer, preflight
from semtrack.config import ExtractConfig
from semtrack.module import SemanticTracker

TRAINER_FLAGS = ("devices", "num_nodes", "accelerator", "strategy", "precision")
_FIELDS = {f.name: f for f in dataclasses.fields(ExtractConfig)}
SWITCHES = frozenset(name for name, f in _FIELDS.items() if isinstance(f.default, bool))
LIST_FLAGS = {"tracker_resolution": 2, "native_fps_datasets": None}  # values taken after the flag
SUBCOMMAND = "predict"


def translate(argv: list[str]) -> list[str]:
    """Rewrite research/flat flags into LightningCLI arguments (see the module docstring)."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        name, eq, value = arg[2:].partition("=") if arg.startswith("--") else ("", "", "")
        if name in _FIELDS:
            target = f"--extract.{name}"
        elif name in TRAINER_FLAGS:
            target = f"--trainer.{name}"
        else:
            out.append(arg)
            continue
        if eq:
            out.append(f"{target}={value}")
        elif name in SWITCHES:
            out.append(f"{target}=true")
        elif name in LIST_FLAGS:
            count = LIST_FLAGS[name]
            values = []
            while i < len(argv) and not argv[i].startswith("--") and (count is None or len(values) < count):
                values.append(argv[i])
                i += 1
            out.append(f"{target}=[{', '.join(values)}]")
        elif i < len(argv):
            out += [target, argv[i]]
            i += 1
        else:
            out.append(target)  # jsonargparse reports the missing value
    if SUBCOMMAND not in out:
        out.insert(0, SUBCOMMAND)
    return out


class ExtractCLI(LightningCLI):
    """LightningCLI with one subcommand (`predict`) and the whole `ExtractConfig` under `extract`."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {SUBCOMMAND: {"model", "dataloaders", "datamodule"}}

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(ExtractConfig, "extract", fail_untyped=False)
        parser.link_arguments("extract", "model.config", apply_on="instantiate")
        parser.link_arguments("extract", "data.config", apply_on="instantiate")

    def instantiate_trainer(self, **kwargs):
        """The job's Trainer, assembled by `semtrack.api.build_trainer` from the parsed trainer options."""
        options = dict(self._get(self.config_init, "trainer", default={}))
        callbacks = [*(options.pop("callbacks", None) or []), *kwargs.get("callbacks", [])]
        trainer, self.writer = build_trainer(self._get(self.config_init, "extract"), callbacks, **options)
        return trainer

    def before_predict(self) -> None:
        preflight(self._get(self.config_init, "extract"), self.trainer.precision)

    def predict(self, **kwargs) -> None:
        """`Trainer.predict` without collecting predictions: the writer has them, memory stays flat."""
        kwargs["return_predictions"] = False
        self.trainer.predict(**kwargs)


def main(argv: list[str] | None = None) -> int:
    """Run the program on `argv` (default `sys.argv[1:]`); returns the exit status."""
    args = translate(list(sys.argv[1:] if argv is None else argv))
    # Lightning's DDP launcher re-runs sys.argv for the other ranks: hand it the translated form.
    saved, sys.argv = sys.argv, [sys.argv[0], *args]
    try:
        cli = ExtractCLI(
            SemanticTracker,
            ExtractionDataModule,
            trainer_defaults=dict(TRAINER_DEFAULTS),
            save_config_callback=None,
            auto_configure_optimizers=False,
            seed_everything_default=False,
            parser_kwargs={SUBCOMMAND: {"default_env": False}, "description": __doc__.split("\n\n")[0]},
        )
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    report = cli.writer.report
    return 1 if report is None or report["counts"]["failed"] else 0
