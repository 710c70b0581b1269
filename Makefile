# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU wheel of torch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test

.PHONY: demo test install fetch bench interop clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e .
	touch $@

$(TSTAMP): $(STAMP) pyproject.toml
	$(BIN)/pip install -q -e ".[test]"
	touch $@

install: $(STAMP)

fetch: $(STAMP)
	$(BIN)/loralab fetch

# train fetches the default model itself the first time (a separate fetch costs ~3 s of imports); every
# `make demo` trains anew: a run of an earlier demo recipe in runs/demo must not stop it
demo: $(STAMP)
	$(BIN)/loralab train configs/demo.yaml resume=false

test: $(TSTAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/python -m pytest

bench: $(TSTAMP)
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/throughput.py

# llama.cpp loads `loralab export`'s GGUFs and continues 20 held-out prompts as loralab does. Not part of
# `make test`: the first run compiles llama.cpp (llama-cpp-python, the interop extra: ~7.5 min on 2 cores).
interop: $(TSTAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/pip install -q -e ".[interop]"
	$(BIN)/loralab fetch
	$(BIN)/python benchmarks/interop_llamacpp.py

clean:
	rm -rf $(VENV) runs build src/*.egg-info
