"""The ledger's record schema: which fields each kind of record has, of which types and bounds.

`parse_record(line)` turns one ledger line (bytes) into a record (a dict that passed the schema), or
None for anything else: not JSON, nested too deep, a lone surrogate, an unknown kind, a field
missing or of the wrong type or out of bounds. Readers count the Nones; nothing here raises.

Every record: `kind` ("start" | "video" | "end"), `run` (str), `time` (finite seconds since the
epoch); optional `rank` (int >= 0) and `seq` (int >= 0, the writer's Lamport sequence,
`semtrack.ledger`). Fields not listed are allowed (newer writers), their values any JSON.
"""
from __future__ import annotations

import json
import math
import re

MAX_INT = 2**62  # every count, size, offset and sequence in a record is below this
SHARD_PATH = re.compile(r"shards/[^/\x00]+\.tar")  # where a tar shard may be, relative to the folder root


def _int(value, low: int = 0) -> bool:
    return type(value) is int and low <= value < MAX_INT


def _number(value) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _str(value) -> bool:
    return type(value) is str


def _optional(check):
    return lambda value: value is None or check(value)


def _entry(value) -> bool:
    """An entry of a done record's `outputs`: bytes [, sha256] [, shard, member, offset, shard_bytes]."""
    if not isinstance(value, dict) or not _int(value.get("bytes")):
        return False
    if "sha256" in value and not _str(value["sha256"]):
        return False
    if "shard" not in value:
        return True
    return (_str(value["shard"]) and SHARD_PATH.fullmatch(value["shard"]) is not None and _str(value.get("member"))
            and _int(value.get("offset")) and _int(value.get("shard_bytes")))


def _outputs(value) -> bool:
    return isinstance(value, dict) and all(_str(k) and _entry(v) for k, v in value.items())


def _stats(value) -> bool:
    """{name: number or None}: a done record's per-video figures."""
    return isinstance(value, dict) and all(_str(k) and (v is None or _number(v)) for k, v in value.items())


def _pair(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and all(_int(v) for v in value)


def _file_identity(value) -> bool:
    """{ino, size, mtime_ns, ctime_ns}: stat fields as the OS gives them (64-bit; times may precede 1970)."""
    return isinstance(value, dict) and set(value) == {"ino", "size", "mtime_ns", "ctime_ns"} and all(
        type(v) is int and -(2**63) <= v < 2**64 for v in value.values())


def _stage_totals(value) -> bool:
    return isinstance(value, dict) and all(
        _str(k) and isinstance(v, list) and len(v) == 2 and _number(v[0]) and _int(v[1]) for k, v in value.items())


# {field: (required, check)} per kind; `video` records by status.
_COMMON = {"run": (True, _str), "time": (True, _number), "rank": (False, _int), "seq": (False, _int)}
_SCHEMA = {
    "start": {"world_size": (False, lambda v: _int(v, 1)), "shard": (False, _pair), "csv_rows": (False, _int),
              "rows": (False, _int), "assigned": (False, _int), "skipped": (False, _int),
              "not_retried": (False, _int),
              "csv_keys": (False, _optional(_str)), "csv_path": (False, _optional(_str)),
              "semtrack_version": (False, _str), "host": (False, _str), "pid": (False, _int)},
    "end": {"status": (True, _str), "reason": (False, _optional(_str)), "done": (False, _int),
            "failed": (False, _int), "stage_totals": (False, _stage_totals), "wall_s": (False, _number),
            "data_wait_s": (False, _number), "points_dropped": (False, _int),
            "startup_s": (False, _optional(_number))},
    "done": {"row": (True, _int), "dataset": (True, _str), "video_id": (True, _str), "status": (True, _str),
             "frames": (False, _int), "points": (False, _int), "outputs": (False, _outputs),
             "adopted": (False, lambda v: type(v) is bool), "fps": (False, _optional(_number)),
             "stats": (False, _stats)},
    "failed": {"row": (True, _int), "dataset": (True, _str), "video_id": (True, _str), "status": (True, _str),
               "stage": (False, _str), "reason": (False, _str), "video_path": (False, _str),
               "fps": (False, _optional(_number)), "file": (False, _file_identity)},
}
STATUSES = ("done", "failed")


def valid_record(record) -> bool:
    """Whether `record` (a parsed JSON value) is a record of the schema (module docstring)."""
    if not isinstance(record, dict):
        return False
    kind = record.get("kind")
    if kind == "video":
        kind = record.get("status")
        if kind not in STATUSES:
            return False
    elif kind not in ("start", "end"):
        return False
    for name, (required, check) in (*_COMMON.items(), *_SCHEMA[kind].items()):
        if name in record:
            if not check(record[name]):
                return False
        elif required:
            return False
    return True


def parse_record(line: bytes) -> dict | None:
    """The record on one ledger line, or None when the line is not one (module docstring)."""
    try:
        record = json.loads(line)
        json.dumps(record, ensure_ascii=False).encode("utf-8")  # a lone surrogate anywhere fails here
    except (ValueError, RecursionError, UnicodeError, TypeError):
        return None
    return record if valid_record(record) else None
