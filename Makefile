# Cloudlet fleet — top-level commands. `make help` lists them.
# Each area keeps its own targets in mk/<area>.mk and adds its test target to TEST_TARGETS.

SHELL := /bin/bash
VENV ?= .venv
PY := $(CURDIR)/$(VENV)/bin/python
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export CONTAINERS_CONF := $(CURDIR)/etc/containers.conf
PYTEST_ARGS ?=

TEST_TARGETS := test-python

.PHONY: help deps test test-python
help: ## list the commands
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | sort | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

deps: ## install Debian packages and the Python virtualenv (idempotent)
	@bash .ci/install

test-python: ## Python tests of the cloudlet package (real sockets, processes, sshd, podman)
	$(PY) -m pytest tests $(PYTEST_ARGS)

include $(wildcard mk/*.mk)

test: deps $(TEST_TARGETS) ## run every test (unit, integration, lint, molecule); installs what it needs first
	@echo "== all tests passed: $(TEST_TARGETS)"
