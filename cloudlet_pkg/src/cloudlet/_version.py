"""The package version, derived from the code: ``<release>+src.<hash of the package's files>``.

A change to any file of the package changes the version, so ``cloudlet --version``, the daemons'
``/v1/health`` and their ``cloudlet_build_info`` metric show which code runs on a node (an upgrade
is visible). The installed wheel holds the same files as the source tree it was built from, so both
give the same hash. Compiled caches are left out.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

RELEASE = "0.3.0"


def source_hash(root: Path | None = None) -> str:
    """SHA-256 over the package's files (relative path and contents), in a stable order; 12 hex."""
    base = root or Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(p for p in base.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                       and p.suffix not in (".pyc", ".pyo")):
        h.update(path.relative_to(base).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:12]


VERSION = f"{RELEASE}+src.{source_hash()}"
