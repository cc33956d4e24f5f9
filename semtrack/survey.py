"""The folder's track statistics over all its done videos, from the ledger alone: summaries and
histograms of every statistic (`semtrack.trackstats.STATS`), the videos each rule flags, each
statistic's extreme 1 %, a gallery pick, and the `--where` filter; `restate` fills in the statistics
an older ledger lacks from the pickles.

    table = StatsTable.of(latest_videos(records))    # done videos: columns of numbers
    survey = build_survey(report, latest, table)      # a JSON-able dict (semtrack-report --json)
    keys = table.where("visible<0.1 and points>=8")   # [(dataset, video_id)]

Filter syntax (`--where`, and `RULES`): conditions joined by `and` (or `,`), all of which must hold;
a condition is `NAME OP NUMBER` with NAME a statistic and OP one of `< <= > >= == !=`, or the name of
a rule. A video without statistics, or whose statistic is None, matches no condition.
"""
from __future__ import annotations

import math
import re
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from semtrack.layout import OutputLayout
from semtrack.ledger import DONE, FAILED, LedgerPart, new_run_id, output_entry, read_output
from semtrack.trackfile import TrackFileError, loads_tracks
from semtrack.trackstats import STATS, file_stats
from semtrack.util import one_line

HISTOGRAM_BINS = 30
EXTREME_SHARE = 0.01  # each statistic's extreme 1 % (of the done videos with statistics)
EXTREME_MIN_VIDEOS = 100  # fewer videos with a statistic than this: it has no extreme 1 %
LISTED = 10  # videos listed per rule and per extreme (the page and --json); --where lists them all
GALLERY = 48  # videos in the gallery, at most
GALLERY_FLAGGED = 24  # of which flagged by a rule or an extreme, at most (the rest: an evenly spaced sample)
MISSING_NOTE = "no statistics; rerun with --verify_outputs to compute them"
REASONS_LISTED = 20  # failure reasons listed per stage, the most frequent first
OTHER_REASONS = "(other reasons)"
RESTATE_BATCH = 1000  # restated records appended (and fsynced) together

# rule -> its filter: the kinds of bad video the statistics are there to find
RULES: dict[str, str] = {
    "few_visible": "visible<0.1",
    "few_points": "points<8",
    "no_motion": "displacement_p95_px<1",
    "one_entity_dominates": "largest_entity_share>0.8 and entities>1",
}
# statistic -> which of its tails is worth a look ("low", "high" or "both"); the others have none
TAILS: dict[str, str] = {
    "frames": "both", "points": "low", "entities": "low", "points_per_entity_min": "low",
    "largest_entity_share": "high", "visible": "low", "visible_half": "low",
    "displacement_median_px": "both", "displacement_p95_px": "high", "static": "high", "step_s": "high",
    "wait_s": "high",
}
_CONDITION = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(<=|>=|==|!=|<|>)\s*([-+]?[0-9.]+(?:[eE][-+]?[0-9]+)?)\s*$")
_OPS = {"<": np.less, "<=": np.less_equal, ">": np.greater, ">=": np.greater_equal, "==": np.equal,
        "!=": np.not_equal}


class FilterError(ValueError):
    """A `--where` expression that does not parse (one line saying what is wrong)."""


def parse_where(text: str) -> list[tuple[str, str, float]]:
    """`text` -> its conditions [(statistic, op, number)], rules expanded. FilterError if it does not parse."""
    conditions = []
    for part in re.split(r"\s+and\s+|,", text.strip()):
        if part.strip() in RULES:
            conditions += parse_where(RULES[part.strip()])
            continue
        match = _CONDITION.match(part)
        if match is None:
            raise FilterError(f"cannot read {part.strip()!r}: write NAME OP NUMBER (OP one of < <= > >= == !=) or "
                              f"a rule ({', '.join(RULES)}), joined by 'and'")
        name, op, number = match.groups()
        if name not in STATS:
            raise FilterError(f"no statistic {name!r}; statistics: {', '.join(STATS)}")
        conditions.append((name, op, float(number)))
    return conditions


@dataclass
class StatsTable:
    """The done videos of a folder: `keys` [(dataset, video_id)] and `records` (their latest ledger
    records) of those with statistics, `columns` {statistic: (V,) float64, NaN for None} in the same
    order, and `missing`: the done records without statistics."""

    keys: list[tuple[str, str]]
    records: list[dict]
    columns: dict[str, np.ndarray]
    missing: list[dict] = field(default_factory=list)

    @classmethod
    def of(cls, latest: dict[tuple[str, str], dict]) -> StatsTable:
        """From {(dataset, video_id): latest record} (`semtrack.ledger.latest_videos`), in key order."""
        keys, records, missing = [], [], []
        for key in sorted(latest):
            record = latest[key]
            if record["status"] != DONE:
                continue
            if isinstance(record.get("stats"), dict):
                keys.append(key)
                records.append(record)
            else:
                missing.append(record)
        names = list(STATS)
        matrix = np.array([list(map(r["stats"].get, names)) for r in records], dtype=np.float64)  # None: NaN
        matrix = matrix.reshape(len(records), len(names))
        return cls(keys, records, {name: matrix[:, k].copy() for k, name in enumerate(names)}, missing)

    def mask(self, conditions: list[tuple[str, str, float]]) -> np.ndarray:
        """(V,) bool: the videos meeting every condition (NaN meets none)."""
        keep = np.ones(len(self.keys), dtype=bool)
        with np.errstate(invalid="ignore"):
            for name, op, number in conditions:
                keep &= _OPS[op](self.columns[name], number) & ~np.isnan(self.columns[name])
        return keep

    def where(self, text: str) -> list[tuple[str, str]]:
        """The (dataset, video_id) of the videos matching filter `text` (module docstring), in key order."""
        return [self.keys[i] for i in np.flatnonzero(self.mask(parse_where(text)))]


def _number(value: float):
    """A JSON number: int when whole, None for NaN."""
    if value is None or math.isnan(value):
        return None
    return int(value) if float(value).is_integer() else round(float(value), 6)


def _entry(table: StatsTable, i: int, name: str | None = None) -> dict:
    dataset, video_id = table.keys[i]
    entry = {"dataset": dataset, "video_id": video_id}
    if name is not None:
        entry["value"] = _number(table.columns[name][i])
    return entry


def _summary(values: np.ndarray, description: str) -> dict:
    """count, min, p1, median, p99, max, mean and a histogram (HISTOGRAM_BINS bins over [min, max]) of
    the non-NaN values."""
    finite = values[~np.isnan(values)]
    out = {"description": description, "count": int(finite.size)}
    if not finite.size:
        return {**out, "histogram": None}
    p1, median, p99 = np.quantile(finite, [0.01, 0.5, 0.99])
    lo, hi = float(finite.min()), float(finite.max())
    counts, edges = np.histogram(finite, bins=HISTOGRAM_BINS if hi > lo else 1, range=(lo, hi if hi > lo else lo + 1))
    return {**out, "min": _number(lo), "p1": _number(p1), "median": _number(median), "p99": _number(p99),
            "max": _number(hi), "mean": _number(finite.mean()),
            "histogram": {"edges": [_number(e) for e in edges], "counts": counts.tolist()}}


def _extremes(table: StatsTable, name: str, tail: str) -> dict:
    """The ceil(1 %) lowest (tail "low") or highest ("high") values of statistic `name`, not counting
    values equal to the median: their count, the threshold and the LISTED most extreme. None of
    them under EXTREME_MIN_VIDEOS videos."""
    values = table.columns[name]
    valid = np.flatnonzero(~np.isnan(values))
    if valid.size < EXTREME_MIN_VIDEOS:
        return {"count": 0, "threshold": None, "videos": []}
    k = math.ceil(EXTREME_SHARE * valid.size)
    median = np.median(values[valid])
    order = valid[np.argsort(values[valid] if tail == "low" else -values[valid], kind="stable")][:k]
    order = order[values[order] != median]
    return {"count": int(order.size), "threshold": _number(values[order[-1]]) if order.size else None,
            "videos": [_entry(table, i, name) for i in order[:LISTED]]}


def _worst_first(table: StatsTable, matches: np.ndarray, conditions) -> np.ndarray:
    """`matches` (indices) ordered by the rule's first condition, the most extreme value first."""
    name, op, _ = conditions[0]
    values = table.columns[name][matches]
    return matches[np.argsort(values if op in ("<", "<=") else -values, kind="stable")]


def _flagged(table: StatsTable) -> dict[str, np.ndarray]:
    """{rule: indices of the videos it flags, worst first}."""
    out = {}
    for rule, text in RULES.items():
        conditions = parse_where(text)
        out[rule] = _worst_first(table, np.flatnonzero(table.mask(conditions)), conditions)
    return out


def gallery_pick(table: StatsTable, flagged: dict[str, np.ndarray], extremes: dict[str, dict]) -> list[dict]:
    """Up to GALLERY videos: up to GALLERY_FLAGGED flagged ones (rules then extremes, round robin, the
    worst of each first), then a sample of the rest: GALLERY videos evenly spaced in (dataset,
    video_id) order, those not chosen already. -> [{dataset, video_id, why}]."""
    index = {key: i for i, key in enumerate(table.keys)}
    queues = [(rule, [int(i) for i in found]) for rule, found in flagged.items()]
    queues += [(f"{name} {tail}", [index[(v["dataset"], v["video_id"])] for v in e["videos"]])
               for (name, tail), e in extremes.items()]
    chosen: dict[int, str] = {}
    depth = 0
    while len(chosen) < GALLERY_FLAGGED and any(depth < len(q) for _, q in queues):
        for why, queue in queues:
            if depth < len(queue) and queue[depth] not in chosen and len(chosen) < GALLERY_FLAGGED:
                chosen[queue[depth]] = why
        depth += 1
    spread = np.unique(np.linspace(0, len(table.keys) - 1, GALLERY).round().astype(np.int64)) if table.keys else []
    for i in spread:  # evenly spaced in (dataset, video_id) order
        if len(chosen) >= GALLERY:
            break
        chosen.setdefault(int(i), "sample")
    return [{**_entry(table, i), "why": why} for i, why in chosen.items()]


def failures_by_stage(latest: dict[tuple[str, str], dict]) -> dict[str, dict[str, int]]:
    """{stage: {reason: videos}} of the videos whose latest record failed, most frequent reason first:
    the REASONS_LISTED most frequent, then `OTHER_REASONS`: the videos of the others (failures.csv
    lists every one)."""
    by_stage: dict[str, Counter] = defaultdict(Counter)
    for record in latest.values():
        if record["status"] == FAILED:
            by_stage[record.get("stage", "")][record.get("reason", "")] += 1
    out = {}
    for stage, counts in sorted(by_stage.items()):
        ranked = counts.most_common()
        out[stage] = dict(ranked[:REASONS_LISTED])
        if len(ranked) > REASONS_LISTED:
            out[stage][OTHER_REASONS] = sum(n for _, n in ranked[REASONS_LISTED:])
    return out


def build_survey(report: dict, latest: dict[tuple[str, str], dict], table: StatsTable) -> dict:
    """The numbers of `semtrack-report --json` and `--html`: the folder's counts, failures by stage
    and reason, each statistic's summary and histogram, the rules' and extremes' videos, the videos
    without statistics, the gallery pick and the runs (`report`: `semtrack.report.build_report`)."""
    flagged = _flagged(table)
    extremes = {(name, side): _extremes(table, name, side) for name, tail in TAILS.items()
                for side in (("low", "high") if tail == "both" else (tail,))}
    return {
        "output_dir": report["output_dir"],
        "counts": {**report["counts"], "with_statistics": len(table.keys), "without_statistics": len(table.missing)},
        "failures_by_stage": failures_by_stage(latest),
        "statistics": {name: _summary(table.columns[name], text) for name, text in STATS.items()},
        "rules": {rule: {"where": RULES[rule], "count": int(found.size),
                         "videos": [_entry(table, int(i), parse_where(RULES[rule])[0][0]) for i in found[:LISTED]]}
                  for rule, found in flagged.items()},
        "extremes": {f"{name} {side}": e for (name, side), e in extremes.items()},
        "without_statistics": {"count": len(table.missing), "note": MISSING_NOTE if table.missing else None,
                               "videos": [{"dataset": r["dataset"], "video_id": r["video_id"]}
                                          for r in table.missing[:LISTED]]},
        "gallery": gallery_pick(table, flagged, extremes),
        "runs": report["runs"],
    }


def restate(layout: OutputLayout, missing: list[dict], last_seq: int = 0) -> tuple[list[dict], list[str]]:
    """Compute the statistics of done videos whose records have none (`missing`) from their pickles
    (read and validated; the SHA-256 must match the record's) and append each record again with them
    (`restated: true`) to a ledger file of this pass's own, RESTATE_BATCH at a time (an interrupted
    pass keeps what it appended). Each new record is this pass's (`run`: a new run id, rank 0, a new
    time, `seq` counting up from `last_seq`, the highest in the folder), so it is the video's latest
    and no copy of the old one; the report counts no run for it. -> (the new records, one line per
    video that could not be read). Raises OSError when the ledger cannot be written."""
    run_id = new_run_id()
    part = LedgerPart(layout.ledger_part(run_id, 0))
    records, problems, appended = [], [], 0
    for record in missing:
        try:
            data = read_output(layout, record, "pickle")
            recorded = record["outputs"]["pickle"].get("sha256")
            if recorded is not None and output_entry(data)["sha256"] != recorded:
                raise TrackFileError("the pickle differs from the one its record lists (SHA-256)")
            stats = file_stats(loads_tracks(data, record["video_id"]))
        except (OSError, KeyError, TypeError, ValueError) as exc:  # ValueError: TrackFileError, UnsafeFile
            problems.append(f"{record['dataset']}/{record['video_id']}: {one_line(exc)}")
            continue
        records.append({**record, "stats": stats, "restated": True, "run": run_id, "rank": 0, "time": time.time(),
                        "seq": last_seq + len(records) + 1})
        if len(records) - appended >= RESTATE_BATCH:
            part.append(records[appended:])
            appended = len(records)
    part.append(records[appended:])
    return records, problems
