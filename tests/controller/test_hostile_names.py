"""Hostile service names on every controller route, against real podman, with decoy containers.

The path traversal this guards against: ``DELETE /v1/services/%2F..%2F<container>`` once reached
podman as ``/containers/cloudlet-<c>-/../<container>`` and removed an unrelated container. Every
route with a service name must refuse a bad name with 400 before anything runs, and the podman
runtime must only ever touch containers that carry this cloudlet's labels.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from cloudlet.controller.runtime.base import BadName
from cloudlet.controller.runtime.podman import PodmanRuntime
from support.controller import Stack, podman

pytestmark = [pytest.mark.podman, pytest.mark.slow]


def _running(name: str) -> bool:
    out = podman("inspect", "--format", "{{.State.Running}}", name, check=False)
    return out.returncode == 0 and out.stdout.strip() == "true"


@pytest.fixture
def decoy(demo_image: str) -> Iterator[str]:
    """A running container with no cloudlet labels, that no controller may ever touch."""
    name = f"cltest-decoy-{secrets.token_hex(4)}"
    podman("run", "-d", "--name", name, "-e", "PORT=7000", demo_image)
    try:
        assert _running(name)
        yield name
    finally:
        podman("rm", "-f", "-t", "0", name, check=False)


def hostile_names(decoy: str, decoy_id: str) -> list[str]:
    """URL path segments (already percent-encoded) that must never be taken for a service name."""
    return [
        f"%2F..%2F{decoy}",  # the reported traversal: cloudlet-<c>-/../<decoy>
        f"%2F..%2F..%2F{decoy}",
        f"%2F..%2F{decoy_id[:12]}",  # podman also resolves ID prefixes
        f"..%2F{decoy}",
        f"%2E%2E%2F{decoy}",
        "%2E%2E",
        "a%2Fb",
        "a%00",
        "a%00b",
        "a%20b",
        "%20demo",
        "demo%0A",  # a trailing newline passes re.match(r"...$")
        "d%C3%A9mo",  # unicode: démo
        "%EF%BD%84emo",  # fullwidth d
        "Demo",
        "-demo",
        "a" * 33,
        "a" * 5000,
        "a.b",
        "a%3Fb",
        "a%25b",
    ]


async def test_every_route_refuses_hostile_names_and_touches_nothing(stack: Stack, demo_image: str, decoy: str) -> None:
    decoy_id = podman("inspect", "--format", "{{.Id}}", decoy).stdout.strip()
    # a container with this controller's exact container name, but not carrying its labels
    impostor = f"cloudlet-{stack.cloudlet}-victim"
    podman("run", "-d", "--name", impostor, "-e", "PORT=7000", demo_image)
    try:
        routes = [
            ("GET", "/v1/services/{}"),
            ("PUT", "/v1/services/{}"),
            ("DELETE", "/v1/services/{}"),
            ("POST", "/v1/services/{}/sessions"),
        ]
        body = {"image": demo_image, "port": 7000, "env": {"PORT": "7000"}}
        answers: dict[tuple[str, str], tuple[int, object]] = {}
        for bad in hostile_names(decoy, decoy_id):
            for method, template in routes:
                status, err = await stack.api(method, template.format(bad), body if method == "PUT" else None)
                answers[(method, bad[:40])] = (status, err)
        assert _running(decoy), "the decoy container was touched"
        assert _running(impostor), "a container without this cloudlet's labels was touched"
        wrong = {k: v for k, v in answers.items()
                 if v[0] != 400 or not isinstance(v[1], dict) or v[1]["error"]["code"] != "bad_request"}
        assert not wrong, wrong
        status, err = answers[("DELETE", f"%2F..%2F{decoy}"[:40])]
        assert "invalid service name" in err["error"]["message"]  # type: ignore[index]

        # a valid name whose container exists but is not this cloudlet's: not found, not removed
        status, err = await stack.api("DELETE", "/v1/services/victim")
        assert status == 404, err
        status, err = await stack.api("GET", "/v1/services/victim")
        assert status == 404, err

        assert _running(decoy), "the decoy container was touched"
        assert _running(impostor), "a container without this cloudlet's labels was touched"
        status, listed = await stack.api("GET", "/v1/services")
        assert status == 200 and listed["services"] == []  # type: ignore[index]
        assert await stack.registered() == {}
        # unauthenticated requests learn nothing about names: 401 first
        status, err = await stack.api("DELETE", f"/v1/services/%2F..%2F{decoy}", token=None)
        assert status == 401
    finally:
        podman("rm", "-f", "-t", "0", impostor, check=False)


async def test_podman_runtime_acts_only_on_its_own_labelled_containers(
    podman_socket: str, demo_image: str, cloudlet_name: str, decoy: str
) -> None:
    rt = PodmanRuntime(cloudlet_name, podman_socket)
    # same container name, this cloudlet's label, another service's label: still not "victim"
    other = f"cloudlet-{cloudlet_name}-victim"
    podman("run", "-d", "--name", other, "-e", "PORT=7000",
           "--label", f"cloudlet.cloudlet={cloudlet_name}", "--label", "cloudlet.service=other", demo_image)
    try:
        for bad in (f"/../{decoy}", "..", f"x/../../{decoy}", "a\x00", "a b", "démo", "a" * 33, "victim\n"):
            with pytest.raises(BadName):
                await rt.delete(bad)
            with pytest.raises(BadName):
                await rt.get(bad)
        assert await rt.delete("victim") is False
        assert await rt.get("victim") is None
        assert _running(decoy) and _running(other)
    finally:
        await rt.close()
