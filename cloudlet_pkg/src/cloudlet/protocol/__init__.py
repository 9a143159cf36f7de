"""What both ends of a session agree on: the wire format (``wire``), credentials, and the replay ring."""
