"""The package's shape: imports go one way between layers, no cycles, no scaffolding in the node wheel,
and the device side installs and runs with only its own dependencies.

docs/architecture.md draws the layers; ``LAYERS`` below is the same table, checked.
"""

from __future__ import annotations

import ast
import asyncio
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from cloudlet.protocol import credentials
from support.sessiond import SECRET, Backend

REPO = Path(__file__).resolve().parents[1]
PKG = REPO / "cloudlet_pkg" / "src" / "cloudlet"

# layer -> the layers it may import (besides itself). A module's layer is its first package below
# `cloudlet` (or the module itself for top-level modules).
LAYERS: dict[str, set[str]] = {
    "common": set(),
    "protocol": {"common"},
    "_version": set(),  # the version derived from the code: anything may read it
    "relay": {"common", "protocol", "_version"},
    "tunnel": {"common", "protocol", "relay.hop"},  # it implements the relay's PeerConnector
    "sessiond": {"common", "protocol", "relay", "tunnel", "_version"},
    "controller": {"common", "protocol", "_version"},
    "client": {"common", "protocol"},
    "images": set(),
    "status": {"_version"},  # asks the daemons over their APIs, imports neither
    "cli": {"*"},  # the command dispatcher registers every component (lazily)
    "__main__": {"cli"},
    "__init__": {"_version"},
}
DEVICE_SIDE_THIRD_PARTY = {"aiohttp", "uvloop"}


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PKG.rglob("*.py")}


def imports_of(path: Path, name: str) -> Iterator[str]:
    """Every module ``path`` imports (lazy and TYPE_CHECKING imports too), absolute names."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[: len(base) - node.level + (1 if is_pkg else 0)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod
            yield from (f"{mod}.{a.name}" for a in node.names)


def internal_graph() -> dict[str, set[str]]:
    mods = modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps: set[str] = set()
        for target in imports_of(path, name):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("cloudlet") and not name.startswith(target + "."):
                deps.add(target)
        graph[name] = deps
    return graph


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles() -> None:
    assert cycles(internal_graph()) == []


def test_cycle_finder_finds_a_planted_cycle() -> None:
    graph = internal_graph()
    graph["cloudlet.common.names"] = graph["cloudlet.common.names"] | {"cloudlet.protocol.wire"}
    assert ["cloudlet.common.names", "cloudlet.protocol.wire"] in cycles(graph)


def test_layers_import_only_what_they_may() -> None:
    wrong = []
    for module, deps in internal_graph().items():
        layer = layer_of(module)
        allowed = LAYERS.get(layer)
        assert allowed is not None, f"{module}: layer {layer!r} missing from LAYERS (and from docs/architecture.md)"
        if "*" in allowed:
            continue
        for dep in deps:
            dep_layer = layer_of(dep)
            if dep_layer == layer:
                continue
            ok = dep_layer in allowed or any(dep == f"cloudlet.{a}" or dep.startswith(f"cloudlet.{a}.") for a in allowed)
            if not ok:
                wrong.append(f"{module} -> {dep}")
    assert not wrong, "imports against the layering (docs/architecture.md): " + ", ".join(sorted(wrong))


def test_device_side_imports_only_device_side_libraries() -> None:
    """The agent, the client library and what they use import nothing of the node's dependencies."""
    mods = modules()
    graph = internal_graph()
    seen: set[str] = set()
    todo = ["cloudlet.client.agent_cli", "cloudlet.client.agent", "cloudlet.client.cli", "cloudlet.client"]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        todo.extend(graph[m])
    third_party: dict[str, set[str]] = {}
    for m in seen:
        for target in imports_of(mods[m], m):
            top = target.split(".")[0]
            if top and top != "cloudlet" and top not in sys.stdlib_module_names:
                third_party.setdefault(top, set()).add(m)
    assert set(third_party) <= DEVICE_SIDE_THIRD_PARTY, third_party
    assert not {layer_of(m) for m in seen} & {"relay", "sessiond", "tunnel", "controller"}


# -- the wheel and the device venv ------------------------------------------------------------------


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The product wheel and the device-side dependencies (``pip wheel`` of the plain package)."""
    out = tmp_path_factory.mktemp("wheels")
    run = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check", "-w", str(out), str(REPO / "cloudlet_pkg")],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "SOURCE_DATE_EPOCH": "315532800"},
    )
    if run.returncode != 0 and "No matching distribution" in run.stderr + run.stdout:
        pytest.skip(f"cannot fetch the device-side dependencies from the package index: {run.stderr[-300:]}")
    assert run.returncode == 0, run.stderr
    return out


def test_node_wheel_has_no_test_or_bench_code(wheelhouse: Path) -> None:
    (wheel,) = wheelhouse.glob("cloudlet-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    code = [n for n in names if n.startswith("cloudlet/")]
    assert "cloudlet/relay/session.py" in code and "cloudlet/client/agent.py" in code  # the listing is real
    suspicious = [n for n in code if any(w in n.lower() for w in ("bench", "sshd", "test", "fake", "harness", "conftest"))]
    assert suspicious == []
    for n in code:  # and nothing that starts a test sshd or creates accounts
        if n.endswith(".py"):
            text = zipfile.ZipFile(wheel).read(n).decode()
            assert "useradd" not in text and "wait_up" not in text, n
    metadata = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("/METADATA"))).decode()
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    base = [r for r in requires if "extra ==" not in r]
    assert base and all("aiohttp" in r for r in base), base  # the device side needs aiohttp only
    assert any("kubernetes" in r and 'extra == "kubernetes"' in r for r in requires)
    assert any("asyncssh" in r and 'extra == "node"' in r for r in requires)


@pytest.fixture(scope="module")
def device_venv(wheelhouse: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    run = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--disable-pip-version-check",
         "--find-links", str(wheelhouse), "cloudlet"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return venv


def test_device_venv_holds_only_device_side_dependencies(device_venv: Path) -> None:
    out = subprocess.run([str(device_venv / "bin" / "pip"), "list", "--format", "json"],
                         capture_output=True, text=True, check=True, timeout=60)
    installed = {p["name"].lower() for p in json.loads(out.stdout)}
    assert "cloudlet" in installed and "aiohttp" in installed
    assert not installed & {"asyncssh", "cryptography", "prometheus-client", "pydantic", "kubernetes", "cloudlet-bench"}
    # the node's commands say what to install instead of failing with a traceback
    sd = subprocess.run([str(device_venv / "bin" / "cloudlet"), "sessiond", "--config", "/nonexistent"],
                        capture_output=True, text=True, timeout=60)
    assert sd.returncode == 2 and "pip install 'cloudlet[node]'" in sd.stderr and "Traceback" not in sd.stderr


async def test_agent_from_the_device_venv_carries_a_program(device_venv: Path, make_sessiond, tmp_path: Path) -> None:
    """`cloudlet agent` from the device venv relays a real connection through a real sessiond."""
    echo = await Backend(echo=True).start()
    try:
        a = await make_sessiond("a")
        entry, _ = await a.put_service("echo", echo.address)
        cred = tmp_path / "cred"
        cred.write_text(credentials.issue(SECRET, "echo", "a").token)
        agent = await asyncio.create_subprocess_exec(
            str(device_venv / "bin" / "cloudlet"), "agent", "run", "--listen", "127.0.0.1:0",
            "--cloudlet", f"a=127.0.0.1:{entry.port}", "--credential-file", str(cred),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        try:
            assert agent.stdout is not None
            line = await asyncio.wait_for(agent.stdout.readline(), 60)
            assert line, (await agent.stderr.read()).decode() if agent.stderr else ""
            port = int(json.loads(line)["listen"].rsplit(":", 1)[1])
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            payload = os.urandom(200_000)
            writer.write(payload)
            got = await asyncio.wait_for(reader.readexactly(len(payload)), 30)
            assert got == payload
            writer.close()
        finally:
            agent.terminate()
            await agent.wait()
    finally:
        await echo.stop()
