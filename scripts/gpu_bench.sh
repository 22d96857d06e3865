#!/usr/bin/env bash
# One GPU benchmark run (H100 / H200) for the figures of docs/PERFORMANCE.md: random ViT-L/14 weights,
# batch 256, fp16 autocast + gradient scaler, against the per-sample baseline in the same run; then the
# metrics, the feature cache's I/O and a warm full-size CIRCO validation on the card.
# On a GPU node without internet that has PyTorch but not open_clip_torch, ftfy or wcwidth, download
# those three as wheels for its Python into .whl/ first (ignored by git), e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl open_clip_torch ftfy wcwidth
# This script installs whatever is in .whl/. Outputs go to $OUT (default ./runs/gpu).
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT_DIR="${OUT:-./runs/gpu}"
mkdir -p "$OUT_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT_DIR/gpu.txt"
python3 scripts/bench.py --clip-model ViT-L-14 --device cuda --batch-size 256 --precision fp16 \
    --repeats 5 --json "$OUT_DIR/bench_vitl14.json" 2>&1 | tee "$OUT_DIR/bench_vitl14.log"
python3 scripts/bench_metrics.py --device cuda 2>&1 | tee "$OUT_DIR/bench_metrics.log"
python3 scripts/bench_feature_cache.py --images 4096 --workers 0 4 8 --json "$OUT_DIR/cache_io.json" 2>&1 \
    | tee "$OUT_DIR/cache_io.log"
python3 scripts/bench_eval.py --device cuda --repeats 3 --token-file-check --json "$OUT_DIR/bench_eval.json" 2>&1 \
    | tee "$OUT_DIR/bench_eval.log"
