#!/usr/bin/env bash
# Reproducible throughput benchmark of tcia-async against its baselines, on this machine, against the simulator
# on loopback. Usage: ./bench.sh [--quick|--full] [--only SCENARIO,...] [--out DIR] [--keep]
# Results: benchmarks/results/summary.json, report.md, *.png. See benchmarks/bench.py for the scenarios.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON="${PYTHON:-}"
if [ -z "$PYTHON" ]; then
    if [ -n "${VIRTUAL_ENV:-}" ]; then PYTHON="$VIRTUAL_ENV/bin/python"
    elif [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python
    else PYTHON="$(command -v python3 || command -v python)"
    fi
fi
exec "$PYTHON" benchmarks/bench.py "$@"
