# shellcheck shell=bash
# Helpers sourced by every launcher in launch/ (torchrun.sh, deepspeed.sh, slurm/*): nothing here runs on its own.

# The interpreter that has scaledkd installed. Launchers run `$PYTHON -m torch.distributed.run` (what the `torchrun`
# command runs) and `$PYTHON -m deepspeed.launcher.runner` (the `deepspeed` command), so the workers are started by
# this interpreter, never by a torchrun/deepspeed script that another environment put first on PATH.
PYTHON=${PYTHON:-python3}

# What each process runs, as python's arguments: SCALEDKD_ENTRY (word-split) replaces the default
# "-m scaledkd.cli distill", e.g. "-m scaledkd.cli finetune" or "my_probe.py"; the launcher's own arguments ("$@")
# follow it either way. Sets the array SCALEDKD_ENTRY_ARGS.
# The default entry resumes by itself (train.resume=auto: the newest complete checkpoint of output_dir, or a fresh
# start), so a requeued or re-submitted job continues where it stopped; a train.resume=... of your own comes later
# on the command line and wins.
scaledkd_entry_args() {
  # shellcheck disable=SC2034  # read by the scripts that source this file
  read -r -a SCALEDKD_ENTRY_ARGS <<<"${SCALEDKD_ENTRY:--m scaledkd.cli distill train.resume=auto}"
}

# A free TCP port on this machine: single-node runs pick one so that two jobs sharing a host never both take 29500.
scaledkd_free_port() {
  "$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])'
}

# GPUs this process may use: the entries of CUDA_VISIBLE_DEVICES when it is set, else what nvidia-smi lists;
# 1 when there are none (one CPU process; ask for more with NPROC_PER_NODE/NUM_GPUS).
scaledkd_local_gpus() {
  local n=0
  local -a ids
  if [[ -n ${CUDA_VISIBLE_DEVICES+set} ]]; then
    IFS=, read -r -a ids <<<"$CUDA_VISIBLE_DEVICES"
    n=${#ids[@]}
  elif command -v nvidia-smi >/dev/null 2>&1; then
    n=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU') || n=0
  fi
  echo $((n > 0 ? n : 1))
}

# Replace this shell with the command, logging it (shell-quoted) to stderr first; with DRY_RUN=1 print it to stdout
# and return instead.
scaledkd_exec() {
  local line
  line=$(printf '%q ' "$@")
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    echo "${line% }"
    return 0
  fi
  echo "+ ${line% }" >&2
  exec "$@"
}

# Exit status of a job that stopped on request (SIGTERM/SIGUSR1) after writing a checkpoint (scaledkd's
# PREEMPTED_EXIT, EX_TEMPFAIL): run it again (or requeue it) and train.resume=auto continues it.
SCALEDKD_PREEMPTED=75

# Run a command in the background and pass stop requests on: SIGUSR1 or SIGTERM received by this shell is sent, as
# SIGUSR1, to the command itself (`self`: srun, which forwards it to every node's tasks; another launcher script) or
# to the workers below it (`workers`: the processes at the leaves of its process tree, i.e. what torchrun or the
# deepspeed launcher started, so that the launchers themselves keep running while the workers checkpoint). Returns the command's status, or SCALEDKD_PREEMPTED when a stop was requested. DRY_RUN=1 prints the
# command, except for another of these launcher scripts (`bash <script>`), which runs and prints its own.
scaledkd_supervise() {
  local mode=$1
  shift
  if [[ ${DRY_RUN:-0} == 1 ]]; then
    if [[ $1 == bash ]]; then
      "$@"
      return
    fi
    scaledkd_exec "$@"
    return 0
  fi
  local line
  line=$(printf '%q ' "$@")
  echo "+ ${line% }" >&2
  _scaledkd_stop=0
  "$@" &
  _scaledkd_child=$!
  _scaledkd_mode=$mode
  trap _scaledkd_forward_stop USR1 TERM
  local rc=0
  while :; do
    wait "$_scaledkd_child" && rc=0 || rc=$?
    kill -0 "$_scaledkd_child" 2>/dev/null || break # else wait was interrupted by a trapped signal
  done
  trap - USR1 TERM
  if ((_scaledkd_stop)); then
    echo "scaledkd: stopped on request (the workers checkpointed); exit $SCALEDKD_PREEMPTED" >&2
    return "$SCALEDKD_PREEMPTED"
  fi
  return "$rc"
}

_scaledkd_forward_stop() {
  _scaledkd_stop=1
  echo "scaledkd: stop requested; asking the workers to checkpoint and leave" >&2
  if [[ $_scaledkd_mode == workers ]]; then
    local pid
    for pid in $(_scaledkd_leaves "$_scaledkd_child"); do
      kill -USR1 "$pid" 2>/dev/null || true
    done
  else
    kill -USR1 "$_scaledkd_child" 2>/dev/null || true
  fi
}

# The processes at the leaves of the process tree under $1 (itself when it has no children).
_scaledkd_leaves() {
  local kids kid
  kids=$(pgrep -P "$1" || true)
  if [[ -z $kids ]]; then
    echo "$1"
    return
  fi
  for kid in $kids; do
    _scaledkd_leaves "$kid"
  done
}

# In a SLURM job, put it back in the queue after a requested stop (the sbatch scripts ask for --requeue and for
# SIGUSR1 before the time limit); outside SLURM, say how to continue. Returns the status it was given.
scaledkd_requeue_if_stopped() {
  local rc=$1
  if ((rc == SCALEDKD_PREEMPTED)); then
    if [[ -n ${SLURM_JOB_ID:-} ]] && command -v scontrol >/dev/null 2>&1; then
      echo "scaledkd: requeueing job $SLURM_JOB_ID; it resumes from its checkpoint" >&2
      scontrol requeue "$SLURM_JOB_ID" || echo "scaledkd: scontrol requeue failed; resubmit the job" >&2
    else
      echo "scaledkd: not in a SLURM job: run the same command again to continue (train.resume=auto)" >&2
    fi
  fi
  return "$rc"
}
