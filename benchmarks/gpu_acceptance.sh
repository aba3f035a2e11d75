#!/usr/bin/env bash
# Every figure owed on a GPU in one command (docs/PERFORMANCE.md, "The acceptance run"):
#   benchmarks/gpu_acceptance.sh OUT_DIR [--budget-s 480] [--steps a,b] [--list] [--dry-run]
# Runs from this checkout's src/ (no install, no network); $PYTHON picks the interpreter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root/src${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" -m dsv4.acceptance "$@"
