"""`scripts/extract.py` / `semtrack-extract`: the extraction job's command line.

Two spellings, one job (both build it with `semtrack.api.build_trainer`):

* Flat flags, the research script's spelling: `extract.py --csv_path v.csv --clustering_method kmeans
  --devices 2`. Every `ExtractConfig` field is `--<name>`, plus the trainer flags `--devices
  --num_nodes --accelerator --strategy --precision` and any other Trainer argument as
  `--trainer.<name> VALUE`. `--help` lists them by group.
* LightningCLI, for YAML configs: `extract.py predict --config run.yaml --trainer.devices 8`
  (every extraction option under `extract:`; `predict --help` shows all of Lightning's options).
  `--print_config` and `--config` given with flat flags switch to this form (`translate`).

Exit status: 0 when every video of this run was done or skipped; 1 when one failed, or the run
stopped after processing had started (a folder that cannot be written, an error in the loop), or
its report could not be written; 2 when the job could not start (bad CSV, names, option, weights,
sidecar, an unwritable folder, another run holding the folder or shard), reported in one line;
129 / 130 / 143 when stopped by SIGHUP / SIGINT / SIGTERM (at a video boundary, the report written).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
import signal
import sys
import types
import typing

import yaml

import semtrack
from semtrack.config import GROUPS, ExtractConfig, field_help, research_options

SUBCOMMAND = "predict"
TRAINER_FLAGS = {
    "devices": "devices per node: a number, a list such as 0,1, or auto",
    "num_nodes": "nodes (DDP across machines)",
    "accelerator": "cpu, gpu, cuda or auto",
    "strategy": "auto, ddp, ddp_spawn, ...",
    "precision": "32-true (fp32), bf16-mixed (bf16 tracker), or 16-mixed (fp32 tracker)",
}
NONE_WORDS = ("none", "null")
ERROR_CHARS = 300  # a LightningCLI parsing error's characters kept in its one line
_FIELDS = {f.name: f for f in dataclasses.fields(ExtractConfig)}
_HINTS = typing.get_type_hints(ExtractConfig)
SWITCHES = frozenset(name for name, f in _FIELDS.items() if isinstance(f.default, bool))
LIST_FLAGS = {"tracker_resolution": 2, "native_fps_datasets": None}  # values taken after the flag


# ---------------------------------------------------------------------------- flat flags
class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad command line in one line, naming the closest known flag."""

    def error(self, message: str) -> typing.NoReturn:
        unknown = message.partition("unrecognized arguments: ")[2].split()
        flags = [a for a in unknown if a.startswith("--")]
        if flags:
            known = [o for action in self._actions for o in action.option_strings]
            close = difflib.get_close_matches(flags[0].split("=")[0], known, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see --help"
            message = f"unknown option {flags[0]}{hint}"
        self.exit(2, f"error: {message}\n")


def _optional(convert):
    def parse(text: str):
        return None if text.lower() in NONE_WORDS else convert(text)
    parse.__name__ = convert.__name__  # argparse names it in "invalid <name> value"
    return parse


def number(text: str) -> float:
    """A finite float."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def _metavar(hint) -> str | tuple | None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _metavar(next(a for a in args if a is not type(None)))
    if origin is typing.Literal:
        return None  # argparse shows the choices
    if origin is tuple:
        return ("H", "W")
    if origin is list:
        return "NAME"
    return {int: "N", float: "X"}.get(hint, "TEXT")


def _arg_spec(hint) -> dict:
    """argparse keywords for an ExtractConfig field's type hint ("none" parses as None for Optional)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Literal:
        return {"choices": list(args)}
    if origin is tuple:
        return {"type": args[0], "nargs": len(args) if args[-1] is not Ellipsis else "*"}
    if origin is list:
        return {"type": args[0], "nargs": "*"}
    if origin in (typing.Union, types.UnionType):  # Optional[X]
        spec = _arg_spec(next(a for a in args if a is not type(None)))
        if "type" in spec and "nargs" not in spec:
            spec["type"] = _optional(spec["type"])
        return spec
    return {"type": number if hint is float else hint}


def _default_text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, (tuple, list)):
        return " ".join(map(str, value)) or "(none)"
    return str(value)


def flat_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The flat-flag parser: `ExtractConfig` fields by group, then the trainer flags."""
    parser = _Parser(
        prog=prog, allow_abbrev=False,
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, max_help_position=32),
        usage="%(prog)s (--csv_path CSV | --video_path FILE|DIR|GLOB) [options]",
        description="Semantic point tracks for every video of a CSV: DINOv2 entities tracked with CoTracker3, "
                    "one pickle per video.",
        epilog=f"Any other Trainer argument: --trainer.NAME VALUE. --print_config writes these options as a "
               f"YAML config; run one with {prog or 'semtrack-extract'} {SUBCOMMAND} --config FILE "
               f"({SUBCOMMAND} --help: every Lightning option).",
    )
    groups = {name: parser.add_argument_group(name) for name in GROUPS}
    for name, f in _FIELDS.items():
        group, text, shown = field_help(name)
        if name in SWITCHES:  # defaults stay out of the namespace: parse_flat sees what was given
            groups[group].add_argument(f"--{name}", action="store_true", default=argparse.SUPPRESS, help=text)
            continue
        hint = _HINTS[name]
        groups[group].add_argument(f"--{name}", default=argparse.SUPPRESS, metavar=_metavar(hint),
                                   help=f"{text} (default: {shown or _default_text(f.default)})", **_arg_spec(hint))
    parser.add_argument("--version", action="version", version=f"%(prog)s {semtrack.__version__}")
    trainer = parser.add_argument_group("trainer")
    defaults = trainer_defaults()
    for name, text in TRAINER_FLAGS.items():
        trainer.add_argument(f"--{name}", default=argparse.SUPPRESS, metavar="TEXT",
                             help=f"{text} (default: {defaults[name]})")
    return parser


def trainer_defaults() -> dict:
    """The trainer flags' defaults: the job's (`semtrack.api.TRAINER_DEFAULTS`), else Lightning's."""
    import inspect

    import lightning as L

    from semtrack.api import TRAINER_DEFAULTS

    lightning = inspect.signature(L.Trainer.__init__).parameters
    return {name: TRAINER_DEFAULTS.get(name, lightning[name].default) for name in TRAINER_FLAGS}


def _trainer_value(text: str):
    """A Trainer argument's value as YAML reads it: `8` -> 8, `false` -> False, `bf16-mixed` stays text."""
    return yaml.safe_load(text)


def parse_flat(argv: list[str]) -> tuple[ExtractConfig, dict]:
    """Flat flags -> (config from the options given, trainer options). Exits 2 on a bad command line."""
    trainer: dict = {}
    rest = []
    args = iter(argv)
    for arg in args:
        if arg.startswith("--trainer."):
            name, eq, value = arg[len("--trainer."):].partition("=")
            trainer[name] = _trainer_value(value if eq else next(args, ""))
        else:
            rest.append(arg)
    parsed = vars(flat_parser().parse_args(rest))
    for name in TRAINER_FLAGS:
        if name in parsed:
            trainer[name] = _trainer_value(parsed.pop(name))
    if parsed.get("tracker_resolution") is not None:
        parsed["tracker_resolution"] = tuple(parsed["tracker_resolution"])
    return ExtractConfig.from_dict(parsed), trainer


# ---------------------------------------------------------------------------- LightningCLI form
def translate(argv: list[str]) -> list[str]:
    """Rewrite flat flags into LightningCLI arguments: `--<field>` -> `--extract.<field>`, switches ->
    `--extract.<name>=true`, trainer flags -> `--trainer.<name>`, list flags -> `[a, b]`, "none" ->
    null; `--research_compat` adds the preset's options not given; adds `predict`."""
    if "--research_compat" in argv:  # spelled out: LightningCLI builds the config without `from_dict`
        given = {a[2:].split("=")[0]: True for a in argv if a.startswith("--")}
        for name, value in research_options(given).items():
            if name not in given:
                argv = [*argv, f"--{name}"] if value is True else [*argv, f"--{name}", _default_text(value)]
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
            out.append(f"{target}={'null' if value.lower() in NONE_WORDS else value}")
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
            out += [target, "null" if argv[i].lower() in NONE_WORDS else argv[i]]
            i += 1
        else:
            out.append(target)  # jsonargparse reports the missing value
    if SUBCOMMAND not in out:
        out.insert(0, SUBCOMMAND)
    return out


def _lightning_cli(args: list[str]):
    """Run the LightningCLI form; -> the CLI object (its `.writer` holds the report)."""
    from lightning.pytorch.cli import LightningCLI

    from datamodules.extraction import ExtractionDataModule
    from semtrack.api import TRAINER_DEFAULTS, build_trainer, execute, preflight, quiet_lightning
    from semtrack.module import SemanticTracker

    quiet_lightning()

    class ExtractCLI(LightningCLI):
        """One subcommand (`predict`) and the whole `ExtractConfig` under `extract`."""

        @staticmethod
        def subcommands() -> dict[str, set[str]]:
            return {SUBCOMMAND: {"model", "dataloaders", "datamodule"}}

        def add_arguments_to_parser(self, parser) -> None:
            parser.add_class_arguments(ExtractConfig, "extract", fail_untyped=False)
            parser.link_arguments("extract", "model.config", apply_on="instantiate")
            parser.link_arguments("extract", "data.config", apply_on="instantiate")

        def instantiate_trainer(self, **kwargs):
            options = dict(self._get(self.config_init, "trainer", default={}))
            callbacks = [*(options.pop("callbacks", None) or []), *kwargs.get("callbacks", [])]
            trainer, self.writer = build_trainer(self._get(self.config_init, "extract"), callbacks, **options)
            return trainer

        def before_predict(self) -> None:
            self.writer.stop.install()
            try:
                preflight(self._get(self.config_init, "extract"), self.trainer.precision, self.datamodule)
            except BaseException:
                self.writer.release()
                raise

        def predict(self, model, datamodule=None, **kwargs) -> None:
            execute(self.trainer, self.writer, model, datamodule)  # predictions not collected: flat memory

    from jsonargparse import ArgumentError

    try:
        return ExtractCLI(
            SemanticTracker, ExtractionDataModule, args=args, trainer_defaults=dict(TRAINER_DEFAULTS),
            save_config_callback=None, auto_configure_optimizers=False, seed_everything_default=False,
            parser_kwargs={SUBCOMMAND: {"default_env": False, "exit_on_error": False}, "exit_on_error": False,
                           "description": __doc__.split("\n\n")[0]},
        )
    except ArgumentError as exc:  # one line, as for the flat flags
        text = " ".join(str(exc).split()) or "bad arguments"
        raise ValueError(f"{text[:ERROR_CHARS]}; see {SUBCOMMAND} --help") from None


# ---------------------------------------------------------------------------- main
def exit_status(report: dict | None) -> int:
    """0 when this run's videos were all done or skipped and its report was written, else 1."""
    run = None if report is None else report.get("last_run")
    if run is None:
        return 1
    return 1 if run["counts"]["failed"] or run.get("errors") or run["status"] != "complete" else 0


def _reason(exc: BaseException) -> str:
    """The message of an error; an OSError raised with (errno, message) shows the message alone."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is None:
        return exc.strerror
    return str(exc)


def main(argv: list[str] | None = None) -> int:
    """Run the program on `argv` (default `sys.argv[1:]`); returns the exit status."""
    from semtrack.api import RunFailed, RunInterrupted
    from semtrack.stopping import Stopped, resume_command

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:  # a bare command: how to use it, not an error about the default CSV
        parser = flat_parser()
        print(parser.format_usage().rstrip() + f"\n{parser.prog}: give --csv_path or --video_path; --help lists "
              "every option", file=sys.stderr)
        return 2
    lightning_form = SUBCOMMAND in argv[:1] or any(a.split("=")[0] in ("--config", "--print_config") for a in argv)
    args = translate(argv) if lightning_form else argv
    # Lightning's DDP launcher re-runs sys.argv for the other ranks: hand it this command line.
    saved, sys.argv = sys.argv, [sys.argv[0], *args]
    try:
        if lightning_form:
            report = _lightning_cli(args).writer.report
        else:
            from semtrack.api import run

            config, trainer_options = parse_flat(args)
            report = run(config, **trainer_options)
    except (RunInterrupted, Stopped, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signum", None) or signal.SIGINT
        print(f"semtrack: stopped by {signal.Signals(signum).name}; to resume, run: {resume_command(argv)}",
              file=sys.stderr)
        return 128 + signum
    except RunFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(f"error: {_reason(exc)}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return exit_status(report)
