"""Key material for the tunnels."""

from __future__ import annotations

import os

import asyncssh


def generate_client_key(path: str) -> str:
    """Write a new ed25519 client key (0600) and its ``.pub``; return the public key line."""
    key = asyncssh.generate_private_key("ssh-ed25519", comment="cloudlet-tunnel")
    key.write_private_key(path)
    os.chmod(path, 0o600)
    key.write_public_key(path + ".pub")
    return key.export_public_key().decode().strip()
