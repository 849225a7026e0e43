# shellcheck shell=bash
# Helpers sourced by every launcher in launch/ (torchrun.sh, deepspeed.sh, slurm/*): nothing here runs on its own.

# The interpreter that has scaledkd installed. Launchers run `$PYTHON -m torch.distributed.run` (what the `torchrun`
# command runs) and `$PYTHON -m deepspeed.launcher.runner` (the `deepspeed` command), so the workers are started by
# this interpreter, never by a torchrun/deepspeed script that another environment put first on PATH.
PYTHON=${PYTHON:-python3}

# What each process runs, as python's arguments: SCALEDKD_ENTRY (word-split) replaces the default
# "-m scaledkd.cli distill", e.g. "-m scaledkd.cli finetune" or "my_probe.py"; the launcher's own arguments ("$@")
# follow it either way. Sets the array SCALEDKD_ENTRY_ARGS.
scaledkd_entry_args() {
  # shellcheck disable=SC2034  # read by the scripts that source this file
  read -r -a SCALEDKD_ENTRY_ARGS <<<"${SCALEDKD_ENTRY:--m scaledkd.cli distill}"
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
