# The fleet rollout and the local fleet (docs/fleet.md, docs/demo.md).
# Local fleet = three cloudlet hosts as podman containers with systemd and sshd (fleet/fleet.py).

FLEET_PY := $(PY) fleet/fleet.py
FLEET_PLAYBOOKS := site.yml playbooks/launch.yml playbooks/reset.yml playbooks/uninstall.yml playbooks/status.yml playbooks/devices.yml playbooks/upgrade.yml
# the roles and playbooks themselves ship in the collection (lint-collection lints them too)
FLEET_ROLES := $(COLLECTION_DIR)/roles $(COLLECTION_DIR)/playbooks
# Sources of the cloudlet wheel: the wheelhouse is rebuilt only when one of them changed, and with
# a fixed SOURCE_DATE_EPOCH, so an unchanged tree gives a byte-identical wheel (idempotent rollout).
WHEEL_SOURCES := $(shell find cloudlet_pkg/src -type f -not -path '*/__pycache__/*' -not -path '*.egg-info*' 2>/dev/null) cloudlet_pkg/pyproject.toml

.PHONY: wheelhouse fleet-image fleet-up fleet-down fleet-status site launch demo demo-run demo-down \
        test-fleet test-molecule lint-fleet

wheelhouse: wheelhouse/.stamp ## build the wheelhouse the roles install from (cloudlet, its node and kubernetes extras, their deps)
wheelhouse/.stamp: $(WHEEL_SOURCES)
	@echo "== wheelhouse: pip wheel cloudlet_pkg and its dependencies"
	@mkdir -p wheelhouse
	@rm -f wheelhouse/cloudlet-*.whl
	SOURCE_DATE_EPOCH=315532800 $(PY) -m pip wheel -q --disable-pip-version-check -w wheelhouse "./cloudlet_pkg[node,kubernetes]"
	@touch $@

fleet-image: ## build (or reuse) the local fleet's host image (debootstrap, cached in .cache/fleet)
	$(FLEET_PY) image

fleet-up: ## start the local fleet: hosts a, b, c on 10.213.0.0/24 with systemd and sshd
	$(FLEET_PY) up

fleet-down: ## remove the local fleet, its service containers and networks
	$(FLEET_PY) down

fleet-status: ## show the local fleet's hosts and their SSH reachability
	$(FLEET_PY) status

site: wheelhouse ## roll the fleet out: ansible-playbook site.yml (inventory/local unless INVENTORY=...)
	ansible-playbook $(if $(INVENTORY),-i $(INVENTORY)) site.yml

launch: ## launch the demo service on every cloudlet (playbooks/launch.yml)
	ansible-playbook $(if $(INVENTORY),-i $(INVENTORY)) playbooks/launch.yml

demo: ## on a fresh machine: deps, images, fleet, rollout, launch, then a handover A -> B -> C with a report
	@bash fleet/demo.sh

demo-down: ## remove everything `make demo` created
	$(FLEET_PY) down

lint-fleet: ## yamllint, ansible-lint (production profile) and syntax check of roles, playbooks, molecule
	yamllint -s $(FLEET_ROLES) inventory molecule $(FLEET_PLAYBOOKS) requirements.yml
	ansible-lint --profile production $(FLEET_ROLES) molecule inventory $(FLEET_PLAYBOOKS)
	ansible-playbook --syntax-check $(FLEET_PLAYBOOKS)

test-fleet: lint-fleet ## fleet tooling tests, role checks (lint, argument specs, check mode)
	$(PY) -m pytest tests/fleet $(PYTEST_ARGS)

test-molecule: wheelhouse collection-install ## molecule: three-host fleet, converge cloudlet.fleet.site from the installed collection, idempotence, check, verify, reset + uninstall (side_effect), destroy
	molecule test -s default

# tests/fleet already runs in test-python (pytest tests); make test adds the lint and molecule.
TEST_TARGETS += lint-fleet test-molecule
