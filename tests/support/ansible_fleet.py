"""Helpers for the cloudlet.fleet integration tests: real cloudlets and a real ansible-playbook.

A cloudlet here is a real ``cloudlet sessiond`` + ``cloudlet controller`` pair with the podman
runtime, started by the controller tests' ``Stack`` (tests/support/controller.py), on a private
podman API socket, with the demo image built by ``cloudlet image build-demo``. Every cloudlet gets a
unique ``cltest-<random>`` name; the finalizers stop the daemons and remove its containers and
network whatever the test did.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

from support.controller import Stack, cleanup_cloudlet, containers_of, podman

REPO = Path(__file__).resolve().parents[2]

__all__ = ["Stack", "containers_of", "podman"]

BIN = Path(sys.executable).parent
PLAYBOOK = REPO / "playbooks" / "example_launch.yml"
RECAP = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+unreachable=(?P<unreachable>\d+)"
    r"\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)


@dataclass
class Run:
    """One finished ansible-playbook (or ansible) command."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str

    @property
    def output(self) -> str:
        return self.stdout + self.stderr

    @property
    def flat(self) -> str:
        """stdout with every run of whitespace as one space (the YAML callback folds long lines)."""
        return " ".join(self.stdout.split())

    def recap(self) -> dict[str, dict[str, int]]:
        """PLAY RECAP per host: ok, changed, unreachable, failed."""
        return {
            m["host"]: {k: int(m[k]) for k in ("ok", "changed", "unreachable", "failed")}
            for m in RECAP.finditer(self.stdout)
        }

    def changed(self) -> dict[str, int]:
        return {host: counts["changed"] for host, counts in self.recap().items()}

    def failed(self) -> dict[str, int]:
        return {host: counts["failed"] for host, counts in self.recap().items()}


@dataclass
class Fleet:
    """Cloudlets of one inventory group, and the inventory that reaches their controllers."""

    dir: Path
    stacks: list[Stack]
    token: str

    @property
    def names(self) -> list[str]:
        return [s.cloudlet for s in self.stacks]

    @property
    def inventory(self) -> Path:
        return self.dir / "inventory.yml"

    def write_inventory(self) -> None:
        credentials = self.dir / "credentials"
        credentials.mkdir(mode=0o700, exist_ok=True)
        token_file = credentials / "controller.token"
        token_file.write_text(self.token + "\n")
        token_file.chmod(0o600)
        hosts = "".join(
            f"    {s.cloudlet}:\n      cloudlet_controller_url: {s.controller_url}\n"
            f"      cloudlet_controller_api_url: {s.controller_url}\n" for s in self.stacks
        )
        self.inventory.write_text(
            "---\ncloudlets:\n  hosts:\n" + hosts
            + "  vars:\n"
            + "    ansible_connection: local\n"
            + f"    ansible_python_interpreter: {sys.executable}\n"
            + f"    cloudlet_credentials_dir: {credentials}\n"
        )

    def env(self, **extra: str) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
            ANSIBLE_NOCOLOR="1",
            ANSIBLE_FORCE_COLOR="0",
            ANSIBLE_LOCAL_TEMP=str(self.dir / "ansible-tmp"),
            ANSIBLE_REMOTE_TEMP=str(self.dir / "ansible-tmp"),
            ANSIBLE_RETRY_FILES_ENABLED="0",
        )
        # Only the test's own loopback controllers are contacted: no proxy, no outside settings.
        for name in ("CLOUDLET_CONTROLLER_URL", "CLOUDLET_CONTROLLER_TOKEN", "http_proxy", "HTTP_PROXY",
                     "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
            env.pop(name, None)
        env.update(extra)
        return env

    def playbook(self, *args: str, env: dict[str, str] | None = None, playbook: Path = PLAYBOOK) -> Run:
        """``ansible-playbook <playbook, default playbooks/example_launch.yml> -i <inventory> <args>``."""
        cmd = [str(BIN / "ansible-playbook"), "-i", str(self.inventory), str(playbook), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, env=env or self.env(), cwd=REPO, timeout=300)
        return Run(cmd, done.returncode, done.stdout, done.stderr)

    def module(self, host: str, module: str, args: dict[str, object], *extra: str,
               env: dict[str, str] | None = None) -> tuple[Run, dict[str, object]]:
        """Run one module ad hoc with ``ansible`` on ``host``; return the run and the module's result."""
        cmd = [str(BIN / "ansible"), host, "-i", str(self.inventory), "-m", module, *extra]
        if args:
            cmd += ["-a", json.dumps(args)]
        env = dict(env or self.env(), ANSIBLE_LOAD_CALLBACK_PLUGINS="1", ANSIBLE_STDOUT_CALLBACK="ansible.posix.json")
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
        run = Run(cmd, done.returncode, done.stdout, done.stderr)
        try:
            report = json.loads(done.stdout)
            result = report["plays"][0]["tasks"][0]["hosts"][host]
        except (ValueError, KeyError, IndexError) as exc:
            raise AssertionError(f"no JSON result from {cmd}: {exc}\n{run.output}") from None
        return run, result


async def start_fleet(tmp_path: Path, podman_socket: str, count: int) -> AsyncIterator[Fleet]:
    token = secrets.token_urlsafe(24)
    stacks: list[Stack] = []
    names = [f"cltest-{secrets.token_hex(4)}" for _ in range(count)]
    try:
        for name in names:
            directory = tmp_path / name
            directory.mkdir()
            stack = Stack(directory, name, podman_socket, token=token)
            # Distinct session port ranges for the cloudlets of one test.
            while any(abs(stack.port_base - other.port_base) < 50 for other in stacks):
                stack.port_base += 50
            stack.write_controller_config()
            stacks.append(stack)
            await stack.start_sessiond()
            await stack.start_controller()
        fleet = Fleet(tmp_path, stacks, token)
        fleet.write_inventory()
        yield fleet
    finally:
        for stack in stacks:
            await stack.close()
        for name in names:
            cleanup_cloudlet(name)
