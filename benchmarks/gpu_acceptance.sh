#!/usr/bin/env bash
# The GPU acceptance run (see benchmarks/gpu_acceptance.py): pytest -m gpu, the executor
# benchmark for both models at batch 1 and 8, and an nsys capture if nsys exists, within 7
# minutes on a fresh H100/H200 with no network. Options: --wheels DIR --out DIR --dry-run.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
exec "${PYTHON:-python3}" "$here/gpu_acceptance.py" "$@"
