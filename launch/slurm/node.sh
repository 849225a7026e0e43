#!/usr/bin/env bash
# One node's share of a SLURM job: the rendezvous variables from SLURM (env.sh), then torchrun.sh with one process
# per GPU. The .sbatch scripts start it, through srun on every node of a multi-node job; it reads this node's
# SLURM_NODEID itself, so the same command serves every node.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=env.sh
source "$here/env.sh"
scaledkd_slurm_env
echo "scaledkd: node $NODE_RANK of $NNODES ($(hostname)): NPROC_PER_NODE=$NPROC_PER_NODE," \
  "rendezvous at $MASTER_ADDR:$MASTER_PORT" >&2
exec bash "$here/../torchrun.sh" "$@"
