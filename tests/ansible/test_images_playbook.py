"""cloudlet.fleet.images and the image module against a real podman (its API service, as a node's
controller uses it): an archive made by ``podman save`` is loaded once, a second run changes nothing,
check mode predicts without loading, a new build of the same tag is loaded again, absent removes."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from support.controller import podman

pytestmark = [pytest.mark.podman, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def build(tmp_path: Path, tag: str) -> tuple[Path, str]:
    """A tiny image of its own (FROM scratch, a random label), saved to an archive, then removed."""
    ctx = tmp_path / f"ctx-{secrets.token_hex(4)}"
    ctx.mkdir()
    (ctx / "x").write_text("x\n")
    (ctx / "Containerfile").write_text(f"FROM scratch\nCOPY x /x\nLABEL nonce={secrets.token_hex(8)}\n")
    podman("build", "-q", "-t", tag, str(ctx))
    image_id = podman("image", "inspect", "--format", "{{.Id}}", tag).stdout.strip()
    archive = ctx / "image.tar"
    podman("save", "-o", str(archive), tag)
    podman("rmi", "-f", tag)
    return archive, image_id


def run(tmp_path: Path, socket: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict[str, int]]:
    inventory = tmp_path / "inventory.yml"
    inventory.write_text(json.dumps({"cloudlets": {"hosts": {"localhost": {
        "ansible_connection": "local", "ansible_python_interpreter": sys.executable,
        "cloudlet_state_dir": str(tmp_path / "state"), "cloudlet_podman_socket": socket}}}}))
    env = {**os.environ, "ANSIBLE_CONFIG": str(ROOT / "ansible.cfg"), "ANSIBLE_COLLECTIONS_PATH": str(ROOT / "collections"),
           "ANSIBLE_NOCOLOR": "1", "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["ansible-playbook", "-i", str(inventory), str(ROOT / "playbooks/images.yml"), *extra],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    recap = {}
    for line in proc.stdout.splitlines():
        if line.startswith("localhost") and "changed=" in line:
            recap = {k: int(v) for k, v in (p.split("=") for p in line.split()[2:] if "=" in p)}
    return proc, recap


def image_id(tag: str) -> str | None:
    proc = podman("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    return proc.stdout.strip() if proc.returncode == 0 else None


def test_images_playbook_loads_once_predicts_reloads_a_new_build_and_removes(tmp_path: Path, podman_socket: str) -> None:
    tag = f"localhost/cloudlet-imgtest-{secrets.token_hex(3)}:1"
    archive, first = build(tmp_path, tag)
    args = ("-e", f"images_archive={archive}", "-e", f"images_name={tag}")
    try:
        assert image_id(tag) is None
        checked, recap = run(tmp_path, podman_socket, "--check", *args)
        assert checked.returncode == 0 and recap["changed"] >= 1, checked.stdout[-3000:]
        assert image_id(tag) is None  # check mode loaded nothing

        loaded, recap = run(tmp_path, podman_socket, *args)
        assert loaded.returncode == 0, loaded.stdout[-3000:] + loaded.stderr[-2000:]
        assert image_id(tag) == first and f"loaded, id {first[:12]}" in loaded.stdout
        assert (tmp_path / "state" / "images" / "image.tar").is_file()

        again, recap = run(tmp_path, podman_socket, *args)
        assert again.returncode == 0 and recap["changed"] == 0, again.stdout[-3000:]
        assert f"already there, id {first[:12]}" in again.stdout

        archive2, second = build(tmp_path, tag)  # the same tag, another build
        assert second != first
        podman("tag", first, tag)  # podman still has the old one under the tag
        newer, recap = run(tmp_path, podman_socket, "-e", f"images_archive={archive2}", "-e", f"images_name={tag}")
        assert newer.returncode == 0 and recap["changed"] >= 1, newer.stdout[-3000:]
        assert image_id(tag) == second

        wrong, _ = run(tmp_path, podman_socket, "-e", f"images_archive={archive2}", "-e", "images_name=localhost/other:9")
        assert wrong.returncode != 0 and f"holds {tag}, not localhost/other:9" in wrong.stdout

        removed, recap = run(tmp_path, podman_socket, "-e", "images_state=absent", "-e", f"images_name={tag}")
        assert removed.returncode == 0 and recap["changed"] >= 1, removed.stdout[-3000:]
        assert image_id(tag) is None
    finally:
        for ref in (tag, first):
            podman("rmi", "-f", ref, check=False)


FAKE_K3S = """#!/bin/sh
# a stand-in for k3s (no k3s binary can be had here): records every call, keeps a list of images
echo "$*" >> "$FAKE_K3S_DIR/calls"
[ -e "$FAKE_K3S_DIR/down" ] && exit 1
case "$*" in
  "ctr -n k8s.io images ls -q name=="*) cat "$FAKE_K3S_DIR/images" 2>/dev/null; exit 0 ;;
  "ctr -n k8s.io images import "*) echo "$FAKE_K3S_IMAGE" >> "$FAKE_K3S_DIR/images"; exit 0 ;;
  "ctr -n k8s.io images rm "*) : > "$FAKE_K3S_DIR/images"; exit 0 ;;
esac
exit 2
"""


def test_on_k3s_the_archive_goes_to_the_airgap_dir_and_into_containerd_once(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The k3s path, with a recording stand-in for the k3s binary: the exact commands it is sent."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "k3s").write_text(FAKE_K3S)
    (fake / "k3s").chmod(0o755)
    archive = tmp_path / "app-1.tar"
    archive.write_bytes(b"not read on this path: containerd reads it")
    monkeypatch.setenv("FAKE_K3S_DIR", str(fake))
    monkeypatch.setenv("FAKE_K3S_IMAGE", "localhost/app:1")
    airgap = tmp_path / "airgap"
    airgap.mkdir()
    extra = ("-e", f"images_archive={archive}", "-e", "images_name=localhost/app:1", "-e", "cloudlet_runtime=kubernetes",
             "-e", f"k3s_install_dir={fake}", "-e", f"k3s_images_dir={airgap}")
    node_copy = tmp_path / "state" / "images" / "app-1.tar"

    first, recap = run(tmp_path, "/nonexistent.sock", *extra)
    assert first.returncode == 0, first.stdout[-3000:]
    assert (airgap / "app-1.tar").read_bytes() == archive.read_bytes()  # imported again at every k3s start
    calls = (fake / "calls").read_text().splitlines()
    assert calls == ["ctr -n k8s.io images ls -q name==localhost/app:1", f"ctr -n k8s.io images import {node_copy}"]
    assert "imported into containerd" in first.stdout

    second, recap = run(tmp_path, "/nonexistent.sock", *extra)
    assert second.returncode == 0 and recap["changed"] == 0, second.stdout[-3000:]
    assert (fake / "calls").read_text().splitlines()[2:] == ["ctr -n k8s.io images ls -q name==localhost/app:1"]
    assert "already in containerd" in second.stdout

    (fake / "down").write_text("")  # k3s not running: the airgap directory alone
    (fake / "images").write_text("")
    third, _ = run(tmp_path, "/nonexistent.sock", *extra)
    assert third.returncode == 0 and "k3s is not running" in third.stdout, third.stdout[-3000:]
    (fake / "down").unlink()

    (fake / "images").write_text("localhost/app:1\n")
    removed, recap = run(tmp_path, "/nonexistent.sock", *extra, "-e", "images_state=absent")
    assert removed.returncode == 0 and recap["changed"] == 1, removed.stdout[-3000:]
    assert (fake / "calls").read_text().splitlines()[-1] == "ctr -n k8s.io images rm localhost/app:1"
