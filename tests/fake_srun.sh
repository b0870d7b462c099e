#!/usr/bin/env bash
# Stands in for SLURM's srun in tests/test_launch.py (put on PATH as `srun`): starts --ntasks copies of
# the command on this machine, each with the variables srun gives a task (SLURM_PROCID, SLURM_LOCALID,
# SLURM_NODEID, SLURM_NTASKS, SLURM_STEP_NODELIST=127.0.0.1, SLURM_STEP_NUM_NODES) and its output in
# --output (%x, %j, %t replaced). Like --kill-on-bad-exit, the first task to fail ends the others;
# exits with the first non-zero status, else 0. SIGTERM / SIGINT end every task.
set -u
ntasks=1 per_node=1 nodes=1 output=/dev/stdout
while [ $# -gt 0 ]; do
  case $1 in
    --ntasks=*) ntasks=${1#*=} ;;
    --ntasks-per-node=*) per_node=${1#*=} ;;
    --nodes=*) nodes=${1#*=} ;;
    --output=*) output=${1#*=} ;;
    --*) ;;
    *) break ;;
  esac
  shift
done
pids=()
stop() { kill "${pids[@]}" 2> /dev/null; wait; }
trap 'stop; exit 143' TERM INT
for ((t = 0; t < ntasks; t++)); do
  out=${output//%t/$t}
  out=${out//%j/${SLURM_JOB_ID:-0}}
  out=${out//%x/${SLURM_JOB_NAME:-job}}
  SLURM_PROCID=$t SLURM_LOCALID=$((t % per_node)) SLURM_NODEID=$((t / per_node)) \
    SLURM_NTASKS=$ntasks SLURM_STEP_NODELIST=127.0.0.1 SLURM_STEP_NUM_NODES=$nodes \
    "$@" >> "$out" 2>&1 &
  pids+=($!)
done
for ((t = 0; t < ntasks; t++)); do
  wait -n
  rc=$?
  if [ $rc != 0 ]; then
    stop
    exit $rc
  fi
done
exit 0
