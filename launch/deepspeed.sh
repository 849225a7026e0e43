#!/usr/bin/env bash
# DeepSpeed launcher: every process runs `python -m scaledkd.cli distill RECIPE key=value ...` (the launcher appends
# --local_rank=N, which the CLI drops). Run it from the repository root (recipes name ds_configs/ relative to it).
#
#   this machine, every GPU:   launch/deepspeed.sh recipes/my_recipe.yaml train.max_steps=1000
#   several machines:          HOSTFILE=launch/hostfile.example launch/deepspeed.sh recipes/my_recipe.yaml
#     (started once, on the first host: DeepSpeed reaches the others over passwordless ssh with pdsh, in the same
#     directory, so the repository and the Python environment must be at the same path everywhere, e.g. on a shared
#     filesystem. Only NCCL_*, PYTHON*, UCX_* and the variables listed in ./.deepspeed_env or ~/.deepspeed_env reach
#     the other hosts.)
#   several machines, no ssh:  HOSTFILE=hosts NODE_RANK=<i> MASTER_ADDR=<first host> launch/deepspeed.sh RECIPE
#     (started on every host with its own NODE_RANK, DeepSpeed's --no_ssh mode: nothing is reached over ssh)
#   CPU test (gloo):           NUM_GPUS=2 OMP_NUM_THREADS=1 DS_ACCELERATOR=cpu launch/deepspeed.sh RECIPE
#     DeepSpeed's flag for CPU processes is --num_accelerators, an alias of the --num_gpus used here. scaledkd sets
#     DS_ACCELERATOR=cpu itself when there is no GPU; setting it here only spares the launcher a warning.
#
# Environment (all optional):
#   HOSTFILE        MPI-style hostfile, one "hostname slots=GPUS" per line (see launch/hostfile.example); without it
#                   only this machine is used
#   NNODES          use the first NNODES hosts of the hostfile (all of them)
#   NODE_RANK       with HOSTFILE: this host's index in it; every host runs this script itself (--no_ssh)
#   NUM_GPUS        processes per host, on GPUs 0..NUM_GPUS-1 (every GPU / every slot)
#   MASTER_ADDR     the first host's address as the others see it (DeepSpeed infers it with `hostname -I`)
#   MASTER_PORT     rendezvous port (one machine: a free port; with a hostfile: 29500)
#   SCALEDKD_ENTRY  what each process runs instead of "-m scaledkd.cli distill train.resume=auto", e.g.
#                   "-m scaledkd.cli finetune" or a script; the arguments given to this script follow it
#   PYTHON          the interpreter with scaledkd installed (python3 on PATH, i.e. the active environment)
#   DRY_RUN=1       print the deepspeed command instead of running it
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=common.sh
source "$here/common.sh"

launcher=("$PYTHON" -m deepspeed.launcher.runner)
if [[ -n ${HOSTFILE:-} ]]; then
  [[ -f $HOSTFILE ]] || { echo "deepspeed.sh: HOSTFILE=$HOSTFILE does not exist" >&2; exit 2; }
  launcher+=(--hostfile "$HOSTFILE")
  MASTER_PORT=${MASTER_PORT:-29500}
else
  MASTER_PORT=${MASTER_PORT:-$(scaledkd_free_port)}
fi
if [[ -n ${NNODES:-} ]]; then launcher+=(--num_nodes "$NNODES"); fi
if [[ -n ${NODE_RANK:-} ]]; then
  [[ -n ${HOSTFILE:-} ]] || { echo "deepspeed.sh: NODE_RANK needs HOSTFILE (the hosts of every node)" >&2; exit 2; }
  launcher+=(--no_ssh --node_rank "$NODE_RANK")
fi
if [[ -n ${NUM_GPUS:-} ]]; then launcher+=(--num_gpus "$NUM_GPUS"); fi
if [[ -n ${MASTER_ADDR:-} ]]; then launcher+=(--master_addr "$MASTER_ADDR"); fi
launcher+=(--master_port "$MASTER_PORT")
scaledkd_entry_args
# The deepspeed launcher spells python's -m as --module.
if [[ ${SCALEDKD_ENTRY_ARGS[0]} == -m ]]; then SCALEDKD_ENTRY_ARGS[0]=--module; fi

# SIGTERM/SIGUSR1 reach the workers, which checkpoint and leave (exit 75; see torchrun.sh).
rc=0
scaledkd_supervise workers "${launcher[@]}" "${SCALEDKD_ENTRY_ARGS[@]}" "$@" || rc=$?
exit "$rc"
