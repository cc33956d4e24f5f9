#!/usr/bin/env bash
# Prepare, on a machine with network and ../shared, what benchmarks/gpu_check.py needs on the GPU
# machine, into two ignored folders that the device call carries:
#   .whl/       the wheels the GPU image lacks (decord2, exact version, for Python 3.12)
#   .gpu_data/  an SSV2-like clip set (>= 32 clips of varied length), the subset of ../shared the
#               CUDA tests read, and the commit these were made at.
# The device tool moves at most 64 MiB per call (working tree + carried folders): this script
# prints the total. Usage: bash benchmarks/gpu_prepare.sh [SHARED_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
shared="${1:-${SEMTRACK_SHARED:-../shared}}"
DECORD=decord2==3.4.0

rm -rf .whl .gpu_data
mkdir -p .whl .gpu_data/shared
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$DECORD"

# SSV2-like: every decodable shared clip, 3 lengths each (12..88 frames at 12 fps), small files.
sources=()
for clip in "$shared"/videos/*.mp4 "$shared"/videos/*.webm; do
    case "$(basename "$clip")" in corrupt_*|not_a_video*) continue ;; esac
    sources+=("$clip")
done
python benchmarks/make_ssv2_like.py "${sources[@]}" --out .gpu_data/ssv2_like --variants 3 --crf 40

# What the CUDA tests read (tests/_shared.py finds it through SEMTRACK_SHARED).
for f in spec/REFERENCE.md spec/fixtures/sampling.npz spec/fixtures/kmeans.npz spec/fixtures/device_checks.json \
         cotracker3/weights.py cotracker3/state_dict_manifest.tsv cotracker3/model_small.npz \
         cotracker3/predictor_queries.npz dinov2/weights.py dinov2/state_dict_manifest.tsv \
         dinov2/features_vitb14.npz videos/bear_ssv2.webm; do
    mkdir -p ".gpu_data/shared/$(dirname "$f")"
    cp "$shared/$f" ".gpu_data/shared/$f"
done
git rev-parse HEAD > .gpu_data/commit.txt
git status --porcelain --untracked-files=no | grep -q . && echo dirty >> .gpu_data/commit.txt || true

tree=$(git ls-files -z | xargs -0 du -cb | tail -1 | cut -f1)
carried=$(du -sb .whl .gpu_data | awk '{s += $1} END {print s}')
total=$((tree + carried))
echo "travels: tree $((tree / 1048576)) MiB + .whl/.gpu_data $((carried / 1048576)) MiB = $((total / 1048576)) MiB (limit 64)"
[ "$total" -le $((64 * 1048576)) ] || { echo "over the device tool's 64 MiB" >&2; exit 1; }
