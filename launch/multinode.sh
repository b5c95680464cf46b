#!/usr/bin/env bash
# Several nodes, c10d rendezvous. Run the same command on every node (input and output folders must be
# on a filesystem all nodes see, as for DeepSpeed checkpoints):
#
#   launch/multinode.sh --nnodes 2 --node_rank 0 --rdzv_endpoint head-node:29500 --nproc_per_node 8 \
#       --input_folder IN --output_folder OUT [more uckpt flags / key=value]
#
# Each launcher option may come from the environment instead: NNODES, NODE_RANK, RDZV_ENDPOINT
# (or MASTER_ADDR + MASTER_PORT), NPROC_PER_NODE (default: number of GPUs, else 1), RDZV_ID.
set -euo pipefail
nnodes=${NNODES:-}
node_rank=${NODE_RANK:-}
endpoint=${RDZV_ENDPOINT:-${MASTER_ADDR:+$MASTER_ADDR:${MASTER_PORT:-29500}}}
nproc=${NPROC_PER_NODE:-}
rdzv_id=${RDZV_ID:-uckpt}
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --nnodes) nnodes=$2; shift 2 ;;
    --node_rank) node_rank=$2; shift 2 ;;
    --rdzv_endpoint) endpoint=$2; shift 2 ;;
    --nproc_per_node) nproc=$2; shift 2 ;;
    --rdzv_id) rdzv_id=$2; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
here="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-$( [ -x "$here/.venv/bin/python" ] && echo "$here/.venv/bin/python" || echo python3 )}
if [ -z "$nproc" ]; then
  nproc=$("$PYTHON" -c "import torch; print(max(1, torch.cuda.device_count()))" 2>/dev/null || echo 1)
fi
missing=()
[ -n "$nnodes" ] || missing+=("--nnodes (or NNODES)")
[ -n "$node_rank" ] || missing+=("--node_rank (or NODE_RANK)")
[ -n "$endpoint" ] || missing+=("--rdzv_endpoint (or RDZV_ENDPOINT, or MASTER_ADDR)")
if [ ${#missing[@]} -gt 0 ]; then
  echo "multinode.sh: missing ${missing[*]}" >&2
  exit 2
fi
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m torch.distributed.run --nnodes "$nnodes" --node_rank "$node_rank" --nproc_per_node "$nproc" \
  --rdzv_backend c10d --rdzv_endpoint "$endpoint" --rdzv_id "$rdzv_id" -m uckpt convert "${args[@]}"
