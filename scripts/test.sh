#!/usr/bin/env bash
# README command 2: set up .venv if needed, then run the test suite (CPU only, offline).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q -rs tests "$@"  # -rs: each skipped test with its reason
