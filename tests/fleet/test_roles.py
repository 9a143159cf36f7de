"""The roles stop early and clearly, and the k3s role works in check mode.

Real ansible-playbook runs against this machine (connection local) or an address nobody answers
on; nothing here changes the machine: every failing run stops in its checks, and the check-mode run
writes nothing (asserted). The full rollout on real hosts is the molecule scenario (make test-molecule).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 240


def playbook(tmp_path: Path, inventory: str, play: str, *extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "inventory.yml").write_text(inventory)
    (tmp_path / "play.yml").write_text(play)
    env = dict(os.environ)
    env.update({
        "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"),
        "ANSIBLE_COLLECTIONS_PATH": str(ROOT / "collections"),
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_HOST_KEY_CHECKING": "false",
        "PATH": f"{Path(sys.executable).parent}:{env.get('PATH', '')}",
    })
    return subprocess.run(
        ["ansible-playbook", "-i", str(tmp_path / "inventory.yml"), str(tmp_path / "play.yml"), *extra],
        capture_output=True, text=True, env=env, timeout=TIMEOUT, cwd=ROOT,
    )


def local_inventory(**hostvars: str) -> str:
    extra = "".join(f"      {k}: {v}\n" for k, v in hostvars.items())
    return (
        "cloudlets:\n  hosts:\n    localhost:\n      ansible_connection: local\n"
        f"      ansible_python_interpreter: {sys.executable}\n{extra}"
    )


ROLE_PLAY = "- hosts: cloudlets\n  gather_facts: false\n  roles:\n    - role: cloudlet.fleet.{role}\n"


def test_bad_variable_stops_at_the_argument_specs(tmp_path):
    proc = playbook(tmp_path, local_inventory(cloudlet_runtime="docker"), ROLE_PLAY.format(role="cloudlet"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "cloudlet_runtime" in out and "podman, kubernetes" in out
    assert "Validating arguments against arg spec" in out
    assert "TASK [cloudlet.fleet.cloudlet : Create" not in out  # stopped before any change


def test_bad_cloudlet_name_stops_with_its_rule(tmp_path):
    proc = playbook(tmp_path, local_inventory(cloudlet_name="Bad_Name"), ROLE_PLAY.format(role="cloudlet"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "[a-z0-9][a-z0-9-]{0,31}" in out
    assert "TASK [cloudlet.fleet.cloudlet : Create" not in out


def test_missing_wheelhouse_stops_before_anything_changes(tmp_path):
    inv = local_inventory(cloudlet_wheelhouse_dir=str(tmp_path / "no-wheelhouse"),
                          cloudlet_credentials_dir=str(tmp_path / "creds"))
    proc = playbook(tmp_path, inv, ROLE_PLAY.format(role="cloudlet"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "No cloudlet wheel in" in out and "make wheelhouse" in out
    assert "TASK [cloudlet.fleet.cloudlet : Install Debian packages" not in out
    assert not (tmp_path / "creds").exists()


def test_unreachable_host_stops_the_rollout_in_its_first_play(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    inv = ("cloudlets:\n  hosts:\n    gone:\n      ansible_host: 127.0.0.1\n"
           f"      ansible_port: {port}\n      cloudlet_connect_timeout: 3\n")
    (tmp_path / "inventory.yml").write_text(inv)
    env = dict(os.environ, ANSIBLE_CONFIG=str(ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1",
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    proc = subprocess.run(["ansible-playbook", "-i", str(tmp_path / "inventory.yml"), "site.yml"],
                          capture_output=True, text=True, env=env, timeout=TIMEOUT, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Reach every host" in out and "gone" in out
    assert "PLAY [Install the cloudlet controller" not in out


def test_k3s_download_without_checksum_is_refused(tmp_path):
    proc = playbook(tmp_path, local_inventory(), ROLE_PLAY.format(role="k3s"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "k3s_release_checksum" in out
    assert "TASK [cloudlet.fleet.k3s : Create the k3s directories]" not in out


def test_k3s_airgap_folder_without_binary_is_refused(tmp_path):
    (tmp_path / "airgap").mkdir()
    proc = playbook(tmp_path, local_inventory(k3s_airgap_dir=str(tmp_path / "airgap")), ROLE_PLAY.format(role="k3s"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "has no k3s binary" in out


def test_k3s_check_mode_reports_changes_and_writes_nothing(tmp_path):
    airgap = tmp_path / "airgap"
    airgap.mkdir()
    (airgap / "k3s").write_bytes(b"\x7fELF not really k3s")
    (airgap / "k3s-airgap-images-amd64.tar.zst").write_bytes(b"images")
    target = tmp_path / "node"
    inv = local_inventory(k3s_airgap_dir=str(airgap), k3s_install_dir=str(target / "bin"),
                          k3s_config_dir=str(target / "etc"), k3s_data_dir=str(target / "data"))
    proc = playbook(tmp_path, inv, ROLE_PLAY.format(role="k3s"), "--check", "--diff")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "failed=0" in out
    assert "changed: [localhost]" in out  # it would install the binary, images, config and unit
    assert "node-name: localhost" in out  # the config.yaml diff
    assert not target.exists()  # and wrote nothing


@pytest.mark.skipif(not os.environ.get("K3S_AIRGAP_DIR"), reason=(
    "no k3s airgap folder: set K3S_AIRGAP_DIR to a folder holding the k3s binary (and optionally "
    "k3s-airgap-images-amd64.tar.zst); none can be obtained on this machine (no k3s in Debian/PyPI/npm, "
    "release downloads blocked)"))
def test_k3s_converges_from_an_airgap_folder(tmp_path):
    airgap = Path(os.environ["K3S_AIRGAP_DIR"])
    assert (airgap / "k3s").is_file(), f"{airgap}/k3s is missing"
    target = os.environ.get("K3S_TEST_HOST")
    if not target:
        pytest.skip("K3S_TEST_HOST (an SSH-reachable root host that may run k3s) is not set")
    inv = (f"cloudlets:\n  hosts:\n    {target}:\n      ansible_user: root\n"
           f"      k3s_airgap_dir: {airgap}\n")
    proc = playbook(tmp_path, inv, ROLE_PLAY.format(role="k3s"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    again = playbook(tmp_path, inv, ROLE_PLAY.format(role="k3s"))
    assert again.returncode == 0 and "changed=0" in again.stdout


def _wheelhouse(tmp_path, *names):
    wh = tmp_path / "wheelhouse"
    wh.mkdir()
    for name in ("cloudlet-0.3.0+src.abc-py3-none-any.whl", *names):
        (wh / name).write_bytes(b"")
    return wh


def test_a_wheelhouse_of_another_architecture_stops_with_a_clear_message(tmp_path):
    wh = _wheelhouse(tmp_path, "uvloop-0.23.0-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.whl")
    inv = local_inventory(cloudlet_wheelhouse_dir=str(wh), cloudlet_credentials_dir=str(tmp_path / "creds"))
    proc = playbook(tmp_path, inv, ROLE_PLAY.format(role="cloudlet"))
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    import platform
    assert f"localhost is {platform.machine()} with CPython" in out and "aarch64" in out
    assert "build a wheelhouse on a machine of" in out
    assert "TASK [cloudlet.fleet.cloudlet : Install Debian packages" not in out
    assert not (tmp_path / "creds").exists()


def test_a_wheelhouse_of_another_python_stops_and_one_of_ours_passes_the_check(tmp_path):
    import platform
    arch = platform.machine()
    wh = _wheelhouse(tmp_path, f"aiohttp-3.14.5-cp399-cp399-manylinux2014_{arch}.whl")
    inv = local_inventory(cloudlet_wheelhouse_dir=str(wh), cloudlet_credentials_dir=str(tmp_path / "creds"))
    out = playbook(tmp_path, inv, ROLE_PLAY.format(role="cloudlet")).stdout
    assert "cp399-cp399" in out and "build a wheelhouse on a machine of" in out
    ours = f"cp{sys.version_info[0]}{sys.version_info[1]}"  # the node here is this machine's python3
    node = subprocess.run(["/usr/bin/python3", "-c", "import sys; print('cp%d%d' % sys.version_info[:2])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    (wh / f"aiohttp-3.14.5-cp399-cp399-manylinux2014_{arch}.whl").unlink()
    (wh / f"aiohttp-3.14.5-{node}-{node}-manylinux2014_{arch}.whl").write_bytes(b"")
    (wh / f"cryptography-50.0.2-cp311-abi3-manylinux_2_34_{arch}.whl").write_bytes(b"")
    out = playbook(tmp_path, inv, ROLE_PLAY.format(role="cloudlet"), "--check").stdout
    assert "Check the wheelhouse was built for this node's architecture and Python" in out
    assert "build a wheelhouse on a machine of" not in out, (ours, out[-3000:])
