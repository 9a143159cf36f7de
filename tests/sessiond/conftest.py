"""Fixtures for the session daemon tests (helpers live in sessiond_helpers.py)."""

from sessiond_helpers import backend, echo_backend, make_sessiond, secret_file  # noqa: F401 - fixtures
