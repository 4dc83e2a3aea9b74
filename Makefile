# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.setup-done
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup test test-fast lint format compile demo continual-demo bench clean

setup: $(STAMP)

# Kubeflow Trainer API models, one folder per CRD version (they share a module name), for the TrainJob
# tests when the CRDs of ../shared/reference are absent (see tests/doubles/trainjob_schema.py).
TRAINER_API_VERSIONS := 2.1.0 2.3.0

# Torch first, from the CPU build, and pinned by constraints.txt so nothing pulls a CUDA build.
# Then every runtime extra but gpu, and the test tools.
$(STAMP): pyproject.toml setup.py constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python >= 3.11 is required (set PYTHON=...)")'
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt "setuptools>=68" wheel torch==2.13.0
	$(PIP) install --quiet --disable-pip-version-check -c constraints.txt --no-build-isolation -e '.[all,dev]'
	@for version in $(TRAINER_API_VERSIONS); do \
		rm -rf $(VENV)/trainer-api/$$version && \
		$(PIP) install --quiet --disable-pip-version-check --no-deps \
			--target $(VENV)/trainer-api/$$version kubeflow-trainer-api==$$version || exit 1; \
	done
	@touch $@
	@echo "setup: $(VENV) is ready"

# One pytest worker per core (pytest-xdist; each worker computes on one thread, see tests/conftest.py).
test: setup
	$(PY) -m pytest -n auto --dist worksteal

test-fast: setup
	$(PY) -m pytest -n auto --dist worksteal -m "not slow"

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

compile: setup
	$(PY) -m pipelines.compile_all
	$(PY) -m pipelines.docs
	$(PY) -m kfp_components.components.reference

demo: setup
	$(PY) -m kfp_components.demo

# Pre-training (cached), then three tasks in sequence with full fine-tuning, LoRA and OSFT; writes
# docs/continual-learning.md and docs/continual.png.
continual-demo: setup
	$(PY) -m benchmarks.continual

bench: setup
	$(PY) -m benchmarks.run

clean:
	rm -rf build dist *.egg-info .pytest_cache .ruff_cache demo-output
