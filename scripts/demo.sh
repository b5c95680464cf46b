#!/usr/bin/env bash
# Set everything up, then run the built-in example: train with DeepSpeed, convert with torchrun,
# resume at another DP size, print what happened.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu
PYTHONPATH="scripts${PYTHONPATH:+:$PYTHONPATH}" exec .venv/bin/python -m examples.demo "$@"
