#!/usr/bin/env python3
"""Stand-in for ansible-test's get-pip.py bootstrap (ci-files.testing.ansible.com is unreachable here).

Two uses:

``python ansible_test_get_pip.py --install-cache``
    Run with the Python that has ansible-test installed (`make sanity-collection` does this). Copies
    this file to the path where that ansible-test looks for a cached bootstrap script,
    ``~/.ansible/test/cache/get_pip_<pip version with underscores>.py``, and prints the path. The pip
    version comes from the installed ansible-test (``get_venv_packages``), so an ansible-core upgrade
    that moves the pin needs no edit here. ansible-test has no option or environment variable for this
    path or for the download URL (both are fixed in ``_util/target/setup/requirements.py``); only
    ``HOME`` moves it, together with every other ansible-test cache.

``python get_pip_<version>.py [pip options] pip==<version> --no-setuptools --no-wheel``
    How ansible-test runs the cached copy inside each new virtualenv: bootstraps pip with the
    standard library's ensurepip (in a subprocess: ensurepip disables the pip config of the process it
    runs in), then lets pip install what ansible-test asked for from the configured index. get-pip's
    own options --no-setuptools/--no-wheel are dropped.
"""

from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys

INSTALL_FLAG = "--install-cache"
# The cache path as ansible-test's requirements.py builds it; checked against its source below.
CACHE_TEMPLATE = "~/.ansible/test/cache/get_pip_%s.py"


def install_cache() -> str:
    """Copy this script to where the installed ansible-test looks for its pip bootstrap script."""
    import pathlib
    import types

    import ansible_test
    from ansible_test._internal.python_requirements import get_venv_packages

    source = (
        pathlib.Path(ansible_test.__file__).parent
        / "_util"
        / "target"
        / "setup"
        / "requirements.py"
    )
    if CACHE_TEMPLATE not in source.read_text(encoding="utf-8"):
        sys.exit(
            f"ansible_test_get_pip: {source} no longer builds its cache path as {CACHE_TEMPLATE!r}; "
            "update CACHE_TEMPLATE in this script"
        )
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    pip_version = get_venv_packages(types.SimpleNamespace(version=version))["pip"]
    target = os.path.expanduser(CACHE_TEMPLATE % pip_version.replace(".", "_"))
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.copyfile(__file__, target)
    return target


def bootstrap(args: list[str]) -> None:
    """Act as get-pip.py: ensurepip, then `pip install <args>` from the configured index."""
    subprocess.check_call(
        [sys.executable, "-m", "ensurepip", "--upgrade"], stdout=subprocess.DEVNULL
    )
    sys.argv = ["pip", "install"] + [
        a for a in args if a not in ("--no-setuptools", "--no-wheel")
    ]
    runpy.run_module("pip", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    if sys.argv[1:] == [INSTALL_FLAG]:
        print(install_cache())
    else:
        bootstrap(sys.argv[1:])
