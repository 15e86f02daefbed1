#!/usr/bin/env bash
# One node of a multi-node run, on torchrun's c10d rendezvous. Start it on every node with the
# same NNODES, MASTER_ADDR, MASTER_PORT and RDZV_ID; arguments are Hydra overrides.
#   node A: NNODES=2 MASTER_ADDR=10.0.0.1 RDZV_ID=exp1 scripts/run_multinode.sh reduce.op=sum
#   node B: NNODES=2 MASTER_ADDR=10.0.0.1 RDZV_ID=exp1 scripts/run_multinode.sh reduce.op=sum
# MASTER_ADDR is the node that hosts the rendezvous (127.0.0.1: all nodes on this machine).
# RUN_DIR must be the same path on every node (rank 0 writes it; shared storage or not).
set -euo pipefail
source "$(dirname "$0")/project-env.bash"
NNODES=${NNODES:-2}
NPROC=${NPROC:-1}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29400}
RDZV_ID=${RDZV_ID:-ddp-reduce}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RUN_DIR=${RUN_DIR:-outputs/multinode/$RDZV_ID}
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec torchrun --nnodes "$NNODES" --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" --log-dir "$RUN_DIR/torchelastic" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" --rdzv-id "$RDZV_ID" \
    -m ddp_reduce.train "hydra.run.dir=$RUN_DIR" "$@"
