# Two commands on a fresh machine: `make demo` and `make test`.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
# The CPU wheel of torch goes in first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH   ?= torch==2.13.0
STAMP   := $(VENV)/.installed
TSTAMP  := $(VENV)/.installed-test

.PHONY: demo test docs fuzz install fetch bench interop models clean gpu-check

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

# The demo trains LoRA on the top 20 of SmolLM2's 30 decoder layers: backward stops at the lowest LoRA
# layer, so a third of it is never run, and the gains hold (docs/performance.md, "The demo's recipe").
# configs/demo.yaml keeps every layer, the library's default, so it fits any model and studies start from it.
DEMO_LAYERS = [10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29]

# train fetches the default model itself the first time (a separate fetch would pay the imports twice); every
# `make demo` trains anew: a run of an earlier demo recipe in runs/demo must not stop it
demo: $(STAMP)
	$(BIN)/loralab train configs/demo.yaml resume=false "lora.layers=$(DEMO_LAYERS)"

test: $(TSTAMP)
	$(BIN)/ruff check src tests benchmarks docs/gen_reference.py docs/gen_study_results.py
	$(BIN)/python -m pytest

# The docs site in site/ (git-ignored): the reference pages regenerated from the code, then built with strict
# link checking (tests/test_docs.py fails when a reference page is stale)
docs: $(TSTAMP)
	$(BIN)/python docs/gen_reference.py
	$(BIN)/mkdocs build --strict

# Every reader of user input fuzzed with Hypothesis' "fuzz" profile (tests/conftest.py): many more
# examples per property than `make test` runs; a failure prints the input that caused it.
fuzz: $(TSTAMP)
	$(BIN)/python -m pytest -q tests/test_fuzz.py --hypothesis-profile=fuzz --hypothesis-show-statistics

bench: $(TSTAMP)
	$(BIN)/python -c "import trl" 2>/dev/null || $(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python benchmarks/throughput.py

# docs/models.md: the architecture matrix (tests/model/test_matrix.py, tiny models of ~60 families, ~1-2 min on
# 2 cores) writes one JSON row per family; the page is rebuilt from them even when a family fails, and the
# target then fails too.
models: $(TSTAMP)
	LORALAB_MATRIX_JSON=runs/models.json $(BIN)/python -m pytest tests/model/test_matrix.py -q -k test_architecture; \
	status=$$?; $(BIN)/python benchmarks/models_table.py runs/models.json docs/models.md && exit $$status

# llama.cpp loads `loralab export`'s GGUFs and continues 20 held-out prompts as loralab does. Not part of
# `make test`: the first run compiles llama.cpp (llama-cpp-python, the interop extra: ~7.5 min on 2 cores).
interop: $(TSTAMP)
	$(BIN)/python -c "import llama_cpp" 2>/dev/null || $(BIN)/pip install -q -e ".[interop]"
	$(BIN)/loralab fetch
	$(BIN)/python benchmarks/interop_llamacpp.py

# Every CUDA path against its CPU reference, the article's 7B rows, the estimate's grid and speed against PEFT /
# TRL, in one run of ~8 minutes on one CUDA GPU (docs/gpu.md); without CUDA it says so and exits 0. TORCH must be a
# CUDA build there: `make gpu-check TORCH=torch==2.13.0` with pip pointed at an index that serves CUDA wheels
# (PIP_INDEX_URL). GPU_PY=python3 runs on an interpreter that already has loralab's dependencies: no venv, no installs.
GPU_PY  ?=
GPU_OUT ?= runs/gpu-check
gpu-check: $(if $(GPU_PY),,$(TSTAMP))
	$(if $(GPU_PY),,$(BIN)/python -c "import liger_kernel" 2>/dev/null || $(BIN)/pip install -q -e ".[gpu]" || true)
	PYTHONPATH=src $(or $(GPU_PY),$(BIN)/python) benchmarks/gpu_check.py --out $(GPU_OUT)

clean:
	rm -rf $(VENV) runs build site src/*.egg-info
