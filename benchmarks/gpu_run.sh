#!/usr/bin/env bash
# The one GPU check (about 2-3 minutes): install the carried wheels, run the harness, copy the
# results to $OUT. From this machine, after scripts/gpu_wheels.sh:
#   device run: bash benchmarks/gpu_run.sh      (carry: [".whl"], timeout_s: 420)
set -euo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
python3 -c "import torch, triton; print('torch', torch.__version__, '| triton', triton.__version__)"
python3 benchmarks/gpu_harness.py --out "${OUT:-benchmarks/results}" 2>&1 | tee "${OUT:-/tmp}/harness.log"
