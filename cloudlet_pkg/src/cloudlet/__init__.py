"""Handover-capable container cloudlets (controller, session daemon, tunnels, client)."""

from cloudlet._version import VERSION as __version__

__all__ = ["__version__"]
