#!/usr/bin/env bash
# Launch `mamba-dist train` with torchrun, on one node or many (run this script once on every node).
#
#   launch/torchrun.sh --config configs/mamba-130m.yaml data.path=/data/pile-neox-2048        # one node, all GPUs
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh --config ...                      # on node0
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 launch/torchrun.sh --config ...                      # on node1
#
# Environment: NNODES (1), NODE_RANK (0), NPROC_PER_NODE (GPUs on this node, or 1 on CPU), MASTER_ADDR (127.0.0.1),
# MASTER_PORT (29500), SHUTDOWN_TIMEOUT (300), MAX_RESTARTS (0). Every argument is passed to the trainer. The
# checkpoint directory must be on storage all nodes see. On CPU each process gets OMP_NUM_THREADS = cores / processes
# unless it is already set.
# Elastic restarts: MAX_RESTARTS=N (torchrun --max-restarts N) restarts every rank when one fails (killed, or exiting
# non-zero, e.g. code 4 when a peer stopped answering within parallel.timeout_s); each attempt resumes from the latest
# complete checkpoint (checkpoint.resume=auto).
# Preemption: SIGTERM or SIGUSR1 sent to torchrun is passed on to the trainer processes, which finish their step,
# write a checkpoint and exit; torchrun waits up to SHUTDOWN_TIMEOUT seconds for that (then SIGKILLs them) and
# exits non-zero, as it does on any signal. Run the same command again to resume.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
if [[ -z "${OMP_NUM_THREADS:-}" ]]; then
  export OMP_NUM_THREADS=$(( $(nproc) / NPROC_PER_NODE > 0 ? $(nproc) / NPROC_PER_NODE : 1 ))
fi

exec torchrun \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$NPROC_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" --max-restarts "${MAX_RESTARTS:-0}" \
  --signals_to_handle SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 --shutdown_timeout "${SHUTDOWN_TIMEOUT:-300}" \
  -m mamba_dist.train "$@"
