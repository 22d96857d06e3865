#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv at the repository root and installs
# requirements.txt into it; reinstalls only when requirements.txt changed. A torch already installed
# in .venv (say a CUDA build put there by hand for a GPU node) is kept: the pinned torch/torchvision
# lines are only installed into an environment that has no torch yet. Called by demo.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "[setup] creating $ROOT/.venv"
    "$PY" -m venv "$ROOT/.venv"
fi
STAMP="$ROOT/.venv/.requirements.sha256"
WANT="$(sha256sum "$ROOT/requirements.txt" | cut -d' ' -f1)"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    if "$ROOT/.venv/bin/python" -c "import torch, torchvision" 2>/dev/null; then
        echo "[setup] installing requirements.txt into .venv, keeping its torch $("$ROOT/.venv/bin/python" -c 'import torch; print(torch.__version__)')"
        grep -v -E '^(torch|torchvision)==' "$ROOT/requirements.txt" > "$ROOT/.venv/.requirements-no-torch.txt"
        "$ROOT/.venv/bin/python" -m pip install --disable-pip-version-check -q -r "$ROOT/.venv/.requirements-no-torch.txt"
    else
        echo "[setup] installing requirements.txt into .venv (first time: a few minutes)"
        "$ROOT/.venv/bin/python" -m pip install --disable-pip-version-check -q -r "$ROOT/requirements.txt"
    fi
    echo "$WANT" > "$STAMP"
fi
