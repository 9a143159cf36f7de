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


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, interval: float = 10.0) -> None:
    """One log line per ``interval`` (with a count) for asyncio's "socket.accept() out of system
    resource" errors, instead of a traceback per failed accept; other errors as before."""
    import logging

    from cloudlet.common.logs import Throttle

    throttle = Throttle(logging.getLogger("cloudlet.accept"), interval)
    previous = loop.get_exception_handler()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            throttle.event(logging.ERROR, "out of descriptors: accepting paused for a second", "accept",
                           error=str(context.get("exception")))
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
