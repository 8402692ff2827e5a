#!/usr/bin/env bash
# The one GPU session (about 6 minutes on an H100/H200): install the carried wheels, then
#   1. the serving-path harness (benchmarks/gpu_harness.py: V1/V2 vs the reference, sync-free, timings);
#   2. the CUDA bf16 vs CPU float32 extraction agreement test (tests/unit/test_offline_scale.py);
#   3. the offline tools on the 8B-class shape (benchmarks/offline.py: extraction, warm start).
# Each step runs even if one before it failed; results land in $OUT as they are written.
# From this machine, after scripts/gpu_wheels.sh:
#   device run: bash benchmarks/gpu_run.sh      (carry: [".whl"], timeout_s: 540)
# `bash benchmarks/gpu_run.sh offline` runs steps 2 and 3 (about 3 minutes).
set -uo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/gpu-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,clocks.max.memory --format=csv || true
python3 -c "import torch, triton, transformers, peft; print('torch', torch.__version__, '| triton', triton.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
status=0
STEPS=${1:-all}
if [ "$STEPS" = all ]; then
echo "== 1/3 serving-path harness"
timeout 200 python3 -m benchmarks.gpu_harness --out "$OUT" > "$OUT/harness.log" 2>&1 || { echo "harness failed ($?)"; status=1; }
tail -n 25 "$OUT/harness.log"
fi
echo "== 2/3 CUDA bf16 vs CPU float32 extraction"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/unit/test_offline_scale.py -k "cuda or batched" > "$OUT/pytest-offline.log" 2>&1 || { echo "pytest failed ($?)"; status=1; }
tail -n 15 "$OUT/pytest-offline.log"
echo "== 3/3 offline tools, 8B-class shape"
timeout 240 python3 -m benchmarks.offline --out "$OUT" > "$OUT/offline.log" 2>&1 || { echo "offline failed ($?)"; status=1; }
tail -n 30 "$OUT/offline.log"
exit $status
