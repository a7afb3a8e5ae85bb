# Two commands do all set-up on a fresh machine: `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench bench-deps soak install system-deps node-deps constraints k8s-rules clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,dev]'
	touch $(STAMP)

install: $(STAMP)

# `make run PORT=9000 CONFIG=my.yaml`: another port (else the file's server.port) or config file.
CONFIG ?= config/router.yaml
PORT ?=
run: $(STAMP)
	$(BIN)/router serve --config $(CONFIG)$(if $(PORT), --port $(PORT))

lint: $(STAMP)
	$(BIN)/ruff check router tests
	$(BIN)/mypy

# Debian's redis-server, prometheus, haproxy (the front of the rolling-restart test) and nginx
# (the peer `router bench --peers` measures the router beside), kubectl (`kubectl kustomize`
# renders deploy/k8s/; not in Debian 12's own archive: found when a configured repository has
# it, the Kubernetes tests skip, saying why, without it) and chromium (the operator console's
# browser test, skipped without it), when missing and we are root. Each package is installed
# on its own, so one that cannot be found does not keep the others out.
system-deps:
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  missing=""; \
	  command -v redis-server >/dev/null || missing="$$missing redis-server"; \
	  command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	  command -v haproxy >/dev/null || [ -x /usr/sbin/haproxy ] || missing="$$missing haproxy"; \
	  command -v nginx >/dev/null || [ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	  command -v kubectl >/dev/null || missing="$$missing kubectl"; \
	  command -v chromium >/dev/null || missing="$$missing chromium"; \
	  if [ -n "$$missing" ]; then \
	    echo "installing$$missing"; \
	    apt-get update -qq || echo "warning: apt-get update failed"; \
	    for package in $$missing; do \
	      DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        $$package >/dev/null 2>&1 || echo "warning: could not install $$package"; \
	    done; \
	  fi; \
	fi

# The official Node SDK, for one check that a JavaScript client reads the router too (skipped,
# saying why, when node and npm are missing).
NODE_DIR := $(VENV)/node
node-deps:
	@if command -v npm >/dev/null && [ ! -d $(NODE_DIR)/node_modules/openai ]; then \
	  mkdir -p $(NODE_DIR) && (npm install --silent --no-audit --no-fund --prefix $(NODE_DIR) \
	    openai@7 >/dev/null || echo "warning: could not install the openai Node SDK"); \
	fi

test: $(STAMP) system-deps node-deps lint
	$(BIN)/python -m pytest -q

# deploy/constraints.txt: the runtime dependencies pinned to the versions installed in .venv
# (deploy/Dockerfile installs exactly these). Run after changing dependencies in pyproject.toml.
constraints: $(STAMP)
	$(BIN)/python deploy/constraints.py

# The Prometheus Operator's PrometheusRule, made from grafana/alerts/router-rules.yaml.
k8s-rules: $(STAMP)
	$(BIN)/python deploy/k8s/overlays/prometheus-operator/prometheusrule.py

# Ten minutes of mixed traffic with a Redis restart; `make test` runs the same test for 30 s.
SOAK_S ?= 600
soak: $(STAMP) system-deps
	SOAK_S=$(SOAK_S) $(BIN)/python -m pytest tests/e2e/test_soak.py -q -s

# `make bench ARGS=--quick`: flags for `router bench` (`router bench --help` lists them);
# `make bench-deps` first for `ARGS=--peers`.
ARGS ?=
bench: $(STAMP)
	$(BIN)/router bench $(ARGS)

# The peers of `router bench --peers`: Debian's nginx (when missing and root; Debian's package
# also enables its own service, which the bench does not use: it runs nginx from a config of its
# own), the LiteLLM proxy in a venv of its own (LITELLM_VENV) and matplotlib for the PNG.
# `make test` needs none of them.
LITELLM_VENV := .venv-litellm
bench-deps: $(STAMP)
	@if ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing nginx"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      --no-install-recommends nginx >/dev/null) || echo "warning: could not install nginx"; \
	  else \
	    echo "nginx is missing (as root: apt-get install nginx); --peers will skip it"; \
	  fi; \
	fi
	@if [ ! -x $(LITELLM_VENV)/bin/litellm ]; then \
	  echo "installing litellm[proxy] into $(LITELLM_VENV)"; \
	  $(PY) -m venv $(LITELLM_VENV) && $(LITELLM_VENV)/bin/python -m pip install -q --upgrade pip \
	    && $(LITELLM_VENV)/bin/python -m pip install -q 'litellm[proxy]' \
	    || echo "warning: could not install litellm; --peers will skip it"; \
	fi
	$(BIN)/python -m pip install -q -e '.[test,dev,bench]'

clean:
	rm -rf $(VENV) $(LITELLM_VENV) build *.egg-info
