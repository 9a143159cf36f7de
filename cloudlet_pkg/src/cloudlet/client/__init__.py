"""The device side: the session client library (re-exported here) and ``cloudlet agent``.

``from cloudlet.client import SessionClient`` is the public API; nothing here imports the relay,
the sessiond or the controller.
"""

from cloudlet.client.library import SessionClient, SessionRefused, attach, end_session
from cloudlet.protocol.wire import Reply

__all__ = ["Reply", "SessionClient", "SessionRefused", "attach", "end_session"]
