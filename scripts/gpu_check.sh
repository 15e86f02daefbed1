#!/usr/bin/env bash
# The CUDA/NCCL checks, for a machine with a GPU: the CUDA tests, then the reduction and the
# comm-dtype benchmarks on NCCL. Arguments go to pytest.
#   scripts/gpu_check.sh
#   OUT=results scripts/gpu_check.sh -x      # also keep the logs and the benchmark's JSON in results/
set -euo pipefail
source "$(dirname "$0")/project-env.bash"
OUT=${OUT:-$(mktemp -d)}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version())" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q tests/test_cuda.py "$@" 2>&1 | tee "$OUT/pytest.log"
python3 -m ddp_reduce.bench reduce --device cuda --json "$OUT/bench_cuda.json" 2>&1 | tee "$OUT/bench.log"
python3 -m ddp_reduce.bench precision --device cuda --json "$OUT/bench_precision_cuda.json" 2>&1 | tee "$OUT/bench_precision.log"
