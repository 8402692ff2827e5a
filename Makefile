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

# CPU benchmarks (numbers go to benchmarks/results/, wall times to bench-times.md); see
# benchmarks/run_all.py. The full accuracy studies are run by hand (hours on 2 cores).
bench: setup
	$(PY) benchmarks/run_all.py
