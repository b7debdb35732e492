# Every target sets itself up on a fresh machine: a .venv in the checkout, the CPU build of
# torch first (a plain `torch` requirement would pull a multi-GB CUDA build), then the project.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
TORCH ?= torch==2.13.0

.PHONY: serve test model bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "tokenmill needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

model: $(BIN)/.installed
	$(BIN)/python -c 'from tokenmill.models.default import main; main()'

serve: model
	$(BIN)/tokenmill serve --host $(HOST) --port $(PORT)

test: model
	$(BIN)/ruff check tokenmill tests benchmarks
	$(BIN)/python -m pytest -q -ra

bench: model
	$(BIN)/python benchmarks/bench_offline.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
