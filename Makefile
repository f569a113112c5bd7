# Everything a person or CI runs. `make demo` and `make test` install what they need.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
NODE_DIR := tests/interop/oidc
NODE_STAMP := $(NODE_DIR)/node_modules/.installed
PYTEST_ARGS ?=
# Interop peers fetched/built once, outside the clone so a fresh clone (CI) reuses them.
INTEROP_CACHE ?= $(or $(SIDECAR_INTEROP_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/spiffe-oauth-sidecar)
export SIDECAR_INTEROP_CACHE := $(INTEROP_CACHE)
KEYCLOAK_VERSION := 26.7.3
KEYCLOAK_STAMP := $(INTEROP_CACHE)/keycloak-$(KEYCLOAK_VERSION)/.sidecar-built
SPIRE_DIR := tests/interop/spire
SPIRE_VERSION := $(shell awk '$$1 == "tool" {next} /spiffe\/spire / {print $$2; exit}' $(SPIRE_DIR)/go.mod)
SPIRE_BIN := $(INTEROP_CACHE)/spire-$(SPIRE_VERSION)
GO ?= $(or $(shell command -v go),/usr/local/go/bin/go)
# helm for the chart tests, at the version tests/helm/tool/go.mod pins, in the same cache.
HELM_TOOL := tests/helm/tool
HELM_VERSION := $(shell sed -n 's/^\thelm\.sh\/helm\/v3 \(v[0-9][0-9.]*\).*/\1/p' $(HELM_TOOL)/go.mod)
HELM := $(INTEROP_CACHE)/helm-$(HELM_VERSION)/helm
# Grafana's dashboard schema (the Grafana Foundation SDK) as a checker for the dashboard.
DASHBOARD_SCHEMA_TOOL := tests/ops/dashboard_schema
DASHBOARD_SCHEMA_VERSION := $(shell sed -n 's/^require github\.com\/grafana\/grafana-foundation-sdk\/go \(v[0-9][0-9.]*\).*/\1/p' $(DASHBOARD_SCHEMA_TOOL)/go.mod)
DASHBOARD_SCHEMA := $(INTEROP_CACHE)/dashboard-schema-$(DASHBOARD_SCHEMA_VERSION)/dashboard-schema

.PHONY: all demo serve test lint fmt check bench clean venv node helm dashboard-schema k8s-examples keycloak spire interop-spire chaos promtool system-tools

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

# Keycloak (Maven Central zip, built once with its preview `spiffe` feature); needs a JDK >= 21.
# Outside CI a machine without Maven or a JDK 21 still runs the suite (the Keycloak cases skip).
$(KEYCLOAK_STAMP): tests/interop/keycloak/install.sh
	bash tests/interop/keycloak/install.sh $(INTEROP_CACHE) $(KEYCLOAK_VERSION) || [ -z "$$CI" ]

keycloak: $(KEYCLOAK_STAMP)

# SPIRE server + agent built from the Go module proxy at the version go.mod pins (a cold build
# takes about 8 minutes on two cores: a separate target, run by .ci/run).
$(SPIRE_BIN)/.built: $(SPIRE_DIR)/go.mod $(SPIRE_DIR)/go.sum
	mkdir -p $(SPIRE_BIN)
	cd $(SPIRE_DIR) && GOFLAGS=-buildvcs=false $(GO) build -o $(SPIRE_BIN)/ \
		github.com/spiffe/spire/cmd/spire-server github.com/spiffe/spire/cmd/spire-agent
	touch $@

spire: $(SPIRE_BIN)/.built

# The chart tests run helm, built from the Go module proxy (a few minutes, once). Without Go
# they skip and say why (under CI they fail).
helm:
	@if [ -x "$(HELM)" ]; then :; \
	elif [ -x "$(GO)" ]; then \
	  echo "building helm $(HELM_VERSION) into $(HELM) ..."; \
	  mkdir -p "$(dir $(HELM))" && cd $(HELM_TOOL) && \
	  "$(GO)" build -buildvcs=false -trimpath -o "$(HELM).tmp" helm.sh/helm/v3/cmd/helm && \
	  mv "$(HELM).tmp" "$(HELM)" || echo "helm could not be built: the chart tests will skip"; \
	else echo "no Go toolchain: helm is not built and the chart tests will skip"; fi

# The dashboard test checks k8s/monitoring's dashboard against Grafana's own schema with a
# small Go program on the Grafana Foundation SDK (Apache-2.0), built once like helm.
dashboard-schema:
	@if [ -x "$(DASHBOARD_SCHEMA)" ]; then :; \
	elif [ -x "$(GO)" ]; then \
	  echo "building the dashboard schema check ($(DASHBOARD_SCHEMA_VERSION)) into $(DASHBOARD_SCHEMA) ..."; \
	  mkdir -p "$(dir $(DASHBOARD_SCHEMA))" && cd $(DASHBOARD_SCHEMA_TOOL) && \
	  "$(GO)" build -buildvcs=false -trimpath -o "$(DASHBOARD_SCHEMA).tmp" . && \
	  mv "$(DASHBOARD_SCHEMA).tmp" "$(DASHBOARD_SCHEMA)" || echo "the dashboard schema check could not be built: its test will skip"; \
	else echo "no Go toolchain: the dashboard schema check is not built and its test will skip"; fi

# Debian packages some tests run as real tools: promtool (k8s/monitoring's alert rules; package
# prometheus) and iptables + setpriv (transparent capture in network namespaces). Installed
# when missing and root; otherwise those tests skip and say why.
SYSTEM_TOOLS := promtool:prometheus iptables-restore:iptables ip6tables-restore:iptables setpriv:util-linux
system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do \
	  command -v $${pair%%:*} >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	[ -z "$$missing" ] || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1 || { \
	  export DEBIAN_FRONTEND=noninteractive; \
	  echo "installing$$missing with apt-get ..."; \
	  apt-get install -y -q --no-install-recommends $$missing >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends $$missing >/dev/null; } || \
	  echo "could not install$$missing: the tests that need them will skip"; }

promtool: system-tools

demo: $(STAMP)
	$(VENV)/bin/sidecar demo

serve: $(STAMP)
	$(VENV)/bin/sidecar demo --serve

test: $(STAMP) node keycloak system-tools helm dashboard-schema
	$(PY) -m pytest $(PYTEST_ARGS)

# The end-to-end cases against a real SPIRE agent (tests/interop/spire, skipped by `make test`).
interop-spire: $(STAMP) spire
	SIDECAR_SPIRE_BIN=$(SPIRE_BIN) $(PY) -m pytest tests/interop/spire $(PYTEST_ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

check: lint test

# The example app's deployments and the dashboard's ConfigMap are generated: the test suite
# checks they are current.
k8s-examples: $(STAMP)
	{ echo "# Generated by: sidecar inject -f k8s/examples/plain/legacy-invoicer.yaml (make k8s-examples)"; \
	  $(VENV)/bin/sidecar inject -f k8s/examples/plain/legacy-invoicer.yaml; } > k8s/examples/app/deployment.yaml
	{ echo "# Generated by: sidecar inject -f k8s/examples/plain/legacy-invoicer-transparent.yaml (make k8s-examples)"; \
	  $(VENV)/bin/sidecar inject -f k8s/examples/plain/legacy-invoicer-transparent.yaml; } > k8s/examples/transparent/deployment.yaml
	$(PY) -c 'from tests.ops.test_dashboard import write_configmap; write_configmap()'

# Bounded (about 6 minutes): micro-benchmarks, then the side-by-side run. Results: bench/results/.
bench: $(STAMP)
	$(PY) -m bench.micro
	$(PY) -m bench

# Bounded (about 5 minutes): faults under load against the real sidecar; writes
# docs/reliability.md and fails when a scenario not listed as known failing breaks a bound.
chaos: $(STAMP)
	$(PY) -m chaos

clean:
	rm -rf $(VENV) $(NODE_DIR)/node_modules .pytest_cache .mypy_cache .ruff_cache .demo
