"""Label stability of the clustering under tiny input changes (+-1 grey level; CPU vs GPU; fp32 vs bf16).

For each clip (decoded with `VideoCSVDataset` at 10 fps; its clustering frames), the DINOv2 input
frames (PIL-resized 224x224 uint8, the research path `preprocess="pil"`) get +-1 grey level in a
seeded `--fraction` of their values; tokens are re-extracted and re-clustered. Reported per clip and
overall, for bipartite merging (default settings 25 %, 11 iterations) and k-means (k=32, the
pipeline's per-video seed):

* `changed`: fraction of patches whose label changes, after matching the two label sets
  (`scipy.optimize.linear_sum_assignment` on the label co-occurrence matrix; labels are arbitrary
  ids); `entities`: distinct labels used before / after.
* why (on the unperturbed tokens): temporal-merge decisions (best cosine of a later frame's
  centroid to the set U) within 1e-3 of the 0.2 threshold; merge-score near-ties (consecutive
  sorted best scores, and best-vs-second-best destinations of merged tokens, within 1e-6, plus the
  sorted-score gaps below 1e-4); how much the perturbation moves the first iteration's scores.
* proposals (prototyped here, not in semtrack.clustering): other orders for the unmerged tokens of
  each merge iteration, with their own stability, how far their labels are from the reference's
  (`proposal_vs_reference`) and whether they reproduce the fixture labels
  (`spec/fixtures/bipartite.npz`). The harness runs the reference order too and must reproduce them.
* `--device D`: D's fp32 tokens vs the CPU's, D's bf16-autocast tokens vs its fp32 ones (both
  clustered on the CPU), and bipartite clustering of the CPU tokens on D vs on the CPU. `--device
  cpu` is the dry form (CPU vs CPU must be 0; bf16 autocast runs on the CPU); `cuda` without a GPU
  is recorded as skipped.

Weights default to checkpoint="random" (deterministic stand-ins): real DINOv2 weights give other
token geometry and may be more or less stable; the output says so.

    python benchmarks/bench_label_stability.py [--clips N] [--frames K] [--model vits14]
        [--fraction 0.001] [--device cuda] [--videos PATH ...] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import environment  # noqa: E402

from _shared import shared_path  # noqa: E402
from datamodules.video import VideoCSVDataset  # noqa: E402
from semtrack.clustering import (  # noqa: E402
    MERGE_RATIO,
    N_CLUSTERS,
    NUM_ITERS,
    TEMPORAL_THRESHOLD,
    _normalise,
    assign_labels,
    bipartite_clusters,
    kmeans_clusters,
    merge_frames,
    merge_schedule,
    merge_step,
    temporal_merge,
)
from semtrack.config import FPS  # noqa: E402
from semtrack.features import DinoV2Extractor  # noqa: E402
from semtrack.resize import resize_pil  # noqa: E402
from semtrack.util import stable_seed  # noqa: E402

TEMPORAL_BAND = 1e-3  # a temporal decision this close to the threshold counts as marginal
NEAR_TIE = 1e-6  # a merge-score gap this small counts as a near-tie
SMALL_GAP = 1e-4  # sorted-score gaps below this: the scale a +-1 grey level moves the scores by
GRID_STEP = 1e-3  # the score grid of the "score_grid" proposal
WEIGHTS_CAVEAT = ("stand-in random weights (checkpoint='random'): real DINOv2 weights give other token geometry "
                  "and may be more or less stable")


# ---------------------------------------------------------------------------- inputs
def default_videos() -> list[Path]:
    """Every clip in shared/videos (unreadable ones become error items and are skipped)."""
    return sorted(p for p in shared_path("videos").iterdir() if p.suffix in (".mp4", ".webm"))


def decode_clips(videos: list[Path], frames: int, limit: int | None) -> tuple[list[tuple[str, torch.Tensor]], list]:
    """[(video_id, clustering frames uint8 (K, 3, H, W))] of the first `limit` readable videos at FPS,
    K = min(frames, T); and [(video_id, error)] of those that failed."""
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "clips.csv"
        table.write_text("video_path,dataset\n" + "".join(f"{p},bench\n" for p in videos))
        dataset = VideoCSVDataset(table, fps=FPS, num_frames_clustering=frames)
        clips, failed = [], []
        for i in range(len(dataset)):
            if limit is not None and len(clips) >= limit:
                break
            item = dataset[i]
            if item.frames is None:
                failed.append((item.video_id, item.error))
            else:
                clips.append((item.video_id, item.frames[item.cluster_frames].contiguous()))
    return clips, failed


def perturb(pixels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """uint8 (...) -> copy with round(fraction * numel) distinct values moved by +-1 (random sign;
    reflected at 0 and 255, so each chosen value changes by exactly one grey level)."""
    gen = torch.Generator().manual_seed(seed)
    flat = pixels.flatten().to(torch.int16)
    count = int(round(fraction * flat.numel()))
    where = torch.randperm(flat.numel(), generator=gen)[:count]
    sign = (torch.randint(0, 2, (count,), generator=gen) * 2 - 1).to(torch.int16)
    moved = flat[where] + sign
    flat[where] = torch.where((moved < 0) | (moved > 255), flat[where] - sign, moved)
    return flat.to(torch.uint8).reshape(pixels.shape)


def extract(ext: DinoV2Extractor, pixels: torch.Tensor, bf16: bool = False) -> torch.Tensor:
    """224x224 uint8 (K, 3, 224, 224) -> float32 tokens (K, 16, 16, D) on the CPU, in batches."""
    out = []
    for start in range(0, pixels.shape[0], ext.batch_size):
        x = ext.normalise(pixels[start:start + ext.batch_size])
        with torch.autocast(ext.device.type, dtype=torch.bfloat16, enabled=bf16):
            out.append(ext.tokens(x).float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------- comparing labels
def changed_fraction(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fraction of patches whose label differs after the best one-to-one matching of a's ids to b's
    (linear_sum_assignment maximising the co-occurrence); unmatched ids count as changed."""
    a, b = a.flatten().cpu().numpy(), b.flatten().cpu().numpy()
    ids_a, ia = np.unique(a, return_inverse=True)
    ids_b, ib = np.unique(b, return_inverse=True)
    co = np.zeros((len(ids_a), len(ids_b)), dtype=np.int64)
    np.add.at(co, (ia, ib), 1)
    rows, cols = linear_sum_assignment(co, maximize=True)
    return float(1.0 - co[rows, cols].sum() / a.size)


def compare(a: torch.Tensor, b: torch.Tensor) -> dict:
    """`changed` fraction, `entities` (distinct labels of a, of b) and `entity_change` (b - a)."""
    n_a, n_b = int(a.unique().numel()), int(b.unique().numel())
    return {"changed": changed_fraction(a, b), "entities": [n_a, n_b], "entity_change": n_b - n_a}


# ---------------------------------------------------------------------------- merge-order proposals
OrderRule = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


def reference_order(best: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, nA) best scores -> (sources (B, r), unmerged (B, nA - r)) A positions: descending score."""
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices
    return order[:, :r], order[:, r:]


def positional_order(best: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sources as in the reference; the unmerged A tokens keep their sequence order."""
    src, unm = reference_order(best, r)
    return src, torch.sort(unm, dim=-1).values


def score_grid_order(best: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Descending score rounded down to a GRID_STEP grid, position breaking ties (near-ties made exact)."""
    order = torch.sort(torch.floor(best / GRID_STEP), dim=-1, descending=True, stable=True).indices
    return order[:, :r], order[:, r:]


ORDER_RULES: dict[str, OrderRule] = {
    "reference": reference_order, "positional": positional_order, "score_grid": score_grid_order,
}
PROPOSALS = ("positional", "score_grid")


def merge_step_with(x: torch.Tensor, r: int, rule: OrderRule) -> torch.Tensor:
    """`semtrack.clustering.merge_step` (its CPU summation, index_add) with the A-token order given by
    `rule`: x (B, n, D) -> (B, n - r, D)."""
    metric = _normalise(x)
    best, dst = (metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)).max(dim=-1)  # (B, nA)
    src_idx, unm_idx = rule(best, r)
    xa, xb = x[:, ::2], x[:, 1::2]
    (bsz, nb), d = xb.shape[:2], x.shape[-1]
    unm = xa.gather(1, unm_idx[..., None].expand(-1, -1, d))
    src = xa.gather(1, src_idx[..., None].expand(-1, -1, d))
    target = (dst.gather(1, src_idx) + torch.arange(bsz, device=x.device)[:, None] * nb).flatten()  # (B*r,)
    summed = xb.reshape(bsz * nb, d).index_add(0, target, src.reshape(-1, d)).reshape(bsz, nb, d)
    ones = torch.ones_like(target, dtype=x.dtype)
    count = torch.ones(bsz * nb, dtype=x.dtype, device=x.device).index_add_(0, target, ones)
    return torch.cat([unm, summed / count.reshape(bsz, nb, 1)], dim=1)


def bipartite_with(tokens: torch.Tensor, rule: OrderRule, merge_ratio=MERGE_RATIO, num_iters=NUM_ITERS):
    """Bipartite labels (T, P, Q) of one video's tokens (T, P, Q, D) with merge order `rule`."""
    t, p, q, d = tokens.shape
    x = tokens.float().reshape(t, p * q, d)
    schedule = merge_schedule(p * q, merge_ratio, num_iters)
    frames = x
    for n, n_next in zip(schedule[:-1], schedule[1:]):
        frames = merge_step_with(frames, n - n_next, rule)
    centroids, _, count = temporal_merge(frames[None])
    return assign_labels(x[None], centroids, count).reshape(t, p, q)


def fixture_check() -> dict:
    """Per rule and fixture setting: labels equal to the reference fixture, and `changed` vs it."""
    fixture = np.load(shared_path("spec", "fixtures", "bipartite.npz"))
    tokens = torch.from_numpy(fixture["tokens"])
    out = {}
    for name, rule in ORDER_RULES.items():
        out[name] = {}
        for m, it in ((25, 11), (40, 5)):
            labels = bipartite_with(tokens, rule, m, it)
            reference = torch.from_numpy(fixture[f"labels_m{m}_i{it}"])
            out[name][f"m{m}_i{it}"] = {
                "labels_equal": bool(torch.equal(labels, reference)), "changed": changed_fraction(reference, labels),
            }
    return out


# ---------------------------------------------------------------------------- why labels move
def merge_diagnostics(tokens: torch.Tensor, shifted: torch.Tensor | None = None) -> dict:
    """Near-ties in the per-frame merges of tokens (T, P, Q, D): consecutive sorted best scores within
    NEAR_TIE (all, and the pair at the merged / unmerged boundary) and within SMALL_GAP, merged tokens
    whose best and second-best destinations are within NEAR_TIE; with `shifted` (the perturbed
    tokens) the median / max change of the first iteration's best scores."""
    t, p, q, d = tokens.shape
    x = tokens.float().reshape(t, p * q, d)
    schedule = merge_schedule(p * q, MERGE_RATIO, NUM_ITERS)
    sorted_gaps, near_sorted, small_sorted, near_dst, boundary = 0, 0, 0, 0, 0
    for n, n_next in zip(schedule[:-1], schedule[1:]):
        r = n - n_next
        metric = _normalise(x)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # (T, nA, nB)
        best = scores.max(dim=-1).values
        ranked = torch.sort(best, dim=-1, descending=True).values  # (T, nA)
        gaps = ranked[:, :-1] - ranked[:, 1:]
        sorted_gaps += gaps.numel()
        near_sorted += int((gaps < NEAR_TIE).sum())
        small_sorted += int((gaps < SMALL_GAP).sum())
        if 0 < r < ranked.shape[1]:
            boundary += int((gaps[:, r - 1] < NEAR_TIE).sum())  # the r-th and (r+1)-th: merged or not
        if scores.shape[-1] > 1 and r > 0:
            top2 = scores.topk(2, dim=-1).values  # (T, nA, 2)
            sources = torch.sort(best, dim=-1, descending=True, stable=True).indices[:, :r]
            near_dst += int(((top2[..., 0] - top2[..., 1]).gather(1, sources) < NEAR_TIE).sum())
        x = merge_step(x, r)
    out = {
        "sorted_score_gaps": sorted_gaps, "sorted_near_ties": near_sorted, "sorted_small_gaps": small_sorted,
        "boundary_near_ties": boundary, "destination_near_ties": near_dst,
    }
    if shifted is not None:
        def first_best(v):
            m = _normalise(v.float().reshape(t, p * q, d))
            return (m[:, ::2] @ m[:, 1::2].transpose(1, 2)).max(dim=-1).values

        move = (first_best(shifted) - first_best(tokens)).abs()
        out["score_shift_iter1"] = {"median": float(move.median()), "max": float(move.max())}
    return out


def temporal_diagnostics(tokens: torch.Tensor) -> dict:
    """Temporal-merge decisions of one video (T, P, Q, D): count, how many (`marginal`) within
    TEMPORAL_BAND of the threshold, and the smallest |best cosine - threshold|. The best cosine of frame t's centroid
    is recomputed against the U rows the merge had added before frame t."""
    t, p, q, d = tokens.shape
    frames = merge_frames(tokens.reshape(t, p * q, d), MERGE_RATIO, NUM_ITERS)  # (T, K, D)
    centroids, provenance, count = temporal_merge(frames[None])
    u = _normalise(centroids[0, : int(count[0])])
    added_at = provenance[0, : int(count[0]), 0]
    fn = _normalise(frames)
    best = [(fn[ti] @ u[added_at < ti].T).max(dim=-1).values for ti in range(1, t)]
    margins = (torch.cat(best) - TEMPORAL_THRESHOLD).abs() if best else torch.zeros(0)
    return {
        "decisions": int(margins.numel()), "marginal": int((margins < TEMPORAL_BAND).sum()),
        "min_margin": float(margins.min()) if margins.numel() else None,
    }


# ---------------------------------------------------------------------------- one clip
def cluster(tokens: torch.Tensor, video_id: str) -> dict[str, torch.Tensor]:
    """Labels (T, P, Q) by method: bipartite (library), kmeans (library), and each proposal."""
    labels = {
        "bipartite": bipartite_clusters(tokens, MERGE_RATIO, NUM_ITERS),
        "kmeans": kmeans_clusters(tokens, N_CLUSTERS, stable_seed(video_id), init="random"),
    }
    for name in PROPOSALS:
        labels[f"bipartite_{name}"] = bipartite_with(tokens, ORDER_RULES[name])
    return labels


def compare_all(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict:
    return {method: compare(a[method], b[method]) for method in a}


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


def device_checks(ext: DinoV2Extractor, pixels: torch.Tensor, cpu_tokens, cpu_labels, video_id, device) -> dict:
    """D fp32 vs CPU tokens, D bf16 vs D fp32 tokens (clustered on the CPU), bipartite on D vs CPU."""
    ext.to(device)
    try:
        fp32 = extract(ext, pixels)
        bf16 = extract(ext, pixels, bf16=True)
    finally:
        ext.to("cpu")
    labels32 = cluster(fp32, video_id)
    on_device = bipartite_clusters(cpu_tokens.to(device), MERGE_RATIO, NUM_ITERS).cpu()
    return {
        "cpu_vs_device_fp32": {**compare_all(cpu_labels, labels32), "token_max_abs": max_abs(fp32, cpu_tokens)},
        "fp32_vs_bf16": {**compare_all(labels32, cluster(bf16, video_id)), "token_max_abs": max_abs(bf16, fp32)},
        "bipartite_on_device_vs_cpu": compare(cpu_labels["bipartite"], on_device),
    }


def run_clip(ext, video_id: str, frames: torch.Tensor, fraction: float, seed: int, device: str | None) -> dict:
    pixels = resize_pil(frames)  # (K, 3, 224, 224) uint8: the DINOv2 input
    tokens = extract(ext, pixels)
    shifted = extract(ext, perturb(pixels, fraction, seed))
    labels = cluster(tokens, video_id)
    row = {
        "video_id": video_id, "frames": int(frames.shape[0]), "size_hw": [int(frames.shape[2]), int(frames.shape[3])],
        "token_change": {"max_abs": max_abs(shifted, tokens), "mean_abs": float((shifted - tokens).abs().mean())},
        "perturbation": compare_all(labels, cluster(shifted, video_id)),
        "proposal_vs_reference": {n: compare(labels["bipartite"], labels[f"bipartite_{n}"]) for n in PROPOSALS},
        "temporal": temporal_diagnostics(tokens),
        "merge": merge_diagnostics(tokens, shifted),
    }
    if device is not None:
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            row["devices"] = {"skipped": "no CUDA device"}
        else:
            row["devices"] = device_checks(ext, pixels, tokens, labels, video_id, device)
    return row


# ---------------------------------------------------------------------------- summary
def overall(rows: list[dict], section: Callable[[dict], dict]) -> dict:
    """Patch-weighted mean `changed`, mean |entity change| and clips with any change, per method."""
    sections = [(r["frames"] * 256, section(r)) for r in rows]
    total = sum(w for w, _ in sections)
    out = {}
    for method in sections[0][1] if sections else []:
        if not isinstance(sections[0][1][method], dict) or "changed" not in sections[0][1][method]:
            continue
        values = [(w, s[method]) for w, s in sections]
        out[method] = {
            "changed": sum(w * v["changed"] for w, v in values) / total,
            "mean_abs_entity_change": float(np.mean([abs(v["entity_change"]) for _, v in values])),
            "clips_changed": sum(v["changed"] > 0 for _, v in values),
        }
    return out


def print_report(result: dict) -> None:
    env = result["env"]
    print(f"bench_label_stability {env['date_utc']} commit {(env['git_commit'] or '?')[:10]}; "
          f"{env['hardware']['gpu'] or env['hardware']['cpu_model']}; torch {env['torch']}")
    s = result["settings"]
    print(f"model {s['model']} weights {s['weights']} ({WEIGHTS_CAVEAT}); {s['fraction']:.3%} of the 224 px input "
          f"values +-1 (seed {s['seed']}); up to {s['frames']} clustering frames at {FPS:g} fps")
    methods = list(result["overall"]["perturbation"])
    print(f"{'clip':22s} {'K':>3s} " + " ".join(f"{m[:22]:>22s}" for m in methods) + "   temporal<1e-3  ties<1e-6")
    for r in result["clips"]:
        cells = [f"{v['changed']:7.2%} ({v['entity_change']:+d} ent)" for v in r["perturbation"].values()]
        print(f"{r['video_id']:22s} {r['frames']:3d} " + " ".join(f"{c:>22s}" for c in cells)
              + f"   {r['temporal']['marginal']:3d}/{r['temporal']['decisions']:<5d}"
              + f"   {r['merge']['sorted_near_ties']:3d}+{r['merge']['destination_near_ties']}")
    for name, block in result["overall"].items():
        print(f"overall {name}: " + "; ".join(f"{m} {v['changed']:.2%} changed, |entity change| "
                                              f"{v['mean_abs_entity_change']:.2f}, {v['clips_changed']} clips changed"
                                              for m, v in block.items()))
    for rule, settings in result["fixture_check"].items():
        print(f"fixture {rule}: " + "; ".join(f"{k} labels_equal={v['labels_equal']} changed={v['changed']:.2%}"
                                             for k, v in settings.items()))
    for vid, error in result["failed"]:
        print(f"skipped {vid}: {error}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", nargs="+", type=Path, default=None, help="default: every clip in shared/videos")
    parser.add_argument("--clips", type=int, default=None, help="at most this many readable clips")
    parser.add_argument("--frames", type=int, default=32, help="clustering frames per clip (K)")
    parser.add_argument("--model", default="vits14", help="DINOv2 model (vits14 default for CPU speed; vitb14 ...)")
    parser.add_argument("--checkpoint", default="random", help="'random' (default), a path, or 'hub'")
    parser.add_argument("--fraction", type=float, default=0.001, help="share of input values moved by +-1")
    parser.add_argument("--seed", type=int, default=0, help="perturbation seed")
    parser.add_argument("--device", default=None, help="also compare tokens on this device (cuda; cpu = dry form)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    if not 0 <= args.fraction <= 1:
        raise SystemExit(f"--fraction must lie in [0, 1], got {args.fraction}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    clips, failed = decode_clips(args.videos or default_videos(), args.frames, args.clips)
    checkpoint = None if args.checkpoint == "hub" else args.checkpoint
    ext = DinoV2Extractor(args.model, checkpoint=checkpoint, preprocess="pil")
    rows = []
    for video_id, frames in clips:
        rows.append(run_clip(ext, video_id, frames, args.fraction, args.seed, args.device))
    summary = {
        "perturbation": overall(rows, lambda r: r["perturbation"]),
        "proposal_vs_reference": overall(rows, lambda r: r["proposal_vs_reference"]),
    }
    if args.device is not None and rows and "skipped" not in rows[0]["devices"]:
        for check in ("cpu_vs_device_fp32", "fp32_vs_bf16"):
            summary[check] = overall(rows, lambda r, c=check: r["devices"][c])
        summary["bipartite_on_device_vs_cpu"] = overall(
            rows, lambda r: {"bipartite": r["devices"]["bipartite_on_device_vs_cpu"]})
    result = {
        "benchmark": "label_stability", "env": environment(),
        "settings": {
            "model": args.model, "weights": ext.weights_id, "weights_caveat": WEIGHTS_CAVEAT,
            "preprocess": "pil", "fps": FPS, "frames": args.frames, "fraction": args.fraction, "seed": args.seed,
            "device": args.device, "merge_ratio": MERGE_RATIO, "num_iters": NUM_ITERS, "n_clusters": N_CLUSTERS,
            "temporal_band": TEMPORAL_BAND, "near_tie": NEAR_TIE, "small_gap": SMALL_GAP, "grid_step": GRID_STEP,
            "proposals": {name: ORDER_RULES[name].__doc__.splitlines()[0] for name in PROPOSALS},
        },
        "clips": rows, "failed": failed, "overall": summary, "fixture_check": fixture_check(),
    }
    print_report(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
