#!/usr/bin/env bash
# Set everything up and run the test suite (what CI runs). Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export DS_ACCELERATOR=cpu
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
