#!/usr/bin/env bash
# Train on one machine: NPROC ranks (GPUs, or CPU processes when there is no GPU).
#   launch/single_node.sh CONFIG [key=value ...]        e.g. NPROC=8 launch/single_node.sh configs/base.yaml
# The config and the data are checked before any rank starts.
set -euo pipefail
config=${1:?usage: launch/single_node.sh CONFIG [key=value ...]}; shift
nproc=${NPROC:-2}
port=${MASTER_PORT:-29500}
vdm-train --config "$config" "$@" --check
exec deepspeed --num_gpus "$nproc" --master_port "$port" "$(command -v vdm-train)" --config "$config" "$@"
