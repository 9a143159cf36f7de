"""The Session Service daemon: config, daemon lifecycle, control API, peer connectors, command line."""
