"""The session relay: sessions that outlive connections, the forwarding pipe, the splice fast path.

Layering inside: ``metrics``, ``splice`` and ``hop`` are leaves; ``session`` uses them; ``manager``
holds sessions; ``forward`` and ``connection`` are the per-connection protocols on top.
"""
