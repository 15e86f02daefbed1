#!/usr/bin/env bash
# One machine: ddp-reduce starts NPROC ranks (gloo on a FileStore: no network port is opened);
# arguments are Hydra overrides.
#   scripts/run_local.sh reduce.op=sum optim.lr=0.05
#   NPROC=4 MAX_RESTARTS=2 RUN_DIR=outputs/mine scripts/run_local.sh train.checkpoint_every=50
# The run directory is pinned before launch, so a restarted attempt finds its checkpoints.
set -euo pipefail
source "$(dirname "$0")/project-env.bash"
NPROC=${NPROC:-2}
MAX_RESTARTS=${MAX_RESTARTS:-0}
RUN_DIR=${RUN_DIR:-outputs/$(date +%Y-%m-%d/%H-%M-%S)}
exec ddp-reduce "dist.nproc=$NPROC" "dist.max_restarts=$MAX_RESTARTS" "hydra.run.dir=$RUN_DIR" "$@"
