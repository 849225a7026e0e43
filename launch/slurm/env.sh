# shellcheck shell=bash
# Sourced by the SLURM scripts in launch/slurm/: turns a SLURM allocation into torchrun's rendezvous variables.
# Nothing runs on sourcing; call the functions. Every variable below keeps a value already set in the environment.
#
# scaledkd_slurm_env exports
#   MASTER_ADDR     the job's first host: `scontrol show hostnames "$SLURM_JOB_NODELIST"`, or the first word of
#                   SCALEDKD_HOSTNAMES (space-separated host names: dry runs, tests, nodes started by hand); 127.0.0.1
#                   when there is neither
#   MASTER_PORT     15000 + SLURM_JOB_ID % 20000, so that jobs sharing a node differ; 29500 outside a job
#   NNODES          SLURM_JOB_NUM_NODES, else the number of hosts
#   NODE_RANK       SLURM_NODEID (this node's index in the job), else 0
#   NPROC_PER_NODE  SLURM_GPUS_ON_NODE, else GPUS_PER_NODE, else the GPUs this node shows (1 without any)
#   OMP_NUM_THREADS the node's CPUs (SLURM_CPUS_PER_TASK or SLURM_CPUS_ON_NODE) shared by its processes, at least 1;
#                   left unset when SLURM gives no CPU count (torchrun then uses 1)
# scaledkd_nccl_env exports NCCL's defaults for these jobs (see below); scaledkd_use_srun says whether to start the
# nodes with srun.

_scaledkd_slurm_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source-path=SCRIPTDIR source=../common.sh
source "$_scaledkd_slurm_dir/../common.sh"

# The job's host names, one per line.
scaledkd_hostnames() {
  local -a given
  if [[ -n ${SCALEDKD_HOSTNAMES:-} ]]; then
    read -r -a given <<<"$SCALEDKD_HOSTNAMES"
    printf '%s\n' "${given[@]}"
  elif [[ -n ${SLURM_JOB_NODELIST:-} ]]; then
    scontrol show hostnames "$SLURM_JOB_NODELIST" ||
      { echo "env.sh: 'scontrol show hostnames' failed; set SCALEDKD_HOSTNAMES or MASTER_ADDR" >&2; return 1; }
  else
    echo 127.0.0.1
  fi
}

scaledkd_slurm_env() {
  local -a hosts=()
  if [[ -z ${MASTER_ADDR:-} || -z ${NNODES:-${SLURM_JOB_NUM_NODES:-}} ]]; then
    local listing
    listing=$(scaledkd_hostnames) || return 1
    read -r -d '' -a hosts <<<"$listing" || true  # -d '': the whole listing, split on newlines and blanks
  fi
  export MASTER_ADDR=${MASTER_ADDR:-${hosts[0]}}
  if [[ -n ${SLURM_JOB_ID:-} ]]; then
    export MASTER_PORT=${MASTER_PORT:-$((15000 + SLURM_JOB_ID % 20000))}
  else
    export MASTER_PORT=${MASTER_PORT:-29500}
  fi
  export NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${#hosts[@]}}}
  export NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
  export NPROC_PER_NODE=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-${GPUS_PER_NODE:-$(scaledkd_local_gpus)}}}

  local name
  for name in MASTER_PORT NNODES NODE_RANK NPROC_PER_NODE; do
    if [[ ! ${!name} =~ ^[0-9]+$ ]]; then
      echo "env.sh: $name=${!name} is not a whole number" >&2
      return 1
    fi
  done
  if ((NODE_RANK >= NNODES)); then
    echo "env.sh: NODE_RANK=$NODE_RANK must be below NNODES=$NNODES" >&2
    return 1
  fi

  local cpus=${SLURM_CPUS_PER_TASK:-${SLURM_CPUS_ON_NODE:-}}
  if [[ -z ${OMP_NUM_THREADS:-} && $cpus =~ ^[0-9]+$ ]]; then
    local threads=$((cpus / NPROC_PER_NODE))
    export OMP_NUM_THREADS=$((threads > 0 ? threads : 1))
  fi
}

# NCCL settings for multi-node jobs (ignored on CPU, where scaledkd uses gloo).
scaledkd_nccl_env() {
  # A rank that hits a NCCL error or timeout aborts the job instead of hanging until the wall-time limit. (The old
  # name NCCL_ASYNC_ERROR_HANDLING only matters before torch 2.2, older than scaledkd supports; newer torch warns
  # on every rank when it is set.)
  export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
  # WARN: quiet unless something is wrong; INFO prints the chosen transports (InfiniBand or sockets) per rank.
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  # If the nodes have several networks and NCCL/gloo pick one the others cannot reach (a hang at the first
  # collective), name the interface they share, for example:
  #   export NCCL_SOCKET_IFNAME=ib0 GLOO_SOCKET_IFNAME=ib0   (or eth0, ens*, or "^lo,docker" to exclude some)
}

# True when this script should reach the job's nodes through srun: inside a SLURM job, with srun installed, and
# SCALEDKD_NO_SRUN unset. Run by hand (once per node, or outside SLURM) the node's share starts directly.
scaledkd_use_srun() {
  [[ -n ${SLURM_JOB_ID:-} && ${SCALEDKD_NO_SRUN:-0} != 1 ]] && command -v srun >/dev/null 2>&1
}
