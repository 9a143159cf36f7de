"""Test support: one harness per thing the tests drive (tests/conftest.py holds the fixtures).

- ``sessiond``: backends driven by hand, in-process daemons, the control API (subprocess daemons
  come from ``cloudlet_bench.harness.sessiond``, the one sessiond harness, shared with the benches);
- ``controller``: a private podman and real sessiond + controller processes (``Stack``);
- ``backends``: an echo server for the tunnel tests; the private OpenSSH sshd is
  ``cloudlet_bench.harness.sshd``;
- ``netns``: a multi-host bed of network namespaces;
- ``k8s_fake``: the Kubernetes API test server (the one fake: no Kubernetes can run here);
- ``ansible_fleet``: real cloudlets plus a real ``ansible-playbook``.

Tests import these as ``from support.X import ...`` (pytest.ini puts tests/ on the path).
"""
