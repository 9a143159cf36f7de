#!/usr/bin/env python3
"""Stand-in for ansible-test's get-pip.py bootstrap (ci-files.testing.ansible.com is unreachable here).

Bootstraps pip with the standard library's ensurepip (in a subprocess: ensurepip disables the pip
config of the process it runs in), then lets pip install what ansible-test asked for (pip==<version>)
from the configured index. get-pip's own options --no-setuptools/--no-wheel are dropped.
"""
import runpy
import subprocess
import sys

subprocess.check_call([sys.executable, "-m", "ensurepip", "--upgrade"], stdout=subprocess.DEVNULL)
args = [a for a in sys.argv[1:] if a not in ("--no-setuptools", "--no-wheel")]
sys.argv = ["pip", "install"] + args
runpy.run_module("pip", run_name="__main__", alter_sys=True)
