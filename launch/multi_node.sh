#!/usr/bin/env bash
# Train on several machines with DeepSpeed's launcher (ssh to each host in the hostfile).
#   launch/multi_node.sh HOSTFILE CONFIG [key=value ...]
# HOSTFILE lists "hostname slots=N" per machine (see launch/hostfile.example). Every host needs the
# same environment and the shards reachable at the same path (or a pipe: URL). Run from the first host.
set -euo pipefail
hostfile=${1:?usage: launch/multi_node.sh HOSTFILE CONFIG [key=value ...]}; shift
config=${1:?usage: launch/multi_node.sh HOSTFILE CONFIG [key=value ...]}; shift
master=${MASTER_ADDR:-$(awk 'NF && $1 !~ /^#/ {print $1; exit}' "$hostfile")}
port=${MASTER_PORT:-29500}
vdm-train --config "$config" "$@" --check
exec deepspeed --hostfile "$hostfile" --master_addr "$master" --master_port "$port" \
  "$(command -v vdm-train)" --config "$config" "$@"
