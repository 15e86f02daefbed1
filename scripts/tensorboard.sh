#!/usr/bin/env bash
# TensorBoard on a run or a sweep directory (default: the current directory).
#   scripts/tensorboard.sh multirun/2026-11-26/10-00-00
#   TB_HOST=0.0.0.0 scripts/tensorboard.sh outputs      # reachable from other machines
# Binds to 127.0.0.1 unless TB_HOST says otherwise, on TB_PORT (6006); extra arguments go to
# tensorboard. With more than 40 runs, TensorBoard's Custom Scalars and Scalars dashboards start
# with no run selected (empty charts): for such a directory this prints links that select them all.
set -euo pipefail
source "$(dirname "$0")/project-env.bash"
LOGDIR=${1:-.}
shift || true
HOST=${TB_HOST:-127.0.0.1}
PORT=${TB_PORT:-6006}
case "$HOST" in 0.0.0.0 | "::") URL_HOST=$(hostname) ;; *) URL_HOST=$HOST ;; esac

# TensorBoard's runs are the folders that hold event files, named by their path under LOGDIR.
# Its run selector keeps its state in the URL: runSelectionState, base64 of {"run": true, ...}.
python3 - "$LOGDIR" "http://$URL_HOST:$PORT/" <<'EOF' || echo "tensorboard.sh: could not list the runs" >&2
import base64, json, os, sys, urllib.parse

logdir, base = sys.argv[1], sys.argv[2]
runs = sorted(
    os.path.relpath(folder, logdir)
    for folder, _, files in os.walk(logdir)
    if any("tfevents" in f for f in files)
)
if len(runs) > 40:
    state = json.dumps({run: True for run in runs}).encode()  # ASCII: non-ASCII is \u-escaped
    arg = urllib.parse.quote(base64.b64encode(state).decode(), safe="")
    print(f"tensorboard.sh: {len(runs)} runs; TensorBoard selects none by default above 40.")
    print(f"  custom scalars, every run selected: {base}#custom_scalars&runSelectionState={arg}")
    print(f"  scalars, every run selected:        {base}#scalars&runSelectionState={arg}", flush=True)
EOF
exec tensorboard --logdir "$LOGDIR" --host "$HOST" --port "$PORT" "$@"
