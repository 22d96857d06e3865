#!/usr/bin/env bash
# README command 1: set up .venv if needed, then run the whole pipeline on the embedded toy world
# (generated data, a toy CLIP trained on its web part, FTI4CIR) on the CPU. Extra arguments go to scripts/demo.py.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python scripts/demo.py "$@"
