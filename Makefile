# cluster-registry developer entry points. `make test` is what CI runs (.ci/run).
SHELL := /bin/bash
.DEFAULT_GOAL := help
ROOT := $(abspath .)
VENV := $(ROOT)/.venv
export PATH := $(ROOT)/.cache/bin:$(VENV)/bin:$(PATH)
PYTEST ?= $(VENV)/bin/pytest
PYTEST_ARGS ?=

.PHONY: help toolchain images cluster-up cluster-down test test-unit test-chart test-integration test-e2e test-gitops typecheck generate demo demo-down bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-18s %s\n", $$1, $$2}'

toolchain: ## install pinned tools into .cache/bin and the virtualenv into .venv
	ci/toolchain

cluster-up: toolchain ## start the local control plane and the two registries
	ci/localcluster up

images: cluster-up ## build the project's images (OCI layouts in .cache/images) and push them to the local cluster
	ci/images push

cluster-down: ## stop everything `cluster-up` started
	ci/localcluster down

test: images typecheck ## every layer: unit, chart, integration, e2e
	$(PYTEST) $(PYTEST_ARGS) tests

test-unit: toolchain ## the pure core only
	$(PYTEST) $(PYTEST_ARGS) -m unit tests

test-chart: toolchain ## helm lint, ct lint, kubeconform and render tests
	$(PYTEST) $(PYTEST_ARGS) -m chart tests

test-integration: toolchain ## against real registries on loopback
	$(PYTEST) $(PYTEST_ARGS) -m integration tests

test-e2e: images ## against the local control plane
	$(PYTEST) $(PYTEST_ARGS) -m e2e tests

test-gitops: images ## Flux, Argo CD health checks, ct install, helm 4, promtool
	$(PYTEST) $(PYTEST_ARGS) -m gitops tests

typecheck: toolchain ## mypy --strict over the package
	$(VENV)/bin/mypy

generate: toolchain ## regenerate committed generated files (schema copy, values reference)
	ci/generate

demo: images ## boot the local cluster, install the chart and a sample CNF
	$(VENV)/bin/python -m tests.support.demo up

demo-down: ## stop the demo and the local cluster
	-$(VENV)/bin/python -m tests.support.demo down
	ci/localcluster down

bench: cluster-up ## run every benchmark (each prints a final JSON line)
	for b in bench/*.py; do $(VENV)/bin/python $$b || exit 1; done
