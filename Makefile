# Every target sets itself up on a fresh machine: a .venv in the checkout, the CPU build of
# torch first (a plain `torch` requirement would pull a multi-GB CUDA build), then the project.
# The CPU build comes from PyTorch's own index, TORCH_INDEX; where that index is unreachable
# (--timeout 10 --retries 0: it fails fast), torch comes from pip's configured index instead, as
# on machines that reach only a mirror set up to serve the CPU build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
# The official `openai` npm package for the JavaScript example tests and axe-core for the browser
# tests, vendored once at set-up (those checks are skipped where node, npm or the registry is
# missing).
JS := tests/server/js

.PHONY: serve test model browser bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "tokenmill needs Python >= 3.11"'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q --timeout 10 --retries 0 --index-url $(TORCH_INDEX) '$(TORCH)' \
	  || { echo "$(TORCH_INDEX) unreachable: $(TORCH) from pip's configured index"; \
	       $(BIN)/python -m pip install -q '$(TORCH)'; }
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

# No stamp when npm is missing or fails (an unreachable registry fails within a minute), so that
# the next `make test` tries again.
$(JS)/node_modules/.installed: $(JS)/package.json
	@if command -v npm >/dev/null 2>&1; then \
	  npm install --prefix $(JS) --no-package-lock --no-audit --no-fund --loglevel=error \
	    --fetch-timeout=20000 --fetch-retries=1 && touch $@ \
	    || echo "npm install failed: the JavaScript example test will be skipped"; \
	else echo "npm not found: the JavaScript example test will be skipped"; fi

# Debian's chromium for the browser tests (tests/web), installed once where this runs as root with
# apt-get; elsewhere those tests are skipped with the reason. Playwright drives it: never a browser
# of Playwright's own download.
CHROMIUM := /usr/bin/chromium
browser:
	@test -x $(CHROMIUM) || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  { echo "installing Debian's chromium for the browser tests"; \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { apt-get update -q >/dev/null 2>&1 && \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; }; }; } \
	  || echo "chromium could not be installed: the browser tests will be skipped"

model: $(BIN)/.installed
	$(BIN)/python -c 'from tokenmill.models.default import main; main()'

serve: model
	$(BIN)/tokenmill serve --host $(HOST) --port $(PORT)

test: model browser $(JS)/node_modules/.installed
	$(BIN)/ruff check tokenmill tests benchmarks
	$(BIN)/python -m pytest -q -ra

bench: model
	$(BIN)/python benchmarks/bench_offline.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache $(JS)/node_modules
