"""Handover-capable container cloudlets (controller, session daemon, tunnels, client)."""

__version__ = "0.2.0"
