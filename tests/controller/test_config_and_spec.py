"""Controller config loading and service spec validation (pure functions, no processes)."""

from __future__ import annotations

import subprocess
import sys

import pytest
from cloudlet.controller.config import ConfigError, from_dict, load
from cloudlet.controller.runtime.base import ServiceSpec, SpecError


def test_defaults_and_full_config(tmp_path) -> None:
    cfg = from_dict({"controller": {"cloudlet": "a"}})
    assert cfg.listen == "127.0.0.1:8700" and cfg.runtime == "podman" and cfg.port_range == (31000, 31999)
    assert cfg.podman.socket == "/run/podman/podman.sock" and cfg.podman.network == ""
    assert cfg.kubernetes.kubeconfig == "/etc/rancher/k3s/k3s.yaml" and cfg.kubernetes.namespace == "default"
    path = tmp_path / "c.toml"
    path.write_text(
        '[controller]\ncloudlet = "edge-1"\nlisten = "0.0.0.0:9000"\nruntime = "kubernetes"\n'
        'tls_cert_file = "/etc/c.crt"\ntls_key_file = "/etc/c.key"\n'
        'port_range = [32000, 32010]\nready_timeout_seconds = 12\nreconcile_interval_seconds = 2.5\n'
        'session_host = "192.0.2.1"\nmax_services = 7\n'
        '[podman]\nsocket = "/tmp/p.sock"\nnetwork = "net1"\n'
        '[kubernetes]\nkubeconfig = "in-cluster"\nnamespace = "edge"\ncontext = "k3s"\n'
    )
    cfg = load(path)
    assert (cfg.cloudlet, cfg.listen_host_port, cfg.runtime) == ("edge-1", ("0.0.0.0", 9000), "kubernetes")
    assert cfg.port_range == (32000, 32010) and cfg.ready_timeout_seconds == 12.0
    assert cfg.reconcile_interval_seconds == 2.5 and cfg.session_host == "192.0.2.1" and cfg.max_services == 7
    assert (cfg.podman.socket, cfg.podman.network) == ("/tmp/p.sock", "net1")
    assert (cfg.kubernetes.kubeconfig, cfg.kubernetes.namespace, cfg.kubernetes.context) == ("in-cluster", "edge", "k3s")


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({}, "controller.cloudlet: required key is missing"),
        ({"controller": {"cloudlet": "A"}}, "controller.cloudlet: invalid name 'A'"),
        ({"controller": {"cloudlet": "a", "lisen": "x"}}, "controller.lisen: unknown key"),
        ({"controller": {"cloudlet": "a"}, "extra": {}}, "[extra]: unknown table"),
        ({"controller": {"cloudlet": "a", "runtime": "docker"}}, "controller.runtime: Input should be 'podman' or 'kubernetes'"),
        ({"controller": {"cloudlet": "a", "port_range": [2, 1]}}, "controller.port_range: must be [first, last] with first <= last"),
        ({"controller": {"cloudlet": "a", "listen": "nope"}}, "controller.listen: address 'nope' is not HOST:PORT"),
        ({"controller": {"cloudlet": "a", "ready_timeout_seconds": 0}}, "controller.ready_timeout_seconds: Input should be greater than 0"),
        ({"controller": {"cloudlet": "a", "token_file": 5}}, "controller.token_file: Input should be a valid string (got 5)"),
        ({"controller": {"cloudlet": "a"}, "podman": {"sock": "x"}}, "podman.sock: unknown key"),
        ({"controller": {"cloudlet": "a", "runtime_events": "yes"}},
         "controller.runtime_events: Input should be a valid boolean (got 'yes')"),
        ({"controller": {"cloudlet": "a", "event_debounce_seconds": -1}},
         "controller.event_debounce_seconds: Input should be greater than or equal to 0"),
        ({"controller": {"cloudlet": "a", "event_debounce_seconds": True}},
         "controller.event_debounce_seconds: Input should be a valid number (got True)"),
    ],
)
def test_bad_config_is_a_clear_error(data: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    assert needle in str(info.value)


def test_every_problem_is_reported_at_once_with_its_key() -> None:
    with pytest.raises(ConfigError) as info:
        from_dict({"controller": {"cloudlet": "a", "ready_timeout_seconds": "ten", "colour": 1, "port_range": [1]},
                   "podman": {"socket": 5}, "kubernetes": "x"})
    assert info.value.problems == ["[kubernetes]: must be a table"]  # the file's shape first
    with pytest.raises(ConfigError) as info:
        from_dict({"controller": {"cloudlet": "a", "ready_timeout_seconds": "ten", "colour": 1, "port_range": [1]},
                   "podman": {"socket": 5}})
    text = str(info.value)
    assert text.startswith("controller config: 4 problems:")
    for needle in ("controller.ready_timeout_seconds: Input should be a valid number (got 'ten')",
                   "controller.colour: unknown key", "controller.port_range", "podman.socket: Input should be a valid string"):
        assert needle in text


def test_runtime_events_keys() -> None:
    cfg = from_dict({"controller": {"cloudlet": "a"}})
    assert cfg.runtime_events is True and cfg.event_debounce_seconds == 0.05
    cfg = from_dict({"controller": {"cloudlet": "a", "runtime_events": False, "event_debounce_seconds": 0}})
    assert cfg.runtime_events is False and cfg.event_debounce_seconds == 0.0


def test_unreadable_and_invalid_files(tmp_path) -> None:
    with pytest.raises(ConfigError, match="missing.toml: cannot read config"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[controller\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(bad)


def test_check_config_command(tmp_path) -> None:
    (tmp_path / "token").write_text("t" * 32)
    (tmp_path / "secret").write_text("s" * 32)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[controller]\ncloudlet = "a"\ntoken_file = "{tmp_path}/token"\nsecret_file = "{tmp_path}/secret"\n')
    run = [sys.executable, "-m", "cloudlet", "controller", "--config", str(cfg), "--check-config"]
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 0 and "is valid (cloudlet a, runtime podman)" in proc.stdout
    (tmp_path / "token").write_text("short")
    proc = subprocess.run(run, capture_output=True, text=True)
    assert proc.returncode == 2 and "shorter than 16" in proc.stderr


def test_spec_is_canonical_and_hash_ignores_order() -> None:
    a = ServiceSpec.from_request("s", {"image": "i", "port": 1, "env": {"B": "2", "A": "1"}, "limits": {"cpus": 1}})
    b = ServiceSpec.from_request("s", {"limits": {"cpus": 1.0}, "env": {"A": "1", "B": "2"}, "port": 1, "image": "i"})
    assert a == b and a.hash() == b.hash() and len(a.hash()) == 32
    assert a.to_json() == {"name": "s", "image": "i", "port": 1, "env": {"A": "1", "B": "2"},
                           "limits": {"cpus": 1.0, "memory_mb": None}}
    assert ServiceSpec.from_json(a.to_json()) == a
    c = ServiceSpec.from_request("s", {"image": "i", "port": 2})
    assert c.hash() != a.hash()


@pytest.mark.parametrize(
    ("name", "body", "needle"),
    [
        ("-x", {"image": "i", "port": 1}, "invalid service name"),
        ("x" * 33, {"image": "i", "port": 1}, "invalid service name"),
        ("x", [], "JSON object"),
        ("x", {"image": "", "port": 1}, "image must be"),
        ("x", {"image": "i", "port": 0}, "port must be"),
        ("x", {"image": "i", "port": True}, "port must be"),
        ("x", {"image": "i", "port": 1, "env": {"A": 1}}, "env A must be a string"),
        ("x", {"image": "i", "port": 1, "env": {f"E{i}": "" for i in range(65)}}, "at most 64"),
        ("x", {"image": "i", "port": 1, "limits": {"memory_mb": 1}}, "limits.memory_mb"),
        ("x", {"image": "i", "port": 1, "limits": {"gpus": 1}}, "limits must be"),
        ("x", {"image": "i", "port": 1, "name": "y"}, "differs from the URL"),
    ],
)
def test_bad_spec(name: str, body: object, needle: str) -> None:
    with pytest.raises(SpecError) as info:
        ServiceSpec.from_request(name, body)
    assert needle in str(info.value)
