#!/usr/bin/env bash
# Creates (or reuses) the virtual environment .venv at the repository root and installs
# requirements.txt into it; reinstalls only when requirements.txt changed. Sourced by demo.sh/test.sh.
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
    echo "[setup] installing requirements.txt into .venv (first time: a few minutes)"
    "$ROOT/.venv/bin/python" -m pip install --disable-pip-version-check -q -r "$ROOT/requirements.txt"
    echo "$WANT" > "$STAMP"
fi
