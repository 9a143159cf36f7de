"""Host and port strings: the one parser for ``HOST:PORT`` and ``[V6]:PORT``, and loopback checks."""

from __future__ import annotations

import ipaddress


def parse_hostport(value: str, what: str = "address") -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``; ValueError with a clear message."""
    host, sep, port_s = value.rpartition(":")
    if not sep or not host or not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"{what} {value!r} is not HOST:PORT")
    return host.strip("[]"), int(port_s)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (``127.0.0.0/8``, ``::1``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def format_address(addr: tuple[str, int] | None) -> str | None:
    """``("127.0.0.1", 80)`` -> ``"127.0.0.1:80"`` (IPv6 hosts in brackets); None stays None."""
    if addr is None:
        return None
    host = f"[{addr[0]}]" if ":" in addr[0] else addr[0]
    return f"{host}:{addr[1]}"
