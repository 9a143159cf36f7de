"""SSH tunnels to peer cloudlets: warm asyncssh connections, one channel per forwarded session.

``SshPeerConnector`` keeps one long-lived SSH connection per peer (``[peers.NAME]`` tables with
``transport = "ssh"``, see docs/tunnels.md). A forwarded session opens a ``direct-tcpip`` channel
on the warm connection to the peer's *peer endpoint* (its sessiond ``peer_listen``, loopback on
the peer), so a handover never waits for an SSH handshake. When a tunnel is down, ``open()``
refuses at once with ``PeerUnavailable`` (status ``PEER_UNAVAILABLE``); the connection task
reconnects by itself with capped exponential backoff.

The peer side is the system OpenSSH sshd with a dedicated tunnel account whose key may only open
the peer endpoint (``restrict,port-forwarding,permitopen="127.0.0.1:PORT"``). Host keys are always
checked against the configured ``known_hosts`` file; an unknown or changed key refuses the tunnel.

Modules: ``config`` (the ``[peers.NAME]`` table), ``peer`` (one warm connection), ``channel`` (a
forwarded session's channel as a stream pair), ``connector`` (the relay's ``PeerConnector``),
``metrics``, ``keys``; ``_fastpath`` is private (docs/tunnels.md).
"""
