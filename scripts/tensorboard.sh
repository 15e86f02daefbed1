#!/usr/bin/env bash
# TensorBoard on a run or a sweep directory (default: every run under outputs/ and multirun/).
#   scripts/tensorboard.sh multirun/2026-11-26/10-00-00
#   TB_HOST=0.0.0.0 scripts/tensorboard.sh outputs      # reachable from other machines
# Binds to 127.0.0.1 unless TB_HOST says otherwise; extra arguments go to tensorboard.
set -euo pipefail
LOGDIR=${1:-.}
shift || true
exec tensorboard --logdir "$LOGDIR" --host "${TB_HOST:-127.0.0.1}" --port "${TB_PORT:-6006}" "$@"
