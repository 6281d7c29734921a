#!/usr/bin/env bash
# Launch `mamba-dist train` with the DeepSpeed launcher (`deepspeed`), on this node or on every node of a hostfile.
#
#   launch/deepspeed.sh --config configs/mamba-1.4b.yaml data.path=/data/pile parallel.zero_stage=2  # all GPUs here
#   NUM_GPUS=4 launch/deepspeed.sh --config ...                                   # this node, GPUs 0-3
#   HOSTFILE=launch/hostfile launch/deepspeed.sh --config ... parallel.tp=2 parallel.zero_stage=1
#       # every node in the hostfile (see launch/hostfile.example), started from this one over passwordless ssh
#       # (pdsh); this node must be the first in the hostfile or reachable as MASTER_ADDR.
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/deepspeed.sh --config ...
#       # no ssh: run the same command on every node with its NODE_RANK (like torchrun; NNODES > 1 turns it on)
#
# Environment: HOSTFILE (none: this node only), NUM_GPUS (processes per node; default: every GPU, or 1 on CPU),
# NNODES / NODE_RANK / MASTER_ADDR (the no-ssh mode), MASTER_PORT (29500), DS_LAUNCHER (pdsh | openmpi | slurm | ...,
# for HOSTFILE runs), DS_ARGS (more launcher arguments), MAX_RESTARTS (0; see the end). Every argument is passed to
# the trainer; the launcher adds
# --local_rank, which the trainer accepts.
# Remote nodes get only the environment variables named in ./.deepspeed_env (KEY=VALUE lines) and those starting
# with NCCL_ / PYTHON / UCX_: put e.g. NCCL_SOCKET_IFNAME there. The checkpoint directory must be on storage every
# node sees. On CPU each process gets OMP_NUM_THREADS = cores / processes unless it is already set.
set -euo pipefail

MASTER_PORT=${MASTER_PORT:-29500}
NNODES=${NNODES:-1}
args=(--master_port "$MASTER_PORT")
if [[ -n "${HOSTFILE:-}" ]]; then
  [[ -f "$HOSTFILE" ]] || { echo "launch/deepspeed.sh: HOSTFILE=$HOSTFILE does not exist" >&2; exit 2; }
  args+=(--hostfile "$HOSTFILE" --launcher "${DS_LAUNCHER:-pdsh}")
  if (( $(grep -cE '^[[:space:]]*[^#[:space:]]' "$HOSTFILE") == 1 )); then
    # one host: the launcher starts the processes locally, so skip its ssh check and `ssh host hostname -I`
    args+=(--no_ssh_check --master_addr "${MASTER_ADDR:-127.0.0.1}")
  elif [[ -n "${MASTER_ADDR:-}" ]]; then
    args+=(--master_addr "$MASTER_ADDR")
  fi
elif (( NNODES > 1 )); then
  [[ -n "${NODE_RANK:-}" && -n "${MASTER_ADDR:-}" ]] || {
    echo "launch/deepspeed.sh: NNODES=$NNODES needs NODE_RANK and MASTER_ADDR (or use HOSTFILE)" >&2; exit 2; }
  # --no_ssh: each node starts its own processes; the launcher still needs a (one-line-per-node) hostfile
  # to know how many nodes and slots there are.
  NPROC=${NUM_GPUS:-$(python -c "import torch; print(max(1, torch.cuda.device_count()))")}
  GEN_HOSTFILE=$(mktemp "${TMPDIR:-/tmp}/mamba-dist-hostfile.XXXXXX")
  trap 'rm -f "$GEN_HOSTFILE"' EXIT
  for ((i = 0; i < NNODES; i++)); do echo "node$i slots=$NPROC"; done > "$GEN_HOSTFILE"
  args+=(--hostfile "$GEN_HOSTFILE" --no_ssh --node_rank "$NODE_RANK" --master_addr "$MASTER_ADDR")
else
  args+=(--master_addr "${MASTER_ADDR:-127.0.0.1}")
fi
if [[ -n "${NUM_GPUS:-}" ]]; then
  args+=(--num_gpus "$NUM_GPUS")
elif [[ -z "${HOSTFILE:-}" ]] && ! python -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
  args+=(--num_gpus 1)  # CPU: DeepSpeed would count NUMA nodes as devices; one process unless NUM_GPUS says more
fi
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  nproc_here=${NUM_GPUS:-1}
  export OMP_NUM_THREADS=$(( $(nproc) / nproc_here > 0 ? $(nproc) / nproc_here : 1 ))
fi

# DS_ARGS: more launcher arguments, e.g. DS_ARGS="--include node0:0,1@node1 --bind_cores_to_rank"
# Restarts: the deepspeed launcher has none (it stops every rank when one fails), so MAX_RESTARTS=N re-runs it up to
# N times after a failure; each attempt resumes from the latest complete checkpoint (checkpoint.resume=auto). Not
# after exit code 2 (bad input) or 3 (halted), which would fail again, nor after SIGTERM/SIGINT/SIGUSR1 reached this
# script (preemption: the trainer saves and stops). MAMBA_DIST_RESTART_COUNT tells the ranks their attempt.
# Signals: the launcher runs in its own process group, and a signal this script receives goes to the whole group
# (on one node the deepspeed runner itself passes none on: its ranks would train on, orphaned); the script returns
# once every process of the group has exited.
set -m
stopping=0 child=0
forward() { stopping=1; (( child )) && kill -s "$1" -- "-$child" 2>/dev/null || true; }
for sig in TERM INT USR1; do trap "forward $sig" "$sig"; done
attempt=0
while true; do
  # shellcheck disable=SC2206
  MAMBA_DIST_RESTART_COUNT=$attempt deepspeed "${args[@]}" ${DS_ARGS:-} --module mamba_dist.train "$@" &
  child=$!
  rc=0; wait "$child" || rc=$?
  while kill -0 "$child" 2>/dev/null; do rc=0; wait "$child" || rc=$?; done  # wait returns early on a trap
  while kill -0 -- "-$child" 2>/dev/null; do sleep 1; done  # ranks still saving after a signal
  if (( rc == 0 || rc == 2 || rc == 3 || stopping || attempt >= ${MAX_RESTARTS:-0} )); then exit "$rc"; fi
  attempt=$((attempt + 1))
  echo "launch/deepspeed.sh: the launcher exited with code $rc; restart $attempt of $MAX_RESTARTS" >&2
done
