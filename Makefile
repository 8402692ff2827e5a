# svd-vllm: `make demo` runs the main job, `make test` runs the tests. Both set up first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.svd-vllm-installed
EXTRAS ?= cpu,server,bench,dev

.PHONY: setup test lint format demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	VENV=$(VENV) PYTHON=$(PYTHON) EXTRAS=$(EXTRAS) bash scripts/setup.sh
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

demo: setup
	$(VENV)/bin/svd-vllm demo

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info

# CPU benchmarks (numbers go to benchmarks/results/); see each script's docstring.
bench: setup
	$(PY) benchmarks/kernel.py
	$(PY) benchmarks/processor.py
	$(PY) benchmarks/sidecar.py
	$(PY) benchmarks/accuracy.py --quick
