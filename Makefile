# The two commands the README promises: `make demo` (service end to end) and `make test` (the suite).
SHELL := /bin/bash
.DEFAULT_GOAL := help
VENV := .venv
PY := $(VENV)/bin/python
PYTHON ?= $(shell command -v python3.11 || command -v python3)

export RAY_AUTH_MODE := token
export RAY_USAGE_STATS_ENABLED := 0
export HF_HUB_OFFLINE := 1
export OMP_NUM_THREADS ?= 1
export TOKENIZERS_PARALLELISM := false

.PHONY: help install browser demo stop test lint bench bench-rollout bench-quality bench-ingest bench-embedding bench-generation bench-autoscale gpu-check chatchat-check
help:
	@echo "make demo   start local Ray, ingest the sample KB, deploy, stream an answer"
	@echo "make stop   drain and remove the apps, stop Ray"
	@echo "make test   install what the tests need and run lint, types and the whole suite"
	@echo "make bench  benchmark Serve HTTP vs the Serve floor and in-process (needs make demo running)"
	@echo "make bench-rollout  upgrades and rollouts under load, three ways (about 20 minutes)"
	@echo "make bench-quality  rollouts judged on answer quality under sticky clients (about 12 minutes)"
	@echo "make bench-embedding  the embedding runtimes in-process: question latency, ingest chunks/s, cosine to torch"
	@echo "make bench-generation  batched generation, 1-64 streams, in-process and through Serve (tiny model)"
	@echo "make bench-autoscale  a load ramp on autoscaled vs fixed replicas, a cold start from zero, a rollout (25 min)"
	@echo "make gpu-check  on a GPU machine: the batched-generation goals for the 0.5B shape through Serve"
	@echo "make chatchat-check  Chatchat 0.3.1.3's own client through its KB lifecycle against make demo (15 steps)"

# torch goes in first: with no GPU the CPU build (a bare `torch` requirement, pulled in by
# sentence-transformers, would drag a multi-GB CUDA build onto a machine that cannot use it).
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
		$(PY) -m pip install --quiet "torch>=2.4"; \
	else \
		$(PY) -m pip install --quiet torch==2.13.0; \
	fi
	$(PY) -m pip install --quiet -e ".[serve,dev]"
	touch $@

install: $(VENV)/.installed

# The console's tests drive Debian's headless Chromium through its ChromeDriver; nothing downloads a
# browser. Installed when missing and this user may (root, or passwordless sudo); else the tests say so.
browser:
	@if [ ! -x /usr/bin/chromedriver ] || [ ! -x /usr/bin/chromium ]; then \
		if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else \
			echo "Chromium is missing: apt-get install chromium chromium-driver (the console tests need it)"; exit 0; fi; \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver >/dev/null; \
	fi

demo: install
	$(PY) -m scripts.demo

stop: install
	$(PY) -m scripts.stop

lint: install
	$(VENV)/bin/ruff check rag control deployments scripts tests
	$(VENV)/bin/mypy

test: lint browser
	$(VENV)/bin/pytest -q -p no:cacheprovider -n 2 --durations=10

bench: install
	$(PY) -m scripts.bench_pipeline

bench-rollout: install
	$(PY) -m scripts.bench_rollout

bench-quality: install
	$(PY) -m scripts.bench_rollout --scenarios quality-same quality-half-index quality-threshold quality-failing \
		--step-seconds 10 --piece-delay 0.01

bench-ingest: install
	$(PY) -m scripts.bench_ingest

bench-embedding: install
	$(PY) -m scripts.bench_embedding

bench-autoscale: install
	$(PY) -m scripts.bench_autoscale --json var/bench_autoscale.json

bench-generation: install
	$(PY) -m scripts.bench_generation --tiny --json var/bench_generation.json

# On a machine with a GPU: the issue-10 goals for the Qwen2.5-0.5B shape, through Serve (about 10 minutes).
gpu-check: install
	$(PY) -m scripts.bench_generation --device cuda --streams 1 8 64 --min-tokens 1024 --repeat 1 --json var/gpu_generation.json

# Chatchat's own client in a venv of its own (its pins clash with ours: pydantic 2.7, httpx 0.27, langchain
# 0.1), against the running `make demo`.
CHATCHAT_VENV = .venv-chatchat
$(CHATCHAT_VENV)/.installed: scripts/chatchat_client_requirements.txt
	test -x $(CHATCHAT_VENV)/bin/python || $(PYTHON) -m venv $(CHATCHAT_VENV)
	$(CHATCHAT_VENV)/bin/pip install --quiet --no-deps langchain-chatchat==0.3.1.3
	$(CHATCHAT_VENV)/bin/pip install --quiet -r scripts/chatchat_client_requirements.txt
	touch $@

chatchat-check: $(CHATCHAT_VENV)/.installed
	$(CHATCHAT_VENV)/bin/python scripts/chatchat_client_check.py --base http://127.0.0.1:8000 --key-file var/api_key
