#!/usr/bin/env bash
# torchrun launcher, one node or several: every process runs `python -m scaledkd.cli distill RECIPE key=value ...`.
# Run it from the repository root (recipes name ds_configs/ relative to it).
#
#   one node, every visible GPU:   launch/torchrun.sh recipes/my_recipe.yaml train.max_steps=1000
#   two nodes, once on each:       NNODES=2 NODE_RANK=0 MASTER_ADDR=node-a MASTER_PORT=29500 launch/torchrun.sh RECIPE
#                                  NNODES=2 NODE_RANK=1 MASTER_ADDR=node-a MASTER_PORT=29500 launch/torchrun.sh RECIPE
#   CPU test (gloo, 2 processes):  NPROC_PER_NODE=2 OMP_NUM_THREADS=1 launch/torchrun.sh RECIPE
#
# Environment (all optional):
#   NNODES          nodes taking part (1)
#   NODE_RANK       this node's index, 0..NNODES-1 (0); node 0 hosts the rendezvous
#   NPROC_PER_NODE  processes on this node, one per GPU (the GPUs in CUDA_VISIBLE_DEVICES, else those nvidia-smi
#                   lists; 1 without GPUs)
#   MASTER_ADDR     node 0's address, reachable from every node (127.0.0.1)
#   MASTER_PORT     rendezvous port on node 0, the same on every node (one node: a free port; several: 29500)
#   SCALEDKD_ENTRY  what each process runs instead of "-m scaledkd.cli distill train.resume=auto", e.g.
#                   "-m scaledkd.cli finetune" or a script; the arguments given to this script follow it
#   PYTHON          the interpreter with scaledkd installed (python3 on PATH, i.e. the active environment)
#   DRY_RUN=1       print the torchrun command instead of running it
# scaledkd picks NCCL on GPUs and gloo on CPU by itself; there is nothing to switch for the CPU variant.
# SIGTERM or SIGUSR1 to this script: the workers finish their optimiser step, write a checkpoint and leave; the
# script exits 75 and the same command continues the run (train.resume=auto is the default).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
NPROC_PER_NODE=${NPROC_PER_NODE:-$(scaledkd_local_gpus)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
if [[ -z ${MASTER_PORT:-} ]]; then
  if ((NNODES == 1)); then MASTER_PORT=$(scaledkd_free_port); else MASTER_PORT=29500; fi
fi
scaledkd_entry_args

# SIGTERM/SIGUSR1 reach the workers (not torchrun, which would kill them): they checkpoint and leave with exit 75.
rc=0
scaledkd_supervise workers "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --node_rank "$NODE_RANK" \
  --nproc_per_node "$NPROC_PER_NODE" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  "${SCALEDKD_ENTRY_ARGS[@]}" "$@" || rc=$?
exit "$rc"
