# cloudlet.fleet: the Ansible collection (collections/ansible_collections/cloudlet/fleet), its example
# playbook and their tests. Included by the top Makefile (PATH has .venv/bin, ANSIBLE_CONFIG is set).

COLLECTION_DIR := collections/ansible_collections/cloudlet/fleet
COLLECTION_LINT_PATHS := $(COLLECTION_DIR) playbooks/example_launch.yml
# where collection-install puts the built collection (molecule rolls the fleet out from there)
COLLECTION_INSTALL_DIR := $(CURDIR)/.cache/collections

COLLECTION_SOURCES := $(shell find $(COLLECTION_DIR) -type f -not -path '*/tests/output/*' -not -path '*/__pycache__/*' 2>/dev/null)

.PHONY: collection-build collection-install test-collection test-collection-unit test-collection-integration lint-collection sanity-collection

collection-build: .cache/collection/.stamp ## cloudlet.fleet: ansible-galaxy collection build (the tarball users install)
.cache/collection/.stamp: $(COLLECTION_SOURCES)
	@mkdir -p .cache/collection && rm -f .cache/collection/cloudlet-fleet-*.tar.gz
	ansible-galaxy collection build --force --output-path .cache/collection $(COLLECTION_DIR)
	@touch $@

collection-install: collection-build ## cloudlet.fleet: install the built tarball into .cache/collections (as a user would)
	cd .cache/collection && env -u ANSIBLE_CONFIG ansible-galaxy collection install --force --offline -p $(COLLECTION_INSTALL_DIR) cloudlet-fleet-*.tar.gz

test-collection: test-collection-unit test-collection-integration ## cloudlet.fleet: module unit tests + real ansible-playbook integration

# Run from collections/ so that `ansible_collections.cloudlet.fleet...` imports.
test-collection-unit: ## cloudlet.fleet: module unit tests (local HTTP controller, ~20 s)
	cd collections && $(PY) -m pytest -p no:cacheprovider ansible_collections/cloudlet/fleet/tests/unit $(PYTEST_ARGS)

test-collection-integration: ## cloudlet.fleet: ansible-playbook against a real controller with podman
	$(PY) -m pytest tests/ansible $(PYTEST_ARGS)

# tests/ansible runs in test-collection; keep test-python from running it a second time.
test-python: override PYTEST_ARGS += --ignore=tests/ansible

lint-collection: ## cloudlet.fleet: yamllint + ansible-lint --profile production on the collection and example playbook, antsibull-changelog lint of the fragments
	yamllint -s .yamllint .ansible-lint $(COLLECTION_LINT_PATHS)
	ansible-lint --profile production $(COLLECTION_LINT_PATHS)
	cd $(COLLECTION_DIR) && antsibull-changelog lint

# ansible-test sanity with the project's own Python (--local: .venv already holds ansible-core and its
# requirements; --venv would bootstrap a controller virtualenv under tests/output/.tmp on every fresh
# clone). Each sanity test that needs packages gets its own virtualenv, cached by ansible-test under
# ~/.ansible/test/venv and reused while its requirements are unchanged. ansible-test bootstraps pip
# into each new one with a get-pip script it would download from a host not reachable here, so the
# stand-in is first copied to the cache path the installed ansible-test looks for.
# SANITY_ARGS passes options through, e.g. SANITY_ARGS='--test pylint -v'.
SANITY_ARGS ?=
sanity-collection: ## cloudlet.fleet: ansible-test sanity, all 24 tests, Python 3.11 (~40 s; ~5 min the first time on a machine)
	$(PY) tests/ansible/ansible_test_get_pip.py --install-cache
	cd $(COLLECTION_DIR) && $(CURDIR)/$(VENV)/bin/ansible-test sanity --local --python 3.11 --color no $(SANITY_ARGS)

TEST_TARGETS += lint-collection test-collection sanity-collection
