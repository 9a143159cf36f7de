"""fleet/fleet.py: naming and addressing of the local fleet (no containers started here)."""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "fleet" / "fleet.py"


@pytest.fixture(scope="module")
def fleet():
    spec = importlib.util.spec_from_file_location("fleet_tool", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["fleet_tool"] = module
    spec.loader.exec_module(module)
    return module


def args(**kw) -> argparse.Namespace:
    base = {"name": "cltest-x", "hosts": "a,b,c", "subnet": "10.213.0.0/24", "mirror": None}
    base.update(kw)
    return argparse.Namespace(**base)


def test_hosts_get_fixed_addresses_and_their_own_service_networks(fleet):
    f = fleet.fleet_from_args(args())
    assert [f.address(i) for i in range(3)] == ["10.213.0.11", "10.213.0.12", "10.213.0.13"]
    nets = [f.service_subnet(i) for i in range(3)]
    assert [str(n) for n in nets] == ["10.213.1.0/24", "10.213.2.0/24", "10.213.3.0/24"]
    assert not any(n.overlaps(f.subnet) for n in nets)
    assert f.container("b") == "cltest-x-b" and f.service_network("b") == "cltest-x-svc-b"
    assert f.network == "cltest-x-net"


@pytest.mark.parametrize("hosts", ["A,b", "a,-b", "a,b_c", "", "a," + "x" * 33])
def test_bad_host_names_are_refused(fleet, hosts, capsys):
    with pytest.raises(SystemExit):
        fleet.fleet_from_args(args(hosts=hosts))
    assert "error" in capsys.readouterr().err


def test_small_or_bad_subnets_are_refused(fleet, capsys):
    for subnet in ("10.213.0.0/28", "10.213.0.300/24"):
        with pytest.raises(SystemExit):
            fleet.fleet_from_args(args(subnet=subnet))
    assert "subnet" in capsys.readouterr().err


def test_image_tag_follows_the_recipe(fleet, monkeypatch):
    first = fleet.recipe_hash("http://deb.debian.org/debian")
    assert first == fleet.recipe_hash("http://mirror.example/debian")  # the mirror changes nothing built
    monkeypatch.setattr(fleet, "PACKAGES", fleet.PACKAGES + ("curl",))
    assert fleet.recipe_hash("http://deb.debian.org/debian") != first


def test_every_command_has_help():
    for cmd in ("image", "up", "down", "status"):
        out = subprocess.run([sys.executable, str(SCRIPT), cmd, "--help"], capture_output=True, text=True, check=True)
        assert "--name" in out.stdout and "--subnet" in out.stdout


def test_rootfs_customisation_gives_every_host_its_own_host_keys(fleet, tmp_path):
    root = tmp_path / "root"
    (root / "etc/ssh").mkdir(parents=True)
    (root / "etc/apt").mkdir(parents=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    (root / "etc/ssh/ssh_host_ed25519_key").write_text("baked-in key")
    fleet.customise(root, "http://deb.debian.org/debian")
    assert not (root / "etc/ssh/ssh_host_ed25519_key").exists()
    unit = (root / "etc/systemd/system/ssh-hostkeys.service").read_text()
    assert "ssh-keygen -A" in unit and "Before=ssh.service" in unit
    assert (root / "etc/systemd/system/multi-user.target.wants/ssh-hostkeys.service").is_symlink()
    assert (root / "etc/machine-id").read_text() == ""
    assert "bookworm main" in (root / "etc/apt/sources.list").read_text()
