#!/usr/bin/env bash
# One node: torchrun --standalone with NPROC ranks; arguments are Hydra overrides.
#   scripts/run_local.sh reduce.op=sum optim.lr=0.05
#   NPROC=4 MAX_RESTARTS=2 RUN_DIR=outputs/mine scripts/run_local.sh train.checkpoint_every=50
# The run directory is pinned before launch, so a restarted attempt finds its checkpoints.
set -euo pipefail
NPROC=${NPROC:-2}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RUN_DIR=${RUN_DIR:-outputs/$(date +%Y-%m-%d/%H-%M-%S)}
# gloo restarts hang or fail to connect without this (pytorch/pytorch#135712)
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
exec torchrun --standalone --nproc-per-node "$NPROC" --max-restarts "$MAX_RESTARTS" \
    -m ddp_reduce.train "hydra.run.dir=$RUN_DIR" "$@"
