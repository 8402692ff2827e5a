#!/usr/bin/env bash
# Fetch the wheels the GPU harness needs that the GPU machines lack (they have torch, Triton,
# numpy and safetensors but not pydantic), for their Python 3.12 x86-64, into .whl/ (ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
PY=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl \
  "pydantic==$("$PY" -c 'import pydantic; print(pydantic.VERSION)')" \
  "pydantic-core==$("$PY" -c 'import pydantic_core; print(pydantic_core.__version__)')" \
  annotated-types typing-inspection
ls -la .whl
