"""Event loop choice and descriptor limits for the daemons and the agent (no third-party imports)."""

from __future__ import annotations

import asyncio


# -- command line ----------------------------------------------------------------------------
def use_fast_loop(choice: str = "auto") -> None:
    """Install uvloop's event loop policy when asked for (``auto``: if it is installed)."""
    if choice == "asyncio":
        return
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise SystemExit("--loop uvloop: uvloop is not installed (pip install 'cloudlet[uvloop]')") from None
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def raise_nofile_limit(want: int = 1 << 20) -> int:
    """Raise RLIMIT_NOFILE as far as allowed (each session holds two sockets)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for target in (want, hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), max(hard, target)))
            return max(soft, target)
        except (ValueError, OSError):
            continue
    return soft
