#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one or many hosts): prints, and with --run runs, the gcloud commands
# that copy this project to every worker, set up its venv there and start `python -m vit_jax.main` on
# all workers at once. Run it from a clone of the project on your own machine; it needs git (and, for
# --run, gcloud logged in). Flags checked against `gcloud compute tpus tpu-vm {create,scp,ssh} --help`.
# shellcheck disable=SC2016  # backquotes in the text, not a command
USAGE='usage: scripts/launch_tpu.sh NAME ZONE TYPE --workdir=DIR [options] -- CONFIG [ARGS...]

  NAME ZONE TYPE    the TPU VM, its zone and accelerator type (v4-32, v5litepod-16, v5p-64,
                    v6e-16, ...; v5e-N is written v5litepod-N for gcloud)
  --workdir=DIR     checkpoints and logs of the run, the same for every worker: a path all
                    workers share (a gcsfuse or Filestore mount) or gs://BUCKET/PATH. Running the
                    same command again resumes from its latest checkpoint.
  CONFIG [ARGS...]  what `python -m vit_jax.main` takes: configs/X.py[:ARGS] and --config.k=v

options:
  --project=P       Google Cloud project (default: gcloud'"'"'s configured one)
  --run             run the commands (default: only print them)
  --create          first create the TPU VM (--version=V: its runtime; default from TYPE)
  --spot            with --create: a Spot VM (it can be preempted; see README, preemption)
  --dir=D           project folder on the workers (default vit_jax, in the home folder)
  --python=P        interpreter for the venv, 3.11 or newer (default python3.11; installed
                    with apt when missing)
  --no-setup        skip copying and the venv: start only (same commit already set up)
  --stop            instead of starting: SIGTERM the training on every worker (it saves a
                    checkpoint and exits; start again to resume)'
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/_launch_common.sh
source scripts/_launch_common.sh

[ $# -ge 3 ] || usage_error "NAME ZONE TYPE are required"
name=$1 zone=$2 type=$3
shift 3
for positional in "$name" "$zone" "$type"; do
  case $positional in -*) usage_error "NAME ZONE TYPE come first (got '$positional')" ;; esac
done

project="" workdir="" run=0 create=0 version="" spot=0 dir=vit_jax python=python3.11 setup=1 stop=0
while [ $# -gt 0 ]; do
  opt=$1
  case $opt in
    --) shift; break ;;
    --run) run=1 ;;
    --create) create=1 ;;
    --spot) spot=1 ;;
    --no-setup) setup=0 ;;
    --stop) stop=1 ;;
    --project=* | --workdir=* | --version=* | --dir=* | --python=*) ;;
    --project | --workdir | --version | --dir | --python)
      [ $# -ge 2 ] || usage_error "$opt needs a value"
      opt="$1=$2"
      shift ;;
    *) usage_error "unknown option '$opt'" ;;
  esac
  case $opt in
    --project=*) project=${opt#*=} ;;
    --workdir=*) workdir=${opt#*=} ;;
    --version=*) version=${opt#*=} ;;
    --dir=*) dir=${opt#*=} ;;
    --python=*) python=${opt#*=} ;;
  esac
  shift
done
if [ "$stop" = 0 ]; then
  [ "${opt:-}" = -- ] || usage_error "'-- CONFIG [ARGS...]' is missing"
  [ $# -ge 1 ] || usage_error "CONFIG is missing after '--'"
  [ -n "$workdir" ] || usage_error "--workdir is required: every worker writes its checkpoint shards there"
  case $workdir in
    gs://* | /*) ;;
    *) usage_error "--workdir must be gs://... or an absolute path that every worker shares (got '$workdir')" ;;
  esac
fi
[ -n "$dir" ] || usage_error "--dir is empty"

# gcloud calls v5e "v5litepod"; the plan's topology names (v5e-16) are accepted too.
case $type in v5e-*) type=v5litepod-${type#v5e-} ;; esac
if [ "$create" = 1 ] && [ -z "$version" ]; then
  # TPU software versions for JAX (https://cloud.google.com/tpu/docs/runtimes).
  case $type in
    v6e-*) version=v2-alpha-tpuv6e ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v5litepod-*) version=v2-alpha-tpuv5-lite ;;
    v2-* | v3-* | v4-*) version=tpu-ubuntu2204-base ;;
    *) usage_error "no default runtime for TYPE '$type': give --version (gcloud compute tpus tpu-vm versions list)" ;;
  esac
fi

flags=("--zone=$zone")
[ -n "$project" ] && flags+=("--project=$project")
# step COMMENT COMMAND...: prints the comment and the command (quoted, one line); runs it with --run.
step() {
  printf '# %s\n' "$1"
  shift
  shquote "$@"
  if [ "$run" = 1 ]; then
    "$@"
  fi
}
ssh_all() {  # ssh_all COMMENT REMOTE_COMMAND
  step "$1" gcloud compute tpus tpu-vm ssh "$name" "${flags[@]}" --worker=all "--command=$2"
}
qdir=$(shquote "$dir")
# Each worker's log and pid file, named after its host (every worker runs the same command); the
# remote shell expands it.
# shellcheck disable=SC2016
log='logs/"$(hostname)"'

if [ "$stop" = 1 ]; then
  ssh_all "stop the training on every worker (SIGTERM: it saves a checkpoint, then exits)" \
    "cd $qdir && kill -TERM \"\$(cat $log.pid)\""
  exit 0
fi

commit=$(git rev-parse HEAD)
tarball="${TMPDIR:-/tmp}/vit_jax-${commit:0:12}.tar.gz"
echo "# vit_jax on TPU VM $name ($type, $zone): commit ${commit:0:12}, workdir $workdir"
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "# note: uncommitted changes are not copied (git archive takes the commit); commit them first" >&2
fi
case $workdir in
  gs://*) echo "# note: vit_jax.main writes config.json and metrics.jsonl with plain file I/O; a gs:// workdir keeps only the checkpoints in the bucket. A gcsfuse mount of the bucket at the same path on every worker keeps everything there." >&2 ;;
esac
if [ "$run" = 1 ]; then
  echo "# --worker=all opens one ssh per worker: load your key first (ssh-add ~/.ssh/google_compute_engine)" >&2
fi

if [ "$create" = 1 ]; then
  create_cmd=(gcloud compute tpus tpu-vm create "$name" "${flags[@]}" "--accelerator-type=$type"
              "--version=$version")
  [ "$spot" = 1 ] && create_cmd+=(--spot)
  step "create the TPU VM" "${create_cmd[@]}"
fi

if [ "$setup" = 1 ]; then
  step "pack the project: the tracked files of commit ${commit:0:12}" \
    git archive --format=tar.gz "--output=$tarball" "$commit"
  step "copy it to every worker" \
    gcloud compute tpus tpu-vm scp "$tarball" "$name:vit_jax_src.tar.gz" "${flags[@]}" --worker=all
  qpy=$(shquote "$python")
  install_python=""
  if [[ $python =~ ^python3\.[0-9]+$ ]]; then  # TPU VM images are Ubuntu 22.04 (Python 3.10)
    install_python="{ command -v $qpy > /dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $python $python-venv; }; } && "
  fi
  # libtpu (requirements-tpu.txt) is the TPU runtime jax loads; requirements.txt pins jax itself.
  ssh_all "unpack it and set up the venv on every worker" \
    "mkdir -p $qdir && tar -xzf vit_jax_src.tar.gz -C $qdir && cd $qdir && ${install_python}$qpy -m venv .venv && .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -r requirements.txt -r requirements-tpu.txt"
fi

train=$(worker_command .venv/bin/python "$1" "$workdir" "${@:2}")
# nohup and a detached stdin/stdout: the training outlives the ssh session. A second start while one
# runs would find the TPU busy, so it is refused.
ssh_all "start training on every worker at once (log and pid: $dir/logs/HOSTNAME.{log,pid})" \
  "cd $qdir && mkdir -p logs && if [ -f $log.pid ] && kill -0 \"\$(cat $log.pid)\" 2> /dev/null; then echo \"vit_jax already runs on \$(hostname); stop it first (--stop)\" >&2; exit 1; fi && { nohup $train > $log.log 2>&1 < /dev/null & echo \$! > $log.pid; }"
echo "# follow worker 0 (process 0 logs the progress; the others log warnings only):"
echo "#   $(shquote gcloud compute tpus tpu-vm ssh "$name" "${flags[@]}" --worker=0 "--command=tail -n 50 -f $dir/logs/*.log")"
