# shellcheck shell=bash
# Shared by scripts/launch_tpu.sh, scripts/launch_slurm.sbatch and tests/test_launch.py: the one
# command every worker of a multi-host run executes, and shell quoting. Source it from the repository
# root; it only defines functions.
#
# Every launcher starts the same `python -m vit_jax.main` on every host, with the same workdir, and
# always with --config.distributed=True: vit_jax.main then calls jax.distributed.initialize() with no
# arguments and JAX finds the coordinator, process count and index itself (Cloud TPU: from the TPU
# VM's metadata, which is not in the environment; SLURM: from srun's SLURM_* variables; by hand:
# JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID).

# shquote WORD...: prints the words quoted for a POSIX shell, space-separated, on one line. A word of
# characters no shell treats specially stays bare; any other is single-quoted, ' written as '\''.
# (The quoting of Python's shlex.quote, so `shlex.split` reads the line back word for word.)
shquote() {
  local w out=() IFS=' '
  for w in "$@"; do
    if [[ -n $w && $w != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
      out+=("$w")
    else
      out+=("'${w//\'/\'\\\'\'}'")
    fi
  done
  printf '%s\n' "${out[*]}"
}

# worker_argv PYTHON CONFIG WORKDIR [ARGS...]: sets the array WORKER_ARGV to the training command of
# every worker. ARGS (--config.key=value overrides) come last, as given.
worker_argv() {
  if [ $# -lt 3 ]; then
    echo "worker_argv: PYTHON CONFIG WORKDIR [ARGS...]" >&2
    return 2
  fi
  local python=$1 config=$2 workdir=$3
  shift 3
  WORKER_ARGV=("$python" -m vit_jax.main "--config=$config" "--workdir=$workdir"
               --config.distributed=True "$@")
}

# worker_command PYTHON CONFIG WORKDIR [ARGS...]: prints that command as one quoted shell line.
worker_command() {
  worker_argv "$@" || return
  shquote "${WORKER_ARGV[@]}"
}

# usage_error MESSAGE: the message and the script's usage (the caller's $USAGE) on stderr; exit 2.
usage_error() {
  printf 'error: %s\n\n%s\n' "$1" "$USAGE" >&2
  exit 2
}
