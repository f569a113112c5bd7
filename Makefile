# Everything a person or CI runs. `make demo` and `make test` install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_DIR := tests/interop/oidc
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
PYTEST_ARGS ?=

.PHONY: all demo serve test lint fmt check bench clean venv node

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

venv: $(STAMP)

# The interop suite runs oidc-provider (a certified third-party authorization server) on loopback.
$(NODE_STAMP): $(NODE_DIR)/package.json $(wildcard $(NODE_DIR)/package-lock.json)
	cd $(NODE_DIR) && npm ci --no-audit --no-fund --loglevel=error
	touch $@

node: $(if $(wildcard $(NODE_DIR)/package.json),$(NODE_STAMP))

demo: $(STAMP)
	$(VENV)/bin/sidecar demo

serve: $(STAMP)
	$(VENV)/bin/sidecar demo --serve

test: $(STAMP) node
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

check: lint test

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules .pytest_cache .mypy_cache .ruff_cache .demo
