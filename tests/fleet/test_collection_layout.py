"""The rollout ships in the cloudlet.fleet collection: built and installed as a user would, its
playbooks run by FQCN; the two roles declare the fleet-wide variables identically; nothing reads
another role's variables through a default() chain."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COLLECTION = ROOT / "collections" / "ansible_collections" / "cloudlet" / "fleet"
ROLES = COLLECTION / "roles"
FLEET_WIDE = ("cloudlet_fleet_group", "cloudlet_address", "cloudlet_sessiond_peer_listen",
              "cloudlet_sessiond_control_socket", "cloudlet_user", "cloudlet_tunnel_user", "cloudlet_tunnel_port",
              "cloudlet_tunnel_dir")
BIN = Path(sys.executable).parent


def load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def test_both_roles_declare_the_fleet_wide_variables_the_same_way() -> None:
    specs = {r: load(ROLES / r / "meta" / "argument_specs.yml")["argument_specs"]["main"]["options"]
             for r in ("cloudlet", "cloudlet_tunnels")}
    defaults = {r: load(ROLES / r / "defaults" / "main.yml") for r in ("cloudlet", "cloudlet_tunnels")}
    for var in FLEET_WIDE:
        assert specs["cloudlet"][var] == specs["cloudlet_tunnels"][var], var
        assert defaults["cloudlet"][var] == defaults["cloudlet_tunnels"][var], var
        if "default" in specs["cloudlet"][var]:
            assert specs["cloudlet"][var]["default"] == defaults["cloudlet"][var], var


def test_no_role_reads_another_roles_variable_through_a_default_chain() -> None:
    """``default(cloudlet_x)`` in a role is allowed only on a peer's hostvars (a per-host override)."""
    chained = []
    for path in ROLES.rglob("*"):
        if path.suffix not in (".yml", ".j2") or not path.is_file():
            continue
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for m in re.finditer(r"(\S+)\s*\|\s*default\((cloudlet_\w+)\)", line):
                if not m.group(1).startswith("pv."):
                    chained.append(f"{path.relative_to(ROOT)}:{n}: {m.group(0)}")
    assert chained == []


def test_module_utils_are_marked_private() -> None:
    for path in (COLLECTION / "plugins" / "module_utils").glob("*.py"):
        assert "PRIVATE to the collection" in path.read_text(), path


def clean_env(collections: Path) -> dict[str, str]:
    """No repository ansible.cfg, no inherited ANSIBLE_*: only ``collections`` and what pip installed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")}
    env.update(ANSIBLE_COLLECTIONS_PATH=str(collections), ANSIBLE_NOCOLOR="1")
    return env


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ansible-galaxy collection build`` then ``install`` into a fresh collections path."""
    out = tmp_path_factory.mktemp("collection")
    build = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "build", "--force", "--output-path", str(out),
                            str(COLLECTION)], capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    (tarball,) = out.glob("cloudlet-fleet-*.tar.gz")
    names = tarfile.open(tarball).getnames()
    for wanted in ("roles/cloudlet/tasks/main.yml", "roles/cloudlet_tunnels/meta/argument_specs.yml",
                   "roles/k3s/defaults/main.yml", "playbooks/site.yml", "playbooks/launch.yml"):
        assert wanted in names, wanted
    target = out / "installed"
    inst = subprocess.run([str(BIN / "ansible-galaxy"), "collection", "install", "--force", "--offline", "-p",
                           str(target), str(tarball)], capture_output=True, text=True, timeout=300, env=clean_env(target),
                          cwd=out)
    assert inst.returncode == 0, inst.stderr
    return target


def test_installed_collection_runs_its_playbooks_by_name(installed: Path, tmp_path: Path) -> None:
    inventory = tmp_path / "hosts.yml"
    inventory.write_text("cloudlets:\n  hosts:\n    a:\n    b:\n")
    env = clean_env(installed)
    for playbook in ("site", "launch", "reset", "uninstall", "status"):
        run = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), "--syntax-check",
                              f"cloudlet.fleet.{playbook}"], capture_output=True, text=True, env=env, cwd=tmp_path,
                             timeout=300)
        assert run.returncode == 0, run.stdout + run.stderr
    listed = subprocess.run([str(BIN / "ansible-playbook"), "-i", str(inventory), "--list-tasks", "cloudlet.fleet.site"],
                            capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "cloudlet.fleet.cloudlet : " in listed.stdout and "cloudlet.fleet.cloudlet_tunnels : " in listed.stdout
    assert str(installed) in subprocess.run([str(BIN / "ansible-galaxy"), "collection", "list", "cloudlet.fleet"],
                                            capture_output=True, text=True, env=env, timeout=120).stdout
