#!/usr/bin/env bash
# Train with torchrun instead of DeepSpeed's launcher (no ssh: run this once on every node).
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node-001 NPROC=8 launch/torchrun.sh CONFIG [key=value ...]
set -euo pipefail
config=${1:?usage: launch/torchrun.sh CONFIG [key=value ...]}; shift
vdm-train --config "$config" "$@" --check
exec torchrun --nnodes "${NNODES:-1}" --node_rank "${NODE_RANK:-0}" --nproc_per_node "${NPROC:-2}" \
  --master_addr "${MASTER_ADDR:-127.0.0.1}" --master_port "${MASTER_PORT:-29500}" \
  "$(command -v vdm-train)" --config "$config" "$@"
