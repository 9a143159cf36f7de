"""Harnesses shared by the benchmarks and the tests: a private OpenSSH sshd (``sshd``) and sessiond
subprocesses with their configs (``sessiond``). Never installed on a cloudlet node."""
