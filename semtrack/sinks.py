"""Where a run's outputs go: one interface, two formats.

An output sink takes a done video's `video` ledger record and its members {"pickle": bytes, "gif":
bytes} and writes them; it fills in the record's `outputs` and hands back the records that are
durable (their outputs renamed into place), which only then go to the ledger:

* `PickleFiles` (`--output_format pickle`): each member to its own file, at once
  (`<dataset>/feat_dump/<video_id>.pkl`, `<dataset>/gif_dump/<video_id>.gif`);
* `semtrack.webdataset.TarShards` (`--output_format webdataset`): members appended to a tar shard,
  whose records come back when the shard is closed.

`add(record, members) -> records` raises when the video's outputs could not all be written, having
left none of them (the caller records the failure); `close() -> records` finishes what is open;
`abandon() -> records` gives up what is open (its records' outputs are gone).
"""
from __future__ import annotations

import contextlib
from typing import Protocol

from semtrack.layout import OutputLayout
from semtrack.ledger import output_entry
from semtrack.safeio import real_folder, write_atomic
from semtrack.webdataset import TarShards


class OutputSink(Protocol):
    """Writes done videos' members; see the module docstring. `format`: its `--output_format`."""

    format: str

    def add(self, record: dict, members: dict[str, bytes]) -> list[dict]: ...

    def close(self) -> list[dict]: ...

    def abandon(self) -> list[dict]: ...


class PickleFiles:
    """One file per member, written atomically (`semtrack.safeio.write_atomic`). A video whose members
    could not all be written keeps none of them (nor an older run's files of the same names)."""

    format = "pickle"

    def __init__(self, layout: OutputLayout):
        self.layout = layout

    def _path(self, kind: str, record: dict):
        where = self.layout.pickle if kind == "pickle" else self.layout.gif
        return where(record["dataset"], record["video_id"])

    def add(self, record: dict, members: dict[str, bytes]) -> list[dict]:
        outputs = {}
        for kind in members:  # before anything is written or removed: no planted link on the way
            real_folder(self.layout.root, self._path(kind, record).parent)
        try:
            for kind, data in members.items():
                write_atomic(self._path(kind, record), data)
                outputs[kind] = output_entry(data) if kind == "pickle" else {"bytes": len(data)}
        except BaseException:
            for kind in members:
                with contextlib.suppress(OSError):
                    self._path(kind, record).unlink(missing_ok=True)
            raise
        record["outputs"] = outputs
        return [record]

    def close(self) -> list[dict]:
        return []

    def abandon(self) -> list[dict]:
        return []


def open_sink(layout: OutputLayout, output_format: str, run_id: str, rank: int, videos_per_tar: int) -> OutputSink:
    """The sink of `output_format` ("pickle" | "webdataset") for process `rank` of run `run_id`."""
    if output_format == "webdataset":
        return TarShards(layout, run_id, rank, videos_per_tar)
    return PickleFiles(layout)
