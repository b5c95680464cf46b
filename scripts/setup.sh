#!/usr/bin/env bash
# Create .venv (if missing) and install uckpt with the exact versions of constraints.txt (torch 2.13.0
# CPU build, deepspeed 0.19.8, transformers 5.22.2 for tests; pyproject.toml itself declares ranges).
# Re-running is cheap: it reinstalls only when pyproject.toml or constraints.txt changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.uckpt-installed
want=$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  if ! .venv/bin/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[test]" \
      > .venv/pip.log 2>&1; then
    grep -v "is ignored: it is neither a file nor a directory" .venv/pip.log >&2 || true
    echo "setup: pip install failed (log: .venv/pip.log)" >&2
    exit 1
  fi
  .venv/bin/python -c "import torch, deepspeed, omegaconf, uckpt" 2>/dev/null \
    || { echo "setup: install failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
