# cloudlet.fleet: the Ansible collection (collections/ansible_collections/cloudlet/fleet), its example
# playbook and their tests. Included by the top Makefile (PATH has .venv/bin, ANSIBLE_CONFIG is set).

COLLECTION_DIR := collections/ansible_collections/cloudlet/fleet
COLLECTION_LINT_PATHS := $(COLLECTION_DIR) playbooks/example_launch.yml

.PHONY: test-collection test-collection-unit test-collection-integration lint-collection

test-collection: test-collection-unit test-collection-integration ## cloudlet.fleet: module unit tests + real ansible-playbook integration

# Run from collections/ so that `ansible_collections.cloudlet.fleet...` imports.
test-collection-unit: ## cloudlet.fleet: module unit tests (local HTTP controller, ~20 s)
	cd collections && $(PY) -m pytest -p no:cacheprovider ansible_collections/cloudlet/fleet/tests/unit $(PYTEST_ARGS)

test-collection-integration: ## cloudlet.fleet: ansible-playbook against a real controller with podman
	$(PY) -m pytest tests/ansible $(PYTEST_ARGS)

# tests/ansible runs in test-collection; keep test-python from running it a second time.
test-python: override PYTEST_ARGS += --ignore=tests/ansible

lint-collection: ## cloudlet.fleet: yamllint + ansible-lint --profile production on the collection and example playbook
	yamllint -s .yamllint .ansible-lint $(COLLECTION_LINT_PATHS)
	ansible-lint --profile production $(COLLECTION_LINT_PATHS)

TEST_TARGETS += lint-collection test-collection
