#!/usr/bin/env bash
# The one run a GPU node does (scripts/gpu_check.py: every CUDA path at toy scale, then the speed figures at
# ViT-L/14 size); `--cpu` runs the same check on the CPU. Outputs go to $OUT (default ./gpu_check_out).
# A node without internet that has PyTorch but not this project's other packages needs their wheels in
# .whl/ (ignored by git), downloaded elsewhere for its Python, e.g.
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl open_clip_torch ftfy wcwidth
# (the caption path also needs transformers, tokenizers, huggingface_hub and safetensors there).
# No `set -e`: a failing part is the check's finding, recorded in summary.json; the later parts still run.
cd "$(dirname "$0")/.." || exit 1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || echo "gpu_check.sh: installing .whl/ failed; going on with what is installed"
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export OUT="${OUT:-./gpu_check_out}"
PYTHON="${PYTHON:-python3}"
exec "$PYTHON" scripts/gpu_check.py --out "$OUT" "$@"
