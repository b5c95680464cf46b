#!/usr/bin/env bash
# One node: launch/convert.sh NPROC --input_folder IN --output_folder OUT [more uckpt flags / key=value]
# Starts NPROC converter ranks with torchrun --standalone (NCCL when every rank has a GPU, gloo otherwise).
set -euo pipefail
if [ $# -lt 1 ] || ! [[ "$1" =~ ^[0-9]+$ ]]; then
  echo "usage: $0 NPROC --input_folder IN --output_folder OUT [flags...]" >&2
  exit 2
fi
nproc=$1; shift
here="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-$( [ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3 )}
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m torch.distributed.run --standalone --nnodes 1 --nproc_per_node "$nproc" -m uckpt convert "$@"
